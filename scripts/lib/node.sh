# Sourced by the bench scripts: one `opmesh serve` on a free loopback port.
# Needs BIN (the opmesh binary) and WORK (a scratch directory); sets NODE (its pid) and
# TARGET (its URL). The caller's EXIT trap should call stop_node.

# Below the kernel's range for outgoing connections (32768-60999 on Linux), which no
# connection of another process takes between the check and the node's bind.
free_port() {
    local p
    for p in $(shuf -i 20000-32767 -n 100); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    echo "$(basename "$0"): no free port found" >&2
    exit 1
}

# start_node [VAR=VALUE ...] [-- SERVE ARGS ...]: starts `opmesh serve` with those
# environment settings and arguments and waits until it listens. A port taken between
# the check and the bind is tried again with another.
start_node() {
    local envs=() args=() port attempt
    while [ $# -gt 0 ]; do
        if [ "$1" = -- ]; then
            shift
            args=("$@")
            break
        fi
        envs+=("$1")
        shift
    done
    for attempt in 1 2 3 4 5; do
        port=$(free_port)
        env "${envs[@]}" RUST_LOG=warn "$BIN" serve --http-addr "127.0.0.1:$port" "${args[@]}" \
            >"$WORK/node.log" 2>&1 &
        NODE=$!
        TARGET="http://127.0.0.1:$port"
        local deadline=$((SECONDS + 30))
        until grep -qs "opmesh listening on" "$WORK/node.log"; do
            if ! kill -0 "$NODE" 2>/dev/null; then
                wait "$NODE" 2>/dev/null || true
                NODE=""
                if grep -qs "Address already in use" "$WORK/node.log"; then
                    continue 2
                fi
                break 2
            fi
            if [ $SECONDS -ge $deadline ]; then
                break 2
            fi
            sleep 0.1
        done
        return
    done
    echo "$(basename "$0"): the node did not start: $(cat "$WORK/node.log")" >&2
    exit 1
}

stop_node() {
    if [ -n "${NODE:-}" ]; then
        kill "$NODE" 2>/dev/null || true
        wait "$NODE" 2>/dev/null || true
        NODE=""
    fi
}

# The release binary: OPMESH_BIN, or the one under CARGO_TARGET_DIR or target/, built if
# missing.
release_bin() {
    local bin=${OPMESH_BIN:-${CARGO_TARGET_DIR:-target}/release/opmesh}
    if [ ! -x "$bin" ]; then
        if [ -n "${OPMESH_BIN:-}" ]; then
            echo "$(basename "$0"): OPMESH_BIN=$OPMESH_BIN is not an executable" >&2
            exit 2
        fi
        cargo build --release -p opmesh >&2
    fi
    echo "$bin"
}
