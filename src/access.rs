//! The shim's own access rules, checked before anything reaches a server:
//! which clients are served (networks), which PV names can be found (globs),
//! and whether writes pass at all. By default everything is allowed, and
//! the IOC's own access security decides, as it does for direct clients.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// What the shim lets clients do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Refuse CA writes and PVA PUT, PUT_GET and RPC.
    pub read_only: bool,
    /// Names that can be found; empty: every name.
    pub allow_names: Vec<Glob>,
    /// Names that are never found, whatever `allow_names` says.
    pub deny_names: Vec<Glob>,
    /// Networks whose clients are served; empty: every client.
    pub allow_clients: Vec<Cidr>,
}

impl Access {
    /// Whether a search for `name` may go to the servers.
    pub fn allows_name(&self, name: &[u8]) -> bool {
        let allowed =
            self.allow_names.is_empty() || self.allow_names.iter().any(|g| g.matches(name));
        allowed && !self.deny_names.iter().any(|g| g.matches(name))
    }

    /// Whether a client at `ip` is served.
    pub fn allows_client(&self, ip: IpAddr) -> bool {
        self.allow_clients.is_empty() || self.allow_clients.iter().any(|c| c.contains(ip))
    }
}

/// A shell-style pattern over a PV name: `*` matches any run of bytes
/// (`:` included, so `IOC:*` takes every PV of a prefix), `?` any one
/// byte; every other byte matches itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(Vec<u8>);

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob(pattern.as_bytes().to_vec())
    }

    /// Linear in the name for each star: the last star's position is the
    /// only one ever retried, so no input makes this backtrack without end.
    pub fn matches(&self, name: &[u8]) -> bool {
        let pattern = &self.0;
        let (mut p, mut n) = (0, 0);
        let mut retry: Option<(usize, usize)> = None;
        while n < name.len() {
            match pattern.get(p) {
                Some(b'*') => {
                    retry = Some((p, n));
                    p += 1;
                }
                Some(&b) if b == b'?' || b == name[n] => {
                    p += 1;
                    n += 1;
                }
                _ => match retry {
                    // Let the last star take one more byte.
                    Some((star, taken)) => {
                        p = star + 1;
                        n = taken + 1;
                        retry = Some((star, taken + 1));
                    }
                    None => return false,
                },
            }
        }
        pattern[p..].iter().all(|&b| b == b'*')
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", String::from_utf8_lossy(&self.0))
    }
}

/// A network: an address and a prefix length (`10.0.0.0/8`, `fd00::/8`);
/// an address alone is a network of one. An IPv4 client seen as an
/// IPv4-mapped IPv6 address (a dual-stack socket) matches IPv4 networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => same_prefix(
                u128::from(u32::from(net)),
                u128::from(u32::from(ip)),
                32,
                self.prefix,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(u128::from(net), u128::from(ip), 128, self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether `a` and `b`, numbers of `bits` bits, agree in their top
/// `prefix` bits.
fn same_prefix(a: u128, b: u128, bits: u32, prefix: u8) -> bool {
    let ignored = bits - u32::from(prefix);
    ignored >= bits || (a >> ignored) == (b >> ignored)
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.trim().parse().map_err(|_| {
            format!("'{text}' is not an address or a network (CIDR, e.g. 10.0.0.0/8)")
        })?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= bits)
                .ok_or_else(|| format!("'{text}': the prefix length must be 0 to {bits}"))?,
        };
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(p: &str, name: &str) -> bool {
        Glob::new(p).matches(name.as_bytes())
    }

    #[test]
    fn globs_match_stars_and_single_bytes() {
        assert!(glob("IOC:*", "IOC:TEMP"));
        assert!(glob("IOC:*", "IOC:"));
        assert!(!glob("IOC:*", "OTHER:TEMP"));
        assert!(glob("*:SP", "IOC:A:SP"));
        assert!(!glob("*:SP", "IOC:A:SPX"));
        assert!(glob("IOC:?", "IOC:A"));
        assert!(!glob("IOC:?", "IOC:AB"));
        assert!(glob("*A*B*", "xxAyyBzz"));
        assert!(!glob("*A*B*", "xxByyAzz"));
        assert!(glob("EXACT", "EXACT"));
        assert!(!glob("EXACT", "EXACTLY"));
        assert!(glob("*", ""));
        assert!(!glob("", "X"));
    }

    #[test]
    fn a_pathological_glob_matches_in_bounded_work() {
        let name = "a".repeat(10_000);
        let pattern = format!("{}b", "*a".repeat(50));
        let started = std::time::Instant::now();
        assert!(!glob(&pattern, &name));
        // Backtracking over every star would take astronomically long.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn deny_wins_over_allow_and_no_allow_list_allows_all() {
        let mut access = Access::default();
        assert!(access.allows_name(b"ANY"));
        access.deny_names.push(Glob::new("*:SECRET"));
        assert!(access.allows_name(b"IOC:TEMP"));
        assert!(!access.allows_name(b"IOC:SECRET"));
        access.allow_names.push(Glob::new("IOC:*"));
        assert!(!access.allows_name(b"OTHER:TEMP"));
        assert!(!access.allows_name(b"IOC:SECRET"));
        assert!(access.allows_name(b"IOC:TEMP"));
    }

    #[test]
    fn networks_contain_their_addresses() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(
            net.contains("::ffff:10.1.0.9".parse().unwrap()),
            "IPv4-mapped"
        );
        let host: Cidr = "192.0.2.7".parse().unwrap();
        assert!(host.contains("192.0.2.7".parse().unwrap()));
        assert!(!host.contains("192.0.2.8".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));
        assert!(
            !all.contains("2001:db8::1".parse().unwrap()),
            "another family"
        );
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::5".parse().unwrap()));
    }

    #[test]
    fn bad_networks_are_refused_with_a_reason() {
        assert!("10.0.0.0/33"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("0 to 32"));
        assert!("ioc".parse::<Cidr>().unwrap_err().contains("CIDR"));
        assert!("::/129".parse::<Cidr>().is_err());
    }

    #[test]
    fn clients_are_checked_only_when_networks_are_listed() {
        let mut access = Access::default();
        assert!(access.allows_client("203.0.113.1".parse().unwrap()));
        access.allow_clients.push("10.0.0.0/8".parse().unwrap());
        assert!(!access.allows_client("203.0.113.1".parse().unwrap()));
        assert!(access.allows_client("10.9.9.9".parse().unwrap()));
    }
}
