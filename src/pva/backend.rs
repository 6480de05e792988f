//! One TCP connection from the shim to a local PVA server, on behalf of one
//! client connection.
//!
//! The task does the client side of the handshake with the client's own
//! method and credentials (passed on verbatim), then relays. Messages for the
//! server wait in the link's outbox until the handshake is done. Messages
//! from the server go to the session as events carrying the client outbox
//! budget they will use, so a slow client stops this reader. Servers drop a
//! connection that is silent for 40 s and never send ECHO themselves, so the
//! task sends one every 15 s, as clients do.

use super::frame;
use super::wire::Direction;
use super::wire::{self, Command, Message};
use crate::relay::framing::FrameReader;
use crate::relay::metrics::{Proto, ServerLinkCount};
use crate::relay::outbox::{Outbox, OutboxReceiver};
use crate::relay::upstream::{self, BackendLink, LinkError};
use crate::session::Events;
use bytes::BytesMut;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tracing::debug;

const ECHO_INTERVAL: Duration = Duration::from_secs(15);
/// pvAccessCPP gives up on a handshake after 5 s; so does the shim.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the shim waits for a new connection's first byte before it
/// connects again, once per wait; the last connection has the whole
/// [`HANDSHAKE_TIMEOUT`]. A PVA server speaks first, as soon as it
/// accepts. A connection that stays silent is most likely one the server
/// never accepted: when its listen backlog is full (QSRV2's is 4), the
/// kernel completes the TCP handshake with a SYN cookie and then drops the
/// final ACK, so only the shim's side is open. The shim speaks only after
/// the server, so nothing would revive it; 1,000 clients connecting at once
/// through the shim left some dozens of links so. The waits grow, so that
/// connects again add less to a server's full queue.
const GREETING_WAITS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

pub struct BackendConfig {
    /// Largest message accepted from a server (--max-message).
    pub max_server_message: u32,
    pub queue_bytes: usize,
    pub connect_timeout: Duration,
    /// The byte order the client connection uses; a server must match it,
    /// because payloads pass through unchanged.
    pub big_endian: bool,
    /// The address connections leave from (see `relay::upstream::connect`).
    pub source: Ipv4Addr,
}

pub fn open(
    server: SocketAddrV4,
    id: u64,
    config: &BackendConfig,
    validation: wire::ClientValidation,
    client: Outbox,
    events: Events<Message>,
) -> BackendLink {
    let settings = Settings {
        max_message: config.max_server_message,
        connect_timeout: config.connect_timeout,
        big_endian: config.big_endian,
        source: config.source,
    };
    BackendLink::spawn(
        server,
        id,
        config.queue_bytes,
        events,
        move |queue, own, reports| async move {
            let stream = match connect_greeted(server, &settings).await {
                Ok(stream) => stream,
                Err(e) => return e,
            };
            let _counted = ServerLinkCount::opened(Proto::Pva);
            let (read, mut write) = stream.into_split();
            let mut reader = FrameReader::new(
                read,
                wire::Decoder::new(settings.max_message, Direction::FromServer),
            );
            let shaking = handshake(&mut reader, &mut write, &validation, settings.big_endian);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, shaking).await {
                Err(_) => LinkError::HandshakeTimeout(HANDSHAKE_TIMEOUT),
                Ok(Err(e)) => e,
                Ok(Ok(())) => {
                    let link = Relay {
                        server,
                        id,
                        queue,
                        own,
                        client,
                    };
                    link.run(reader, write, &reports).await
                }
            }
        },
    )
}

struct Settings {
    max_message: u32,
    connect_timeout: Duration,
    big_endian: bool,
    source: Ipv4Addr,
}

/// Connects to `server`, and connects again while a connection brings no
/// byte within its [`GREETING_WAITS`].
async fn connect_greeted(
    server: SocketAddrV4,
    settings: &Settings,
) -> Result<TcpStream, LinkError> {
    let connect = || upstream::connect_within(server, settings.source, settings.connect_timeout);
    for wait in GREETING_WAITS {
        let stream = connect().await?;
        // Ready on the first byte, and on a close or an error, which the
        // handshake then reports.
        if tokio::time::timeout(wait, stream.readable()).await.is_ok() {
            return Ok(stream);
        }
        debug!(%server, ?wait, "server sent nothing on a new connection; connecting again");
    }
    connect().await
}

