//! Rates of new searches: a token bucket per client address and one for
//! all clients, so no client's burst of names can flood the servers' UDP
//! ports. A name already under search or in the cache costs nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;
use tokio::time::Instant;

/// Up to `per_second` a second, and as many at once after a second idle.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(per_second: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(per_second),
            at: now,
        }
    }

    fn refill(&mut self, per_second: u32, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(per_second)).min(f64::from(per_second));
        self.at = now;
    }
}

/// The rates of new searches, per client address and in all.
pub struct SearchRates {
    per_address: u32,
    in_all: u32,
    addresses: HashMap<IpAddr, Bucket>,
    all: Bucket,
}

impl SearchRates {
    pub fn new(per_address: u32, in_all: u32, now: Instant) -> SearchRates {
        SearchRates {
            per_address: per_address.max(1),
            in_all: in_all.max(1),
            addresses: HashMap::new(),
            all: Bucket::full(in_all.max(1), now),
        }
    }

    /// Takes one new search for `client` if both its rate and the total
    /// allow it now.
    pub fn take(&mut self, client: IpAddr, now: Instant) -> bool {
        let per_address = self.per_address;
        let own = self
            .addresses
            .entry(client)
            .or_insert_with(|| Bucket::full(per_address, now));
        own.refill(per_address, now);
        self.all.refill(self.in_all, now);
        if own.tokens < 1.0 || self.all.tokens < 1.0 {
            return false;
        }
        own.tokens -= 1.0;
        self.all.tokens -= 1.0;
        true
    }

    /// Forgets addresses idle for a second (their buckets are full again),
    /// so the table holds only recent searchers.
    pub fn sweep(&mut self, now: Instant) {
        self.addresses
            .retain(|_, bucket| now.saturating_duration_since(bucket.at) < Duration::from_secs(1));
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.addresses.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn taken(rates: &mut SearchRates, client: IpAddr, n: usize, now: Instant) -> usize {
        (0..n).filter(|_| rates.take(client, now)).count()
    }

    #[test]
    fn an_address_gets_its_rate_and_no_more() {
        let now = Instant::now();
        let mut rates = SearchRates::new(100, 1000, now);
        assert_eq!(taken(&mut rates, A, 150, now), 100);
        // Half a second refills half the bucket.
        let later = now + Duration::from_millis(500);
        assert_eq!(taken(&mut rates, A, 150, later), 50);
        // Another address has its own bucket.
        assert_eq!(taken(&mut rates, B, 150, later), 100);
    }

    #[test]
    fn all_addresses_together_get_the_total_rate() {
        let now = Instant::now();
        let mut rates = SearchRates::new(100, 150, now);
        assert_eq!(taken(&mut rates, A, 100, now), 100);
        assert_eq!(taken(&mut rates, B, 100, now), 50);
    }

    #[test]
    fn idle_addresses_are_forgotten() {
        let now = Instant::now();
        let mut rates = SearchRates::new(100, 1000, now);
        rates.take(A, now);
        rates.take(B, now + Duration::from_millis(900));
        rates.sweep(now + Duration::from_millis(1500));
        assert_eq!(rates.tracked(), 1);
    }
}
