//! Limits that keep one hostile or broken client from denying service to
//! the others: deadlines on a client connection, connections per source
//! address, and channels held by all client connections together.
//!
//! Every connection holds a slot of `--max-clients` until it ends, so each
//! way a client can keep a connection open without using it is bounded by a
//! deadline: the first message (hello), a message begun but not finished
//! (stall), and silence in both directions (idle).

use super::framing::{Decoder, FrameReader};
use super::metrics::{Proto, METRICS};
use super::outbox::{Outbox, UNWRITTEN_TO_CLIENTS};
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long a client connection may hold its slot without using it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientDeadlines {
    /// From accept to the first complete message.
    pub hello: Duration,
    /// Nothing received and nothing sent. Longer than the clients' own
    /// probes: libca sends ECHO on a circuit silent for EPICS_CA_CONN_TMO
    /// (30 s), pvxs every 15 s. A CA client that only receives monitor
    /// updates sends nothing, so bytes sent count as activity too.
    pub idle: Duration,
    /// From the last byte of a message begun but not finished.
    pub stall: Duration,
}

impl Default for ClientDeadlines {
    fn default() -> Self {
        ClientDeadlines {
            hello: Duration::from_secs(5),
            idle: Duration::from_secs(180),
            stall: Duration::from_secs(30),
        }
    }
}

/// When bytes last moved in one direction of a connection: a cheap shared
/// timestamp, one relaxed atomic store per write.
#[derive(Debug, Clone)]
pub struct Activity(Arc<ActivityClock>);

#[derive(Debug)]
struct ActivityClock {
    origin: Instant,
    /// Milliseconds since `origin`.
    last: AtomicU64,
}

impl Activity {
    pub fn new() -> Activity {
        Activity(Arc::new(ActivityClock {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }))
    }