async fn handshake(
    reader: &mut FrameReader<OwnedReadHalf, wire::Decoder>,
    write: &mut OwnedWriteHalf,
    validation: &wire::ClientValidation,
    big_endian: bool,
) -> Result<(), LinkError> {
    use tokio::io::AsyncWriteExt;
    let mut server_big_endian = None;
    let methods = loop {
        let message = next(reader).await?;
        if message.header.is_control() {
            if message.header.command == wire::CONTROL_SET_BYTE_ORDER {
                server_big_endian = Some(message.header.is_big_endian());
            }
            continue;
        }
        if message.header.command() == Ok(Command::ConnectionValidation) {
            break wire::parse_server_methods(&message)
                .map_err(|e| LinkError::Handshake(e.to_string()))?;
        }
    };
    if server_big_endian.unwrap_or(big_endian) != big_endian {
        return Err(LinkError::Handshake(
            "the server's byte order differs from the client's".to_string(),
        ));
    }
    let mut ours = validation.clone();
    if !methods.contains(&validation.method) {
        // The client's method is not offered here: fall back to anonymous,
        // whose credentials are a null type.
        ours.method = bytes::Bytes::from_static(b"anonymous");
        ours.credentials = bytes::Bytes::from_static(&[0xFF]);
    }
    let mut out = BytesMut::new();
    let message = wire::client_validation(big_endian, &ours);
    message.header.encode(&mut out);
    out.extend_from_slice(&message.payload);
    write.write_all(&out).await.map_err(LinkError::Write)?;
    loop {
        let message = next(reader).await?;
        if message.header.command() == Ok(Command::ConnectionValidated)
            && !message.header.is_control()
        {
            if message.payload.first() != Some(&wire::STATUS_OK) {
                tracing::warn!(target: "nameshim::pva::backend", "server did not accept the client's credentials; continuing as pvxs clients do");
            }
            return Ok(());
        }
    }
}

async fn next(
    reader: &mut FrameReader<OwnedReadHalf, wire::Decoder>,
) -> Result<Message, LinkError> {
    match reader.next().await {
        Ok(Some(message)) => Ok(message),
        Ok(None) => Err(LinkError::Handshake(
            "server closed the connection".to_string(),
        )),
        Err(e) => Err(LinkError::Read(e)),
    }
}

/// A link past its handshake.
struct Relay {
    server: SocketAddrV4,
    id: u64,
    /// Frames for the server.
    queue: OutboxReceiver,
    /// A sender into `queue`, for the keepalive.
    own: Outbox,
    /// Towards the client, whose budget bounds what is in flight.
    client: Outbox,
}

impl Relay {
    /// Runs until either direction ends; returns why it ended.
    async fn run(
        self,
        mut reader: FrameReader<OwnedReadHalf, wire::Decoder>,
        write: OwnedWriteHalf,
        events: &Events<Message>,
    ) -> LinkError {
        let Relay {
            server,
            id,
            queue,
            own,
            client,
        } = self;
        let read_loop = upstream::pump(&mut reader, server, id, &client, events);
        tokio::select! {
            error = read_loop => error,
            error = keepalive(own) => error,
            written = queue.drain_into(write) => match written {
                Ok(()) => LinkError::ClientGone,
                Err(e) => LinkError::Write(e),
            },
        }
    }
}

/// Sends an ECHO every `ECHO_INTERVAL` until the link's queue is gone.
async fn keepalive(own: Outbox) -> LinkError {
    let mut ticks = tokio::time::interval(ECHO_INTERVAL);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let echo = wire::Writer::new(wire::HOST_BIG_ENDIAN)
            .into_message(Command::Echo, Direction::FromClient);
        if own.send(frame(&echo)).await.is_err() {
            return LinkError::ClientGone;
        }
    }
}
