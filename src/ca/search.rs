//! The CA search relay: finds which local server owns a channel name.
//!
//! One task owns one UDP socket. It sends the names that sessions ask for as
//! libca-style search datagrams (VERSION first, then SEARCH messages with
//! DONT_REPLY) to every target, by default the loopback broadcast address,
//! which reaches every socket bound to the CA server port in this network
//! namespace (unicast to 127.0.0.1 reaches only one of the sockets that share
//! the port). Answers are accepted only from this host's own addresses.
//! Names are batched, resent with backoff until a deadline, and answers are
//! cached for a bounded time.

use super::wire::{self, Command};
use crate::relay::localaddr::LocalAddrs;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info};

/// First resend delay; each resend doubles it, up to `MAX_RESEND_DELAY`.
const FIRST_RESEND_DELAY: Duration = Duration::from_millis(20);
const MAX_RESEND_DELAY: Duration = Duration::from_secs(1);
/// Requests queued towards the relay task before `lookup` refuses more.
const REQUEST_QUEUE: usize = 4096;

#[derive(Debug, Clone)]
pub struct SearchConfig {
    /// Where search datagrams go.
    pub targets: Vec<SocketAddrV4>,
    /// How long a name is searched for before it counts as not found.
    pub timeout: Duration,
    /// How long a found server is remembered.
    pub cache_ttl: Duration,
    /// Names searched at once, at most.
    pub max_pending: usize,
    /// Names remembered, at most.
    pub max_cached: usize,
}

/// The outcome of one lookup. `server` is `None` when no local server
/// answered before the deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub name: Bytes,
    pub server: Option<SocketAddrV4>,
}

enum Request {
    Lookup {
        name: Bytes,
        reply: mpsc::UnboundedSender<Answer>,
    },
    /// The server at this address went away: forget what it owned.
    Forget(SocketAddrV4),
}

/// The relay is overloaded; the caller should treat the name as not found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// A handle to the search relay task. Cheap to clone.
#[derive(Clone)]
pub struct Resolver {
    requests: mpsc::Sender<Request>,
}

impl Resolver {
    /// Binds the search socket and starts the relay task.
    pub fn start(config: SearchConfig) -> io::Result<Resolver> {
        let socket = bind_search_socket()?;
        info!(
            target: "nameshim::ca::search",
            local = %socket.local_addr()?,
            targets = ?config.targets,
            "CA search relay ready"
        );
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        tokio::spawn(SearchRelay::new(socket, config).run(rx));
        Ok(Resolver { requests: tx })
    }

    /// Asks for the server of `name`; the answer arrives on `reply`.
    pub fn lookup(&self, name: Bytes, reply: &mpsc::UnboundedSender<Answer>) -> Result<(), Busy> {
        self.requests
            .try_send(Request::Lookup {
                name,
                reply: reply.clone(),
            })
            .map_err(|_| Busy)
    }

    /// Drops cached answers that point at `server`.
    pub fn forget(&self, server: SocketAddrV4) {
        // Losing a forget under overload only delays a cache expiry.
        let _ = self.requests.try_send(Request::Forget(server));
    }
}

fn bind_search_socket() -> io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_broadcast(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())?;
    UdpSocket::from_std(socket.into())
}

struct Pending {
    id: u32,
    waiters: Vec<mpsc::UnboundedSender<Answer>>,
    sends: u32,
    next_send: Instant,
    deadline: Instant,
}

struct SearchRelay {
    socket: UdpSocket,
    config: SearchConfig,
    pending: HashMap<Bytes, Pending>,
    names_by_id: HashMap<u32, Bytes>,
    cache: HashMap<Bytes, (SocketAddrV4, Instant)>,
    local: LocalAddrs,
    next_id: u32,
    sequence: u32,
}

impl SearchRelay {
    fn new(socket: UdpSocket, config: SearchConfig) -> Self {
        SearchRelay {
            socket,
            config,
            pending: HashMap::new(),
            names_by_id: HashMap::new(),
            cache: HashMap::new(),
            local: LocalAddrs::new(),
            next_id: 1,
            sequence: 0,
        }
    }

