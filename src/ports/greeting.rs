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
//! message"; pvxs: bad magic). libca then dials again a fixed delay after
//! its previous attempt. Measured here, the connects of a silent circuit
//! rejected again and again are 0.25, 0.257, 0.512, 1.024, 2.048 and
//! 4.096 s apart, counted from connect to connect (the close, after the
//! shim's classification window, does not move them). So a connection
//! that is closed silently right after a PVA greeting marks its source
//! address, and the silent connection from it that arrives when one of
//! libca's reconnects is due is greeted as CA. The mark is used once; a
//! libca that answers the CA greeting ends the chain.
//!
//! A PVA client greeted as CA by mistake loses more than libca does: pvxs
//! retries a lost name server only every 10 s (`tcpNSCheckInterval`,
//! pvxs `client.cpp`). Hence narrow windows. libca cannot come back before
//! its delay has run from its previous connect, so a window opens only
//! `EARLY_TOLERANCE` before it; it stays open `LATE_TOLERANCE` after, for
//! a loaded host. Both ends are taken at accept, before the silence that
//! classifies a connection, so that timer's jitter does not move them.
//!
//! A PVA client behind the same address (NAT) may still land in the window
//! just before libca's own reconnect. So the connection that comes when the
//! reconnect is due is a candidate: it waits `CONTEST_WAIT` before it is
//! greeted, and if another silent connection from the address is accepted
//! within `CONTEST_WINDOW` of it, both are greeted as PVA. The PVA client
//! answers; libca rejects once more and is greeted as CA at its next delay.
//! Only a PVA client alone in the window, with libca more than
//! `CONTEST_WINDOW` late, is greeted as CA; it rejects the greeting and
//! libca's own reconnect, greeted as PVA, continues the chain.

use crate::relay::listener::Reception;
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
/// libca's delays from one connect of a circuit rejected again and again
/// to the next, in milliseconds (measured: 0.25, 0.257, 0.512, 1.024,
/// 2.048, 4.096 s; the first delay may come twice, the last repeats).
/// Which one comes next is not known here: libca's count can be ahead of
/// the rejections seen (a connection that closed before its greeting, a
/// PVA client that took libca's turn), so each of them is a window.
const LIBCA_RECONNECT_MS: [u64; 6] = [256, 512, 1024, 2048, 4096, 8192];
/// How much before its delay libca's reconnect may be accepted: only the
/// slack of the accept times taken here.
pub const EARLY_TOLERANCE: Duration = Duration::from_millis(10);
/// How much after its delay libca's reconnect may be accepted and still be
/// taken for libca's (scheduling on a loaded host, one round trip).
pub const LATE_TOLERANCE: Duration = Duration::from_millis(150);
/// A mark older than the longest reconnect window is dropped.
pub const HINT_LIFETIME: Duration = Duration::from_millis(8192 + 150);
/// Two silent connections from one address accepted this close to each
/// other, one of them when libca's reconnect was due, are both greeted as
/// PVA: one is a PVA client, and libca (taken for the other) is late. Each
/// greeting is right for the PVA client; libca, rejected once more, comes
/// back at its next delay and is greeted as CA then. A PVA client greeted
/// as CA would lose 10 s, libca loses 0.25 s. libca comes at most a few
/// milliseconds after its delay (measured 1.5 to 9 ms on a busy host).
pub const CONTEST_WINDOW: Duration = Duration::from_millis(40);
/// How long a candidate waits before it is greeted: the contest window and
/// the jitter of the classification timers.
pub const CONTEST_WAIT: Duration = Duration::from_millis(50);
/// Marked addresses kept at once; beyond it, the oldest mark goes.
pub const MAX_HINTS: usize = 1024;

/// The greeting a silent connection got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    Ca,
    Pva,
}

/// When a silent connection was accepted and when it was greeted.
#[derive(Debug, Clone, Copy)]
pub struct SilentTimes {
    pub accepted: Instant,
    pub greeted_at: Instant,
}

