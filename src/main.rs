//! The `opmesh` binary: parses the command line and runs it. `serve` is
//! [`opmesh::server::serve`] on the loaded configuration; the client commands and the
//! load generator live in [`opmesh::cli`] and [`opmesh::bench`].

use std::process::ExitCode;

// glibc malloc stalls on frees from other threads, which the actors do all the time;
// mimalloc took in-process throughput from 0.6M to 1.3M ops/s and p99 from 4 ms to
// 0.5 ms (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use opmesh::cli::{Cli, Command, ServeArgs};
use opmesh::{config, server};

async fn serve(args: ServeArgs) -> ExitCode {
    let check_only = args.check_config;
    let cfg = match config::load(&args.load_options()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("opmesh: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if check_only {
        println!("{}", cfg.summary());
        return ExitCode::SUCCESS;
    }
    match server::serve(&cfg).await {
        Ok(stopped) if stopped.is_clean() => ExitCode::SUCCESS,
        // Operations left unfinished when the grace period ended, or a hand-off cut
        // short (both logged).
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("opmesh: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        // `serve` sets logging up once its configuration (and trace export) is known.
        Command::Serve(a) => return serve(a).await,
        Command::Bench(a) => {
            opmesh::logging::init(None);
            opmesh::bench::run(a).await
        }
        other => {
            opmesh::logging::init(None);
            opmesh::cli::run_client(other).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("opmesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}
