//! The search relay shared by CA and PVA: finds which local server owns a
//! channel name, by UDP over the loopback.
//!
//! One task owns one UDP socket. It sends the names that sessions ask for in
//! the protocol's search datagrams to every target, resends them with backoff
//! until a deadline, and caches answers for a bounded time. Answers are
//! accepted only from this host's own addresses, and only when the server
//! they name is local too, so a client is never routed to another machine.
//! The protocol (datagram layout, answer parsing) is a [`SearchProtocol`].

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
/// Largest search datagram either protocol sends.
const MAX_DATAGRAM: usize = 1500;

/// What differs between CA and PVA searches.
pub trait SearchProtocol: Send + 'static {
    /// For log lines.
    const NAME: &'static str;
    /// Longest name a datagram can carry.
    const MAX_NAME_LEN: usize;

    /// Appends one search datagram for a prefix of `names` (search id, name)
    /// to `out` and returns how many names it holds (at least one).
    /// `reply_port` is the relay's own UDP port.
    fn encode(
        &mut self,
        names: &[(u32, &[u8])],
        sequence: u32,
        reply_port: u16,
        out: &mut BytesMut,
    ) -> usize;

    /// The (search id, server) pairs a datagram from `from` announces. A
    /// server address of 0.0.0.0 means "the sender".
    fn answers(
        &mut self,
        datagram: &[u8],
        from: SocketAddrV4,
        found: &mut Vec<(u32, SocketAddrV4)>,
    );
}

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
    /// Starts the relay task on an already bound socket.
    pub fn start<P: SearchProtocol>(
        protocol: P,
        socket: UdpSocket,
        config: SearchConfig,
    ) -> io::Result<Resolver> {
        info!(
            target: "nameshim::relay::discovery",
            protocol = P::NAME,
            local = %socket.local_addr()?,
            targets = ?config.targets,
            "search relay ready"
        );
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        tokio::spawn(SearchRelay::new(protocol, socket, config).run(rx));
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

/// A UDP socket on an ephemeral port of `local` that may send broadcasts.
pub fn bind_search_socket(local: Ipv4Addr) -> io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_broadcast(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((local, 0)).into())?;
    UdpSocket::from_std(socket.into())
}

struct Pending {
    id: u32,
    waiters: Vec<mpsc::UnboundedSender<Answer>>,
    sends: u32,
    next_send: Instant,
    deadline: Instant,
}

struct SearchRelay<P> {
    protocol: P,
    socket: UdpSocket,
    config: SearchConfig,
    pending: HashMap<Bytes, Pending>,
    names_by_id: HashMap<u32, Bytes>,
    cache: HashMap<Bytes, (SocketAddrV4, Instant)>,
    local: LocalAddrs,
    next_id: u32,
    sequence: u32,
}

impl<P: SearchProtocol> SearchRelay<P> {
    fn new(protocol: P, socket: UdpSocket, config: SearchConfig) -> Self {
        SearchRelay {
            protocol,
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
                    Err(e) => debug!(target: "nameshim::relay::discovery", cause = %e, "search socket receive error"),
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
        if self.pending.len() >= self.config.max_pending || name.len() > P::MAX_NAME_LEN {
            debug!(target: "nameshim::relay::discovery", name = %String::from_utf8_lossy(&name), "search refused (limit)");
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
        let mut datagram = BytesMut::with_capacity(MAX_DATAGRAM);
        let reply_port = self.socket.local_addr().map_or(0, |a| a.port());
        while !rest.is_empty() {
            datagram.clear();
            self.sequence = self.sequence.wrapping_add(1);
            let fitted = self
                .protocol
                .encode(rest, self.sequence, reply_port, &mut datagram)
                .max(1);
            debug!(target: "nameshim::relay::discovery", protocol = P::NAME, names = fitted, len = datagram.len(), "sending search");
            for target in &self.config.targets {
                if let Err(e) = self.socket.send_to(&datagram, *target).await {
                    debug!(target: "nameshim::relay::discovery", %target, cause = %e, "search send failed");
                }
            }
            rest = &rest[fitted.min(rest.len())..];
        }
    }

    fn on_datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        let SocketAddr::V4(from) = from else { return };
        if !self.local.contains(*from.ip()) {
            debug!(target: "nameshim::relay::discovery", peer = %from, "ignored search answer from a remote host");
            return;
        }
        let mut found = Vec::new();
        self.protocol.answers(datagram, from, &mut found);
        for (id, server) in found {
            let ip = if server.ip().is_unspecified() {
                *from.ip()
            } else {
                *server.ip()
            };
            if !self.local.contains(ip) {
                debug!(target: "nameshim::relay::discovery", peer = %from, server = %ip, "ignored answer naming a remote server");
                continue;
            }
            let server = SocketAddrV4::new(ip, server.port());
            let Some(name) = self.names_by_id.get(&id).cloned() else {
                continue; // answered already, by another server
            };
            debug!(target: "nameshim::relay::discovery", protocol = P::NAME, name = %String::from_utf8_lossy(&name), %server, "found");
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
            debug!(target: "nameshim::relay::discovery", name = %String::from_utf8_lossy(name), "not found");
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

/// Distinct waiters kept for one name under search, besides those that
/// must always be settled.
const MAX_WAITERS_PER_NAME: usize = 64;

/// A waiter for a name: something a session must do once the name's server
/// is known (or known to be absent).
pub trait Waiter: PartialEq {
    /// Whether dropping this waiter would leave a request unanswered
    /// (a channel creation), so it must be kept whatever the limits.
    fn must_settle(&self) -> bool;
}

/// The names one client connection waits for, each asked of the relay once.
pub struct Awaiting<W> {
    names: HashMap<Bytes, Vec<W>>,
    max_names: usize,
}

impl<W: Waiter> Awaiting<W> {
    pub fn new(max_names: usize) -> Self {
        Awaiting {
            names: HashMap::new(),
            max_names,
        }
    }

    /// Registers `waiter` for `name`, asking the relay when the name is new.
    /// Clients repeat a search until it is answered: one waiter is kept per
    /// distinct request, and a bounded number per name. Returns the waiter
    /// back when it cannot wait (limits, or the relay is overloaded): the
    /// caller settles it as "not found".
    pub fn add(
        &mut self,
        name: Bytes,
        waiter: W,
        resolver: &Resolver,
        answers: &mpsc::UnboundedSender<Answer>,
    ) -> Option<W> {
        if let Some(waiters) = self.names.get_mut(&name) {
            if !waiters.contains(&waiter)
                && (waiter.must_settle() || waiters.len() < MAX_WAITERS_PER_NAME)
            {
                waiters.push(waiter);
            }
            return None;
        }
        if self.names.len() >= self.max_names || resolver.lookup(name.clone(), answers).is_err() {
            return Some(waiter);
        }
        self.names.insert(name, vec![waiter]);
        None
    }

    /// Everything that waited for the answered name.
    pub fn take(&mut self, name: &Bytes) -> Vec<W> {
        self.names.remove(name).unwrap_or_default()
    }
}
