//! Host-name resolution without NSS, for the places that take a host name
//! (today only `nameshim check`).
//!
//! The release binary links glibc statically. Static glibc's `getaddrinfo`
//! still loads the NSS modules named in `/etc/nsswitch.conf` with `dlopen`,
//! which must never happen: a `FROM scratch` image has none, and another
//! distribution's belong to another glibc. So names are resolved here, in
//! this order, and never with `ToSocketAddrs` or `getaddrinfo`:
//!
//! 1. an IP literal (`10.0.0.5`, `::1`);
//! 2. `/etc/hosts` (first field an address, the others names; `#` comments);
//! 3. a DNS stub: one A query (then AAAA if no A record) over UDP to each
//!    `nameserver` of `/etc/resolv.conf` in turn, honouring `search`,
//!    `domain`, `ndots`, `timeout` and `attempts` as glibc does
//!    (`resolv/res_query.c` `__res_context_search`).
//!
//! The DNS codec is pure (RFC 1035 section 4): a query is a 12-byte header
//! (random id, RD set, one question) and the question (labels, type, class
//! IN). An answer counts only if it comes from the server asked (connected
//! UDP socket), carries the query's id, has QR set, and repeats the question
//! exactly. Names in answers may be compressed; a pointer must point
//! strictly backwards, so a pointer loop cannot be followed, and a name is
//! at most 255 bytes. CNAME chains are followed at most `MAX_CNAME_HOPS`.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

pub const HOSTS_PATH: &str = "/etc/hosts";
pub const RESOLV_CONF_PATH: &str = "/etc/resolv.conf";

/// Bytes read of `/etc/hosts` or `/etc/resolv.conf`, at most.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// Name servers asked, at most (glibc `MAXNS`).
const MAX_NAMESERVERS: usize = 3;
/// Search domains tried, at most (glibc `MAXDNSRCH`).
const MAX_SEARCH_DOMAINS: usize = 6;
/// Largest UDP answer read (RFC 1035 limits plain UDP to 512; EDNS is not
/// asked for, but a server may still send more).
const MAX_ANSWER: usize = 4096;
/// Resource records read from one answer, at most.
const MAX_RECORDS: usize = 64;
/// CNAME links followed from the asked name, at most.
const MAX_CNAME_HOPS: usize = 8;
/// Longest name in wire form (RFC 1035 section 2.3.4).
const MAX_NAME_WIRE: usize = 255;
const MAX_LABEL: usize = 63;

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const FLAG_QR: u16 = 0x8000;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const RCODE_NXDOMAIN: u16 = 3;

#[derive(Debug)]
pub enum ResolveError {
    /// Not a valid host name.
    BadName(String),
    /// Every source was asked; none knows the name.
    NotFound { name: String, asked: String },
    /// No name server answered in time, or every answer was unusable.
    NoAnswer { name: String, asked: String },
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::BadName(why) => write!(f, "not a host name: {why}"),
            ResolveError::NotFound { name, asked } => {
                write!(f, "'{name}' is unknown to {asked}")
            }
            ResolveError::NoAnswer { name, asked } => {
                write!(f, "no usable answer for '{name}' from {asked}")
            }
        }
    }
}

impl std::error::Error for ResolveError {}

/// Resolves `host` to addresses with `port`, IPv4 first.
/// `budget` bounds the time spent asking name servers.
pub fn resolve(host: &str, port: u16, budget: Duration) -> Result<Vec<SocketAddr>, ResolveError> {
    let with_port = |ips: Vec<IpAddr>| {
        ips.into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect()
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    check_name(host)?;
    let hosts = read_small(HOSTS_PATH).unwrap_or_default();
    let found = hosts_lookup(&hosts, host);
    if !found.is_empty() {
        return Ok(with_port(found));
    }
    let conf = ResolvConf::parse(&read_small(RESOLV_CONF_PATH).unwrap_or_default());
    dns_lookup(&conf, host, budget).map(with_port)
}

fn read_small(path: &str) -> io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// A name's labels: 1 to 63 bytes of letters, digits, `-` or `_`, at most
/// 253 characters in all; one trailing dot allowed.
fn check_name(name: &str) -> Result<(), ResolveError> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() || bare.len() > MAX_NAME_WIRE - 2 {
        return Err(ResolveError::BadName(format!(
            "'{name}' is empty or too long"
        )));
    }
    for label in bare.split('.') {
        let ok_chars = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if label.is_empty() || label.len() > MAX_LABEL || !ok_chars {
            return Err(ResolveError::BadName(format!(
                "'{name}' has an empty, long or odd label '{label}'"
            )));
        }
    }
    Ok(())
}

