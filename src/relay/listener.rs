//! The listening side of every port: binds, accepts within the limits on
//! clients and on each source address, and peeks at a connection's first
//! byte. It knows no protocol: what serves a connection is the handler it
//! is given (see `crate::ports`, which wires the protocols in).
//!
//! Each connection holds one of `max_clients` slots and one of its source
//! address's `max_per_host` places until its task ends, by any path: a
//! panic in a session ends only that task (tokio catches it and drops the
//! task's future, and with it the slot).

use super::limits::HostCounts;
use super::metrics::{Refusal, METRICS};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Wait after an accept error (EMFILE, ENOBUFS) so it cannot spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Idle time before TCP keepalive probes a silent peer that may be gone.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Connections refused for their source address are logged at warning
/// level at most this often; the others in between at debug level.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);
/// While out of file descriptors, a warning at most this often.
const OUT_OF_DESCRIPTORS_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a refused connection is held before it is closed. libca sets
/// up its search machinery while its first name-server circuit connects,
/// and a circuit closed within that moment trips `assert(this->pudpiiu)`
/// in `cac::destroyIIU` (libca `cac.cpp`), which hangs the client.
pub const REFUSED_CLOSE_DELAY: Duration = Duration::from_millis(250);
/// Refused connections held at once, at most; beyond that they are closed
/// at once, so a flood of refused connections cannot take descriptors.
const MAX_HELD_REFUSALS: usize = 64;

/// How many connections a port serves at once.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_clients: usize,
    /// Connections from one source address at once.
    pub max_per_host: usize,
}

/// What a connection's peer sent before the session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reception {
    /// At least one byte.
    Spoke,
    /// Nothing at all.
    Silent,
}

/// What a new connection's peer sent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstByte {
    Byte(u8),
    /// Nothing arrived within the window.
    Silent,
    /// The peer closed before sending anything.
    Closed,
}

/// Waits up to `window` for the peer's first byte, without consuming it.
pub async fn peek_first_byte(stream: &TcpStream, window: Duration) -> io::Result<FirstByte> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(window, stream.peek(&mut first)).await {
        Err(_silent) => Ok(FirstByte::Silent),
        Ok(Ok(0)) => Ok(FirstByte::Closed),
        Ok(Ok(_)) => Ok(FirstByte::Byte(first[0])),
        Ok(Err(e)) => Err(e),
    }
}

