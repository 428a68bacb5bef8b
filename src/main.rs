//! The `opmesh` binary: parses the command line and runs it.

use std::process::ExitCode;

// glibc malloc stalls on frees from other threads, which the actors do all the time;
// mimalloc took in-process throughput from 0.6M to 1.3M ops/s and p99 from 4 ms to
// 0.5 ms (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use opmesh::cli::{Cli, Command, ServeArgs};
use opmesh::{api, config, handlers, Node};

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("received SIGINT"),
        _ = term => tracing::info!("received SIGTERM"),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let cfg = match config::load(&config::LoadOptions {
        profile: args.profile,
        config_file: args.config,
        http_addr: args.http_addr,
        node_id: args.node_id,
        cluster_addr: args.cluster_addr,
        join: args.join,
        cluster_secret: args.cluster_secret,
        data_dir: args.data_dir,
        otlp_endpoint: args.otlp_endpoint,
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("opmesh: configuration error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    // The HTTP port is bound first: the cluster registry carries its real address.
    let listener = match std::net::TcpListener::bind(cfg.http.addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("opmesh: cannot listen on {}: {e}", cfg.http.addr);
            return Ok(ExitCode::from(1));
        }
    };
    let http_addr = listener.local_addr()?;
    let telemetry = match opmesh::telemetry::Telemetry::start(&cfg.telemetry, &cfg.node_id) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("opmesh: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    opmesh::logging::init(telemetry.otel_layer());
    if let Some(t) = &cfg.telemetry.traces {
        tracing::info!(endpoint = %t.endpoint, protocol = t.protocol.as_str(), sampling_ratio = t.sampling_ratio, "exporting traces");
    }
    let builder = Node::builder()
        .node_id(cfg.node_id.as_str())
        .config(cfg.engine.clone())
        .tracing(telemetry.tracing());
    let builder = handlers::register_builtins(builder, &cfg.http_handlers);
    let cluster = match &cfg.cluster {
        None => None,
        Some(c) => {
            let handlers = builder.handler_types();
            let serves = if c.serves.is_empty() {
                handlers
            } else {
                if let Some(t) = c
                    .serves
                    .iter()
                    .find(|t| !handlers.iter().any(|h| &**h == t.as_str()))
                {
                    eprintln!("opmesh: configuration error: cluster.serves lists `{t}`, which has no handler on this node (handlers: {})",
                        handlers.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(", "));
                    return Ok(ExitCode::from(2));
                }
                c.serves.iter().map(|t| t.as_str().into()).collect()
            };
            let cc = opmesh_cluster::ClusterConfig {
                node: cfg.node_id.clone(),
                cluster_id: c.id.clone(),
                secret: opmesh_cluster::Secret::new(c.secret.expose().to_vec()),
                listen: c.addr,
                advertise: c.advertise.clone(),
                http_addr: http_addr.to_string(),
                join: c.join.clone(),
                data_dir: c.data_dir.clone(),
                serves,
                heartbeat: c.heartbeat,
                down_after: c.down_after,
                write_timeout: c.write_timeout,
                election_timeout: c.election_timeout,
                voters: c.voters.try_into()?,
                flush_bytes: c.flush_bytes,
                linger: c.linger,
                max_frame: c.max_frame,
                reconnect_min: opmesh_cluster::ClusterConfig::DEFAULT_RECONNECT_MIN,
                reconnect_max: opmesh_cluster::ClusterConfig::DEFAULT_RECONNECT_MAX,
                handshake_timeout: opmesh_cluster::ClusterConfig::DEFAULT_HANDSHAKE_TIMEOUT,
            };
            let cluster = match opmesh_cluster::Cluster::start(cc).await {
                Ok(cl) => cl,
                Err(e) => {
                    eprintln!("opmesh: cannot start the cluster layer: {e}");
                    return Ok(ExitCode::from(1));
                }
            };
            Some(cluster)
        }
    };
    let node = match &cluster {
        Some(c) => c.start_node(builder).await?,
        None => builder.start().await?,
    };
    let settings = api::ApiSettings {
        addr: cfg.http.addr,
        workers: cfg.http.workers,
        max_body_bytes: cfg.http.max_body_bytes,
        keep_alive: cfg.http.keep_alive,
        shutdown_grace: cfg.shutdown_grace,
        telemetry: telemetry.clone(),
    };
    let server = match api::start(node.clone(), cluster.clone(), listener, &settings) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("opmesh: cannot listen on {}: {e}", settings.addr);
            return Ok(ExitCode::from(1));
        }
    };
    if let Some(c) = &cluster {
        // Tests and scripts read this line to learn the bound cluster address.
        println!("opmesh cluster port {}", c.cluster_addr());
    }
    // Tests and scripts read this line to learn the bound address.
    println!("opmesh listening on http://{}", server.addr);
    tracing::info!(node = %cfg.node_id, addr = %server.addr, profile = ?cfg.profile, "serving");
    let left = api::run_until(node, server, cfg.shutdown_grace, shutdown_signal()).await?;
    // The last spans (the drain's failures among them) go out before the process ends.
    let t = telemetry.clone();
    let _ =
        tokio::task::spawn_blocking(move || t.shutdown(std::time::Duration::from_secs(5))).await;
    Ok(if left == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        // `serve` sets logging up once its configuration (and trace export) is known.
        opmesh::logging::init(None);
    }
    let result = match cli.command {
        Command::Serve(a) => serve(a).await,
        Command::Bench(a) => opmesh::bench::run(a).await.map(|_| ExitCode::SUCCESS),
        other => opmesh::cli::run_client(other)
            .await
            .map(|_| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("opmesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}
