//! edgemesh-bench: load generators behind `scripts/bench/*`.
//!
//! `edgemesh-bench sync` measures cloud → edge metadata sync against one running cloudcore on
//! loopback: fan-out latency of REST writes to many connected nodes, cloudcore's memory per
//! connected node, and the time a fresh node needs for a full snapshot.
//!
//! `edgemesh-bench transport serve|run` compares transports for direct node-to-node paths
//! (plain TCP, TCP+TLS, QUIC) between two network namespaces (`scripts/bench/transport`).

mod api;
mod ha;
mod node;
mod report;
mod sync;
mod transport;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "edgemesh-bench", version, about = "edgemesh load generators")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Metadata sync: fan-out latency, cloudcore memory per node, snapshot time.
    Sync(sync::SyncArgs),
    /// One cloud (one cloudcore or replicas on etcd): fan-out, memory, failover, relay.
    Ha(ha::HaArgs),
    /// Direct-path transports: plain TCP, TCP+TLS and QUIC, throughput and latency.
    Transport(transport::TransportArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edgemesh-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Sync(args) => runtime.block_on(sync::run(args)),
        Command::Ha(args) => runtime.block_on(ha::run(args)),
        Command::Transport(args) => runtime.block_on(transport::run(args)),
    };
    // Node tasks may still be winding down; do not wait for them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgemesh-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
