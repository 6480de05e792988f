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
use crate::relay::outbox::{Outbox, OutboxReceiver};
use crate::relay::upstream::{self, BackendLink};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// What a backend circuit reports to its session. `link` tells apart
/// successive circuits to the same server.
pub type BackendEvent = crate::relay::upstream::BackendEvent<Message>;

pub struct BackendConfig {
    /// Largest payload accepted from a server (--max-message).
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
    events: mpsc::UnboundedSender<BackendEvent>,
) -> BackendLink {
    let (outbox, queue) = Outbox::new(config.queue_bytes);
    let task = tokio::spawn(run(
        server,
        id,
        config.max_server_message,
        config.connect_timeout,
        config.source,
        queue,
        client,
        events,
    ));
    BackendLink::new(id, outbox, task.abort_handle())
}

#[allow(clippy::too_many_arguments)]
async fn run(
    server: SocketAddrV4,
    link: u64,
    max_payload: u32,
    connect_timeout: Duration,
    source: Ipv4Addr,
    queue: OutboxReceiver,
    client: Outbox,
    events: mpsc::UnboundedSender<BackendEvent>,
) {
    let connecting = upstream::connect(server, source);
    let reason = match tokio::time::timeout(connect_timeout, connecting).await {
        Err(_) => "connect timed out".to_string(),
        Ok(Err(e)) => format!("connect failed: {e}"),
        Ok(Ok(stream)) => {
            let _counted =
                crate::relay::metrics::ServerLinkCount::opened(crate::relay::metrics::Proto::Ca);
            relay(stream, link, server, max_payload, queue, client, &events).await
        }
    };
    let _ = events.send(BackendEvent::Closed {
        server,
        link,
        reason,
    });
}

/// Runs the circuit until either direction ends; returns why it ended.
async fn relay(
    stream: TcpStream,
    link: u64,
    server: SocketAddrV4,
    max_payload: u32,
    queue: OutboxReceiver,
    client: Outbox,
    events: &mpsc::UnboundedSender<BackendEvent>,
) -> String {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let mut reader = FrameReader::new(read, CaDecoder { max_payload });
    let read_loop = upstream::pump(&mut reader, server, link, &client, events);
    tokio::select! {
        reason = read_loop => reason,
        written = queue.drain_into(write) => match written {
            Ok(()) => "session closed the circuit".to_string(),
            Err(e) => format!("write failed: {e}"),
        },
    }
}