/// The addresses `/etc/hosts` gives `name` (case-insensitive), IPv4 first.
pub fn hosts_lookup(hosts: &str, name: &str) -> Vec<IpAddr> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut found: Vec<IpAddr> = Vec::new();
    for line in hosts.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if fields.any(|alias| alias.eq_ignore_ascii_case(name)) && !found.contains(&ip) {
            found.push(ip);
        }
    }
    found.sort_by_key(|ip| ip.is_ipv6());
    found
}

/// What `/etc/resolv.conf` says (resolv.conf(5)); defaults as glibc's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<IpAddr>,
    pub search: Vec<String>,
    pub ndots: usize,
    pub timeout: Duration,
    pub attempts: usize,
}

impl ResolvConf {
    pub fn parse(text: &str) -> ResolvConf {
        let mut conf = ResolvConf {
            nameservers: Vec::new(),
            search: Vec::new(),
            ndots: 1,
            timeout: Duration::from_secs(5),
            attempts: 2,
        };
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    // A scoped address ("fe80::1%eth0") is skipped, not misread.
                    if let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) {
                        if conf.nameservers.len() < MAX_NAMESERVERS {
                            conf.nameservers.push(ip);
                        }
                    }
                }
                // The last of `search` and `domain` wins, as in glibc.
                Some("search") | Some("domain") => {
                    conf.search = words
                        .filter(|d| check_name(d).is_ok())
                        .take(MAX_SEARCH_DOMAINS)
                        .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                        .collect();
                }
                Some("options") => {
                    for option in words {
                        let number = |prefix: &str| {
                            option
                                .strip_prefix(prefix)
                                .and_then(|n| n.parse::<u64>().ok())
                        };
                        if let Some(n) = number("ndots:") {
                            conf.ndots = n.min(15) as usize;
                        } else if let Some(n) = number("timeout:") {
                            conf.timeout = Duration::from_secs(n.clamp(1, 30));
                        } else if let Some(n) = number("attempts:") {
                            conf.attempts = n.clamp(1, 5) as usize;
                        }
                    }
                }
                _ => {}
            }
        }
        if conf.nameservers.is_empty() {
            // resolv.conf(5): "the default is to use the name server on the local machine".
            conf.nameservers.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        conf
    }

    /// The names to ask, in order: with fewer than `ndots` dots the search
    /// domains come first, otherwise the name as given does; a trailing dot
    /// means the name alone.
    pub fn candidates(&self, name: &str) -> Vec<String> {
        if let Some(absolute) = name.strip_suffix('.') {
            return vec![absolute.to_ascii_lowercase()];
        }
        let name = name.to_ascii_lowercase();
        let searched = self.search.iter().map(|domain| format!("{name}.{domain}"));
        if name.matches('.').count() >= self.ndots {
            std::iter::once(name.clone()).chain(searched).collect()
        } else {
            searched.chain(std::iter::once(name.clone())).collect()
        }
    }
}