/// Accepts connections until the task is dropped, and runs `handler` on
/// its own task for each one, within the limits, with the time it was
/// accepted. Accept errors are logged
/// and retried after a pause; they never end the listener.
/// A connection beyond its address's limit is closed (after
/// `REFUSED_CLOSE_DELAY`, holding no slot) rather than left to wait for a
/// place: waiting would hold a slot, which is what the limit prevents.
pub async fn serve<H, F>(listener: TcpListener, limits: ConnectionLimits, handler: H)
where
    H: Fn(TcpStream, SocketAddr, Instant) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_clients));
    let hosts = HostCounts::new(limits.max_per_host);
    let mut refusals = RefusalLog::default();
    let mut spare = SpareDescriptor::new(&listener);
    let held_refusals = Arc::new(Semaphore::new(MAX_HELD_REFUSALS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                spare.accepted(&listener);
                accepted
            }
            Err(e) if is_out_of_descriptors(&e) => {
                // Refusing is progress, not a spin: no pause then.
                if !spare.refuse_one(&listener, &e) {
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
                continue;
            }
            Err(e) => {
                warn!(target: "nameshim::relay", cause = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        // Taken here, not in the connection's task, whose start may wait.
        let accepted_at = Instant::now();
        let Some(host) = hosts.enter(peer.ip()) else {
            refusals.note(peer.ip(), hosts.max());
            METRICS.refused(Refusal::PerHost);
            close_refused(stream, &held_refusals);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let connection = handler(stream, peer, accepted_at);
        tokio::spawn(async move {
            // Dropped with this future however it ends, a panic included.
            let _held = (slot, host);
            connection.await;
        });
    }
}

/// Closes a refused connection after `REFUSED_CLOSE_DELAY`, or at once when
/// `MAX_HELD_REFUSALS` are already held.
fn close_refused(stream: TcpStream, held: &Arc<Semaphore>) {
    match held.clone().try_acquire_owned() {
        Ok(place) => {
            tokio::spawn(async move {
                tokio::time::sleep(REFUSED_CLOSE_DELAY).await;
                drop((stream, place));
            });
        }
        Err(_) => drop(stream),
    }
}

/// Whether an accept failed for want of a file descriptor (the process's
/// limit, EMFILE, or the system's, ENFILE).
fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// One file descriptor held back for the moment the process runs out.
///
/// Out of descriptors, accept fails and leaves the connection in the
/// kernel's backlog, where its client waits without an answer for as long
/// as the shortage lasts, and the next accept fails the same way. With the
/// spare given back, the listener can take that connection and close it at
/// once: its client learns it was refused, and the backlog drains. Clients
/// already served are not touched. The spare is a duplicate of the
/// listening socket, so it needs no file system (a FROM scratch image).
struct SpareDescriptor {
    fd: Option<OwnedFd>,
    /// Connections refused since the last warning, and when that was.
    unlogged: u64,
    last_warning: Option<Instant>,
    /// Connections refused since descriptors last ran out.
    refused: u64,
}

impl SpareDescriptor {
    fn new(listener: &TcpListener) -> SpareDescriptor {
        SpareDescriptor {
            fd: listener.as_fd().try_clone_to_owned().ok(),
            unlogged: 0,
            last_warning: None,
            refused: 0,
        }
    }

    /// Gives back the spare, accepts one waiting connection and closes it,
    /// then takes the spare again. False when no connection was refused.
    fn refuse_one(&mut self, listener: &TcpListener, cause: &io::Error) -> bool {
        self.fd = None;
        // Non-blocking like the listener: WouldBlock if none is waiting.
        let refused = socket2::SockRef::from(listener).accept().is_ok();
        self.fd = listener.as_fd().try_clone_to_owned().ok();
        if refused {
            self.refused += 1;
            self.unlogged += 1;
            METRICS.refused(Refusal::OutOfDescriptors);
        }
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|at| now.duration_since(at) >= OUT_OF_DESCRIPTORS_LOG_EVERY)
        {
            warn!(
                target: "nameshim::relay",
                %cause,
                refused = self.unlogged,
                "out of file descriptors: closing new connections at once until some are free (raise the limit, ulimit -n, or lower --max-clients)"
            );
            self.last_warning = Some(now);
            self.unlogged = 0;
        }
        refused
    }

    /// A connection was accepted: descriptors are there again.
    fn accepted(&mut self, listener: &TcpListener) {
        if self.refused > 0 {
            info!(target: "nameshim::relay", refused = self.refused, "file descriptors available again: accepting new connections");
            self.refused = 0;
            self.unlogged = 0;
            self.last_warning = None;
        }
        if self.fd.is_none() {
            self.fd = listener.as_fd().try_clone_to_owned().ok();
        }
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

/// Binds the listening socket, with SO_REUSEADDR so a restart can rebind
/// while old connections linger in TIME_WAIT.
/// `protocols` names what it serves, for the log.
pub fn bind(addr: SocketAddr, protocols: &str) -> io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    let listener = TcpListener::from_std(socket.into())?;
    info!(target: "nameshim::relay", addr = %listener.local_addr()?, protocols, "listening");
    Ok(listener)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client socket and the server's end of it, over the loopback.
    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
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
        let limits = ConnectionLimits {
            max_clients,
            max_per_host,
        };
        tokio::spawn(serve(listener, limits, |mut stream, _, _| async move {
            let _ = stream.write_all(b"+").await;
            let mut sink = [0u8; 16];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        }));
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
        let one = ConnectionLimits {
            max_clients: 1,
            max_per_host: 1,
        };
        tokio::spawn(serve(listener, one, move |mut stream, _, _| {
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
    async fn out_of_descriptors_a_waiting_connection_is_closed_at_once_and_the_spare_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut spare = SpareDescriptor::new(&listener);
        assert!(spare.fd.is_some());
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(is_out_of_descriptors(&emfile));
        assert!(!is_out_of_descriptors(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
        // Nobody waiting: nothing refused, no spin on a phantom connection.
        assert!(!spare.refuse_one(&listener, &emfile));
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        // Let the handshake complete into the accept queue.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(spare.refuse_one(&listener, &emfile));
        assert_eq!(
            first_byte(&mut client).await,
            None,
            "closed, not left waiting"
        );
        assert!(spare.fd.is_some(), "the spare is taken again");
        assert_eq!(spare.refused, 1);
        spare.accepted(&listener);
        assert_eq!(spare.refused, 0, "descriptors are back");
    }

    #[tokio::test]
    async fn a_first_byte_is_peeked_not_consumed() {
        let (mut client, mut server) = pair().await;
        client.write_all(&[0xCA, 2]).await.unwrap();
        let got = peek_first_byte(&server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, FirstByte::Byte(0xCA));
        assert_eq!(first_byte(&mut server).await, Some(0xCA), "still there");
    }

    #[tokio::test]
    async fn silence_is_silent() {
        let (_client, server) = pair().await;
        let got = peek_first_byte(&server, Duration::from_millis(30))
            .await
            .unwrap();
        assert_eq!(got, FirstByte::Silent);
    }

    #[tokio::test]
    async fn close_without_data_is_closed() {
        let (client, server) = pair().await;
        drop(client);
        let got = peek_first_byte(&server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, FirstByte::Closed);
    }
}
