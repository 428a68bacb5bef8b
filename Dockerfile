# syntax=docker/dockerfile:1
#
# The opmesh image: `docker build -t opmesh:dev .` (see README, "Deploy to Kubernetes").
# Two stages: a builder with the Rust toolchain, and a runtime with nothing but the C
# runtime libraries the binary links (glibc, libgcc), a non-root user and no shell.

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src

# The dependencies first, in a layer of their own: it is rebuilt only when a manifest or
# the lock file changes, not on every source change. The workspace's members and the
# targets their manifests declare are stubbed so that cargo can build the dependencies.
COPY Cargo.toml Cargo.lock ./
COPY actors/Cargo.toml actors/
COPY cluster/Cargo.toml cluster/
RUN mkdir -p src actors/src cluster/src benches cluster/benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs actors/src/lib.rs cluster/src/lib.rs \
    && for b in benches/micro benches/cluster benches/tracing cluster/benches/codec cluster/benches/link; do \
           echo 'fn main() {}' > "$b.rs"; \
       done \
    && cargo build --release --locked --bin opmesh \
    && rm -rf src actors/src cluster/src

# Then opmesh itself. `touch` makes cargo rebuild the crates whose stubs it compiled.
COPY actors/src actors/src
COPY cluster/src cluster/src
COPY src src
COPY config config
RUN touch src/main.rs src/lib.rs actors/src/lib.rs cluster/src/lib.rs \
    && cargo build --release --locked --bin opmesh \
    && cp target/release/opmesh /opmesh

# distroless `cc`: glibc and libgcc, CA certificates, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /opmesh /usr/local/bin/opmesh
# The built-in defaults and the workload profiles, for reference and `--config`.
COPY config /usr/share/opmesh/config
# distroless' `nonroot` user, by number so that Kubernetes can check runAsNonRoot.
USER 65532:65532
# 7070: the HTTP api, dashboard, probes and metrics. 7071: the cluster port.
EXPOSE 7070 7071
ENTRYPOINT ["opmesh"]
CMD ["serve"]