fn dns_lookup(
    conf: &ResolvConf,
    name: &str,
    budget: Duration,
) -> Result<Vec<IpAddr>, ResolveError> {
    let deadline = Instant::now() + budget;
    let asked = conf
        .nameservers
        .iter()
        .map(|ip| format!("{ip}"))
        .collect::<Vec<_>>()
        .join(", ");
    let asked = format!("{HOSTS_PATH} and the name servers of {RESOLV_CONF_PATH} ({asked})");
    let mut any_answer = false;
    for candidate in conf.candidates(name) {
        for qtype in [TYPE_A, TYPE_AAAA] {
            match ask_servers(conf, &candidate, qtype, deadline) {
                Some(Answer::Addresses(ips)) if !ips.is_empty() => return Ok(ips),
                // NXDOMAIN: no record of any type; try the next candidate.
                Some(Answer::NoSuchName) => {
                    any_answer = true;
                    break;
                }
                Some(_) => any_answer = true,
                None => {}
            }
        }
    }
    let name = name.to_string();
    if any_answer {
        Err(ResolveError::NotFound { name, asked })
    } else {
        Err(ResolveError::NoAnswer { name, asked })
    }
}

/// Asks each server in turn, `attempts` rounds, until one answers; None if
/// none does before `deadline`.
fn ask_servers(conf: &ResolvConf, name: &str, qtype: u16, deadline: Instant) -> Option<Answer> {
    for _ in 0..conf.attempts {
        for &server in &conf.nameservers {
            let left = deadline.checked_duration_since(Instant::now())?;
            if left.is_zero() {
                return None;
            }
            let wait = conf.timeout.min(left);
            match ask(SocketAddr::new(server, 53), name, qtype, wait) {
                Ok(Answer::ServerFailure) | Err(_) => continue,
                Ok(answer) => return Some(answer),
            }
        }
    }
    None
}

/// One query to one server, and its answer.
fn ask(server: SocketAddr, name: &str, qtype: u16, wait: Duration) -> io::Result<Answer> {
    let id = random_id();
    let query = encode_query(id, name, qtype)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "name does not fit a query"))?;
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    // Connected: the kernel drops datagrams from any other address or port.
    socket.connect(server)?;
    socket.send(&query)?;
    let until = Instant::now() + wait;
    let mut buf = vec![0u8; MAX_ANSWER];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        socket.set_read_timeout(Some(left))?;
        let n = socket.recv(&mut buf)?;
        // A datagram that is not the answer (wrong id, forged, garbled) is
        // ignored: the real answer may still come.
        if let Ok(answer) = parse_answer(&buf[..n], id, name, qtype) {
            return Ok(answer);
        }
    }
}

fn random_id() -> u16 {
    // SipHash keyed from the OS's random source (std's RandomState): no
    // extra crate, and unpredictable enough for a 16-bit query id.
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish() as u16
}

/// The query message for `name` (no trailing dot) and `qtype`; None when
/// the name does not fit the wire form.
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(12 + name.len() + 6);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&FLAG_RD.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // 1 question, no other records
    encode_name(name, &mut out)?;
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    Some(out)
}

fn encode_name(name: &str, out: &mut Vec<u8>) -> Option<()> {
    let start = out.len();
    for label in name.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL {
            return None;
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    (out.len() - start <= MAX_NAME_WIRE).then_some(())
}

/// What a server said about one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The addresses of the asked type for the name (or its CNAME target);
    /// empty when the name exists without such a record.
    Addresses(Vec<IpAddr>),
    /// NXDOMAIN.
    NoSuchName,
    /// SERVFAIL, REFUSED and the like: ask the next server.
    ServerFailure,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    Truncated,
    NotOurs(&'static str),
    BadName(&'static str),
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::Truncated => write!(f, "answer ends inside a field"),
            DnsError::NotOurs(why) => write!(f, "not the answer to our query: {why}"),
            DnsError::BadName(why) => write!(f, "bad name in answer: {why}"),
        }
    }
}

