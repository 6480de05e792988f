//! How many connections to one server the shim opens at once. Every client
//! connection has its own link to each server it uses, so clients that
//! arrive together make as many connects to one server at the same moment.
//! A server's listen backlog can be small (QSRV2 listens with a backlog of
//! 4): past it, the kernel answers with SYN cookies and then drops the
//! final ACK, and the connection is open on the shim's side only. A PVA
//! server speaks first, so such a link waits for nothing. Keeping the
//! connects in flight to one server below its backlog avoids that.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections to one server between connect and the server's first byte,
/// at most: QSRV2's listen backlog.
pub const MAX_OPENING_PER_SERVER: usize = 4;

/// The servers being connected to, each with its connects in flight.
pub struct Opening {
    servers: Mutex<HashMap<SocketAddrV4, Arc<Semaphore>>>,
    per_server: usize,
}

/// The right to open one connection to a server; given back when dropped.
pub struct OpenPermit<'a> {
    opening: &'a Opening,
    server: SocketAddrV4,
    permit: Option<OwnedSemaphorePermit>,
}

pub static OPENING: std::sync::LazyLock<Opening> =
    std::sync::LazyLock::new(|| Opening::new(MAX_OPENING_PER_SERVER));

impl Opening {
    pub fn new(per_server: usize) -> Self {
        Opening {
            servers: Mutex::new(HashMap::new()),
            per_server,
        }
    }

    /// Waits until fewer than the limit of connections to `server` are
    /// opening.
    pub async fn enter(&self, server: SocketAddrV4) -> OpenPermit<'_> {
        let semaphore = {
            let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
            servers
                .entry(server)
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_server)))
                .clone()
        };
        // The semaphore is never closed.
        let permit = semaphore.acquire_owned().await.ok();
        OpenPermit {
            opening: self,
            server,
            permit,
        }
    }

    #[cfg(test)]
    fn servers(&self) -> usize {
        self.servers.lock().map(|s| s.len()).unwrap_or(0)
    }
}

impl Drop for OpenPermit<'_> {
    fn drop(&mut self) {
        let mut servers = self
            .opening
            .servers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        drop(self.permit.take());
        // A server no one is connecting to, or waiting to, is forgotten, so
        // the map holds only servers being connected to now.
        if servers
            .get(&self.server)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            servers.remove(&self.server);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    const A: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5075);
    const B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5076);

    #[tokio::test]
    async fn connects_to_one_server_wait_past_the_limit() {
        let opening = Opening::new(2);
        let first = opening.enter(A).await;
        let _second = opening.enter(A).await;
        let third = tokio::time::timeout(Duration::from_millis(50), opening.enter(A)).await;
        assert!(third.is_err(), "a third connect waits");
        let _other = tokio::time::timeout(Duration::from_millis(50), opening.enter(B))
            .await
            .expect("another server is not held up");
        drop(first);
        tokio::time::timeout(Duration::from_millis(50), opening.enter(A))
            .await
            .expect("a connect done makes room");
    }

    #[tokio::test]
    async fn a_server_no_longer_connected_to_is_forgotten() {
        let opening = Opening::new(1);
        let permit = opening.enter(A).await;
        let waiting = {
            let opening = &opening;
            async move { opening.enter(A).await }
        };
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut waiting)
                .await
                .is_err()
        );
        drop(permit);
        assert_eq!(opening.servers(), 1, "kept for the connect still waiting");
        let second = waiting.await;
        drop(second);
        assert_eq!(opening.servers(), 0);
    }
}
