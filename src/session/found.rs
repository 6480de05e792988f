//! Names one client connection's searches found, kept until the client
//! creates the channel. A CA client that was told "here" creates the
//! channel on the same circuit right after the answer (libca `tcpiiu.cpp`
//! searchRespNotify), so its CREATE_CHAN can go straight to the server the
//! search found instead of asking the search relay a second time. In a
//! connect storm that second ask, a hand-off to the relay's task and back
//! per channel, is a large part of the shim's own work.

use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::time::Duration;
use tokio::time::Instant;

/// How long a found name is kept for its creation. libca creates at once;
/// a creation later than this asks the search relay, whose cache still
/// answers it without a new search.
pub const FOUND_KEPT: Duration = Duration::from_secs(2);

/// Found names awaiting their creation, at most `max_names` of them.
pub struct FoundNames {
    names: HashMap<Bytes, (SocketAddrV4, Instant)>,
    max_names: usize,
}

impl FoundNames {
    pub fn new(max_names: usize) -> Self {
        FoundNames {
            names: HashMap::new(),
            max_names,
        }
    }

    /// Keeps `name`, found on `server` at `now`. The name is copied, so it
    /// never holds on to the message it was cut from. When full of names
    /// still fresh, the name is not kept: its creation asks the relay.
    pub fn remember(&mut self, name: &[u8], server: SocketAddrV4, now: Instant) {
        if self.names.len() >= self.max_names && !self.names.contains_key(name) {
            self.names.retain(|_, (_, found)| fresh(*found, now));
            if self.names.len() >= self.max_names {
                return;
            }
        }
        self.names
            .insert(Bytes::copy_from_slice(name), (server, now));
    }

    /// The server `name` was found on, if it was found within
    /// [`FOUND_KEPT`]; the name is no longer kept either way.
    pub fn take(&mut self, name: &[u8], now: Instant) -> Option<SocketAddrV4> {
        let (server, found) = self.names.remove(name)?;
        fresh(found, now).then_some(server)
    }

    /// Drops the names found on `server`, whose connection was lost.
    pub fn forget(&mut self, server: SocketAddrV4) {
        self.names.retain(|_, (on, _)| *on != server);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.names.len()
    }
}

fn fresh(found: Instant, now: Instant) -> bool {
    now.saturating_duration_since(found) < FOUND_KEPT
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const A: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5064);
    const B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 6064);

    #[test]
    fn a_found_name_is_taken_once() {
        let mut found = FoundNames::new(10);
        let now = Instant::now();
        found.remember(b"PV:1", A, now);
        assert_eq!(found.take(b"PV:1", now), Some(A));
        assert_eq!(found.take(b"PV:1", now), None);
    }

    #[test]
    fn a_name_found_too_long_ago_is_not_given() {
        let mut found = FoundNames::new(10);
        let then = Instant::now();
        found.remember(b"PV:1", A, then);
        assert_eq!(found.take(b"PV:1", then + FOUND_KEPT), None);
        assert_eq!(found.len(), 0);
    }

    #[test]
    fn names_of_a_lost_server_are_forgotten() {
        let mut found = FoundNames::new(10);
        let now = Instant::now();
        found.remember(b"PV:1", A, now);
        found.remember(b"PV:2", B, now);
        found.forget(A);
        assert_eq!(found.take(b"PV:1", now), None);
        assert_eq!(found.take(b"PV:2", now), Some(B));
    }

    #[test]
    fn the_count_is_bounded_and_stale_names_make_room() {
        let mut found = FoundNames::new(2);
        let then = Instant::now();
        found.remember(b"PV:1", A, then);
        found.remember(b"PV:2", A, then);
        found.remember(b"PV:3", A, then);
        assert_eq!(found.len(), 2);
        assert_eq!(found.take(b"PV:3", then), None);
        let later = then + FOUND_KEPT;
        found.remember(b"PV:3", B, later);
        assert_eq!(found.len(), 1);
        assert_eq!(found.take(b"PV:3", later), Some(B));
    }

    #[test]
    fn a_name_found_again_is_kept_once_with_its_new_server() {
        let mut found = FoundNames::new(1);
        let now = Instant::now();
        found.remember(b"PV:1", A, now);
        found.remember(b"PV:1", B, now);
        assert_eq!(found.len(), 1);
        assert_eq!(found.take(b"PV:1", now), Some(B));
    }
}