fn be16(msg: &[u8], at: usize) -> Result<u16, DnsError> {
    let b = msg.get(at..at + 2).ok_or(DnsError::Truncated)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

/// Parses the answer to query `id` for `name` and `qtype`.
pub fn parse_answer(msg: &[u8], id: u16, name: &str, qtype: u16) -> Result<Answer, DnsError> {
    let (flags, answers, mut at) = read_header_and_question(msg, id, name, qtype)?;
    match flags & 0x000F {
        0 => {}
        RCODE_NXDOMAIN => return Ok(Answer::NoSuchName),
        _ => return Ok(Answer::ServerFailure),
    }
    let mut records = Vec::new();
    for _ in 0..answers.min(MAX_RECORDS) {
        let (record, next) = read_record(msg, at)?;
        if record.class == CLASS_IN {
            records.push(record);
        }
        at = next;
    }
    let owner = follow_cnames(msg, &records, name)?;
    let ips = addresses(msg, &records, &owner, qtype);
    if ips.is_empty() && flags & FLAG_TC != 0 {
        // Cut short with nothing usable: TCP would be needed, which this
        // stub does not do; another server may answer in full.
        return Ok(Answer::ServerFailure);
    }
    Ok(Answer::Addresses(ips))
}

/// Checks that `msg` answers our one question; returns the flags, the
/// answer count and the position after the question.
fn read_header_and_question(
    msg: &[u8],
    id: u16,
    name: &str,
    qtype: u16,
) -> Result<(u16, usize, usize), DnsError> {
    if be16(msg, 0)? != id {
        return Err(DnsError::NotOurs("wrong id"));
    }
    let flags = be16(msg, 2)?;
    if flags & FLAG_QR == 0 {
        return Err(DnsError::NotOurs("a query, not a response"));
    }
    if be16(msg, 4)? != 1 {
        return Err(DnsError::NotOurs("not exactly one question"));
    }
    let answers = usize::from(be16(msg, 6)?);
    let (asked, at) = decode_name(msg, 12)?;
    if !asked.eq_ignore_ascii_case(name)
        || be16(msg, at)? != qtype
        || be16(msg, at + 2)? != CLASS_IN
    {
        return Err(DnsError::NotOurs("another question"));
    }
    Ok((flags, answers, at + 4))
}

/// One resource record of the answer section, its data left in the message.
struct Record {
    owner: String,
    rtype: u16,
    class: u16,
    /// Where the record's data starts in the message, and its length.
    data: usize,
    len: usize,
}

/// Reads the record at `at`; returns it and the position after it.
fn read_record(msg: &[u8], at: usize) -> Result<(Record, usize), DnsError> {
    let (owner, next) = decode_name(msg, at)?;
    let rtype = be16(msg, next)?;
    let class = be16(msg, next + 2)?;
    // The TTL (4 bytes) sits between the class and the data length.
    let len = usize::from(be16(msg, next + 8)?);
    let data = next + 10;
    if data + len > msg.len() {
        return Err(DnsError::Truncated);
    }
    let record = Record {
        owner,
        rtype,
        class,
        data,
        len,
    };
    Ok((record, data + len))
}

/// Follows the CNAME chain from the asked name; returns the name at its
/// end (lowercase), the owner of the addresses.
fn follow_cnames(msg: &[u8], records: &[Record], name: &str) -> Result<String, DnsError> {
    let mut current = name.to_ascii_lowercase();
    for _ in 0..MAX_CNAME_HOPS {
        let alias = records
            .iter()
            .find(|r| r.rtype == TYPE_CNAME && r.owner.eq_ignore_ascii_case(&current));
        match alias {
            Some(alias) => current = decode_name(msg, alias.data)?.0.to_ascii_lowercase(),
            None => break,
        }
    }
    Ok(current)
}

/// The distinct addresses of type `qtype` that `owner` has, in answer order.
fn addresses(msg: &[u8], records: &[Record], owner: &str, qtype: u16) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for record in records {
        if record.rtype != qtype || !record.owner.eq_ignore_ascii_case(owner) {
            continue;
        }
        let rdata = &msg[record.data..record.data + record.len];
        let ip = match (qtype, rdata.len()) {
            (TYPE_A, 4) => IpAddr::from([rdata[0], rdata[1], rdata[2], rdata[3]]),
            (TYPE_AAAA, 16) => {
                let mut b = [0u8; 16];
                b.copy_from_slice(rdata);
                IpAddr::from(b)
            }
            _ => continue,
        };
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

/// Reads a possibly compressed name at `at`; returns it (dotted, no
/// trailing dot) and the position after it in the message. Every pointer
/// must point before the place it is read from, so loops cannot happen.
pub fn decode_name(msg: &[u8], mut at: usize) -> Result<(String, usize), DnsError> {
    let mut name = String::new();
    let mut wire_len = 0usize;
    let mut after = None;
    loop {
        let len = *msg.get(at).ok_or(DnsError::Truncated)?;
        match len & 0xC0 {
            0xC0 => {
                let pointer = usize::from(be16(msg, at)? & 0x3FFF);
                if pointer >= at {
                    return Err(DnsError::BadName(
                        "a compression pointer that does not point back",
                    ));
                }
                after.get_or_insert(at + 2);
                at = pointer;
            }
            0x00 if len == 0 => {
                return Ok((name, after.unwrap_or(at + 1)));
            }
            0x00 => {
                let len = usize::from(len);
                let label = msg.get(at + 1..at + 1 + len).ok_or(DnsError::Truncated)?;
                wire_len += 1 + len;
                if wire_len + 1 > MAX_NAME_WIRE {
                    return Err(DnsError::BadName("longer than 255 bytes"));
                }
                if !name.is_empty() {
                    name.push('.');
                }
                // Labels are bytes; anything but printable ASCII is shown escaped.
                for &b in label {
                    if b.is_ascii_graphic() && b != b'.' {
                        name.push(char::from(b));
                    } else {
                        name.push_str(&format!("\\{b:03}"));
                    }
                }
                at += 1 + len;
            }
            _ => return Err(DnsError::BadName("a reserved label type")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dig +noedns example.com A` as sent by BIND's dig, id 0x1234.
    const QUERY_EXAMPLE_COM_A: [u8; 29] = [
        0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0, //
        0x00, 0x01, 0x00, 0x01,
    ];

    /// The answer to it: one A record 93.184.215.14, the owner a pointer
    /// to the question's name (offset 12), TTL 3600.
    fn answer_example_com() -> Vec<u8> {
        let mut a = QUERY_EXAMPLE_COM_A.to_vec();
        a[2] = 0x81; // QR, RD
        a[3] = 0x80; // RA, rcode 0
        a[7] = 1; // one answer
        a.extend_from_slice(&[
            0xC0, 12, 0, 1, 0, 1, 0, 0, 0x0E, 0x10, 0, 4, 93, 184, 215, 14,
        ]);
        a
    }

    #[test]
    fn a_query_has_the_golden_bytes_of_dig() {
        assert_eq!(
            encode_query(0x1234, "example.com", TYPE_A).as_deref(),
            Some(&QUERY_EXAMPLE_COM_A[..])
        );
    }

    #[test]
    fn a_query_refuses_names_that_do_not_fit() {
        assert_eq!(encode_query(1, &"a".repeat(64), TYPE_A), None);
        assert_eq!(encode_query(1, "a..b", TYPE_A), None);
        let long = vec!["abcdefghi"; 26].join(".");
        assert_eq!(encode_query(1, &long, TYPE_A), None);
    }

    #[test]
    fn an_answer_gives_its_a_record() {
        let got = parse_answer(&answer_example_com(), 0x1234, "example.com", TYPE_A);
        assert_eq!(
            got,
            Ok(Answer::Addresses(vec![IpAddr::from([93, 184, 215, 14])]))
        );
    }

    #[test]
    fn an_answer_with_another_id_or_question_is_not_ours() {
        let a = answer_example_com();
        assert!(matches!(
            parse_answer(&a, 0x4321, "example.com", TYPE_A),
            Err(DnsError::NotOurs(_))
        ));
        assert!(matches!(
            parse_answer(&a, 0x1234, "example.org", TYPE_A),
            Err(DnsError::NotOurs(_))
        ));
        assert!(matches!(
            parse_answer(&a, 0x1234, "example.com", TYPE_AAAA),
            Err(DnsError::NotOurs(_))
        ));
        let mut query = QUERY_EXAMPLE_COM_A.to_vec();
        query[7] = 0;
        assert!(matches!(
            parse_answer(&query, 0x1234, "example.com", TYPE_A),
            Err(DnsError::NotOurs(_))
        ));
    }

    #[test]
    fn a_truncated_answer_is_an_error_at_every_length() {
        let a = answer_example_com();
        for n in 0..a.len() {
            assert!(
                parse_answer(&a[..n], 0x1234, "example.com", TYPE_A).is_err(),
                "cut at {n}"
            );
        }
    }

    #[test]
    fn a_compression_loop_is_refused() {
        let mut a = answer_example_com();
        // The answer's owner points to itself.
        let owner = QUERY_EXAMPLE_COM_A.len();
        a[owner + 1] = owner as u8;
        assert!(matches!(
            parse_answer(&a, 0x1234, "example.com", TYPE_A),
            Err(DnsError::BadName(_))
        ));
        // Two pointers pointing at each other.
        let msg = [0xC0, 2, 0xC0, 0];
        assert!(decode_name(&msg, 2).is_err());
        assert!(decode_name(&msg, 0).is_err());
    }

    #[test]
    fn a_name_longer_than_255_bytes_is_refused() {
        let mut msg = Vec::new();
        for _ in 0..5 {
            msg.push(63);
            msg.extend_from_slice(&[b'a'; 63]);
        }
        msg.push(0);
        assert!(matches!(decode_name(&msg, 0), Err(DnsError::BadName(_))));
    }

    #[test]
    fn nxdomain_and_servfail_are_told_apart() {
        let mut a = QUERY_EXAMPLE_COM_A.to_vec();
        a[2] = 0x81;
        a[3] = 0x83;
        assert_eq!(
            parse_answer(&a, 0x1234, "example.com", TYPE_A),
            Ok(Answer::NoSuchName)
        );
        a[3] = 0x82;
        assert_eq!(
            parse_answer(&a, 0x1234, "example.com", TYPE_A),
            Ok(Answer::ServerFailure)
        );
    }

    #[test]
    fn a_cname_chain_is_followed_and_unrelated_records_ignored() {
        // www.example.com CNAME example.com; example.com A 10.0.0.1;
        // other.test A 10.6.6.6 (not on the chain).
        let mut a = encode_query(7, "www.example.com", TYPE_A).unwrap();
        a[2] = 0x81;
        a[3] = 0x80;
        a[7] = 3;
        // CNAME: owner -> offset 12; rdata -> pointer to "example.com" at 16.
        a.extend_from_slice(&[0xC0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xC0, 16]);
        a.extend_from_slice(&[0xC0, 16, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 1]);
        a.extend_from_slice(&[
            5, b'o', b't', b'h', b'e', b'r', 4, b't', b'e', b's', b't', 0,
        ]);
        a.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 6, 6, 6]);
        assert_eq!(
            parse_answer(&a, 7, "www.example.com", TYPE_A),
            Ok(Answer::Addresses(vec![IpAddr::from([10, 0, 0, 1])]))
        );
    }

    #[test]
    fn an_aaaa_record_is_read() {
        let mut a = encode_query(9, "v6.test", TYPE_AAAA).unwrap();
        a[2] = 0x81;
        a[3] = 0x80;
        a[7] = 1;
        a.extend_from_slice(&[0xC0, 12, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16]);
        a.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(
            parse_answer(&a, 9, "v6.test", TYPE_AAAA),
            Ok(Answer::Addresses(vec!["2001:db8::1".parse().unwrap()]))
        );
    }

    #[test]
    fn hosts_file_matches_any_alias_ignoring_case_and_comments() {
        let hosts = "\
# comment 10.9.9.9 ioc
127.0.0.1\tlocalhost
10.0.0.5 ioc-host.example.test IOC-HOST # the IOC
::1 localhost ip6-localhost
fd00::5 ioc-host
not-an-ip ioc-host
";
        assert_eq!(
            hosts_lookup(hosts, "ioc-host"),
            vec![IpAddr::from([10, 0, 0, 5]), "fd00::5".parse().unwrap()]
        );
        assert_eq!(
            hosts_lookup(hosts, "ioc-host.example.test."),
            vec![IpAddr::from([10, 0, 0, 5])]
        );
        assert_eq!(
            hosts_lookup(hosts, "localhost"),
            vec![IpAddr::from([127, 0, 0, 1]), "::1".parse().unwrap()]
        );
        assert!(hosts_lookup(hosts, "ioc").is_empty());
        assert!(hosts_lookup(hosts, "comment").is_empty());
    }

    #[test]
    fn resolv_conf_gives_servers_search_and_options() {
        let conf = ResolvConf::parse(
            "\
# generated
nameserver 10.0.0.53
nameserver fe80::1%eth0
nameserver 10.0.0.54 ; second
domain ignored.test
search svc.cluster.local cluster.local
options ndots:5 timeout:1 attempts:3 rotate
",
        );
        assert_eq!(
            conf.nameservers,
            vec![IpAddr::from([10, 0, 0, 53]), IpAddr::from([10, 0, 0, 54])]
        );
        assert_eq!(conf.search, ["svc.cluster.local", "cluster.local"]);
        assert_eq!(conf.ndots, 5);
        assert_eq!(conf.timeout, Duration::from_secs(1));
        assert_eq!(conf.attempts, 3);
        assert_eq!(
            conf.candidates("ioc.ns"),
            ["ioc.ns.svc.cluster.local", "ioc.ns.cluster.local", "ioc.ns"]
        );
        assert_eq!(conf.candidates("ioc.example.test."), ["ioc.example.test"]);
    }

    #[test]
    fn resolv_conf_defaults_are_glibcs() {
        let conf = ResolvConf::parse("");
        assert_eq!(conf.nameservers, vec![IpAddr::from([127, 0, 0, 1])]);
        assert_eq!((conf.ndots, conf.attempts), (1, 2));
        assert_eq!(conf.timeout, Duration::from_secs(5));
        let conf = ResolvConf::parse("search lab.test\n");
        assert_eq!(conf.candidates("ioc"), ["ioc.lab.test", "ioc"]);
        assert_eq!(
            conf.candidates("ioc.example.test"),
            ["ioc.example.test", "ioc.example.test.lab.test"]
        );
    }

    #[test]
    fn ip_literals_need_no_lookup() {
        let got = resolve("10.1.2.3", 5066, Duration::ZERO).unwrap();
        assert_eq!(got, vec![SocketAddr::from(([10, 1, 2, 3], 5066))]);
        let got = resolve("::1", 8066, Duration::ZERO).unwrap();
        assert_eq!(got, vec!["[::1]:8066".parse().unwrap()]);
        assert!(matches!(
            resolve("bad name", 1, Duration::ZERO),
            Err(ResolveError::BadName(_))
        ));
    }

    /// A real UDP exchange with a stub server on the loopback that first
    /// sends a forged answer (wrong id), then the right one.
    #[test]
    fn ask_ignores_a_forged_answer_and_takes_the_real_one() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let stub = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).unwrap();
            let query = &buf[..n];
            let mut answer = query.to_vec();
            answer[2] |= 0x80;
            answer[7] = 1;
            answer.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 9, 8, 7]);
            let mut forged = answer.clone();
            forged[0] ^= 0xFF;
            forged[answer.len() - 1] = 66;
            server.send_to(&forged, from).unwrap();
            server.send_to(&answer, from).unwrap();
        });
        let got = ask(addr, "ioc.test", TYPE_A, Duration::from_secs(5)).unwrap();
        stub.join().unwrap();
        assert_eq!(got, Answer::Addresses(vec![IpAddr::from([10, 9, 8, 7])]));
    }

    #[test]
    fn ask_times_out_when_nobody_answers() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let started = Instant::now();
        let got = ask(
            silent.local_addr().unwrap(),
            "ioc.test",
            TYPE_A,
            Duration::from_millis(200),
        );
        assert!(got.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