/// One address's last rejected PVA greeting.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// When the connection that rejected the PVA greeting was accepted.
    accepted_at: Instant,
    /// Where libca's reconnect after this rejection stands.
    turn: Turn,
}

/// The connection that comes when libca's reconnect is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// Not come yet.
    Open,
    /// A silent connection accepted at `accepted` came when it was due; it
    /// waits `CONTEST_WAIT` for another silent connection from the address.
    Claimed { accepted: Instant, contested: bool },
    /// Settled: the connection was greeted.
    Taken,
}

/// What `SilentGreetings::choose` decided for a silent connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Pva,
    /// It came when libca's reconnect was due: wait `CONTEST_WAIT`, then
    /// ask `SilentGreetings::settle`.
    Candidate,
}

impl Mark {
    /// Whether a connection accepted at `accepted` comes when one of
    /// libca's reconnects is due.
    fn due(&self, accepted: Instant) -> bool {
        LIBCA_RECONNECT_MS.iter().any(|&ms| {
            let due = self.accepted_at + Duration::from_millis(ms);
            accepted + EARLY_TOLERANCE >= due && accepted <= due + LATE_TOLERANCE
        })
    }
}

/// How far apart two instants are, either way.
fn apart(a: Instant, b: Instant) -> Duration {
    a.saturating_duration_since(b)
        .max(b.saturating_duration_since(a))
}

/// Source addresses whose last silent connection rejected the PVA greeting.
pub struct SilentGreetings {
    marks: Mutex<HashMap<IpAddr, Mark>>,
    max: usize,
}

impl Default for SilentGreetings {
    fn default() -> Self {
        Self::new(MAX_HINTS)
    }
}

impl SilentGreetings {
    pub fn new(max: usize) -> Self {
        SilentGreetings {
            marks: Mutex::new(HashMap::new()),
            max: max.max(1),
        }
    }

    /// The first step of the greeting for a silent connection from `ip`,
    /// accepted at `accepted`. A mark makes at most one candidate, and is
    /// dropped once old.
    pub fn choose(&self, ip: IpAddr, accepted: Instant) -> Choice {
        let mut marks = self.lock();
        let Some(mark) = marks.get_mut(&ip) else {
            return Choice::Pva;
        };
        if accepted.saturating_duration_since(mark.accepted_at) > HINT_LIFETIME {
            marks.remove(&ip);
            return Choice::Pva;
        }
        let due = mark.due(accepted);
        match &mut mark.turn {
            Turn::Claimed {
                accepted: first,
                contested,
            } if apart(accepted, *first) <= CONTEST_WINDOW => {
                *contested = true;
                Choice::Pva
            }
            Turn::Open if due => {
                mark.turn = Turn::Claimed {
                    accepted,
                    contested: false,
                };
                Choice::Candidate
            }
            _ => Choice::Pva,
        }
    }

    /// The greeting for a candidate accepted at `accepted`, once it has
    /// waited `CONTEST_WAIT`: CA, unless another silent connection from
    /// its address contested it.
    pub fn settle(&self, ip: IpAddr, accepted: Instant) -> Greeting {
        let mut marks = self.lock();
        let Some(mark) = marks.get_mut(&ip) else {
            return Greeting::Pva;
        };
        match mark.turn {
            Turn::Claimed {
                accepted: claimed,
                contested,
            } if claimed == accepted => {
                mark.turn = Turn::Taken;
                if contested {
                    Greeting::Pva
                } else {
                    Greeting::Ca
                }
            }
            // The mark was replaced: a silent connection from the address
            // rejected PVA meanwhile, which is a contest too.
            _ => Greeting::Pva,
        }
    }

