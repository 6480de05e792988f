//! Counters and gauges for `GET /metrics`, kept as process-wide relaxed
//! atomics: each call site is one cheap add, and nothing has to be passed
//! through the sessions. Rendered in the Prometheus text exposition format
//! 0.0.4 (https://prometheus.io/docs/instrumenting/exposition_formats/).

use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// The protocol a figure is kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Ca = 0,
    Pva = 1,
}

impl Proto {
    const ALL: [Proto; 2] = [Proto::Ca, Proto::Pva];

    pub fn label(self) -> &'static str {
        match self {
            Proto::Ca => "ca",
            Proto::Pva => "pva",
        }
    }

    /// From a search protocol's name ("ca" or "pva").
    pub fn named(name: &str) -> Proto {
        if name == "ca" {
            Proto::Ca
        } else {
            Proto::Pva
        }
    }
}

/// One counter per protocol.
pub struct PerProto([AtomicU64; 2]);

impl PerProto {
    const fn new() -> PerProto {
        PerProto([AtomicU64::new(0), AtomicU64::new(0)])
    }

    pub fn add(&self, proto: Proto, n: u64) {
        self.0[proto as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self, proto: Proto) {
        self.add(proto, 1);
    }

    fn get(&self, proto: Proto) -> u64 {
        self.0[proto as usize].load(Ordering::Relaxed)
    }
}

/// One gauge per protocol (signed so that a stray extra decrement shows as
/// a negative number rather than wrapping to 2^64).
pub struct GaugePerProto([AtomicI64; 2]);

impl GaugePerProto {
    const fn new() -> GaugePerProto {
        GaugePerProto([AtomicI64::new(0), AtomicI64::new(0)])
    }

    pub fn add(&self, proto: Proto, delta: i64) {
        self.0[proto as usize].fetch_add(delta, Ordering::Relaxed);
    }

    pub fn get(&self, proto: Proto) -> i64 {
        self.0[proto as usize].load(Ordering::Relaxed)
    }
}

/// Why a connection, channel, search or write was refused by a limit or
/// by the shim's access rules.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    /// `--max-clients-per-host` connections from one address already open.
    PerHost = 0,
    /// `--max-channels` on one client connection.
    ChannelsPerClient = 1,
    /// `--max-total-channels` held by all clients together.
    ChannelsInAll = 2,
    /// The search relay's fair share of pending searches.
    Searches = 3,
    /// An HTTP request head larger than the limit.
    HttpRequestTooLarge = 4,
    /// The process ran out of file descriptors (EMFILE, ENFILE).
    OutOfDescriptors = 5,
    /// A client from a network `--allow-client` does not list.
    ClientNotAllowed = 6,
    /// A search for a name `--allow-pv` / `--deny-pv` keep from the servers.
    NameDenied = 7,
    /// A write refused by `--read-only`.
    WriteRefused = 8,
    /// A new name over `--search-rate-per-client` or `--search-rate`.
    SearchRate = 9,
}

const REFUSALS: [(Refusal, &str); 10] = [
    (Refusal::PerHost, "per_host"),
    (Refusal::ChannelsPerClient, "channels_per_client"),
    (Refusal::ChannelsInAll, "channels_in_all"),
    (Refusal::Searches, "searches"),
    (Refusal::HttpRequestTooLarge, "http_request_too_large"),
    (Refusal::OutOfDescriptors, "out_of_descriptors"),
    (Refusal::ClientNotAllowed, "client_not_allowed"),
    (Refusal::NameDenied, "name_denied"),
    (Refusal::WriteRefused, "write_refused"),
    (Refusal::SearchRate, "search_rate"),
];

/// Why a client connection was closed for what it sent or failed to send.
#[derive(Debug, Clone, Copy)]
pub enum BadInput {
    /// A malformed or unexpected message.
    Protocol = 0,
    /// A hello, stall or idle deadline ran out.
    Timeout = 1,
    /// The peer closed in the middle of a message.
    Truncated = 2,
    /// A message or reply larger than a limit.
    TooLarge = 3,
    /// The first byte was neither CA, PVA nor HTTP.
    UnknownProtocol = 4,
}

const BAD_INPUTS: [(BadInput, &str); 5] = [
    (BadInput::Protocol, "protocol"),
    (BadInput::Timeout, "timeout"),
    (BadInput::Truncated, "truncated"),
    (BadInput::TooLarge, "too_large"),
    (BadInput::UnknownProtocol, "unknown_protocol"),
];

