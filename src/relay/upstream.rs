//! What a connection from the shim to a server reports to its session, and
//! the loop that reads the server under the client's flow control.

use super::framing::{Decoder, FrameReader};
use super::outbox::{Outbox, Permit};
use std::net::SocketAddrV4;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// Bytes a message takes on the wire, to reserve them towards the client.
pub trait WireLen {
    fn wire_len(&self) -> usize;
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
    Closed {
        server: SocketAddrV4,
        link: u64,
        reason: String,
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
    pub fn new(id: u64, outbox: Outbox, task: AbortHandle) -> BackendLink {
        BackendLink { id, outbox, task }
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
/// TCP flow control reaches the server: nothing piles up in between.
pub async fn pump<R, D>(
    reader: &mut FrameReader<R, D>,
    server: SocketAddrV4,
    link: u64,
    client: &Outbox,
    events: &mpsc::UnboundedSender<BackendEvent<D::Item>>,
) -> String
where
    R: AsyncRead + Unpin,
    D: Decoder,
    D::Item: WireLen,
{
    loop {
        let message = match reader.next().await {
            Ok(Some(message)) => message,
            Ok(None) => return "server closed the connection".to_string(),
            Err(e) => return e.to_string(),
        };
        let Ok(permit) = client.reserve(message.wire_len()).await else {
            return "client gone".to_string();
        };
        let event = BackendEvent::Message {
            server,
            link,
            message,
            permit,
        };
        if events.send(event).is_err() {
            return "session ended".to_string();
        }
    }
}