    /// Notes that bytes moved now.
    pub fn touch(&self) {
        let millis = self.0.origin.elapsed().as_millis();
        self.0
            .last
            .store(u64::try_from(millis).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// When bytes last moved (the creation time if never).
    pub fn last(&self) -> Instant {
        self.0.origin + Duration::from_millis(self.0.last.load(Ordering::Relaxed))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

/// The two halves of a client connection: a reader that enforces
/// `deadlines`, and a queue whose writer reports what it sends to that
/// reader and gives up on a client that accepts no byte for the idle time.
pub fn client_io<D: Decoder>(
    stream: TcpStream,
    decoder: D,
    queue_bytes: usize,
    deadlines: ClientDeadlines,
) -> (
    FrameReader<OwnedReadHalf, D>,
    Outbox,
    JoinHandle<io::Result<()>>,
) {
    let (read, write) = stream.into_split();
    let (outbox, queue) = Outbox::new(queue_bytes);
    let outbox = outbox.counted_in(&UNWRITTEN_TO_CLIENTS);
    let sent = queue.activity();
    let queue = queue.give_up_after(deadlines.idle).counting_client_bytes();
    let writer = tokio::spawn(queue.drain_into(write));
    let reader = FrameReader::new(read, decoder).with_deadlines(deadlines, sent);
    (reader, outbox, writer)
}

/// Channels held by all client connections together, at most `cap`.
#[derive(Debug)]
pub struct ChannelBudget {
    cap: usize,
    held: AtomicUsize,
}

impl ChannelBudget {
    pub fn new(cap: usize) -> Arc<ChannelBudget> {
        Arc::new(ChannelBudget {
            cap,
            held: AtomicUsize::new(0),
        })
    }

    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// One connection's part of a [`ChannelBudget`]; dropping it gives the
/// whole part back, so a connection that ends by any path (error, panic)
/// cannot leak channels from the budget.
#[derive(Debug)]
pub struct ChannelShare {
    budget: Arc<ChannelBudget>,
    held: usize,
    /// Whose channels these are, for the channels gauge.
    protocol: Proto,
}

impl ChannelShare {
    pub fn new(budget: Arc<ChannelBudget>, protocol: Proto) -> ChannelShare {
        ChannelShare {
            budget,
            held: 0,
            protocol,
        }
    }

    /// Makes this connection's part `channels`. Shrinking always succeeds;
    /// growing fails, leaving the part as it was, if all connections
    /// together would then hold more than the cap.
    pub fn fit(&mut self, channels: usize) -> bool {
        if channels == self.held {
            return true;
        }
        if channels < self.held {
            self.budget
                .held
                .fetch_sub(self.held - channels, Ordering::Relaxed);
            METRICS
                .channels
                .add(self.protocol, -((self.held - channels) as i64));
            self.held = channels;
            return true;
        }
        let extra = channels - self.held;
        let cap = self.budget.cap;
        let taken = self
            .budget
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(extra).filter(|&total| total <= cap)
            });
        if taken.is_ok() {
            METRICS.channels.add(self.protocol, extra as i64);
            self.held = channels;
        }
        taken.is_ok()
    }

    pub fn cap(&self) -> usize {
        self.budget.cap
    }
}

impl Drop for ChannelShare {
    fn drop(&mut self) {
        self.fit(0);
    }
}

/// Connections open at once per source address, on one listening port.
#[derive(Debug)]
pub struct HostCounts {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against its source address until dropped.
#[derive(Debug)]
pub struct HostSlot {
    counts: Arc<HostCounts>,
    ip: IpAddr,
}

impl HostCounts {
    pub fn new(max: usize) -> Arc<HostCounts> {
        Arc::new(HostCounts {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Counts a connection from `ip`, or refuses it when `ip` already has
    /// the maximum open. An IPv4-mapped IPv6 address counts as IPv4.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<HostSlot> {
        let ip = ip.to_canonical();
        // The map holds no invariant a panic could break halfway.
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(HostSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        let mut open = self
            .counts
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn channel_shares_together_stay_within_the_cap() {
        let budget = ChannelBudget::new(10);
        let mut a = ChannelShare::new(budget.clone(), Proto::Ca);
        let mut b = ChannelShare::new(budget.clone(), Proto::Ca);
        assert!(a.fit(6));
        assert!(b.fit(4));
        assert!(!b.fit(5), "the 11th channel in all is refused");
        assert_eq!(budget.held(), 10, "a refused grow keeps the part as it was");
        assert!(a.fit(2), "shrinking always works");
        assert!(b.fit(8));
        assert_eq!(budget.held(), 10);
    }

    #[test]
    fn a_dropped_share_gives_its_channels_back() {
        let budget = ChannelBudget::new(3);
        let mut a = ChannelShare::new(budget.clone(), Proto::Ca);
        assert!(a.fit(3));
        let mut b = ChannelShare::new(budget.clone(), Proto::Ca);
        assert!(!b.fit(1));
        drop(a);
        assert_eq!(budget.held(), 0);
        assert!(b.fit(1));
    }

    #[test]
    fn host_counts_refuse_beyond_the_max_per_address() {
        let counts = HostCounts::new(2);
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 6));
        let first = counts.enter(a).unwrap();
        let _second = counts.enter(a).unwrap();
        assert!(
            counts.enter(a).is_none(),
            "a third from 10.0.0.5 is refused"
        );
        assert!(counts.enter(b).is_some(), "another address is not affected");
        drop(first);
        assert!(
            counts.enter(a).is_some(),
            "a closed connection frees its place"
        );
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        let counts = HostCounts::new(1);
        let v4 = Ipv4Addr::new(10, 0, 0, 5);
        let _slot = counts.enter(IpAddr::V4(v4)).unwrap();
        assert!(counts.enter(IpAddr::V6(v4.to_ipv6_mapped())).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn activity_reports_the_last_touch() {
        let activity = Activity::new();
        let start = activity.last();
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(activity.last(), start);
        activity.touch();
        assert_eq!(activity.last() - start, Duration::from_secs(7));
    }
}
