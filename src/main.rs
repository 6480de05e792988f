//! nameshim: one TCP port for every EPICS CA and PVA server in a
//! container. This file only parses options, sets up logging, picks the
//! mode (sidecar, or PID-1 wrapper of a command) and maps errors to an exit
//! code.

use clap::Parser;
use nameshim::config::{self, Cli, Config};
use nameshim::{check, fdlimit, logging, serve_all, wrapper};
use std::process::ExitCode;
use tracing::{error, info, warn};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(config::Subcommand::Check(args)) = &cli.subcommand {
        return ExitCode::from(check::run(args));
    }
    logging::init(&cli.log, cli.log_format == "json");
    match fdlimit::raise_to_hard() {
        Ok(Some(raised)) => info!(
            from = raised.from,
            to = raised.to,
            "raised the open-file limit to the hard limit"
        ),
        Ok(None) => {}
        Err(e) => warn!(cause = %e, "cannot raise the open-file limit"),
    }
    let config = Config::from_cli(&cli);
    match config::wrapper_options(&cli) {
        // No thread may be started before wrapper::run: it blocks the
        // signals it forwards, and threads inherit the mask.
        Some(options) => {
            let code = wrapper::run(&options, move || relay_beside_command(&config));
            // The relay thread needs no drain: its clients reconnect to
            // whatever serves the port next.
            std::process::exit(code)
        }
        None => sidecar(config),
    }
}

/// Serves until SIGTERM or SIGINT.
fn sidecar(config: Config) -> ExitCode {
    let runtime = match runtime(config.threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(cause = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(async {
        tokio::select! {
            served = serve_all(&config) => served,
            signal = shutdown_signal() => {
                info!(signal = signal?, "shutting down");
                flush_clients().await;
                Ok(())
            }
        }
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(cause = %e, "nameshim stopped");
            ExitCode::FAILURE
        }
    }
}

/// How long a shutdown waits for what is queued towards clients to be
/// written. Short: the port is already closed, and a container runtime
/// sends SIGKILL after its own grace period (10 s for podman and docker,
/// 30 s for Kubernetes).
const SHUTDOWN_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

/// Gives every client's writer `SHUTDOWN_FLUSH` to write what is queued.
async fn flush_clients() {
    if !nameshim::flush_client_queues(SHUTDOWN_FLUSH).await {
        info!(within = ?SHUTDOWN_FLUSH, "some client queues were not flushed in time");
    }
}

/// One attempt to serve beside a wrapped command; the wrapper retries it.
/// No signal handling here: the wrapper owns every signal.
fn relay_beside_command(config: &Config) -> std::io::Result<()> {
    runtime(config.threads)?.block_on(serve_all(config))
}

/// One thread (the default) keeps the shim within one core of the IOC's
/// host; more spread busy clients over cores.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("nameshim-worker")
        .enable_all()
        .build()
}

async fn shutdown_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        _ = int.recv() => Ok("SIGINT"),
    }
}
