//! Which greeting a silent connection on the shared port gets.
//!
//! Both protocols can leave a new connection silent: a PVA client always
//! waits for the server's greeting, and libca queues its VERSION on a
//! name-server circuit and flushes it only when the program calls into
//! libca or the server speaks first (libca `tcpiiu.cpp`: the TCP search is
//! sent only once the server's VERSION gave the minor version, `CA_V412`).
//! A callback-driven program that only sleeps (pyepics `PV(name,
//! callback=...)` then `time.sleep`) is such a silent libca client.
//!
//! Silence is greeted as PVA by default. The two clients answer a wrong
//! greeting differently from a right one: a PVA client always answers the
//! PVA greeting (CONNECTION_VALIDATION), a CA client always answers the CA
//! VERSION with its own; either one closes at once, having sent nothing,
//! when the greeting is not its protocol's (libca: "Undecipherable TCP
//! message"; pvxs: bad magic). libca then reconnects after 0.25 s, and
//! after 0.5 s, 1 s, ... 8 s if that fails too (measured: 0.25 s after the
//! close). So a connection that is closed silently right after a PVA
//! greeting marks its source address, and a silent connection from it that
//! arrives at one of libca's reconnect delays after the mark is greeted as
//! CA. The mark is used once; if the CA greeting is rejected the same way,
//! nothing is marked and the address is back to PVA.
//!
//! A PVA client greeted as CA by mistake loses more than libca does: pvxs
//! retries a lost name server only every 10 s (`tcpNSCheckInterval`,
//! pvxs `client.cpp`). Hence the narrow windows: a PVA client is greeted as
//! CA only if it shares its address with a rejecting peer (NAT) and its
//! connection lands within `RECONNECT_TOLERANCE` of one of those delays.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// A greeting closed within this time, with nothing received, was rejected.
/// libca closes as soon as it reads the greeting, so this is one round trip
/// plus scheduling; a PVA or CA client that accepts its greeting answers
/// within the same time and is never counted.
pub const REJECTED_WITHIN: Duration = Duration::from_millis(500);
/// libca's reconnect delays after a failed circuit, in milliseconds.
const LIBCA_RECONNECT_MS: [u64; 6] = [250, 500, 1000, 2000, 4000, 8000];
/// How far from a reconnect delay a connection may arrive and still be
/// taken for libca's (scheduling on a loaded host, one round trip).
pub const RECONNECT_TOLERANCE: Duration = Duration::from_millis(100);
/// A mark older than the last reconnect window is dropped.
pub const HINT_LIFETIME: Duration = Duration::from_millis(8100);
/// Marked addresses kept at once; beyond it, the oldest mark goes.
pub const MAX_HINTS: usize = 1024;

/// What a connection's peer sent before the session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reception {
    /// At least one byte.
    Spoke,
    /// Nothing at all.
    Silent,
}

/// The greeting a silent connection got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    Ca,
    Pva,
}

/// Source addresses whose last silent connection rejected the PVA greeting.
pub struct SilentGreetings {
    marks: Mutex<HashMap<IpAddr, Instant>>,
    max: usize,
}

impl Default for SilentGreetings {
    fn default() -> Self {
        Self::new(MAX_HINTS)
    }
}

/// Whether a connection `since` after a mark comes when libca would retry.
fn at_libca_reconnect(since: Duration) -> bool {
    LIBCA_RECONNECT_MS.iter().any(|&ms| {
        let delay = Duration::from_millis(ms);
        since.abs_diff(delay) <= RECONNECT_TOLERANCE
    })
}

impl SilentGreetings {
    pub fn new(max: usize) -> Self {
        SilentGreetings {
            marks: Mutex::new(HashMap::new()),
            max: max.max(1),
        }
    }

    /// The greeting for a new silent connection from `ip`. A mark is used
    /// up when it makes a CA greeting, and dropped once too old.
    pub fn choose(&self, ip: IpAddr, now: Instant) -> Greeting {
        let mut marks = self.lock();
        let Some(&at) = marks.get(&ip) else {
            return Greeting::Pva;
        };
        let since = now.duration_since(at);
        if at_libca_reconnect(since) {
            marks.remove(&ip);
            Greeting::Ca
        } else {
            if since > HINT_LIFETIME {
                marks.remove(&ip);
            }
            Greeting::Pva
        }
    }