    /// Learns from how a silent connection from `ip` ended at `now`.
    pub fn learn(
        &self,
        ip: IpAddr,
        greeted: Greeting,
        reception: Reception,
        times: SilentTimes,
        now: Instant,
    ) {
        let SilentTimes {
            accepted,
            greeted_at,
        } = times;
        let rejected =
            reception == Reception::Silent && now.duration_since(greeted_at) < REJECTED_WITHIN;
        let mut marks = self.lock();
        match (greeted, rejected) {
            // libca took its CA greeting: its chain of reconnects is over.
            (Greeting::Ca, false) => {
                marks.remove(&ip);
            }
            // A PVA client took libca's turn alone; libca's own reconnect,
            // greeted as PVA, continues the chain.
            (Greeting::Ca, true) | (Greeting::Pva, false) => {}
            (Greeting::Pva, true) => {
                self.make_room(&mut marks, ip, now);
                marks.insert(
                    ip,
                    Mark {
                        accepted_at: accepted,
                        turn: Turn::Open,
                    },
                );
            }
        }
    }

    /// Keeps the map within `max` before `ip` is inserted: expired marks go
    /// first, then the oldest.
    fn make_room(&self, marks: &mut HashMap<IpAddr, Mark>, ip: IpAddr, now: Instant) {
        if marks.len() < self.max || marks.contains_key(&ip) {
            return;
        }
        marks.retain(|_, mark| now.duration_since(mark.accepted_at) <= HINT_LIFETIME);
        if marks.len() >= self.max {
            let oldest = marks
                .iter()
                .min_by_key(|(_, mark)| mark.accepted_at)
                .map(|(ip, _)| *ip);
            if let Some(oldest) = oldest {
                marks.remove(&oldest);
            }
        }
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Mark>> {
        // The map is consistent after every statement: a poisoned lock
        // still holds a usable map.
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libca reads the greeting and closes within a millisecond.
    const FAST: Duration = Duration::from_millis(1);
    const LIBCA_FIRST_RETRY: Duration = Duration::from_millis(256);

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The times of a connection accepted at `at`, greeted after the
    /// classification window.
    fn times(at: Instant) -> SilentTimes {
        SilentTimes {
            accepted: at,
            greeted_at: at + ms(200),
        }
    }

    /// The greeting a lone silent connection accepted at `at` gets, with no
    /// other from its address during its wait.
    fn greet(g: &SilentGreetings, who: IpAddr, at: Instant) -> Greeting {
        match g.choose(who, at) {
            Choice::Pva => Greeting::Pva,
            Choice::Candidate => g.settle(who, at),
        }
    }

    /// A connection accepted at `at` that closed at once on its PVA greeting.
    fn reject_pva(g: &SilentGreetings, who: IpAddr, at: Instant) {
        let t = times(at);
        g.learn(
            who,
            Greeting::Pva,
            Reception::Silent,
            t,
            t.greeted_at + FAST,
        );
    }

    #[test]
    fn silence_is_greeted_as_pva_by_default() {
        let g = SilentGreetings::default();
        assert_eq!(greet(&g, ip(1), Instant::now()), Greeting::Pva);
    }

    #[test]
    fn a_rejected_pva_greeting_makes_libcas_reconnect_ca_once() {
        let g = SilentGreetings::default();
        let now = Instant::now();
        reject_pva(&g, ip(1), now);
        let retry = now + LIBCA_FIRST_RETRY + ms(2);
        assert_eq!(
            greet(&g, ip(2), retry),
            Greeting::Pva,
            "other addresses are untouched"
        );
        assert_eq!(greet(&g, ip(1), retry), Greeting::Ca);
        assert_eq!(
            greet(&g, ip(1), retry),
            Greeting::Pva,
            "the mark is used once"
        );
    }

    #[test]
    fn only_a_connection_when_libcas_reconnect_is_due_is_greeted_as_ca() {
        let g = SilentGreetings::default();
        let now = Instant::now();
        reject_pva(&g, ip(1), now);
        // Measured in a failing run: a PVA client from the same address
        // came 211 ms after the rejected connection, libca 252 ms after.
        for early in [0, 100, 211, 245] {
            assert_eq!(
                greet(&g, ip(1), now + ms(early)),
                Greeting::Pva,
                "{early} ms"
            );
        }
        // Between libca's delays.
        for between in [407, 501, 700, 1500, 3000, 6000, 8400] {
            assert_eq!(
                greet(&g, ip(1), now + ms(between)),
                Greeting::Pva,
                "{between} ms"
            );
        }
        let g = SilentGreetings::default();
        reject_pva(&g, ip(1), now);
        assert_eq!(greet(&g, ip(1), now + ms(247)), Greeting::Ca, "timer slack");
        let g = SilentGreetings::default();
        reject_pva(&g, ip(1), now);
        assert_eq!(
            greet(&g, ip(1), now + ms(406)),
            Greeting::Ca,
            "a loaded host"
        );
        let g = SilentGreetings::default();
        reject_pva(&g, ip(1), now);
        assert_eq!(greet(&g, ip(1), now + ms(407)), Greeting::Pva, "too late");
    }

    #[test]
    fn each_of_libcas_delays_is_a_window_whatever_came_before() {
        // libca's count may be ahead of the rejections seen here (measured
        // in CI: its next connect came 0.5 s after the first one seen).
        for delay in [256, 512, 1024, 2048, 4096, 8192] {
            let g = SilentGreetings::default();
            let at = Instant::now();
            reject_pva(&g, ip(1), at);
            let before = at + ms(delay) - ms(30);
            assert_eq!(greet(&g, ip(1), before), Greeting::Pva, "{delay}");
            let due = at + ms(delay) + ms(5);
            assert_eq!(greet(&g, ip(1), due), Greeting::Ca, "{delay}");
        }
    }

    #[test]
    fn a_pva_client_that_takes_libcas_turn_leaves_the_chain_to_libca() {
        let g = SilentGreetings::default();
        let now = Instant::now();
        reject_pva(&g, ip(1), now);
        // A PVA client from the same address lands in the window first and
        // rejects the CA greeting.
        let stolen = now + ms(250);
        assert_eq!(greet(&g, ip(1), stolen), Greeting::Ca);
        let t = times(stolen);
        g.learn(
            ip(1),
            Greeting::Ca,
            Reception::Silent,
            t,
            t.greeted_at + FAST,
        );
        // libca's own reconnect, a moment later, gets PVA and rejects it;
        // its next reconnect gets CA.
        let libca = now + ms(257);
        assert_eq!(greet(&g, ip(1), libca), Greeting::Pva);
        reject_pva(&g, ip(1), libca);
        assert_eq!(greet(&g, ip(1), libca + ms(258)), Greeting::Ca);
    }

    #[test]
    fn libca_taking_its_ca_greeting_ends_the_chain() {
        let g = SilentGreetings::default();
        let now = Instant::now();
        reject_pva(&g, ip(1), now);
        let retry = now + LIBCA_FIRST_RETRY;
        assert_eq!(greet(&g, ip(1), retry), Greeting::Ca);
        let t = times(retry);
        g.learn(
            ip(1),
            Greeting::Ca,
            Reception::Spoke,
            t,
            t.greeted_at + ms(3),
        );
        assert!(g.is_empty());
        let later = retry + ms(300);
        reject_pva(&g, ip(1), later);
        assert_eq!(
            greet(&g, ip(1), later + LIBCA_FIRST_RETRY),
            Greeting::Ca,
            "a new chain starts at libca's first delay"
        );
    }

    #[test]
    fn a_peer_that_spoke_or_stayed_long_marks_nothing() {
        let g = SilentGreetings::default();
        let now = Instant::now();
        let t = times(now);
        g.learn(
            ip(1),
            Greeting::Pva,
            Reception::Spoke,
            t,
            t.greeted_at + FAST,
        );
        let closed = t.greeted_at + REJECTED_WITHIN;
        g.learn(ip(1), Greeting::Pva, Reception::Silent, t, closed);
        assert!(g.is_empty());
        assert_eq!(greet(&g, ip(1), now + LIBCA_FIRST_RETRY), Greeting::Pva);
    }

    #[test]
    fn a_mark_expires_after_libcas_last_retry() {
        let g = SilentGreetings::default();
        let now = Instant::now();
        reject_pva(&g, ip(1), now);
        assert_eq!(
            greet(&g, ip(1), now + Duration::from_secs(9)),
            Greeting::Pva
        );
        assert!(g.is_empty());
        reject_pva(&g, ip(1), now + Duration::from_secs(9));
        assert_eq!(
            greet(&g, ip(1), now + Duration::from_secs(9) + LIBCA_FIRST_RETRY),
            Greeting::Ca,
            "an expired chain starts again at the first delay"
        );
    }

    #[test]
    fn marks_are_bounded_and_the_oldest_goes_first() {
        let g = SilentGreetings::new(3);
        let start = Instant::now();
        for n in 1..=4u8 {
            reject_pva(&g, ip(n), start + ms(u64::from(n)));
        }
        assert_eq!(g.len(), 3);
        assert_eq!(
            greet(&g, ip(1), start + ms(1) + LIBCA_FIRST_RETRY),
            Greeting::Pva,
            "the oldest was dropped"
        );
        assert_eq!(
            greet(&g, ip(4), start + ms(4) + LIBCA_FIRST_RETRY),
            Greeting::Ca
        );
    }

    #[test]
    fn two_silent_connections_when_libcas_reconnect_is_due_are_both_greeted_as_pva() {
        let g = SilentGreetings::default();
        let now = Instant::now();
        reject_pva(&g, ip(1), now);
        // A PVA client lands in the window; libca comes 9 ms later.
        let pva_client = now + ms(248);
        let libca = now + ms(257);
        assert_eq!(g.choose(ip(1), pva_client), Choice::Candidate);
        assert_eq!(g.choose(ip(2), libca), Choice::Pva, "other addresses");
        assert_eq!(g.choose(ip(1), libca), Choice::Pva, "contested");
        assert_eq!(g.settle(ip(1), pva_client), Greeting::Pva);
        // libca rejects PVA once more; its next reconnect (the second
        // 0.25 s of its sequence) is greeted as CA.
        reject_pva(&g, ip(1), libca);
        assert_eq!(greet(&g, ip(1), libca + ms(253)), Greeting::Ca);
    }

    #[test]
    fn a_connection_far_from_the_candidate_does_not_contest_it() {
        let g = SilentGreetings::default();
        let now = Instant::now();
        reject_pva(&g, ip(1), now);
        let libca = now + ms(258);
        assert_eq!(g.choose(ip(1), libca), Choice::Candidate);
        let later = libca + CONTEST_WINDOW + ms(1);
        assert_eq!(g.choose(ip(1), later), Choice::Pva);
        assert_eq!(g.settle(ip(1), libca), Greeting::Ca);
    }

    #[test]
    fn a_connection_accepted_just_before_the_candidate_contests_it() {
        // Its classification timer fired after the candidate's.
        let g = SilentGreetings::default();
        let now = Instant::now();
        reject_pva(&g, ip(1), now);
        let libca = now + ms(258);
        assert_eq!(g.choose(ip(1), libca), Choice::Candidate);
        assert_eq!(g.choose(ip(1), libca - ms(20)), Choice::Pva);
        assert_eq!(g.settle(ip(1), libca), Greeting::Pva);
    }

    #[test]
    fn a_candidate_whose_mark_was_replaced_meanwhile_is_greeted_as_pva() {
        let g = SilentGreetings::default();
        let now = Instant::now();
        reject_pva(&g, ip(1), now);
        let candidate = now + ms(250);
        assert_eq!(g.choose(ip(1), candidate), Choice::Candidate);
        reject_pva(&g, ip(1), candidate + ms(5));
        assert_eq!(g.settle(ip(1), candidate), Greeting::Pva);
    }
}
