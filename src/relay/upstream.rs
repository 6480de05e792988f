//! Connections from the shim to a server: how they are opened, what they
//! report to their session, and the loop that reads the server under the
//! client's flow control.
//!
//! Every connection to a server leaves from one fixed source address, never
//! from 127.0.0.1. A server sees a client through the shim as a peer on that
//! address, so a rule that trusts the server's own host (an access security
//! host group holding `localhost` or `127.0.0.1`) does not reach a remote
//! client through the shim. See docs/security.md.

use super::framing::{Decoder, FrameReader, Piece, ReadError};
use super::outbox::{Outbox, OutboxReceiver, Permit};
use super::stream::{Pass, PART_STALL};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;
use tokio::io::AsyncRead;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::Instrument;

/// The default source address of server connections: on the loopback, so it
/// works with servers bound to 127.0.0.1 as well as to the wildcard, but
/// none of the loopback addresses a host already calls its own: not
/// 127.0.0.1 (`localhost`), not 127.0.1.1 (Debian and Ubuntu give the host
/// name that address in /etc/hosts), not 127.0.0.2 (openSUSE's equivalent).
/// Its last two bytes spell the shim's default port, 5066.
pub const DEFAULT_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 50, 66);

/// Opens a TCP connection to `server` from `source` (any port). An
/// unspecified `source` (0.0.0.0) leaves the choice to the kernel, which
/// picks 127.0.0.1 for a loopback server.
pub async fn connect(server: SocketAddrV4, source: Ipv4Addr) -> io::Result<TcpStream> {
    let socket = bound_socket(source)?;
    socket.connect(server.into()).await
}

/// Checks at start-up that server connections can leave from `source`, so a
/// wrong address is reported once, by name, rather than by every connection.
pub fn check_source(source: Ipv4Addr) -> io::Result<()> {
    bound_socket(source).map(drop)
}

fn bound_socket(source: Ipv4Addr) -> io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    if source.is_unspecified() {
        return Ok(socket);
    }
    // Take the port at connect time rather than at bind time: a port is then
    // shared by connections to different servers, as for an unbound socket,
    // instead of every connection from `source` needing its own port.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    );
    socket.bind(SocketAddr::from((source, 0))).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot bind source address {source}: {e}"),
        )
    })?;
    Ok(socket)
}

/// Bytes a message takes on the wire, to reserve them towards the client.
pub trait WireLen {
    fn wire_len(&self) -> usize;
}

/// Why a link to a server ended. The event that carries it names the
/// server.
#[derive(Debug)]
pub enum LinkError {
    ConnectTimeout(Duration),
    Connect(io::Error),
    HandshakeTimeout(Duration),
    /// The server's side of the handshake went wrong.
    Handshake(String),
    Read(ReadError),
    /// The server closed the connection.
    ServerClosed,
    Write(io::Error),
    /// The server sent something the shim cannot follow.
    Protocol(String),
    /// The client connection ended, so the link has no one to serve.
    ClientGone,
    /// The server began a message, then sent no byte of it for this long.
    StalledInMessage(Duration),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::ConnectTimeout(d) => write!(f, "connect timed out after {d:?}"),
            LinkError::Connect(e) => write!(f, "connect failed: {e}"),
            LinkError::HandshakeTimeout(d) => write!(f, "handshake timed out after {d:?}"),
            LinkError::Handshake(why) => write!(f, "handshake failed: {why}"),
            LinkError::Read(e) => write!(f, "read failed: {e}"),
            LinkError::ServerClosed => write!(f, "server closed the connection"),
            LinkError::Write(e) => write!(f, "write failed: {e}"),
            LinkError::Protocol(why) => write!(f, "cannot follow the server: {why}"),
            LinkError::ClientGone => write!(f, "client connection ended"),
            LinkError::StalledInMessage(d) => {
                write!(f, "sent no byte of a message it had begun for {d:?}")
            }
        }
    }
}