    /// Learns from how a silent connection from `ip` ended.
    pub fn learn(
        &self,
        ip: IpAddr,
        greeted: Greeting,
        reception: Reception,
        lasted: Duration,
        now: Instant,
    ) {
        let rejected = reception == Reception::Silent && lasted < REJECTED_WITHIN;
        if !rejected || greeted == Greeting::Ca {
            // A rejected CA greeting leaves no mark: back to PVA.
            return;
        }
        let mut marks = self.lock();
        if marks.len() >= self.max && !marks.contains_key(&ip) {
            marks.retain(|_, at| now.duration_since(*at) <= HINT_LIFETIME);
            if marks.len() >= self.max {
                if let Some(oldest) = marks.iter().min_by_key(|(_, at)| **at).map(|(ip, _)| *ip) {
                    marks.remove(&oldest);
                }
            }
        }
        marks.insert(ip, now);
    }

    /// Addresses marked now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Instant>> {
        // The map is consistent after every statement: a poisoned lock
        // still holds a usable map.
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_millis(5);
    const LIBCA_FIRST_RETRY: Duration = Duration::from_millis(250);

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn silence_is_greeted_as_pva_by_default() {
        let g = SilentGreetings::default();
        assert_eq!(g.choose(ip(1), Instant::now()), Greeting::Pva);
    }

    #[test]
    fn a_rejected_pva_greeting_makes_libcas_retry_ca_once() {
        let g = SilentGreetings::default();
        let now = Instant::now();
        g.learn(ip(1), Greeting::Pva, Reception::Silent, FAST, now);
        let retry = now + LIBCA_FIRST_RETRY;
        assert_eq!(
            g.choose(ip(2), retry),
            Greeting::Pva,
            "other addresses are untouched"
        );
        assert_eq!(g.choose(ip(1), retry), Greeting::Ca);
        assert_eq!(
            g.choose(ip(1), retry),
            Greeting::Pva,
            "the mark is used once"
        );
    }

    #[test]
    fn a_connection_between_libcas_retries_is_greeted_as_pva_and_keeps_the_mark() {
        let g = SilentGreetings::default();
        let now = Instant::now();
        g.learn(ip(1), Greeting::Pva, Reception::Silent, FAST, now);
        assert_eq!(g.choose(ip(1), now), Greeting::Pva, "at once: not libca");
        assert_eq!(
            g.choose(ip(1), now + Duration::from_millis(700)),
            Greeting::Pva
        );
        assert_eq!(
            g.choose(ip(1), now + Duration::from_millis(1050)),
            Greeting::Ca
        );
    }

    #[test]
    fn a_rejected_ca_greeting_leaves_the_address_on_pva() {
        let g = SilentGreetings::default();
        let now = Instant::now();
        g.learn(ip(1), Greeting::Pva, Reception::Silent, FAST, now);
        let retry = now + LIBCA_FIRST_RETRY;
        assert_eq!(g.choose(ip(1), retry), Greeting::Ca);
        g.learn(ip(1), Greeting::Ca, Reception::Silent, FAST, retry);
        assert_eq!(g.choose(ip(1), retry + LIBCA_FIRST_RETRY), Greeting::Pva);
    }

    #[test]
    fn a_peer_that_spoke_or_stayed_long_marks_nothing() {
        let g = SilentGreetings::default();
        let now = Instant::now();
        g.learn(ip(1), Greeting::Pva, Reception::Spoke, FAST, now);
        g.learn(
            ip(1),
            Greeting::Pva,
            Reception::Silent,
            REJECTED_WITHIN,
            now,
        );
        assert!(g.is_empty());
        assert_eq!(g.choose(ip(1), now + LIBCA_FIRST_RETRY), Greeting::Pva);
    }

    #[test]
    fn a_mark_expires_after_libcas_last_retry() {
        let g = SilentGreetings::default();
        let now = Instant::now();
        g.learn(ip(1), Greeting::Pva, Reception::Silent, FAST, now);
        assert_eq!(g.choose(ip(1), now + Duration::from_secs(9)), Greeting::Pva);
        assert!(g.is_empty());
    }

    #[test]
    fn marks_are_bounded_and_the_oldest_goes_first() {
        let g = SilentGreetings::new(3);
        let start = Instant::now();
        for n in 1..=4u8 {
            let at = start + Duration::from_millis(u64::from(n));
            g.learn(ip(n), Greeting::Pva, Reception::Silent, FAST, at);
        }
        assert_eq!(g.len(), 3);
        let retry = start + LIBCA_FIRST_RETRY;
        assert_eq!(
            g.choose(ip(1), retry),
            Greeting::Pva,
            "the oldest was dropped"
        );
        assert_eq!(g.choose(ip(4), retry), Greeting::Ca);
    }
}
