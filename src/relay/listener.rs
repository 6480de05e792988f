//! The single TCP port: accepts, classifies, and hands each connection to
//! the protocol that owns it.
//!
//! CA is client-first: libca sends VERSION (first byte 0x00) as soon as it
//! connects. PVA is server-first: a PVA client sends nothing until the server
//! greets it. So a connection whose first byte arrives within the
//! classification window is CA, and one that stays silent is PVA. Nothing is
//! sent before the protocol is known: a CA greeting breaks a PVA client and
//! the reverse. Unless turned off, a first byte that is an ASCII capital
//! letter (an HTTP method: GET, HEAD, ...) is plain HTTP, answered by
//! [`super::http`] for health probes and metric scrapes.
//!
//! A silent connection is greeted as PVA, unless the last silent
//! connection from its address rejected that greeting the way libca does
//! (see `greeting`): a libca program that only sleeps never sends first.
//!
//! Each connection holds one of `max_clients` slots and one of its source
//! address's `max_per_host` places until its task ends, by any path: a
//! panic in a session ends only that task (tokio catches it and drops the
//! task's future, and with it the slot).

use super::greeting::{Greeting, SilentGreetings, SilentTimes};
use super::limits::HostCounts;
use super::metrics::{BadInput, Refusal, METRICS};
use crate::ca;
use crate::pva;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// First byte of every PVA message (`PVA_MAGIC`).
const PVA_MAGIC: u8 = 0xCA;
/// First byte of a CA VERSION message (command 0, big-endian).
const CA_VERSION_FIRST_BYTE: u8 = 0x00;
/// Wait after an accept error (EMFILE, ENOBUFS) so it cannot spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Idle time before TCP keepalive probes a silent peer that may be gone.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Connections refused for their source address are logged at warning
/// level at most this often; the others in between at debug level.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

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

pub struct ListenerConfig {
    pub mode: PortMode,
    pub max_clients: usize,
    /// Connections from one source address at once.
    pub max_per_host: usize,
    /// Time an HTTP client has to send its request head.
    pub http_timeout: Duration,
}

/// What the protocol sessions share.
pub struct Services {
    pub ca: Arc<ca::session::CaContext>,
    pub pva: Arc<pva::session::PvaContext>,
}

/// Accepts connections until the task is dropped. Accept errors are logged
/// and retried after a pause; they never end the listener.
pub async fn serve(listener: TcpListener, config: ListenerConfig, services: Arc<Services>) {
    let mode = config.mode;
    let http_timeout = config.http_timeout;
    let greetings = Arc::new(SilentGreetings::default());
    accept_loop(
        listener,
        config.max_clients,
        config.max_per_host,
        move |stream, peer| {
            let services = services.clone();
            let greetings = greetings.clone();
            async move { handle(stream, peer, mode, http_timeout, &services, &greetings).await }
        },
    )
    .await
}

/// Runs `handler` on its own task for each connection, within the limits.
/// A connection beyond its address's limit is closed at once rather than
/// left to wait for a place: waiting would hold a slot, which is what the
/// limit prevents.
async fn accept_loop<H, F>(
    listener: TcpListener,
    max_clients: usize,
    max_per_host: usize,
    handler: H,
) where
    H: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_clients));
    let hosts = HostCounts::new(max_per_host);
    let mut refusals = RefusalLog::default();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(target: "nameshim::relay", cause = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Some(host) = hosts.enter(peer.ip()) else {
            refusals.note(peer.ip(), hosts.max());
            METRICS.refused(Refusal::PerHost);
            drop(stream);
            continue;
        };
        let connection = handler(stream, peer);
        tokio::spawn(async move {
            // Dropped with this future however it ends, a panic included.
            let _held = (slot, host);
            connection.await;
        });
    }
}

