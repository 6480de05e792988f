//! The search relay shared by CA and PVA: finds which local server owns a
//! channel name, by UDP over the loopback.
//!
//! One task owns one UDP socket. It sends the names that sessions ask for in
//! the protocol's search datagrams to every target, resends them with backoff
//! until a deadline, and caches answers for a bounded time. Answers are
//! accepted only from this host's own addresses, and only when the server
//! they name is local too, so a client is never routed to another machine.
//! The protocol (datagram layout, answer parsing) is a [`SearchProtocol`].
//!
//! Hostile clients and local forgers:
//! - Search ids are the keyed SipHash of a counter (see [`SearchIds`]), so
//!   a local process that does not see the searches cannot predict them; a
//!   protocol whose servers answer from their server port (CA) also has its
//!   answers from any other port ignored.
//! - Every name under search is charged to the client address that asked
//!   first (later askers join it for free); an IPv6 client is charged as
//!   its /64 network. One address may hold at most
//!   `max_pending_per_address` names (default 10,000). When the relay is full
//!   (`max_pending`, default 20,000), an address holding less than an equal
//!   share (`max_pending` / addresses with names under search, counting
//!   itself) still gets its search: it takes the place of one search of
//!   the address that holds the most, which ends as not found. Otherwise the
//!   search is refused and ends as not found at once. So no address keeps
//!   more than an equal share while others are waiting.
//! - The cache holds at most `max_cached` names and [`MAX_CACHED_NAME_BYTES`]
//!   of name bytes, and is swept of expired answers every `cache_ttl`.
//! - Resends are kept in a time-ordered queue, so the work per request or
//!   per datagram does not grow with the number of names under search.

use super::metrics::{Proto, Refusal, METRICS};
use super::rate::SearchRates;
use crate::relay::localaddr::LocalAddrs;
use bytes::{Bytes, BytesMut};
use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info};

/// First resend delay; each resend doubles it, up to `MAX_RESEND_DELAY`.
const FIRST_RESEND_DELAY: Duration = Duration::from_millis(20);
const MAX_RESEND_DELAY: Duration = Duration::from_secs(1);
/// Requests queued towards the relay task before `lookup` refuses more:
/// room for a connect storm of 10,000 names arriving together.
const REQUEST_QUEUE: usize = 16_384;
/// Largest search datagram either protocol sends.
const MAX_DATAGRAM: usize = 1500;
/// Name bytes the cache holds at most, besides its entry count: 100,000
/// names of typical length (under 60 bytes) fit, long names count more.
pub const MAX_CACHED_NAME_BYTES: usize = 16 << 20;
/// The cache is swept at least this often when `cache_ttl` is shorter.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Resend queue entries of finished searches kept before the queue is
/// rebuilt from the live searches.
const SCHEDULE_SLACK: usize = 1024;

/// What differs between CA and PVA searches.
pub trait SearchProtocol: Send + 'static {
    /// For log lines.
    const NAME: &'static str;
    /// Longest name a datagram can carry.
    const MAX_NAME_LEN: usize;
    /// Whether servers answer from the UDP port they were searched on (the
    /// targets' port). rsrv and caproto answer from their server port;
    /// pvAccessCPP answers from a random port, so PVA cannot require it.
    const ANSWERS_FROM_SERVER_PORT: bool;

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
    /// Names searched at once for one client address (all its
    /// connections), at most.
    pub max_pending_per_address: usize,
    /// Names remembered, at most.
    pub max_cached: usize,
    /// New names searched for per second for one client address, at most.
    pub max_rate_per_address: u32,
    /// New names searched for per second for all clients, at most.
    pub max_rate: u32,
}

/// The outcome of one lookup. `server` is `None` when no local server
/// answered before the deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub name: Bytes,
    pub server: Option<SocketAddrV4>,
}