    async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut datagram = vec![0u8; 64 * 1024];
        loop {
            let next_due = self.pending.values().map(|p| p.next_send).min();
            tokio::select! {
                request = requests.recv() => {
                    let Some(request) = request else { return };
                    self.handle(request);
                    // Take every request already queued, so names that
                    // arrived together leave in one datagram.
                    while let Ok(request) = requests.try_recv() {
                        self.handle(request);
                    }
                }
                received = self.socket.recv_from(&mut datagram) => match received {
                    Ok((len, from)) => self.on_datagram(&datagram[..len], from),
                    Err(e) => debug!(target: "nameshim::ca::search", cause = %e, "search socket receive error"),
                },
                _ = sleep_until_opt(next_due) => self.send_due().await,
            }
        }
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Lookup { name, reply } => self.lookup(name, reply),
            Request::Forget(server) => {
                self.cache.retain(|_, (cached, _)| *cached != server);
            }
        }
    }

    fn lookup(&mut self, name: Bytes, reply: mpsc::UnboundedSender<Answer>) {
        let now = Instant::now();
        if let Some(&(server, expires)) = self.cache.get(&name) {
            if expires > now {
                let _ = reply.send(Answer {
                    name,
                    server: Some(server),
                });
                return;
            }
            self.cache.remove(&name);
        }
        if let Some(pending) = self.pending.get_mut(&name) {
            pending.waiters.push(reply);
            return;
        }
        if self.pending.len() >= self.config.max_pending || name.len() > wire::MAX_NAME_LEN {
            debug!(target: "nameshim::ca::search", name = %String::from_utf8_lossy(&name), "search refused (limit)");
            let _ = reply.send(Answer { name, server: None });
            return;
        }
        let id = self.allocate_id();
        self.names_by_id.insert(id, name.clone());
        self.pending.insert(
            name,
            Pending {
                id,
                waiters: vec![reply],
                sends: 0,
                next_send: now,
                deadline: now + self.config.timeout,
            },
        );
    }

    fn allocate_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if !self.names_by_id.contains_key(&id) {
                return id;
            }
        }
    }

    /// Sends every name whose resend time has come, and gives up on names
    /// past their deadline.
    async fn send_due(&mut self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut due: Vec<(u32, Bytes)> = Vec::new();
        for (name, pending) in &mut self.pending {
            // Nobody left to tell: the clients that asked have gone.
            pending.waiters.retain(|waiter| !waiter.is_closed());
            if pending.deadline <= now || pending.waiters.is_empty() {
                expired.push(name.clone());
            } else if pending.next_send <= now {
                due.push((pending.id, name.clone()));
                let delay = FIRST_RESEND_DELAY
                    .saturating_mul(1 << pending.sends.min(16))
                    .min(MAX_RESEND_DELAY);
                pending.sends += 1;
                pending.next_send = (now + delay).min(pending.deadline);
            }
        }
        for name in expired {
            self.finish(&name, None);
        }
        let names: Vec<(u32, &[u8])> = due.iter().map(|(id, n)| (*id, &n[..])).collect();
        let mut rest = &names[..];
        let mut datagram = BytesMut::with_capacity(wire::MAX_UDP_SEND);
        while !rest.is_empty() {
            datagram.clear();
            self.sequence = self.sequence.wrapping_add(1);
            let fitted = wire::encode_search_datagram(rest, self.sequence, &mut datagram).max(1);
            debug!(target: "nameshim::ca::search", names = fitted, len = datagram.len(), "sending search");
            for target in &self.config.targets {
                if let Err(e) = self.socket.send_to(&datagram, *target).await {
                    debug!(target: "nameshim::ca::search", %target, cause = %e, "search send failed");
                }
            }
            rest = &rest[fitted.min(rest.len())..];
        }
    }

    fn on_datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        let SocketAddr::V4(from) = from else { return };
        if !self.local.contains(*from.ip()) {
            debug!(target: "nameshim::ca::search", peer = %from, "ignored search answer from a remote host");
            return;
        }
        let messages = match wire::decode_datagram(datagram) {
            Ok(messages) => messages,
            Err(e) => {
                debug!(target: "nameshim::ca::search", peer = %from, cause = %e, "bad search answer");
                return;
            }
        };
        for (header, _payload) in messages {
            if header.command() != Ok(Command::Search) {
                continue;
            }
            let ip = if header.p1 == wire::ADDR_OF_SENDER || header.p1 == 0 {
                *from.ip()
            } else {
                Ipv4Addr::from(header.p1)
            };
            if !self.local.contains(ip) {
                debug!(target: "nameshim::ca::search", peer = %from, server = %ip, "ignored answer naming a remote server");
                continue;
            }
            let server = SocketAddrV4::new(ip, header.data_type);
            let Some(name) = self.names_by_id.get(&header.p2).cloned() else {
                continue; // answered already, by another server
            };
            debug!(target: "nameshim::ca::search", name = %String::from_utf8_lossy(&name), %server, "found");
            self.remember(name.clone(), server);
            self.finish(&name, Some(server));
        }
    }

    fn remember(&mut self, name: Bytes, server: SocketAddrV4) {
        let now = Instant::now();
        if self.cache.len() >= self.config.max_cached {
            self.cache.retain(|_, (_, expires)| *expires > now);
            if self.cache.len() >= self.config.max_cached {
                self.cache.clear();
            }
        }
        self.cache
            .insert(name, (server, now + self.config.cache_ttl));
    }

    fn finish(&mut self, name: &Bytes, server: Option<SocketAddrV4>) {
        let Some(pending) = self.pending.remove(name) else {
            return;
        };
        self.names_by_id.remove(&pending.id);
        if server.is_none() {
            debug!(target: "nameshim::ca::search", name = %String::from_utf8_lossy(name), "not found");
        }
        for waiter in pending.waiters {
            let _ = waiter.send(Answer {
                name: name.clone(),
                server,
            });
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn fake_server() -> (UdpSocket, SearchConfig) {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(addr) = server.local_addr().unwrap() else {
            unreachable!()
        };
        let config = SearchConfig {
            targets: vec![addr],
            timeout: Duration::from_millis(300),
            cache_ttl: Duration::from_secs(5),
            max_pending: 100,
            max_cached: 100,
        };
        (server, config)
    }

    /// Answers every searched name as rsrv would, with TCP port `port`.
    async fn answer_all(server: &UdpSocket, port: u16) -> Vec<Bytes> {
        let mut buf = vec![0u8; 2048];
        let (len, from) = server.recv_from(&mut buf).await.unwrap();
        let mut names = Vec::new();
        let mut reply = BytesMut::new();
        wire::server_version().encode(&mut reply);
        for (header, payload) in wire::decode_datagram(&buf[..len]).unwrap() {
            if header.command() == Ok(Command::Search) {
                names.push(Bytes::copy_from_slice(wire::payload_name(payload)));
                let mut answer = wire::Header::new(Command::Search, port, 0, !0, header.p2);
                answer.payload_size = 8;
                answer.encode(&mut reply);
                reply.extend_from_slice(&[0, 13, 0, 0, 0, 0, 0, 0]);
            }
        }
        server.send_to(&reply, from).await.unwrap();
        names
    }

    #[tokio::test]
    async fn names_asked_together_share_one_datagram_and_are_found() {
        let (server, config) = fake_server().await;
        let resolver = Resolver::start(config).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        resolver.lookup(Bytes::from_static(b"A:ONE"), &tx).unwrap();
        resolver.lookup(Bytes::from_static(b"A:TWO"), &tx).unwrap();
        let names = answer_all(&server, 40000).await;
        assert_eq!(names, [&b"A:ONE"[..], &b"A:TWO"[..]]);
        let expected = Some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 40000));
        for _ in 0..2 {
            assert_eq!(rx.recv().await.unwrap().server, expected);
        }
    }

    #[tokio::test]
    async fn cached_answer_needs_no_datagram() {
        let (server, config) = fake_server().await;
        let resolver = Resolver::start(config).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        resolver.lookup(Bytes::from_static(b"B"), &tx).unwrap();
        answer_all(&server, 40001).await;
        rx.recv().await.unwrap();
        resolver.lookup(Bytes::from_static(b"B"), &tx).unwrap();
        let again = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
        assert_eq!(
            again.unwrap().unwrap().server.map(|s| s.port()),
            Some(40001)
        );
        let mut buf = [0u8; 64];
        let extra =
            tokio::time::timeout(Duration::from_millis(50), server.recv_from(&mut buf)).await;
        assert!(extra.is_err(), "no second search for a cached name");
    }

    #[tokio::test]
    async fn unanswered_name_is_resent_then_not_found() {
        let (server, config) = fake_server().await;
        let resolver = Resolver::start(config).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        resolver.lookup(Bytes::from_static(b"NOBODY"), &tx).unwrap();
        let answer = rx.recv().await.unwrap();
        assert_eq!(answer.server, None);
        let mut buf = [0u8; 256];
        let mut sends = 0;
        while tokio::time::timeout(Duration::from_millis(10), server.recv_from(&mut buf))
            .await
            .is_ok()
        {
            sends += 1;
        }
        assert!(sends >= 3, "searched {sends} times in 300 ms");
    }

    #[tokio::test]
    async fn search_stops_when_every_asker_is_gone() {
        let (server, config) = fake_server().await;
        let resolver = Resolver::start(config).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        resolver.lookup(Bytes::from_static(b"ORPHAN"), &tx).unwrap();
        let mut buf = [0u8; 256];
        server.recv_from(&mut buf).await.unwrap();
        drop((tx, rx));
        // Let the resend that notices the closed waiter go by.
        tokio::time::sleep(Duration::from_millis(60)).await;
        while tokio::time::timeout(Duration::from_millis(5), server.recv_from(&mut buf))
            .await
            .is_ok()
        {}
        let more =
            tokio::time::timeout(Duration::from_millis(150), server.recv_from(&mut buf)).await;
        assert!(more.is_err(), "searched on after the only asker left");
    }

    #[tokio::test]
    async fn forgotten_server_is_searched_again() {
        let (server, config) = fake_server().await;
        let resolver = Resolver::start(config).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        resolver.lookup(Bytes::from_static(b"C"), &tx).unwrap();
        answer_all(&server, 40002).await;
        let first = rx.recv().await.unwrap().server.unwrap();
        resolver.forget(first);
        resolver.lookup(Bytes::from_static(b"C"), &tx).unwrap();
        assert_eq!(answer_all(&server, 40003).await, [&b"C"[..]]);
        assert_eq!(
            rx.recv().await.unwrap().server.map(|s| s.port()),
            Some(40003)
        );
    }
}