pub struct Metrics {
    pub clients: GaugePerProto,
    pub clients_accepted: PerProto,
    pub channels: GaugePerProto,
    pub bytes_from_clients: AtomicU64,
    pub bytes_to_clients: AtomicU64,
    pub searches_sent: PerProto,
    pub searches_found: PerProto,
    pub searches_timed_out: PerProto,
    pub server_links_opened: PerProto,
    pub server_links_lost: PerProto,
    pub http_requests: AtomicU64,
    refused: [AtomicU64; REFUSALS.len()],
    bad_input: [AtomicU64; 5],
}

pub static METRICS: Metrics = Metrics::new();

impl Metrics {
    const fn new() -> Metrics {
        Metrics {
            clients: GaugePerProto::new(),
            clients_accepted: PerProto::new(),
            channels: GaugePerProto::new(),
            bytes_from_clients: AtomicU64::new(0),
            bytes_to_clients: AtomicU64::new(0),
            searches_sent: PerProto::new(),
            searches_found: PerProto::new(),
            searches_timed_out: PerProto::new(),
            server_links_opened: PerProto::new(),
            server_links_lost: PerProto::new(),
            http_requests: AtomicU64::new(0),
            refused: [const { AtomicU64::new(0) }; REFUSALS.len()],
            bad_input: [const { AtomicU64::new(0) }; 5],
        }
    }

    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn bad_input(&self, why: BadInput) {
        self.bad_input[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn bytes_from_clients(&self, n: usize) {
        self.bytes_from_clients
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn bytes_to_clients(&self, n: usize) {
        self.bytes_to_clients.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        for (name, help, samples_of) in EXPOSITION {
            write_metric(&mut out, name, help, samples_of(self));
        }
        out
    }
}

/// Where one metric's samples are read from; the variant decides its TYPE
/// and its labels.
enum Samples<'a> {
    GaugePerProto(&'a GaugePerProto),
    CounterPerProto(&'a PerProto),
    Counter(&'a AtomicU64),
    /// A counter split by one label: the label's name, then each value of
    /// the label with its count.
    CounterBy(&'static str, Vec<(&'static str, u64)>),
}

/// Every metric in the order it is rendered: name, help, and its samples.
type Exposition = [(&'static str, &'static str, fn(&Metrics) -> Samples<'_>); 13];

const EXPOSITION: Exposition = [
    ("nameshim_clients", "Client connections open now.", |m| {
        Samples::GaugePerProto(&m.clients)
    }),
    (
        "nameshim_clients_accepted_total",
        "Client connections served since start.",
        |m| Samples::CounterPerProto(&m.clients_accepted),
    ),
    (
        "nameshim_channels",
        "Channels held by client connections now.",
        |m| Samples::GaugePerProto(&m.channels),
    ),
    (
        "nameshim_client_received_bytes_total",
        "Bytes read from client connections.",
        |m| Samples::Counter(&m.bytes_from_clients),
    ),
    (
        "nameshim_client_sent_bytes_total",
        "Bytes written to client connections.",
        |m| Samples::Counter(&m.bytes_to_clients),
    ),
    (
        "nameshim_searches_sent_total",
        "Names the search relay began searching for on the local servers (cache misses).",
        |m| Samples::CounterPerProto(&m.searches_sent),
    ),
    (
        "nameshim_searches_found_total",
        "Names a local server answered for.",
        |m| Samples::CounterPerProto(&m.searches_found),
    ),
    (
        "nameshim_searches_timed_out_total",
        "Names no local server answered for within --search-timeout.",
        |m| Samples::CounterPerProto(&m.searches_timed_out),
    ),
    (
        "nameshim_server_links_opened_total",
        "Connections to local servers established.",
        |m| Samples::CounterPerProto(&m.server_links_opened),
    ),
    (
        "nameshim_server_links_lost_total",
        "Connections to local servers that ended after being established.",
        |m| Samples::CounterPerProto(&m.server_links_lost),
    ),
    (
        "nameshim_refused_total",
        "Connections, channels, searches or writes refused by a limit or an access rule, by reason.",
        |m| {
            Samples::CounterBy(
                "reason",
                REFUSALS.map(|(why, label)| (label, load(&m.refused[why as usize]))).to_vec(),
            )
        },
    ),
    (
        "nameshim_bad_input_closes_total",
        "Client connections closed for what they sent (or failed to send), by kind.",
        |m| {
            Samples::CounterBy(
                "kind",
                BAD_INPUTS.map(|(why, label)| (label, load(&m.bad_input[why as usize]))).to_vec(),
            )
        },
    ),
    (
        "nameshim_http_requests_total",
        "HTTP requests answered on the shared port.",
        |m| Samples::Counter(&m.http_requests),
    ),
];

fn load(value: &AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

/// One metric: its HELP and TYPE lines, then one line per sample.
fn write_metric(out: &mut String, name: &str, help: &str, samples: Samples) {
    let kind = match samples {
        Samples::GaugePerProto(_) => "gauge",
        Samples::CounterPerProto(_) | Samples::Counter(_) | Samples::CounterBy(..) => "counter",
    };
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    match samples {
        Samples::GaugePerProto(values) => {
            for proto in Proto::ALL {
                sample(out, name, "protocol", proto.label(), values.get(proto));
            }
        }
        Samples::CounterPerProto(values) => {
            for proto in Proto::ALL {
                sample(out, name, "protocol", proto.label(), values.get(proto));
            }
        }
        Samples::Counter(value) => {
            let _ = writeln!(out, "{name} {}", load(value));
        }
        Samples::CounterBy(label, counts) => {
            for (label_value, count) in counts {
                sample(out, name, label, label_value, count);
            }
        }
    }
}

/// One sample line with one label.
fn sample(out: &mut String, name: &str, label: &str, label_value: &str, value: impl Display) {
    let _ = writeln!(out, "{name}{{{label}=\"{label_value}\"}} {value}");
}

/// Counts one client connection of `proto` as open until dropped, by any
/// path (a panic included).
pub struct ClientGauge(Proto);

impl ClientGauge {
    pub fn enter(proto: Proto) -> ClientGauge {
        METRICS.clients.add(proto, 1);
        METRICS.clients_accepted.inc(proto);
        ClientGauge(proto)
    }
}

impl Drop for ClientGauge {
    fn drop(&mut self) {
        METRICS.clients.add(self.0, -1);
    }
}

/// Counts a server link as opened now and as lost when dropped.
pub struct ServerLinkCount(Proto);

impl ServerLinkCount {
    pub fn opened(proto: Proto) -> ServerLinkCount {
        METRICS.server_links_opened.inc(proto);
        ServerLinkCount(proto)
    }
}

impl Drop for ServerLinkCount {
    fn drop(&mut self) {
        METRICS.server_links_lost.inc(self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_help_and_type_before_its_samples() {
        let metrics = Metrics::new();
        metrics.clients.add(Proto::Pva, 2);
        metrics.searches_found.add(Proto::Ca, 7);
        metrics.refused(Refusal::PerHost);
        metrics.bad_input(BadInput::Timeout);
        metrics.bytes_to_clients(1500);
        let text = metrics.render();
        assert!(text.contains("nameshim_clients{protocol=\"pva\"} 2\n"));
        assert!(text.contains("nameshim_clients{protocol=\"ca\"} 0\n"));
        assert!(text.contains("nameshim_searches_found_total{protocol=\"ca\"} 7\n"));
        assert!(text.contains("nameshim_refused_total{reason=\"per_host\"} 1\n"));
        assert!(text.contains("nameshim_bad_input_closes_total{kind=\"timeout\"} 1\n"));
        assert!(text.contains("nameshim_client_sent_bytes_total 1500\n"));
        let mut typed = std::collections::HashSet::new();
        let mut helped = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.insert(rest.split(' ').next().unwrap().to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let name = parts.next().unwrap().to_string();
                let kind = parts.next().unwrap();
                assert!(kind == "counter" || kind == "gauge", "{line}");
                assert!(helped.contains(&name), "TYPE before HELP: {line}");
                assert!(typed.insert(name), "TYPE twice: {line}");
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "sample before its TYPE: {line}");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "not a number: {line}");
                if name.ends_with("_total") {
                    assert!(value.parse::<u64>().is_ok(), "counter not a count: {line}");
                }
            }
        }
        assert!(text.ends_with('\n'));
    }
}
