//! nameshim: one TCP port for every EPICS CA and PVA server in a
//! container. This file only parses options, sets up logging, picks the
//! mode (sidecar, or PID-1 wrapper of a command) and maps errors to an exit
//! code.

mod ca;
mod check;
mod config;
mod pva;
mod relay;
mod resolve;
mod wrapper;

use clap::Parser;
use config::{Cli, Config};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use tracing::{error, info};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(config::Subcommand::Check(args)) = &cli.subcommand {
        return ExitCode::from(check::run(args));
    }
    init_logging(&cli.log, cli.log_format == "json");
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
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(cause = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(async {
        tokio::select! {
            served = serve(&config) => served,
            signal = shutdown_signal() => {
                info!(signal = signal?, "shutting down");
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

/// One attempt to serve beside a wrapped command; the wrapper retries it.
/// No signal handling here: the wrapper owns every signal.
fn relay_beside_command(config: &Config) -> std::io::Result<()> {
    runtime()?.block_on(serve(config))
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("nameshim: bad log filter '{filter}' ({e}); using 'info'");
        tracing_subscriber::EnvFilter::new("info")
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        // One JSON object per line, fields flattened, for log collectors.
        logs.json().flatten_event(true).init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// Binds the ports and serves them; returns only on a failure to start.
async fn serve(config: &Config) -> std::io::Result<()> {
    use relay::listener::{ListenerConfig, PortMode};
    let shared_mode = PortMode::Shared {
        classify_window: config.classify_window,
        http: config.http,
    };
    let listener = bind(config.listen, shared_mode)?;
    let mut single_protocol = Vec::new();
    for (addr, mode) in [
        (config.ca_listen, PortMode::CaOnly),
        (config.pva_listen, PortMode::PvaOnly),
    ] {
        if let Some(addr) = addr {
            single_protocol.push((bind(addr, mode)?, mode));
        }
    }
    let port = listener.local_addr()?.port();
    info!("clients: EPICS_CA_NAME_SERVERS=<host>:{port} EPICS_PVA_NAME_SERVERS=<host>:{port}");
    let services = start_services(config)?;
    for (extra, mode) in single_protocol {
        let extra_config = ListenerConfig {
            mode,
            max_clients: config.max_clients,
            max_per_host: config.max_clients_per_host,
            http_timeout: config.deadlines.hello,
        };
        tokio::spawn(relay::listener::serve(
            extra,
            extra_config,
            services.clone(),
        ));
    }
    let shared = ListenerConfig {
        mode: shared_mode,
        max_clients: config.max_clients,
        max_per_host: config.max_clients_per_host,
        http_timeout: config.deadlines.hello,
    };
    relay::listener::serve(listener, shared, services).await;
    Ok(())
}

/// Names the address in the error: "Address in use" alone does not say
/// which of the ports is taken.
fn bind(
    addr: std::net::SocketAddr,
    mode: relay::listener::PortMode,
) -> std::io::Result<tokio::net::TcpListener> {
    relay::listener::bind(addr, mode)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Names one client connection may have under search at once: well below
/// the relay's own limit (10000), so one client that searches for many names
/// found elsewhere cannot take the relay from the others.
const MAX_SEARCHES_PER_CLIENT: usize = 2_000;

/// Starts both search relays and gathers what the sessions share.
fn start_services(config: &Config) -> std::io::Result<Arc<relay::listener::Services>> {
    let connect_timeout = std::time::Duration::from_secs(5);
    let source = config.server_source_addr;
    relay::upstream::check_source(source).map_err(|e| {
        std::io::Error::new(e.kind(), format!("--server-source-addr {source}: {e}"))
    })?;
    if source.is_unspecified() || source == std::net::Ipv4Addr::LOCALHOST {
        tracing::warn!(%source, "server connections may leave from 127.0.0.1: servers will trust every client through the shim as one on their own host");
    } else {
        info!(%source, "server connections leave from this address");
    }
    // One budget for both protocols: a channel is a channel.
    let channels_in_all = relay::limits::ChannelBudget::new(config.max_total_channels);
    let ca = Arc::new(ca::session::CaContext {
        resolver: ca::search::start(config.ca_search.clone())?,
        backend: ca::backend::BackendConfig {
            max_payload: config.max_payload,
            queue_bytes: config.queue_bytes,
            connect_timeout,
            source,
        },
        max_payload: config.max_client_payload,
        deadlines: config.deadlines,
        channels_in_all: channels_in_all.clone(),
        queue_bytes: config.queue_bytes,
        max_channels: config.max_channels,
        max_searches: MAX_SEARCHES_PER_CLIENT,
    });
    let pva = Arc::new(pva::session::PvaContext {
        resolver: pva::search::start(config.pva_search.clone())?,
        backend: pva::backend::BackendConfig {
            max_message: config.max_payload,
            queue_bytes: config.queue_bytes,
            connect_timeout,
            big_endian: pva::session::BIG_ENDIAN,
            source,
        },
        max_message: config.max_client_payload,
        queue_bytes: config.queue_bytes,
        deadlines: config.deadlines,
        max_channels: config.max_channels,
        channels_in_all,
        max_searches: MAX_SEARCHES_PER_CLIENT,
        advertise_port: config.advertise_port,
    });
    Ok(Arc::new(relay::listener::Services { ca, pva }))
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
