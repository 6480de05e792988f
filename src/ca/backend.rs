//! One TCP circuit from the shim to a local CA server, on behalf of one
//! client connection.
//!
//! Messages for the server are queued in the link's outbox from the moment
//! the link exists; the task connects, then writes them. Messages from the
//! server go to the session as events, each carrying the outbox budget it
//! will use towards the client: a slow client therefore stops this reader,
//! and TCP flow control reaches the server.

use super::wire::Message;
use super::CaDecoder;
use crate::relay::framing::FrameReader;
use crate::relay::metrics::{Proto, ServerLinkCount};
use crate::relay::outbox::{Outbox, OutboxReceiver};
use crate::relay::upstream::{self, BackendLink, LinkError};
use crate::session::Events;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;
use tokio::net::TcpStream;

pub struct BackendConfig {
    /// Largest payload accepted from a server (--max-server-message).
    pub max_server_message: u32,
    pub queue_bytes: usize,
    pub connect_timeout: Duration,
    /// The address circuits leave from (see `relay::upstream::connect`).
    pub source: Ipv4Addr,
}

/// Starts connecting to `server`. `client` is the outbox towards the
/// client, whose budget bounds what this circuit may have in flight.
pub fn open(
    server: SocketAddrV4,
    id: u64,
    config: &BackendConfig,
    client: Outbox,
    events: Events<Message>,
) -> BackendLink {
    let (max_payload, timeout, source) = (
        config.max_server_message,
        config.connect_timeout,
        config.source,
    );
    BackendLink::spawn(
        server,
        id,
        config.queue_bytes,
        events,
        move |queue, _, reports| async move {
            let stream = match upstream::connect_within(server, source, timeout).await {
                Ok(stream) => stream,
                Err(e) => return e,
            };
            let _counted = ServerLinkCount::opened(Proto::Ca);
            relay(stream, id, server, max_payload, queue, client, &reports).await
        },
    )
}

/// Runs the circuit until either direction ends; returns why it ended.
async fn relay(
    stream: TcpStream,
    link: u64,
    server: SocketAddrV4,
    max_payload: u32,
    queue: OutboxReceiver,
    client: Outbox,
    events: &Events<Message>,
) -> LinkError {
    let (read, write) = stream.into_split();
    let mut reader = FrameReader::new(read, CaDecoder { max_payload });
    let read_loop = upstream::pump(&mut reader, server, link, &client, events);
    tokio::select! {
        error = read_loop => error,
        written = queue.drain_into(write) => match written {
            // Every sender is gone: the session dropped the link.
            Ok(()) => LinkError::ClientGone,
            Err(e) => LinkError::Write(e),
        },
    }
}
