//! The ports the shim serves, and which protocol gets each connection: the
//! one module that wires CA, PVA and HTTP into the protocol-free listener
//! of `relay::listener`.
//!
//! CA is client-first: libca sends VERSION (first byte 0x00) as soon as it
//! connects. PVA is server-first: a PVA client sends nothing until the server
//! greets it. So a connection whose first byte arrives within the
//! classification window is CA, and one that stays silent is PVA. Nothing is
//! sent before the protocol is known: a CA greeting breaks a PVA client and
//! the reverse. Unless turned off, a first byte that is an ASCII capital
//! letter (an HTTP method: GET, HEAD, ...) is plain HTTP, answered by
//! `relay::http` for health probes and metric scrapes.
//!
//! A silent connection is greeted as PVA, unless it comes when a libca
//! program's reconnect is due after its address rejected the PVA greeting
//! (see `greeting`): a libca program that only sleeps never sends first.

pub mod greeting;

use crate::access::Access;
use crate::config::Config;
use crate::relay::listener::{self, ConnectionLimits, FirstByte};
use crate::relay::metrics::{BadInput, Refusal, METRICS};
use crate::session::SessionSettings;
use crate::{ca, pva, relay};
use greeting::{Choice, Greeting, SilentGreetings, SilentTimes};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// First byte of a CA VERSION message (command 0, big-endian).
const CA_VERSION_FIRST_BYTE: u8 = 0x00;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Ca,
    Pva,
    /// An HTTP request (health or metrics).
    Http,
    /// The first byte belongs to neither protocol.
    Unknown(u8),
    /// Nothing arrived within the window: a PVA client, or a libca client
    /// that has not flushed its VERSION yet.
    Silent,
    /// The peer closed before sending anything.
    Closed,
}

/// What a listening port serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortMode {
    /// CA and PVA on one port, told apart by the first byte or by silence.
    Shared {
        classify_window: Duration,
        /// Answer HTTP requests (`/healthz`, `/metrics`) too.
        http: bool,
    },
    /// CA only: no classification, the client is greeted at once.
    CaOnly,
    /// PVA only: no classification, the client is greeted at once.
    PvaOnly,
}

impl PortMode {
    /// What the port serves, for the log.
    fn protocols(self) -> &'static str {
        match self {
            PortMode::Shared { http: true, .. } => "ca,pva,http",
            PortMode::Shared { http: false, .. } => "ca,pva",
            PortMode::CaOnly => "ca",
            PortMode::PvaOnly => "pva",
        }
    }
}

/// What the protocol sessions share.
pub struct Services {
    pub ca: Arc<ca::session::CaContext>,
    pub pva: Arc<pva::session::PvaContext>,
    /// The shim's own access rules.
    pub access: Arc<Access>,
}

/// Binds the ports and serves them; returns only on a failure to start.
pub async fn serve_all(config: &Config) -> io::Result<()> {
    Bound::bind(config)?.serve(config).await
}

/// The listening sockets, bound but not served yet, so that a caller can
/// learn the port (`--listen` port 0 picks one) before serving.
pub struct Bound {
    shared: TcpListener,
    shared_mode: PortMode,
    single_protocol: Vec<(TcpListener, PortMode)>,
}

impl Bound {
    /// Binds every port of `config`. Must run inside the runtime.
    pub fn bind(config: &Config) -> io::Result<Bound> {
        let shared_mode = PortMode::Shared {
            classify_window: config.classify_window,
            http: config.http,
        };
        let shared = bind(config.listen, shared_mode)?;
        let mut single_protocol = Vec::new();
        for (addr, mode) in [
            (config.ca_listen, PortMode::CaOnly),
            (config.pva_listen, PortMode::PvaOnly),
        ] {
            if let Some(addr) = addr {
                single_protocol.push((bind(addr, mode)?, mode));
            }
        }
        Ok(Bound {
            shared,
            shared_mode,
            single_protocol,
        })
    }

    /// The TCP port of the shared (CA and PVA) listener.
    pub fn port(&self) -> io::Result<u16> {
        Ok(self.shared.local_addr()?.port())
    }

    /// Starts the search relays and serves every port; returns only on a
    /// failure to start.
    pub async fn serve(self, config: &Config) -> io::Result<()> {
        let port = self.port()?;
        info!("clients: EPICS_CA_NAME_SERVERS=<host>:{port} EPICS_PVA_NAME_SERVERS=<host>:{port}");
        let services = start_services(config)?;
        let limits = ConnectionLimits {
            max_clients: config.limits.max_clients,
            max_per_host: config.limits.max_clients_per_host,
        };
        let http_timeout = config.limits.deadlines.hello;
        for (extra, mode) in self.single_protocol {
            tokio::spawn(serve(extra, mode, limits, http_timeout, services.clone()));
        }
        serve(
            self.shared,
            self.shared_mode,
            limits,
            http_timeout,
            services,
        )
        .await;
        Ok(())
    }
}