/// Connects to `server` from `source` within `timeout`.
pub async fn connect_within(
    server: SocketAddrV4,
    source: Ipv4Addr,
    timeout: Duration,
) -> Result<TcpStream, LinkError> {
    match tokio::time::timeout(timeout, connect(server, source)).await {
        Err(_) => Err(LinkError::ConnectTimeout(timeout)),
        Ok(Err(e)) => Err(LinkError::Connect(e)),
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

/// A server connection's report. `link` tells apart successive connections
/// to the same server.
pub enum BackendEvent<M> {
    Message {
        server: SocketAddrV4,
        link: u64,
        message: M,
        permit: Permit,
    },
    /// The head of a large message (see `relay::stream`): the link waits
    /// for the session's answer before it reads on.
    Head {
        server: SocketAddrV4,
        link: u64,
        head: M,
        answer: oneshot::Sender<Pass>,
    },
    Closed {
        server: SocketAddrV4,
        link: u64,
        error: LinkError,
    },
}

/// A live connection from the shim to a server, on behalf of one client
/// connection: its id, the queue towards the server, and the task that
/// runs it. Dropping it closes the connection.
pub struct BackendLink {
    pub id: u64,
    pub outbox: Outbox,
    task: AbortHandle,
}

impl BackendLink {
    /// Starts link `id` to `server`: `run` gets the queue of frames for the
    /// server, a sender into that queue (for the link's own messages) and
    /// the session's events, and returns why the link ended, which goes to
    /// the session too. The task
    /// logs in the span of the client connection that opened it.
    pub fn spawn<M, F, Fut>(
        server: SocketAddrV4,
        id: u64,
        queue_bytes: usize,
        events: mpsc::UnboundedSender<BackendEvent<M>>,
        run: F,
    ) -> BackendLink
    where
        M: Send + 'static,
        F: FnOnce(OutboxReceiver, Outbox, mpsc::UnboundedSender<BackendEvent<M>>) -> Fut,
        Fut: Future<Output = LinkError> + Send + 'static,
    {
        let (outbox, queue) = Outbox::new(queue_bytes);
        let ended = run(queue, outbox.clone(), events.clone());
        let task = tokio::spawn(
            async move {
                let error = ended.await;
                let _ = events.send(BackendEvent::Closed {
                    server,
                    link: id,
                    error,
                });
            }
            .in_current_span(),
        );
        BackendLink {
            id,
            outbox,
            task: task.abort_handle(),
        }
    }
}

impl Drop for BackendLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads server messages and hands them to the session until the server or
/// the session ends; returns why. Each message first reserves its bytes in
/// the client's outbox, so a client that reads slowly stops this reader and
/// TCP flow control reaches the server: nothing piles up in between. A
/// large message passes in parts (see `relay::stream`), bounded the same
/// way by the channel that carries them.
pub async fn pump<R, D>(
    reader: &mut FrameReader<R, D>,
    server: SocketAddrV4,
    link: u64,
    client: &Outbox,
    events: &mpsc::UnboundedSender<BackendEvent<D::Item>>,
) -> LinkError
where
    R: AsyncRead + Unpin,
    D: Decoder,
    D::Item: WireLen,
{
    loop {
        let message = match reader.next_piece().await {
            Ok(Some(Piece::Whole(message))) => message,
            Ok(Some(Piece::Head(head))) => {
                let (answer, answered) = oneshot::channel();
                let event = BackendEvent::Head {
                    server,
                    link,
                    head,
                    answer,
                };
                if events.send(event).is_err() {
                    return LinkError::ClientGone;
                }
                // No answer: the session is gone.
                let pass = answered.await.unwrap_or(Pass::Drop);
                match pass_on(reader, pass).await {
                    Ok(None) => continue,
                    Ok(Some(message)) => message,
                    Err(e) => return e,
                }
            }
            Ok(None) => return LinkError::ServerClosed,
            Err(e) => return LinkError::Read(e),
        };
        let Ok(permit) = client.reserve(message.wire_len()).await else {
            return LinkError::ClientGone;
        };
        let event = BackendEvent::Message {
            server,
            link,
            message,
            permit,
        };
        if events.send(event).is_err() {
            return LinkError::ClientGone;
        }
    }
}

/// Does what the session said with the large message whose head the reader
/// just yielded; returns the message if it is to be handled whole.
async fn pass_on<R, D>(
    reader: &mut FrameReader<R, D>,
    pass: Pass,
) -> Result<Option<D::Item>, LinkError>
where
    R: AsyncRead + Unpin,
    D: Decoder,
{
    let sink = match pass {
        Pass::Whole => {
            return match reader.next().await {
                Ok(Some(message)) => Ok(Some(message)),
                Ok(None) => Err(LinkError::ServerClosed),
                Err(e) => Err(LinkError::Read(e)),
            }
        }
        Pass::Stream(sink) => Some(sink),
        Pass::Drop => None,
    };
    reader.pass_in_parts();
    loop {
        let part = match tokio::time::timeout(PART_STALL, reader.next_part()).await {
            Err(_) => return Err(LinkError::StalledInMessage(PART_STALL)),
            Ok(Err(e)) => return Err(LinkError::Read(e)),
            Ok(Ok(part)) => part,
        };
        match (part, &sink) {
            (Some(bytes), Some(sink)) => sink.send(bytes).await,
            (Some(_), None) => Ok(()),
            (None, _) => break,
        }
        .map_err(|_| LinkError::ClientGone)?;
    }
    if let Some(sink) = sink {
        sink.finish().await.map_err(|_| LinkError::ClientGone)?;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn peer_seen_by_server(source: Ipv4Addr, server_ip: Ipv4Addr) -> SocketAddr {
        let listener = TcpListener::bind((server_ip, 0)).await.unwrap();
        let SocketAddr::V4(server) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let (_client, accepted) = tokio::join!(connect(server, source), listener.accept());
        accepted.unwrap().1
    }

    #[tokio::test]
    async fn server_sees_the_source_address_not_localhost() {
        let peer = peer_seen_by_server(DEFAULT_SOURCE, Ipv4Addr::LOCALHOST).await;
        assert_eq!(peer.ip(), DEFAULT_SOURCE);
    }

    #[tokio::test]
    async fn server_on_the_wildcard_sees_the_source_address() {
        let peer = peer_seen_by_server(Ipv4Addr::new(127, 9, 8, 7), Ipv4Addr::UNSPECIFIED).await;
        assert_eq!(peer.ip(), Ipv4Addr::new(127, 9, 8, 7));
    }

    #[tokio::test]
    async fn unspecified_source_leaves_the_choice_to_the_kernel() {
        let peer = peer_seen_by_server(Ipv4Addr::UNSPECIFIED, Ipv4Addr::LOCALHOST).await;
        assert_eq!(peer.ip(), Ipv4Addr::LOCALHOST);
    }

    #[test]
    fn a_source_address_not_on_this_host_is_refused_at_start() {
        // 192.0.2.0/24 is reserved for documentation: never local.
        let err = check_source(Ipv4Addr::new(192, 0, 2, 1)).unwrap_err();
        assert!(err.to_string().contains("192.0.2.1"), "{err}");
    }
}
