//! nameshim: one TCP port for every EPICS CA (and, later, PVA) server in a
//! container. This file only parses options, sets up logging, picks the
//! mode and maps errors to an exit code.

mod ca;
mod config;
mod pva;
mod relay;

use clap::Parser;
use config::{Cli, Config};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use tracing::{error, info};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    if !cli.command.is_empty() {
        error!("the PID-1 wrapper mode (nameshim -- COMMAND) is not available in this version");
        return ExitCode::from(2);
    }
    let config = Config::from_cli(&cli);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(cause = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(cause = %e, "nameshim stopped");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("nameshim: bad log filter '{filter}' ({e}); using 'info'");
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Serves until SIGTERM or SIGINT (the sidecar mode).
async fn serve(config: Config) -> std::io::Result<()> {
    use relay::listener::{ListenerConfig, PortMode};
    let shared_mode = PortMode::Shared {
        classify_window: config.classify_window,
    };
    let listener = relay::listener::bind(config.listen, shared_mode)?;
    let ca_listener = match config.ca_listen {
        Some(addr) => Some(relay::listener::bind(addr, PortMode::CaOnly)?),
        None => None,
    };
    let port = listener.local_addr()?.port();
    info!("clients: EPICS_CA_NAME_SERVERS=<host>:{port} EPICS_PVA_NAME_SERVERS=<host>:{port}");
    let resolver = ca::search::start(config.ca_search.clone())?;
    let ca = Arc::new(ca::session::CaContext {
        resolver,
        backend: ca::backend::BackendConfig {
            max_payload: config.max_payload,
            queue_bytes: config.queue_bytes,
            connect_timeout: std::time::Duration::from_secs(5),
        },
        max_payload: config.max_payload,
        queue_bytes: config.queue_bytes,
        max_channels: config.max_channels,
        max_searches: 10_000,
    });
    if let Some(ca_listener) = ca_listener {
        let ca_only = ListenerConfig {
            mode: PortMode::CaOnly,
            max_clients: config.max_clients,
        };
        tokio::spawn(relay::listener::serve(ca_listener, ca_only, ca.clone()));
    }
    let shared = ListenerConfig {
        mode: shared_mode,
        max_clients: config.max_clients,
    };
    tokio::select! {
        () = relay::listener::serve(listener, shared, ca) => Ok(()),
        signal = shutdown_signal() => {
            info!(signal = signal?, "shutting down");
            Ok(())
        }
    }
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