pub(crate) enum Request {
    Lookup {
        name: Bytes,
        /// The client address the search is charged to.
        client: IpAddr,
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

    /// Asks for the server of `name` on behalf of the client at `client`;
    /// the answer arrives on `reply`. `name` should own its bytes: the
    /// relay keeps it while it searches and caches.
    pub fn lookup(
        &self,
        name: Bytes,
        client: IpAddr,
        reply: &mpsc::UnboundedSender<Answer>,
    ) -> Result<(), Busy> {
        self.requests
            .try_send(Request::Lookup {
                name,
                client: charged_address(client),
                reply: reply.clone(),
            })
            .map_err(|_| Busy)
    }

    /// A resolver whose requests the caller reads itself.
    #[cfg(test)]
    pub(crate) fn for_tests() -> (Resolver, mpsc::Receiver<Request>) {
        let (requests, rx) = mpsc::channel(REQUEST_QUEUE);
        (Resolver { requests }, rx)
    }

    /// Whether the relay task still takes requests: false once it has
    /// ended (a panic included), which `/healthz` reports.
    pub fn is_running(&self) -> bool {
        !self.requests.is_closed()
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

/// Search ids that a local process cannot predict: SipHash-1-3 of a counter,
/// keyed by std's `RandomState` (128-bit keys drawn from the operating
/// system's random source once per thread; each later `RandomState` of the
/// thread adds one to the first key). SipHash is a pseudo-random function:
/// without the key, the ids seen so far say nothing about the next ones. A
/// forger that cannot read the search datagrams must guess, with a chance of
/// (names under search) / 2^32 per guessed id. A process that can read them
/// (one bound to the servers' search port) can answer like a server, and no
/// id scheme prevents that.
struct SearchIds {
    key: RandomState,
    counter: u64,
}

impl SearchIds {
    fn new() -> Self {
        SearchIds {
            key: RandomState::new(),
            counter: 0,
        }
    }

    fn next(&mut self) -> u32 {
        self.counter = self.counter.wrapping_add(1);
        let hash = self.key.hash_one(self.counter);
        (hash ^ (hash >> 32)) as u32
    }
}

struct Pending {
    id: u32,
    /// The client address this search is charged to.
    owner: IpAddr,
    waiters: Vec<mpsc::UnboundedSender<Answer>>,
    sends: u32,
    next_send: Instant,
    deadline: Instant,
}

/// Found servers by name, bounded in entries and in name bytes.
struct Cache {
    entries: HashMap<Bytes, (SocketAddrV4, Instant)>,
    name_bytes: usize,
    max_entries: usize,
    max_name_bytes: usize,
    ttl: Duration,
}

impl Cache {
    fn new(max_entries: usize, max_name_bytes: usize, ttl: Duration) -> Self {
        Cache {
            entries: HashMap::new(),
            name_bytes: 0,
            max_entries,
            max_name_bytes,
            ttl,
        }
    }

    fn get(&mut self, name: &Bytes, now: Instant) -> Option<SocketAddrV4> {
        let &(server, expires) = self.entries.get(name)?;
        if expires > now {
            return Some(server);
        }
        self.remove(name);
        None
    }

    fn insert(&mut self, name: Bytes, server: SocketAddrV4, now: Instant) {
        self.remove(&name);
        let full = |c: &Cache| {
            c.entries.len() >= c.max_entries || c.name_bytes + name.len() > c.max_name_bytes
        };
        if full(self) {
            self.sweep(now);
            if full(self) {
                // Everything in it is fresh: start again rather than pick.
                self.entries.clear();
                self.name_bytes = 0;
            }
        }
        if full(self) {
            return; // one name larger than the whole budget
        }
        self.name_bytes += name.len();
        self.entries.insert(name, (server, now + self.ttl));
    }

    fn remove(&mut self, name: &Bytes) {
        if let Some((name, _)) = self.entries.remove_entry(name) {
            self.name_bytes -= name.len();
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&SocketAddrV4, Instant) -> bool) {
        let mut removed = 0;
        self.entries.retain(|name, (server, expires)| {
            let kept = keep(server, *expires);
            if !kept {
                removed += name.len();
            }
            kept
        });
        self.name_bytes -= removed;
    }

    /// Drops every expired answer.
    fn sweep(&mut self, now: Instant) {
        self.retain(|_, expires| expires > now);
    }

    fn forget(&mut self, server: SocketAddrV4) {
        self.retain(|cached, _| *cached != server);
    }
}

struct SearchRelay<P> {
    protocol: P,
    socket: UdpSocket,
    config: SearchConfig,
    pending: HashMap<Bytes, Pending>,
    names_by_id: HashMap<u32, Bytes>,
    /// When each search is next due to be sent, by search id. Entries of
    /// finished searches stay until they come up (or the queue is rebuilt).
    schedule: BinaryHeap<Reverse<(Instant, u32)>>,
    /// The names under search charged to each client address.
    owned: HashMap<IpAddr, HashSet<Bytes>>,
    /// How fast new names may go to the servers.
    rates: SearchRates,
    cache: Cache,
    local: LocalAddrs,
    ids: SearchIds,
    sequence: u32,
}

/// Whether a new search may start, and at whose expense.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Admit,
    /// Admit after ending one search of this (the heaviest) address.
    AdmitInsteadOf(IpAddr),
    Refuse,
}

impl<P: SearchProtocol> SearchRelay<P> {
    fn new(protocol: P, socket: UdpSocket, config: SearchConfig) -> Self {
        let mut ids = SearchIds::new();
        let sequence = ids.next();
        SearchRelay {
            protocol,
            socket,
            cache: Cache::new(config.max_cached, MAX_CACHED_NAME_BYTES, config.cache_ttl),
            rates: SearchRates::new(config.max_rate_per_address, config.max_rate, Instant::now()),
            config,
            pending: HashMap::new(),
            names_by_id: HashMap::new(),
            schedule: BinaryHeap::new(),
            owned: HashMap::new(),
            local: LocalAddrs::new(),
            ids,
            sequence,
        }
    }

    async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut datagram = vec![0u8; 64 * 1024];
        let mut sweep = tokio::time::interval(self.config.cache_ttl.max(MIN_SWEEP_INTERVAL));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_due = self.schedule.peek().map(|Reverse((at, _))| *at);
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
                _ = sweep.tick() => {
                    self.cache.sweep(Instant::now());
                    self.rates.sweep(Instant::now());
                }
            }
        }
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Lookup {
                name,
                client,
                reply,
            } => self.lookup(name, client, reply),
            Request::Forget(server) => self.cache.forget(server),
        }
    }

    fn lookup(&mut self, name: Bytes, client: IpAddr, reply: mpsc::UnboundedSender<Answer>) {
        let now = Instant::now();
        if let Some(server) = self.cache.get(&name, now) {
            let _ = reply.send(Answer {
                name,
                server: Some(server),
            });
            return;
        }
        if let Some(pending) = self.pending.get_mut(&name) {
            pending.waiters.push(reply);
            return;
        }
        if !self.rates.take(client, now) {
            METRICS.refused(Refusal::SearchRate);
            debug!(target: "nameshim::relay::discovery", %client, name = %String::from_utf8_lossy(&name), "search refused (rate of new names)");
            let _ = reply.send(Answer { name, server: None });
            return;
        }
        let admission = if name.len() > P::MAX_NAME_LEN {
            Admission::Refuse
        } else {
            self.admission(client)
        };
        match admission {
            Admission::Admit => {}
            Admission::AdmitInsteadOf(heaviest) => {
                let evicted = self
                    .owned
                    .get(&heaviest)
                    .and_then(|names| names.iter().next().cloned());
                if let Some(evicted) = evicted {
                    debug!(target: "nameshim::relay::discovery", %client, %heaviest, name = %String::from_utf8_lossy(&evicted), "search ended to make room (fair share)");
                    self.finish(&evicted, None);
                }
            }
            Admission::Refuse => {
                METRICS.refused(Refusal::Searches);
                debug!(target: "nameshim::relay::discovery", %client, name = %String::from_utf8_lossy(&name), "search refused (limit)");
                let _ = reply.send(Answer { name, server: None });
                return;
            }
        }
        let id = self.allocate_id();
        self.names_by_id.insert(id, name.clone());
        self.owned.entry(client).or_default().insert(name.clone());
        self.schedule.push(Reverse((now, id)));
        METRICS.searches_sent.inc(Proto::named(P::NAME));
        self.pending.insert(
            name,
            Pending {
                id,
                owner: client,
                waiters: vec![reply],
                sends: 0,
                next_send: now,
                deadline: now + self.config.timeout,
            },
        );
    }

    /// The fair-share rule of the module doc.
    fn admission(&self, client: IpAddr) -> Admission {
        let held = self.owned.get(&client).map_or(0, HashSet::len);
        if held >= self.config.max_pending_per_address {
            return Admission::Refuse;
        }
        if self.pending.len() < self.config.max_pending {
            return Admission::Admit;
        }
        let addresses = self.owned.len() + usize::from(held == 0);
        let share = self.config.max_pending / addresses.max(1);
        if held >= share {
            return Admission::Refuse;
        }
        // Only strictly heavier holders give way, so two addresses at
        // nearly equal shares never take searches from each other in turn.
        match self.owned.iter().max_by_key(|(_, names)| names.len()) {
            Some((&heaviest, names)) if names.len() > held + 1 => {
                Admission::AdmitInsteadOf(heaviest)
            }
            _ => Admission::Refuse,
        }
    }

    fn allocate_id(&mut self) -> u32 {
        loop {
            let id = self.ids.next();
            if id != 0 && !self.names_by_id.contains_key(&id) {
                return id;
            }
        }
    }

    /// Sends every name whose resend time has come, and gives up on names
    /// past their deadline or with nobody left waiting.
    async fn send_due(&mut self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut due: Vec<(u32, Bytes)> = Vec::new();
        while let Some(&Reverse((at, id))) = self.schedule.peek() {
            if at > now {
                break;
            }
            self.schedule.pop();
            let Some(name) = self.names_by_id.get(&id) else {
                continue; // finished already
            };
            let Some(pending) = self.pending.get_mut(name) else {
                continue;
            };
            if pending.next_send != at {
                continue;
            }
            // Nobody left to tell: the clients that asked have gone.
            pending.waiters.retain(|waiter| !waiter.is_closed());
            if pending.deadline <= now || pending.waiters.is_empty() {
                if pending.deadline <= now {
                    METRICS.searches_timed_out.inc(Proto::named(P::NAME));
                }
                expired.push(name.clone());
                continue;
            }
            due.push((pending.id, name.clone()));
            let delay = FIRST_RESEND_DELAY
                .saturating_mul(1 << pending.sends.min(16))
                .min(MAX_RESEND_DELAY);
            pending.sends += 1;
            pending.next_send = (now + delay).min(pending.deadline);
            self.schedule.push(Reverse((pending.next_send, id)));
        }
        for name in expired {
            self.finish(&name, None);
        }
        self.compact_schedule();
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

    /// Rebuilds the resend queue when finished searches dominate it.
    fn compact_schedule(&mut self) {
        if self.schedule.len() <= 2 * self.pending.len() + SCHEDULE_SLACK {
            return;
        }
        self.schedule = self
            .pending
            .values()
            .map(|p| Reverse((p.next_send, p.id)))
            .collect();
    }

    fn on_datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        let SocketAddr::V4(from) = from else { return };
        if !self.local.contains(*from.ip()) {
            debug!(target: "nameshim::relay::discovery", peer = %from, "ignored search answer from a remote host");
            return;
        }
        if P::ANSWERS_FROM_SERVER_PORT
            && !self.config.targets.iter().any(|t| t.port() == from.port())
        {
            debug!(target: "nameshim::relay::discovery", peer = %from, "ignored search answer from a port no server searches on");
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
            METRICS.searches_found.inc(Proto::named(P::NAME));
            self.cache.insert(name.clone(), server, Instant::now());
            self.finish(&name, Some(server));
        }
    }

    fn finish(&mut self, name: &Bytes, server: Option<SocketAddrV4>) {
        let Some(pending) = self.pending.remove(name) else {
            return;
        };
        self.names_by_id.remove(&pending.id);
        if let Some(names) = self.owned.get_mut(&pending.owner) {
            names.remove(name);
            if names.is_empty() {
                self.owned.remove(&pending.owner);
            }
        }
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

/// The address a client's searches are charged to: its IPv4 address, or
/// the /64 network of an IPv6 address (one host usually holds a whole /64,
/// so charging single IPv6 addresses would give it countless shares).
fn charged_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn a_resolver_whose_relay_task_ended_is_not_running() {
        let (requests, relay_side) = mpsc::channel(1);
        let resolver = Resolver { requests };
        assert!(resolver.is_running());
        drop(relay_side);
        assert!(!resolver.is_running());
    }
    #[test]
    fn cache_is_bounded_in_name_bytes() {
        let now = Instant::now();
        let server = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5064);
        let mut cache = Cache::new(1_000_000, 10_000, Duration::from_secs(60));
        for i in 0..1_000u32 {
            let mut name = BytesMut::new();
            name.put_u32(i);
            name.resize(500, b'x');
            cache.insert(name.freeze(), server, now);
            assert!(cache.name_bytes <= 10_000);
            let sum: usize = cache.entries.keys().map(Bytes::len).sum();
            assert_eq!(sum, cache.name_bytes);
        }
        assert!(!cache.entries.is_empty());
    }

    /// A minimal protocol: a search datagram is (u32 id, u8 length, name)
    /// repeated; an answer is (u32 id, u16 port) repeated.
    struct TestProtocol;

    impl SearchProtocol for TestProtocol {
        const NAME: &'static str = "test";
        const MAX_NAME_LEN: usize = 255;
        const ANSWERS_FROM_SERVER_PORT: bool = false;

        fn encode(
            &mut self,
            names: &[(u32, &[u8])],
            _sequence: u32,
            _reply_port: u16,
            out: &mut BytesMut,
        ) -> usize {
            let mut fitted = 0;
            for (id, name) in names {
                if fitted > 0 && out.len() + 5 + name.len() > 1400 {
                    break;
                }
                out.put_u32(*id);
                out.put_u8(name.len() as u8);
                out.put_slice(name);
                fitted += 1;
            }
            fitted
        }

        fn answers(
            &mut self,
            datagram: &[u8],
            _from: SocketAddrV4,
            found: &mut Vec<(u32, SocketAddrV4)>,
        ) {
            for answer in datagram.chunks_exact(6) {
                let id = u32::from_be_bytes([answer[0], answer[1], answer[2], answer[3]]);
                let port = u16::from_be_bytes([answer[4], answer[5]]);
                found.push((id, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)));
            }
        }
    }

    /// A relay searching a silent fake server; returns both.
    async fn test_relay(config: impl FnOnce(&mut SearchConfig)) -> (Resolver, UdpSocket) {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(target) = server.local_addr().unwrap() else {
            unreachable!()
        };
        let mut search = SearchConfig {
            targets: vec![target],
            timeout: Duration::from_secs(10),
            cache_ttl: Duration::from_secs(10),
            max_pending: 100,
            max_pending_per_address: 100,
            max_cached: 100,
            max_rate_per_address: 1_000_000,
            max_rate: 1_000_000,
        };
        config(&mut search);
        let socket = bind_search_socket(Ipv4Addr::LOCALHOST).unwrap();
        (
            Resolver::start(TestProtocol, socket, search).unwrap(),
            server,
        )
    }

    /// Answers the names of every search datagram `server` receives.
    fn answer_everything(server: UdpSocket, port: u16) {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((len, from)) = server.recv_from(&mut buf).await {
                let mut reply = BytesMut::new();
                let mut rest = &buf[..len];
                while rest.len() >= 5 {
                    let name_len = usize::from(rest[4]);
                    reply.put_slice(&rest[..4]);
                    reply.put_u16(port);
                    rest = rest.get(5 + name_len..).unwrap_or_default();
                }
                let _ = server.send_to(&reply, from).await;
            }
        });
    }

    // A client's new names beyond its rate count as not found at once and
    // reach no server; its names found meanwhile stay found, and another
    // address has a rate of its own.
    #[tokio::test]
    async fn new_names_over_a_clients_rate_are_refused_before_any_datagram() {
        let (resolver, server) = test_relay(|c| {
            c.max_rate_per_address = 5;
            c.max_pending_per_address = 100;
        })
        .await;
        answer_everything(server, 40000);
        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 0..8 {
            resolver.lookup(numbered("RATE", i), CLIENT, &tx).unwrap();
        }
        let answers = answers_now(&mut rx).await;
        assert_eq!(answers.iter().filter(|a| a.server.is_some()).count(), 5);
        assert_eq!(answers.iter().filter(|a| a.server.is_none()).count(), 3);
        let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        resolver.lookup(numbered("OTHER", 0), other, &tx).unwrap();
        let answers = answers_now(&mut rx).await;
        assert!(answers[0].server.is_some(), "{answers:?}");
        // A found name is cached: asking again costs no rate.
        resolver.lookup(numbered("RATE", 0), CLIENT, &tx).unwrap();
        assert!(answers_now(&mut rx).await[0].server.is_some());
    }

    /// The answers already delivered on `rx`.
    async fn answers_now(rx: &mut mpsc::UnboundedReceiver<Answer>) -> Vec<Answer> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut answers = Vec::new();
        while let Ok(answer) = rx.try_recv() {
            answers.push(answer);
        }
        answers
    }

    fn address(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn numbered(prefix: &str, i: usize) -> Bytes {
        Bytes::from(format!("{prefix}:{i}"))
    }

    #[tokio::test]
    async fn expired_answers_leave_the_cache_without_a_lookup() {
        let (resolver, server) = test_relay(|c| c.cache_ttl = Duration::from_millis(50)).await;
        answer_everything(server, 40000);
        let name = Bytes::from(b"SWEPT".to_vec());
        let (tx, mut rx) = mpsc::unbounded_channel();
        resolver.lookup(name.clone(), CLIENT, &tx).unwrap();
        let answer = rx.recv().await.unwrap();
        assert!(answer.server.is_some());
        drop(answer);
        assert!(!name.is_unique(), "the cache holds the name");
        tokio::time::sleep(MIN_SWEEP_INTERVAL + Duration::from_millis(700)).await;
        assert!(name.is_unique(), "the expired answer is still cached");
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_limit_across_connections() {
        let (resolver, _server) = test_relay(|c| c.max_pending_per_address = 4).await;
        let (first, mut first_rx) = mpsc::unbounded_channel();
        let (second, mut second_rx) = mpsc::unbounded_channel();
        for i in 0..3 {
            resolver
                .lookup(numbered("A", i), address(1), &first)
                .unwrap();
            resolver
                .lookup(numbered("B", i), address(1), &second)
                .unwrap();
        }
        let refused =
            answers_now(&mut first_rx).await.len() + answers_now(&mut second_rx).await.len();
        assert_eq!(refused, 2, "6 asked, 4 allowed");
        // Another address is not affected.
        let (other, mut other_rx) = mpsc::unbounded_channel();
        resolver
            .lookup(numbered("C", 0), address(2), &other)
            .unwrap();
        assert!(answers_now(&mut other_rx).await.is_empty());
    }

    #[tokio::test]
    async fn a_newcomer_gets_a_search_in_a_full_relay() {
        let (resolver, _server) = test_relay(|c| c.max_pending = 10).await;
        let (greedy, mut greedy_rx) = mpsc::unbounded_channel();
        for i in 0..10 {
            resolver
                .lookup(numbered("G", i), address(1), &greedy)
                .unwrap();
        }
        assert!(answers_now(&mut greedy_rx).await.is_empty());
        let (newcomer, mut newcomer_rx) = mpsc::unbounded_channel();
        for i in 0..5 {
            resolver
                .lookup(numbered("N", i), address(2), &newcomer)
                .unwrap();
        }
        // Two addresses: an equal share is 5 each.
        assert!(answers_now(&mut newcomer_rx).await.is_empty());
        let ended = answers_now(&mut greedy_rx).await;
        assert_eq!(ended.len(), 5);
        assert!(ended.iter().all(|a| a.server.is_none()));
        // Beyond its share the newcomer is refused, and the greedy address
        // cannot take its searches back.
        resolver
            .lookup(numbered("N", 5), address(2), &newcomer)
            .unwrap();
        resolver
            .lookup(numbered("G", 10), address(1), &greedy)
            .unwrap();
        assert_eq!(answers_now(&mut newcomer_rx).await.len(), 1);
        assert_eq!(answers_now(&mut greedy_rx).await.len(), 1);
    }

    #[test]
    fn an_ipv6_host_is_charged_as_its_whole_64_network() {
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let other: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let next_network: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(charged_address(one), charged_address(other));
        assert_ne!(charged_address(one), charged_address(next_network));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(charged_address(mapped), address(1));
    }

    #[test]
    fn search_ids_differ_between_relays_and_do_not_count() {
        let mut one = SearchIds::new();
        let mut two = SearchIds::new();
        let a: Vec<u32> = (0..4).map(|_| one.next()).collect();
        let b: Vec<u32> = (0..4).map(|_| two.next()).collect();
        assert_ne!(a, b);
        assert!(a.windows(2).all(|w| w[1].wrapping_sub(w[0]) != 1));
    }
}
