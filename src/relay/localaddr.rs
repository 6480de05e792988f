//! Which IPv4 addresses belong to this host (or this network namespace).
//!
//! Search answers are accepted only from these, so that a client is never
//! routed to a server on another machine.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// An unknown address triggers a fresh look at the interfaces, at most this often.
const REFRESH_INTERVAL: Duration = Duration::from_secs(2);

pub struct LocalAddrs {
    addrs: HashSet<Ipv4Addr>,
    refreshed: Option<Instant>,
}

impl Default for LocalAddrs {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalAddrs {
    pub fn new() -> Self {
        LocalAddrs {
            addrs: HashSet::new(),
            refreshed: None,
        }
    }

    /// True for the loopback range and for every address of a local interface.
    pub fn contains(&mut self, ip: Ipv4Addr) -> bool {
        if ip.is_loopback() || self.addrs.contains(&ip) {
            return true;
        }
        let stale = self
            .refreshed
            .is_none_or(|at| at.elapsed() >= REFRESH_INTERVAL);
        if stale {
            self.refresh();
        }
        self.addrs.contains(&ip)
    }

    fn refresh(&mut self) {
        self.refreshed = Some(Instant::now());
        match nix::ifaddrs::getifaddrs() {
            Ok(interfaces) => {
                self.addrs = interfaces
                    .filter_map(|ifa| ifa.address)
                    .filter_map(|addr| addr.as_sockaddr_in().map(|sin| sin.ip()))
                    .collect();
            }
            Err(e) => tracing::warn!(cause = %e, "cannot list local interface addresses"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_range_is_local() {
        let mut local = LocalAddrs::new();
        assert!(local.contains(Ipv4Addr::new(127, 0, 0, 1)));
        assert!(local.contains(Ipv4Addr::new(127, 3, 2, 1)));
    }

    #[test]
    fn documentation_address_is_not_local() {
        let mut local = LocalAddrs::new();
        assert!(!local.contains(Ipv4Addr::new(192, 0, 2, 1)));
    }
}