/// Serves one port until the task is dropped.
async fn serve(
    port: TcpListener,
    mode: PortMode,
    limits: ConnectionLimits,
    http_timeout: Duration,
    services: Arc<Services>,
) {
    let context = Arc::new(PortContext {
        mode,
        http_timeout,
        services,
        greetings: SilentGreetings::default(),
    });
    listener::serve(port, limits, move |stream, peer, accepted| {
        let context = context.clone();
        async move { handle(stream, peer, accepted, &context).await }
    })
    .await
}

/// Names the address in the error: "Address in use" alone does not say
/// which of the ports is taken.
fn bind(addr: SocketAddr, mode: PortMode) -> io::Result<TcpListener> {
    listener::bind(addr, mode.protocols())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Starts both search relays and gathers what the sessions share.
fn start_services(config: &Config) -> io::Result<Arc<Services>> {
    let source = config.server_source_addr;
    relay::upstream::check_source(source)
        .map_err(|e| io::Error::new(e.kind(), format!("--server-source-addr {source}: {e}")))?;
    if source.is_unspecified() || source == std::net::Ipv4Addr::LOCALHOST {
        warn!(%source, "server connections may leave from 127.0.0.1: servers will trust every client through the shim as one on their own host");
    } else {
        info!(%source, "server connections leave from this address");
    }
    // One budget for both protocols: a channel is a channel.
    let limits = &config.limits;
    let access = Arc::new(config.access.clone());
    let channels_in_all = relay::limits::ChannelBudget::new(limits.max_total_channels);
    let settings = |resolver| SessionSettings {
        resolver,
        max_client_message: limits.max_client_message,
        queue_bytes: limits.queue_bytes,
        deadlines: limits.deadlines,
        max_channels: limits.max_channels,
        channels_in_all: channels_in_all.clone(),
        max_searches: limits.max_searches_per_client,
        access: access.clone(),
    };
    let ca = Arc::new(ca::session::CaContext {
        session: settings(ca::search::start(config.ca_search.clone())?),
        backend: ca::backend::BackendConfig {
            max_server_message: limits.max_server_message,
            queue_bytes: limits.queue_bytes,
            connect_timeout: limits.server_connect_timeout,
            source,
        },
    });
    let pva = Arc::new(pva::session::PvaContext {
        session: settings(pva::search::start(config.pva_search.clone())?),
        backend: pva::backend::BackendConfig {
            max_server_message: limits.max_server_message,
            queue_bytes: limits.queue_bytes,
            connect_timeout: limits.server_connect_timeout,
            big_endian: pva::session::BIG_ENDIAN,
            source,
        },
        advertise_port: config.advertise_port,
    });
    Ok(Arc::new(Services { ca, pva, access }))
}

/// What one port's connections share.
struct PortContext {
    mode: PortMode,
    http_timeout: Duration,
    services: Arc<Services>,
    greetings: SilentGreetings,
}

async fn handle(stream: TcpStream, peer: SocketAddr, accepted: Instant, port: &PortContext) {
    let services = &port.services;
    if !services.access.allows_client(peer.ip()) {
        METRICS.refused(Refusal::ClientNotAllowed);
        debug!(target: "nameshim::relay", %peer, "closing connection: the client's network is not in --allow-client");
        // Not at once: see `listener::REFUSED_CLOSE_DELAY`. The connection
        // holds its slot meanwhile, within the per-host cap.
        tokio::time::sleep(listener::REFUSED_CLOSE_DELAY).await;
        return;
    }
    let classified = match port.mode {
        PortMode::Shared {
            classify_window,
            http,
        } => classify(&stream, classify_window, http).await,
        PortMode::CaOnly => Ok(Protocol::Ca),
        PortMode::PvaOnly => Ok(Protocol::Pva),
    };
    let protocol = match classified {
        Ok(protocol) => protocol,
        Err(e) => {
            debug!(target: "nameshim::relay", %peer, cause = %e, "connection failed before classification");
            return;
        }
    };
    debug!(target: "nameshim::relay", %peer, ?protocol, "classified connection");
    match protocol {
        Protocol::Ca => {
            ca::session::serve(stream, peer, services.ca.clone()).await;
        }
        Protocol::Pva => {
            pva::session::serve(stream, peer, services.pva.clone()).await;
        }
        Protocol::Silent => serve_silent(stream, peer, accepted, services, &port.greetings).await,
        Protocol::Http => {
            let state = relay::http::State {
                ready: services.ca.session.resolver.is_running()
                    && services.pva.session.resolver.is_running(),
            };
            relay::http::serve(stream, peer, port.http_timeout, state).await
        }
        Protocol::Unknown(byte) => {
            METRICS.bad_input(BadInput::UnknownProtocol);
            warn!(target: "nameshim::relay", %peer, first_byte = byte, "closing connection: neither CA nor PVA")
        }
        Protocol::Closed => {}
    }
}

/// Greets a silent connection as PVA, or as CA if it comes when libca's
/// reconnect is due after its address's last rejected PVA greeting, and
/// learns from how this one ends.
async fn serve_silent(
    stream: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
    services: &Services,
    greetings: &SilentGreetings,
) {
    let times = SilentTimes {
        accepted,
        greeted_at: Instant::now(),
    };
    let greeting = match greetings.choose(peer.ip(), accepted) {
        Choice::Pva => Greeting::Pva,
        Choice::Candidate => {
            tokio::time::sleep(greeting::CONTEST_WAIT).await;
            let settled = greetings.settle(peer.ip(), accepted);
            if settled == Greeting::Pva {
                info!(target: "nameshim::relay", %peer, "greeting a silent connection as PVA: another one from this address came when libca's reconnect was due, and one of them may be a PVA client");
            }
            settled
        }
    };
    let reception = match greeting {
        Greeting::Pva => pva::session::serve(stream, peer, services.pva.clone()).await,
        Greeting::Ca => {
            info!(target: "nameshim::relay", %peer, "greeting a silent connection as CA: it came when libca's reconnect was due after this address closed on the PVA greeting");
            ca::session::serve(stream, peer, services.ca.clone()).await
        }
    };
    greetings.learn(peer.ip(), greeting, reception, times, Instant::now());
}

/// Decides the protocol from the first byte, without consuming it. With
/// `http`, a capital letter starts an HTTP request.
pub async fn classify(stream: &TcpStream, window: Duration, http: bool) -> io::Result<Protocol> {
    Ok(match listener::peek_first_byte(stream, window).await? {
        FirstByte::Silent => Protocol::Silent,
        FirstByte::Closed => Protocol::Closed,
        FirstByte::Byte(CA_VERSION_FIRST_BYTE) => Protocol::Ca,
        FirstByte::Byte(pva::wire::MAGIC) => Protocol::Pva,
        FirstByte::Byte(b'A'..=b'Z') if http => Protocol::Http,
        FirstByte::Byte(other) => Protocol::Unknown(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::listener::tests::pair;
    use tokio::io::AsyncWriteExt;

    async fn classify_sent(bytes: &[u8], http: bool) -> Protocol {
        let (mut client, server) = pair().await;
        client.write_all(bytes).await.unwrap();
        classify(&server, Duration::from_secs(5), http)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn ca_version_first_is_ca() {
        let got = classify_sent(&[0, 0, 0, 0, 0, 0, 0, 13], true).await;
        assert_eq!(got, Protocol::Ca);
    }

    #[tokio::test]
    async fn pva_magic_first_is_pva() {
        let got = classify_sent(&[0xCA, 2, 0x41, 2], true).await;
        assert_eq!(got, Protocol::Pva);
    }

    #[tokio::test]
    async fn silence_is_silent() {
        let (_client, server) = pair().await;
        let got = classify(&server, Duration::from_millis(30), true)
            .await
            .unwrap();
        assert_eq!(got, Protocol::Silent);
    }

    #[tokio::test]
    async fn other_first_byte_is_unknown() {
        let got = classify_sent(b"\x16\x03\x01", true).await;
        assert_eq!(got, Protocol::Unknown(0x16));
    }

    #[tokio::test]
    async fn an_http_method_first_is_http() {
        for request in [
            &b"GET /metrics HTTP/1.0\r\n"[..],
            b"HEAD /healthz HTTP/1.1\r\n",
        ] {
            assert_eq!(classify_sent(request, true).await, Protocol::Http);
        }
    }

    #[tokio::test]
    async fn with_http_off_a_request_is_unknown() {
        let got = classify_sent(b"GET / HTTP/1.0\r\n", false).await;
        assert_eq!(got, Protocol::Unknown(b'G'));
    }

    #[tokio::test]
    async fn close_without_data_is_closed() {
        let (client, server) = pair().await;
        drop(client);
        let got = classify(&server, Duration::from_secs(5), true)
            .await
            .unwrap();
        assert_eq!(got, Protocol::Closed);
    }
}