/// Logs refused connections without flooding the log.
#[derive(Default)]
struct RefusalLog {
    last_warning: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    fn note(&mut self, ip: IpAddr, max: usize) {
        let now = Instant::now();
        if self
            .last_warning
            .is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_EVERY)
        {
            self.unlogged += 1;
            debug!(target: "nameshim::relay", %ip, "closing connection: too many connections from {ip} ({max})");
            return;
        }
        warn!(
            target: "nameshim::relay",
            %ip,
            refused_since_last_warning = self.unlogged,
            "closing connection: too many connections from {ip} ({max})"
        );
        self.last_warning = Some(now);
        self.unlogged = 0;
    }
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    mode: PortMode,
    http_timeout: Duration,
    services: &Services,
    greetings: &SilentGreetings,
) {
    let accepted = Instant::now();
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    let classified = match mode {
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
        Protocol::Silent => serve_silent(stream, peer, accepted, services, greetings).await,
        Protocol::Http => {
            let state = super::http::State {
                ready: services.ca.resolver.is_running() && services.pva.resolver.is_running(),
            };
            super::http::serve(stream, peer, http_timeout, state).await
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
    let greeting = greetings.choose(peer.ip(), accepted);
    let reception = match greeting {
        Greeting::Pva => pva::session::serve(stream, peer, services.pva.clone()).await,
        Greeting::Ca => {
            info!(target: "nameshim::relay", %peer, "greeting a silent connection as CA: it came when libca's reconnect was due after this address closed on the PVA greeting");
            ca::session::serve(stream, peer, services.ca.clone()).await
        }
    };
    let now = Instant::now();
    greetings.learn(peer.ip(), greeting, reception, times, now);
}

/// Decides the protocol from the first byte, without consuming it. With
/// `http`, a capital letter starts an HTTP request.
pub async fn classify(stream: &TcpStream, window: Duration, http: bool) -> io::Result<Protocol> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(window, stream.peek(&mut first)).await {
        Err(_silent) => Ok(Protocol::Silent),
        Ok(Ok(0)) => Ok(Protocol::Closed),
        Ok(Ok(_)) => Ok(match first[0] {
            CA_VERSION_FIRST_BYTE => Protocol::Ca,
            PVA_MAGIC => Protocol::Pva,
            b'A'..=b'Z' if http => Protocol::Http,
            other => Protocol::Unknown(other),
        }),
        Ok(Err(e)) => Err(e),
    }
}

/// Binds the listening socket, with SO_REUSEADDR so a restart can rebind
/// while old connections linger in TIME_WAIT.
pub fn bind(addr: SocketAddr, mode: PortMode) -> io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    let listener = TcpListener::from_std(socket.into())?;
    let protocols = match mode {
        PortMode::Shared { http: true, .. } => "ca,pva,http",
        PortMode::Shared { http: false, .. } => "ca,pva",
        PortMode::CaOnly => "ca",
        PortMode::PvaOnly => "pva",
    };
    info!(target: "nameshim::relay", addr = %listener.local_addr()?, protocols, "listening");
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// A connection from `source` (any port) to `to`.
    async fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        socket.connect(to).await.unwrap()
    }

    /// The first byte the peer sends, or None if it closes without one.
    async fn first_byte(stream: &mut TcpStream) -> Option<u8> {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await {
            Ok(Ok(1)) => Some(byte[0]),
            Ok(_) => None,
            Err(_) => panic!("neither served nor closed within 5 s"),
        }
    }

    /// Serves with a handler that sends b"+" and then holds the connection
    /// until the peer closes it.
    async fn holding_listener(max_clients: usize, max_per_host: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(accept_loop(
            listener,
            max_clients,
            max_per_host,
            |mut stream, _| async move {
                let _ = stream.write_all(b"+").await;
                let mut sink = [0u8; 16];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            },
        ));
        addr
    }

    #[tokio::test]
    async fn connections_beyond_the_per_host_limit_are_closed_at_once() {
        let addr = holding_listener(100, 2).await;
        let mut a1 = connect_from([127, 0, 0, 2], addr).await;
        let mut a2 = connect_from([127, 0, 0, 2], addr).await;
        assert_eq!(first_byte(&mut a1).await, Some(b'+'));
        assert_eq!(first_byte(&mut a2).await, Some(b'+'));
        let mut a3 = connect_from([127, 0, 0, 2], addr).await;
        assert_eq!(
            first_byte(&mut a3).await,
            None,
            "a third from 127.0.0.2 is closed"
        );
        let mut b = connect_from([127, 0, 0, 1], addr).await;
        assert_eq!(
            first_byte(&mut b).await,
            Some(b'+'),
            "127.0.0.1 is still served"
        );
        drop(a1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut a4 = connect_from([127, 0, 0, 2], addr).await;
        assert_eq!(
            first_byte(&mut a4).await,
            Some(b'+'),
            "a closed connection frees its place"
        );
    }

    #[tokio::test]
    async fn a_panicking_session_frees_its_slot_and_leaves_the_listener_serving() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        tokio::spawn(accept_loop(listener, 1, 1, move |mut stream, _| {
            let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("a bug in a session");
                }
                let _ = stream.write_all(b"+").await;
            }
        }));
        // One slot and one place per host: the second connection is served
        // only if the panic gave both back.
        let mut first = TcpStream::connect(addr).await.unwrap();
        assert_eq!(first_byte(&mut first).await, None);
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert_eq!(first_byte(&mut second).await, Some(b'+'));
    }

    #[tokio::test]
    async fn ca_version_first_is_ca() {
        let (mut client, server) = pair().await;
        client.write_all(&[0, 0, 0, 0, 0, 0, 0, 13]).await.unwrap();
        let got = classify(&server, Duration::from_secs(5), true)
            .await
            .unwrap();
        assert_eq!(got, Protocol::Ca);
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
        let (mut client, server) = pair().await;
        client.write_all(b"\x16\x03\x01").await.unwrap();
        let got = classify(&server, Duration::from_secs(5), true)
            .await
            .unwrap();
        assert_eq!(got, Protocol::Unknown(0x16));
    }

    #[tokio::test]
    async fn an_http_method_first_is_http() {
        for request in [
            &b"GET /metrics HTTP/1.0\r\n"[..],
            b"HEAD /healthz HTTP/1.1\r\n",
        ] {
            let (mut client, server) = pair().await;
            client.write_all(request).await.unwrap();
            let got = classify(&server, Duration::from_secs(5), true)
                .await
                .unwrap();
            assert_eq!(got, Protocol::Http);
        }
    }

    #[tokio::test]
    async fn with_http_off_a_request_is_unknown() {
        let (mut client, server) = pair().await;
        client.write_all(b"GET / HTTP/1.0\r\n").await.unwrap();
        let got = classify(&server, Duration::from_secs(5), false)
            .await
            .unwrap();
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
