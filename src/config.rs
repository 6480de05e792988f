//! The one reader of command-line options and environment variables.
//! Every option can also be set as `NAMESHIM_<OPTION>`; the CA server port
//! falls back to `EPICS_CA_SERVER_PORT`, as for any EPICS tool.

use crate::access::{Access, Cidr, Glob};
use crate::relay::discovery::SearchConfig;
use crate::relay::limits::ClientDeadlines;
use crate::wrapper;
use clap::Parser;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

/// The default port. It is none of 5064/5065 (CA server and repeater) and
/// 5075/5076 (PVA server and search), so the shim can sit beside IOCs that
/// keep their usual ports in the same container.
pub const DEFAULT_PORT: u16 = 5066;
const DEFAULT_CA_SERVER_PORT: u16 = 5064;
const DEFAULT_PVA_BROADCAST_PORT: u16 = 5076;
/// Names each search relay (CA, PVA) searches for at once.
const MAX_PENDING_SEARCHES: usize = 20_000;
/// Names one client address (all its connections) may have under search in
/// one relay: half the relay, so that even before the relay's fair-share
/// rule steps in, at least two addresses are needed to fill it, and one
/// client can still create 10,000 channels at once (a pvxs client asks for
/// them all together; names refused here cost it a whole search round).
const MAX_PENDING_SEARCHES_PER_ADDRESS: usize = MAX_PENDING_SEARCHES / 2;

const EXAMPLES: &str = "\
Examples:
  Sidecar, or beside the IOC in one container (serves until SIGTERM):
    nameshim --listen 0.0.0.0:5066

  Publish that one port from the container, with any host port:
    podman run -p 8066:5066 my-ioc-image

  Then, on a client host:
    export EPICS_CA_NAME_SERVERS=ioc-host:8066
    export EPICS_PVA_NAME_SERVERS=ioc-host:8066
    caget MY:PV
    pvget MY:PV

  pvAccessCPP clients (pvapy, EPICS base's pvget and the other C++ pvAccess
  tools) and Phoebus dial the port named in the search response: when the
  published port has another number, as here, tell the shim that port:
    nameshim --listen 0.0.0.0:5066 --advertise-port 8066

  As the entrypoint of an IOC image: the shim starts the IOC as its child,
  forwards signals to it, reaps zombies and exits with the IOC's code:
    nameshim --listen 0.0.0.0:5066 -- bash -c '${IOC}/start.sh'

  From a client host, see which step fails and what to set:
    nameshim check ioc-host:8066 MY:PV

  Search servers on a non-default CA port, or on more addresses:
    nameshim --ca-server-port 6064 --ca-search-addr 127.255.255.255,10.88.0.255

Environment: every option reads NAMESHIM_<OPTION> (for example
NAMESHIM_LISTEN=0.0.0.0:5066); the log filter is NAMESHIM_LOG.";

#[derive(Debug, Parser)]
#[command(
    name = "nameshim",
    // "nameshim 0.1.0 (abc1234)": the commit comes from build.rs.
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("NAMESHIM_GIT_COMMIT"), ")"),
    about = "One TCP port for every EPICS Channel Access and PV Access server in a container",
    long_about = "nameshim serves ONE TCP port that is both a Channel Access name server \
(EPICS_CA_NAME_SERVERS) and a PV Access name server (EPICS_PVA_NAME_SERVERS), and \
carries the channels it finds: each search is relayed by UDP over the loopback to every \
CA and PVA server in the container, and each channel is relayed to its server, so any \
host port mapping works with no UDP published.

With `-- COMMAND [ARGS...]` nameshim is also the container's init: it runs COMMAND \
(the IOC) as its child on the same terminal, forwards signals to it, reaps every \
zombie, and exits with the command's exit code while serving the port beside it.",
    after_help = EXAMPLES,
    override_usage = "nameshim [OPTIONS] [-- COMMAND [ARGS...]]\n       nameshim check [OPTIONS] HOST:PORT [PV...]",
    disable_help_subcommand = true
)]
pub struct Cli {
    /// Address and TCP port to serve on; port 0 picks a free port (logged).
    #[arg(short, long, env = "NAMESHIM_LISTEN", value_name = "ADDR:PORT",
          default_value_t = SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT)))]
    pub listen: SocketAddr,

    /// An extra port for Channel Access only. The shim greets each client at
    /// once, as rsrv does, instead of waiting for its first bytes: libca sends
    /// nothing on a name-server circuit until the server speaks or the program
    /// calls into libca, so a callback-only client that never polls is taken
    /// for a PVA client on the shared port. Publish this port for such clients.
    #[arg(long, env = "NAMESHIM_CA_LISTEN", value_name = "ADDR:PORT")]
    pub ca_listen: Option<SocketAddr>,

    /// An extra port for PV Access only. The shim greets each client at once
    /// instead of after the classification window. A new pvxs client that
    /// hears a beacon from a server it has not seen yet while its name-server
    /// connection is still unvalidated spends its fast search on it and then
    /// waits a whole search round (about 6 s); here that cannot happen.
    #[arg(long, env = "NAMESHIM_PVA_LISTEN", value_name = "ADDR:PORT")]
    pub pva_listen: Option<SocketAddr>,

    /// Where CA searches are sent (comma-separated). The loopback broadcast
    /// address reaches every server bound to the CA port in this network
    /// namespace; a port given here overrides --ca-server-port.
    #[arg(long, env = "NAMESHIM_CA_SEARCH_ADDR", value_name = "ADDR[:PORT]",
          value_delimiter = ',', default_value = "127.255.255.255", value_parser = parse_search_addr)]
    pub ca_search_addr: Vec<SearchAddr>,

    /// UDP port of the CA servers [default: EPICS_CA_SERVER_PORT, else 5064].
    #[arg(long, env = "NAMESHIM_CA_SERVER_PORT", value_name = "PORT")]
    pub ca_server_port: Option<u16>,

    /// Where PVA searches are sent (comma-separated). pvxs servers hear the
    /// loopback broadcast; pvAccessCPP servers whose interface has a
    /// broadcast address hear only the 224.0.0.128 group, which the shim
    /// sends out of the loopback interface.
    #[arg(long, env = "NAMESHIM_PVA_SEARCH_ADDR", value_name = "ADDR[:PORT]",
          value_delimiter = ',', default_value = "127.255.255.255,224.0.0.128", value_parser = parse_search_addr)]
    pub pva_search_addr: Vec<SearchAddr>,

    /// UDP search port of the PVA servers [default: EPICS_PVA_BROADCAST_PORT, else 5076].
    #[arg(long, env = "NAMESHIM_PVA_BROADCAST_PORT", value_name = "PORT")]
    pub pva_broadcast_port: Option<u16>,

    /// The port clients see for the shim (the published host port), put in
    /// PVA search responses. Needed by pvAccessCPP clients (pvapy) and
    /// Phoebus when the port is published under another number: they dial
    /// the port in the response. Without it each "found" response is sent
    /// with port 0 (pvxs clients: "this connection") and then with the port
    /// the client connected to.
    #[arg(long, env = "NAMESHIM_ADVERTISE_PORT", value_name = "PORT")]
    pub advertise_port: Option<u16>,

    /// The address every connection to a CA or PVA server leaves from: to
    /// the IOC, each client through the shim is a peer on this address, so
    /// host rules in its access security (ACF) for clients through the shim
    /// name it. Not 127.0.0.1: an IOC that trusts its own host (localhost)
    /// must not trust every client through the shim. Any 127.x.y.z reaches
    /// servers on 127.0.0.1, on the wildcard or on the container's own
    /// addresses. 0.0.0.0 lets the kernel choose (127.0.0.1; warned).
    #[arg(long, env = "NAMESHIM_SERVER_SOURCE_ADDR", value_name = "ADDR",
          default_value_t = crate::relay::upstream::DEFAULT_SOURCE)]
    pub server_source_addr: Ipv4Addr,

    /// How long a new connection may stay silent before it counts as PVA.
    /// libca speaks as soon as the program calls into it (any pend, poll or
    /// get); PVA clients wait for the server. Longer is safer for slow CA
    /// clients, shorter greets PVA clients sooner (see --pva-listen).
    #[arg(long, env = "NAMESHIM_CLASSIFY_WINDOW", value_name = "DURATION",
          default_value = "200ms", value_parser = parse_duration)]
    pub classify_window: Duration,

    /// How long a name is searched for before it counts as not found. A long
    /// search lets a client reconnect as soon as a restarted IOC answers:
    /// libca takes a late answer while the channel is still searching.
    #[arg(long, env = "NAMESHIM_SEARCH_TIMEOUT", value_name = "DURATION",
          default_value = "30s", value_parser = parse_duration)]
    pub search_timeout: Duration,

    /// How long a found server is remembered for a name.
    #[arg(long, env = "NAMESHIM_CACHE_TTL", value_name = "DURATION",
          default_value = "10s", value_parser = parse_duration)]
    pub cache_ttl: Duration,

    /// New names searched for per second for one client address, per
    /// protocol, at most (names cached or already under search cost
    /// nothing); a name over the rate counts as not found, and the client
    /// searches again later. Bounds what one client can send to the
    /// servers' UDP ports.
    #[arg(
        long,
        env = "NAMESHIM_SEARCH_RATE_PER_CLIENT",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub search_rate_per_client: u32,

    /// New names searched for per second for all clients together, per
    /// protocol, at most.
    #[arg(
        long,
        env = "NAMESHIM_SEARCH_RATE",
        value_name = "N",
        default_value_t = 20_000
    )]
    pub search_rate: u32,

    /// Client connections served at once, per listening port; more wait
    /// in the accept queue.
    #[arg(
        long,
        env = "NAMESHIM_MAX_CLIENTS",
        value_name = "N",
        default_value_t = 1024
    )]
    pub max_clients: usize,

    /// Client connections from one source IP address at once, per
    /// listening port. One more is accepted and closed at once (logged),
    /// so one host cannot take every --max-clients slot.
    #[arg(
        long,
        env = "NAMESHIM_MAX_CLIENTS_PER_HOST",
        value_name = "N",
        default_value_t = 256
    )]
    pub max_clients_per_host: usize,

    /// A client must deliver its first complete message within this time
    /// of being accepted (after the classification window on the shared
    /// port), or it is closed. For PVA: the connection validation.
    #[arg(long, env = "NAMESHIM_HELLO_TIMEOUT", value_name = "DURATION",
          default_value = "5s", value_parser = parse_timeout)]
    pub hello_timeout: Duration,

    /// A client connection that received nothing and was sent nothing for
    /// this long is closed. Longer than the clients' own probes (libca
    /// echoes after 30 s of silence, pvxs every 15 s); a client that only
    /// receives monitor updates stays open while updates flow. A client
    /// that accepts no byte of pending data for this long is closed too.
    #[arg(long, env = "NAMESHIM_IDLE_TIMEOUT", value_name = "DURATION",
          default_value = "180s", value_parser = parse_timeout)]
    pub idle_timeout: Duration,

    /// A client that has begun a message and sends no further byte of it
    /// for this long is closed.
    #[arg(long, env = "NAMESHIM_STALL_TIMEOUT", value_name = "DURATION",
          default_value = "30s", value_parser = parse_timeout)]
    pub stall_timeout: Duration,

    /// Largest message accepted from a server, in bytes (suffixes K, M, G).
    /// Fits large detector images by default; a bigger message closes that
    /// server connection.
    #[arg(long, env = "NAMESHIM_MAX_MESSAGE", value_name = "BYTES",
          default_value = "64M", value_parser = parse_bytes)]
    pub max_message: u64,

    /// Largest message accepted from a client, in bytes (suffixes K, M,
    /// G). Clients send requests and puts, not images; a bigger message
    /// closes the client connection.
    #[arg(long, env = "NAMESHIM_MAX_CLIENT_MESSAGE", value_name = "BYTES",
          default_value = "16M", value_parser = parse_bytes)]
    pub max_client_message: u64,

    /// Bytes queued towards one peer before the shim stops reading from the
    /// other side (suffixes K, M, G).
    #[arg(long, env = "NAMESHIM_QUEUE_BYTES", value_name = "BYTES",
          default_value = "4M", value_parser = parse_bytes)]
    pub queue_bytes: u64,

    /// Channels one client connection may hold; a client that asks for
    /// more is closed.
    #[arg(
        long,
        env = "NAMESHIM_MAX_CHANNELS",
        value_name = "N",
        default_value_t = 100_000
    )]
    pub max_channels: usize,

    /// Channels all client connections together may hold; a client whose
    /// new channel would exceed it is closed, as for --max-channels.
    #[arg(
        long,
        env = "NAMESHIM_MAX_TOTAL_CHANNELS",
        value_name = "N",
        default_value_t = 200_000
    )]
    pub max_total_channels: usize,

    /// Log filter, e.g. info, debug, or nameshim::ca=debug.
    #[arg(
        long,
        env = "NAMESHIM_LOG",
        value_name = "FILTER",
        default_value = "info"
    )]
    pub log: String,

    /// Log line format: `text` for people, or `json` (one JSON object per
    /// line) for cluster log collectors.
    #[arg(long, env = "NAMESHIM_LOG_FORMAT", value_name = "FORMAT",
          default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Threads that serve clients. 1 runs the whole relay on one thread, so
    /// it never takes more than one core from the IOC's host; more spread
    /// busy clients (large arrays to several clients) over that many cores.
    #[arg(long, env = "NAMESHIM_THREADS", value_name = "N", default_value_t = 1)]
    pub threads: usize,

    /// Refuse every write: CA puts get "write access denied" (and CA clients
    /// are told their channels are read-only, so displays grey out their
    /// controls); PVA PUT, PUT_GET and RPC get an error. Reads and monitors
    /// are unaffected. NAMESHIM_READ_ONLY takes 1/0, true/false, yes/no or
    /// on/off.
    #[arg(long, env = "NAMESHIM_READ_ONLY", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub read_only: bool,

    /// Only PV names matching one of these patterns can be found (`*` any
    /// run of characters, `?` any one; comma-separated or repeated). Others
    /// are never searched for, as if no server had them. Default: all.
    #[arg(
        long = "allow-pv",
        env = "NAMESHIM_ALLOW_PV",
        value_name = "GLOB",
        value_delimiter = ','
    )]
    pub allow_pv: Vec<String>,

    /// PV names matching one of these patterns are never found, even when
    /// --allow-pv matches them (comma-separated or repeated).
    #[arg(
        long = "deny-pv",
        env = "NAMESHIM_DENY_PV",
        value_name = "GLOB",
        value_delimiter = ','
    )]
    pub deny_pv: Vec<String>,

    /// Serve only clients from these networks (CIDR such as 10.0.0.0/8, or
    /// one address; comma-separated or repeated); others are closed as soon
    /// as they connect. Behind NAT the shim sees the NAT's address (for
    /// rootless podman, the container's gateway). Default: every client.
    #[arg(long = "allow-client", env = "NAMESHIM_ALLOW_CLIENT", value_name = "CIDR",
          value_delimiter = ',', value_parser = parse_cidr)]
    pub allow_client: Vec<Cidr>,

    /// Do not answer HTTP on the shared port. By default a connection that
    /// starts with an HTTP method gets `GET /healthz` (200 once serving)
    /// or `GET /metrics` (Prometheus text), one response, then close.
    /// NAMESHIM_NO_HTTP takes 1/0, true/false, yes/no or on/off.
    #[arg(long, env = "NAMESHIM_NO_HTTP", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub no_http: bool,

    /// Wrapper mode: the time from the first SIGTERM to SIGKILL of
    /// COMMAND. Keep it below the runtime's own grace period (podman stop
    /// -t, Kubernetes terminationGracePeriodSeconds) to have the shim, not
    /// the runtime, end a stuck IOC and report it.
    #[arg(long, env = "NAMESHIM_GRACE", value_name = "DURATION",
          default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,

    /// Wrapper mode: send forwarded signals to COMMAND's whole process
    /// group (COMMAND and the processes it started) instead of COMMAND only.
    /// NAMESHIM_SIGNAL_GROUP takes 1/0, true/false, yes/no or on/off.
    #[arg(long, env = "NAMESHIM_SIGNAL_GROUP", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub signal_group: bool,

    /// Client-side diagnosis instead of serving: see `nameshim check --help`.
    #[command(subcommand)]
    pub subcommand: Option<Subcommand>,

    /// Wrapper mode: run COMMAND as the child of the shim, which forwards
    /// SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGWINCH to
    /// it, reaps every zombie (as PID 1, or as child subreaper), and exits
    /// with COMMAND's exit code (128+N if signal N killed it). COMMAND
    /// keeps stdin, stdout, stderr and the terminal. The port is served
    /// meanwhile; if it cannot be bound, the shim retries and COMMAND runs
    /// on.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Subcommand {
    /// Connect to a shim as CA and PVA clients do, and print each step.
    #[command(long_about = CHECK_ABOUT, after_help = CHECK_EXAMPLES)]
    Check(CheckArgs),
}

const CHECK_ABOUT: &str = "\
Connects to HOST:PORT as libca (EPICS_CA_NAME_SERVERS) and pvxs \
(EPICS_PVA_NAME_SERVERS) clients do, and prints each step with its time: TCP \
connect, greeting, then for each PV a search, create channel and get. For PVA \
it tells which clients (pvxs, pvAccessCPP, Phoebus) can use the port the \
shim's search answers name, compared with the port dialed here: run it where \
the clients are. It ends with the environment lines to set on clients.

HOST may be a name: it is looked up in /etc/hosts, then by DNS with the \
name servers of /etc/resolv.conf (no NSS modules are loaded).

Exit code: 0 = every PV was read by at least one protocol (with no PV: every \
protocol checked greeted); 1 = some PV was not (with no PV: some protocol did \
not greet); 2 = the name did not resolve, no protocol could connect, or a \
usage error.";

const CHECK_EXAMPLES: &str = "\
Examples:
  nameshim check ioc-host:8066
  nameshim check ioc-host:8066 MY:PV MY:OTHER
  nameshim check --protocol pva --timeout 10s 10.0.0.5:8066 MY:PV";

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The shim as clients reach it: HOST:PORT, [IPV6]:PORT, or HOST (port 5066).
    #[arg(value_name = "HOST:PORT")]
    pub target: String,

    /// PV names to search for, create and read with each protocol.
    #[arg(value_name = "PV")]
    pub pvs: Vec<String>,

    /// Time each step may take (resolve, connect, greeting, search, create, get).
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_timeout)]
    pub timeout: Duration,

    /// Which protocols to check.
    #[arg(long, value_name = "PROTOCOL", default_value = "both",
          value_parser = ["ca", "pva", "both"])]
    pub protocol: String,
}

impl CheckArgs {
    pub fn ca(&self) -> bool {
        self.protocol != "pva"
    }

    pub fn pva(&self) -> bool {
        self.protocol != "ca"
    }
}

/// The wrapper's settings, when a command follows `--`.
pub fn wrapper_options(cli: &Cli) -> Option<wrapper::Options> {
    (!cli.command.is_empty()).then(|| wrapper::Options {
        command: cli.command.clone(),
        grace: cli.grace,
        signal_group: cli.signal_group,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchAddr {
    pub ip: Ipv4Addr,
    pub port: Option<u16>,
}

fn parse_search_addr(text: &str) -> Result<SearchAddr, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddrV4>() {
        return Ok(SearchAddr {
            ip: *addr.ip(),
            port: Some(addr.port()),
        });
    }
    text.parse::<Ipv4Addr>()
        .map(|ip| SearchAddr { ip, port: None })
        .map_err(|_| format!("'{text}' is not an IPv4 address with an optional :port"))
}

/// "250ms", "5s", "2m"; a bare number is seconds, as in EPICS variables.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(text.len()),
    );
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 200ms, 5s or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        _ => {
            return Err(format!(
                "unknown unit '{unit}' in '{text}' (use ms, s or m)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("'{text}': {e}"))
}

/// A duration that is not zero: a zero deadline would close every client.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err(format!("'{text}': a timeout must be longer than zero")),
        d => Ok(d),
    }
}

/// "4096", "64K", "4M", "1G" (powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, scale) = match text.char_indices().last() {
        Some((at, 'K' | 'k')) => (&text[..at], 1u64 << 10),
        Some((at, 'M' | 'm')) => (&text[..at], 1 << 20),
        Some((at, 'G' | 'g')) => (&text[..at], 1 << 30),
        _ => (text, 1),
    };
    number
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("'{text}' is not a byte count like 4096, 64K or 4M"))
}

/// Settings derived from the command line and the environment.
pub struct Config {
    pub listen: SocketAddr,
    pub ca_listen: Option<SocketAddr>,
    pub pva_listen: Option<SocketAddr>,
    pub classify_window: Duration,
    /// Answer HTTP (health, metrics) on the shared port.
    pub http: bool,
    pub limits: Limits,
    /// The shim's own access rules.
    pub access: Access,
    /// Threads of the relay's runtime (1: one thread).
    pub threads: usize,
    pub ca_search: SearchConfig,
    pub pva_search: SearchConfig,
    pub advertise_port: Option<u16>,
    pub server_source_addr: Ipv4Addr,
}

/// Names one client connection may have under search at once: below the
/// relay's own limit (`MAX_PENDING_SEARCHES`), so one client that searches
/// for many names found elsewhere cannot take the relay from the others,
/// and enough for a connect storm of 10,000 channels.
const MAX_SEARCHES_PER_CLIENT: usize = 10_000;
/// How long the shim waits for a server's TCP connection.
const SERVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Every limit on clients and on what they may hold or send, one name per
/// setting (docs/limits.md lists them all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Client connections at once (--max-clients).
    pub max_clients: usize,
    /// Client connections at once from one address (--max-clients-per-host).
    pub max_clients_per_host: usize,
    /// Hello, idle and stall deadlines of a client connection.
    pub deadlines: ClientDeadlines,
    /// Largest message from a server (--max-message).
    pub max_server_message: u32,
    /// Largest message from a client (--max-client-message).
    pub max_client_message: u32,
    /// Bytes queued towards one peer (--queue-bytes).
    pub queue_bytes: usize,
    /// Channels of one client connection (--max-channels).
    pub max_channels: usize,
    /// Channels of all client connections together (--max-total-channels).
    pub max_total_channels: usize,
    /// Names one client connection may have under search at once.
    pub max_searches_per_client: usize,
    /// How long the shim waits for a server's TCP connection.
    pub server_connect_timeout: Duration,
}

impl Limits {
    fn from_cli(cli: &Cli) -> Limits {
        Limits {
            max_clients: cli.max_clients.max(1),
            max_clients_per_host: cli.max_clients_per_host.max(1),
            deadlines: ClientDeadlines {
                hello: cli.hello_timeout,
                idle: cli.idle_timeout,
                stall: cli.stall_timeout,
            },
            max_server_message: cli.max_message.min(u64::from(u32::MAX)) as u32,
            max_client_message: cli.max_client_message.min(u64::from(u32::MAX)) as u32,
            queue_bytes: cli.queue_bytes.min(usize::MAX as u64) as usize,
            max_channels: cli.max_channels,
            max_total_channels: cli.max_total_channels,
            max_searches_per_client: MAX_SEARCHES_PER_CLIENT,
            server_connect_timeout: SERVER_CONNECT_TIMEOUT,
        }
    }
}

fn parse_cidr(text: &str) -> Result<Cidr, String> {
    text.parse()
}

/// An option, else an EPICS environment variable, else a default.
fn port_or_env(option: Option<u16>, variable: &str, default: u16) -> u16 {
    option.unwrap_or_else(|| {
        std::env::var(variable)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(default)
    })
}

fn targets(addrs: &[SearchAddr], default_port: u16) -> Vec<SocketAddrV4> {
    addrs
        .iter()
        .map(|a| SocketAddrV4::new(a.ip, a.port.unwrap_or(default_port)))
        .collect()
}

impl Config {
    pub fn from_cli(cli: &Cli) -> Config {
        let ca_port = port_or_env(
            cli.ca_server_port,
            "EPICS_CA_SERVER_PORT",
            DEFAULT_CA_SERVER_PORT,
        );
        let pva_port = port_or_env(
            cli.pva_broadcast_port,
            "EPICS_PVA_BROADCAST_PORT",
            DEFAULT_PVA_BROADCAST_PORT,
        );
        let search = |targets| SearchConfig {
            targets,
            timeout: cli.search_timeout,
            cache_ttl: cli.cache_ttl,
            max_pending: MAX_PENDING_SEARCHES,
            max_pending_per_address: MAX_PENDING_SEARCHES_PER_ADDRESS,
            max_cached: 100_000,
            max_rate_per_address: cli.search_rate_per_client,
            max_rate: cli.search_rate,
        };
        Config {
            listen: cli.listen,
            ca_listen: cli.ca_listen,
            pva_listen: cli.pva_listen,
            classify_window: cli.classify_window,
            http: !cli.no_http,
            limits: Limits::from_cli(cli),
            access: Access {
                read_only: cli.read_only,
                allow_names: cli.allow_pv.iter().map(|g| Glob::new(g)).collect(),
                deny_names: cli.deny_pv.iter().map(|g| Glob::new(g)).collect(),
                allow_clients: cli.allow_client.clone(),
            },
            threads: cli.threads,
            ca_search: search(targets(&cli.ca_search_addr, ca_port)),
            pva_search: search(targets(&cli.pva_search_addr, pva_port)),
            advertise_port: cli.advertise_port,
            server_source_addr: cli.server_source_addr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn timeouts_are_not_zero() {
        assert_eq!(parse_timeout("5s"), Ok(Duration::from_secs(5)));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("0ms").is_err());
    }

    #[test]
    fn byte_counts_take_suffixes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64K"), Ok(65536));
        assert_eq!(parse_bytes("4M"), Ok(4 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999G").is_err());
    }

    #[test]
    fn search_addresses_take_optional_ports() {
        assert_eq!(
            parse_search_addr("127.255.255.255"),
            Ok(SearchAddr {
                ip: Ipv4Addr::new(127, 255, 255, 255),
                port: None
            })
        );
        assert_eq!(
            parse_search_addr("10.0.0.255:6064").map(|a| a.port),
            Ok(Some(6064))
        );
        assert!(parse_search_addr("ioc-host").is_err());
    }

    #[test]
    fn cli_defaults_search_the_loopback_broadcast() {
        let cli = Cli::parse_from(["nameshim", "--ca-server-port", "5064"]);
        let config = Config::from_cli(&cli);
        assert_eq!(config.listen.port(), DEFAULT_PORT);
        assert_eq!(
            config.ca_search.targets,
            [SocketAddrV4::new(Ipv4Addr::new(127, 255, 255, 255), 5064)]
        );
    }

    #[test]
    fn server_connections_leave_from_127_0_50_66_unless_told() {
        let cli = Cli::parse_from(["nameshim"]);
        assert_eq!(cli.server_source_addr, Ipv4Addr::new(127, 0, 50, 66));
        let cli = Cli::parse_from(["nameshim", "--server-source-addr", "127.1.2.3"]);
        assert_eq!(
            Config::from_cli(&cli).server_source_addr,
            Ipv4Addr::new(127, 1, 2, 3)
        );
        assert!(Cli::try_parse_from(["nameshim", "--server-source-addr", "ioc"]).is_err());
    }

    #[test]
    fn client_limits_have_their_documented_defaults() {
        let config = Config::from_cli(&Cli::parse_from(["nameshim"])).limits;
        assert_eq!(config.deadlines, ClientDeadlines::default());
        assert_eq!(config.deadlines.hello, Duration::from_secs(5));
        assert_eq!(config.deadlines.idle, Duration::from_secs(180));
        assert_eq!(config.deadlines.stall, Duration::from_secs(30));
        assert_eq!(config.max_clients_per_host, 256);
        assert_eq!(config.max_client_message, 16 << 20);
        assert_eq!(config.max_server_message, 64 << 20);
        assert_eq!(config.max_total_channels, 200_000);
    }

    #[test]
    fn client_limits_are_options() {
        let cli = Cli::parse_from([
            "nameshim",
            "--hello-timeout",
            "2s",
            "--idle-timeout",
            "1m",
            "--stall-timeout",
            "500ms",
            "--max-clients-per-host",
            "3",
            "--max-client-message",
            "1M",
            "--max-total-channels",
            "10",
        ]);
        let config = Config::from_cli(&cli).limits;
        assert_eq!(
            config.deadlines,
            ClientDeadlines {
                hello: Duration::from_secs(2),
                idle: Duration::from_secs(60),
                stall: Duration::from_millis(500),
            }
        );
        assert_eq!(config.max_clients_per_host, 3);
        assert_eq!(config.max_client_message, 1 << 20);
        assert_eq!(config.max_total_channels, 10);
    }

    #[test]
    fn check_is_a_subcommand_with_target_pvs_and_options() {
        let cli = Cli::parse_from([
            "nameshim",
            "check",
            "ioc:8066",
            "A:B",
            "C:D",
            "--timeout",
            "1s",
        ]);
        let Some(Subcommand::Check(args)) = &cli.subcommand else {
            panic!("not parsed as check: {cli:?}");
        };
        assert_eq!(args.target, "ioc:8066");
        assert_eq!(args.pvs, ["A:B", "C:D"]);
        assert_eq!(args.timeout, Duration::from_secs(1));
        assert!(args.ca() && args.pva());
        let cli = Cli::parse_from(["nameshim", "check", "--protocol", "pva", "ioc"]);
        let Some(Subcommand::Check(args)) = &cli.subcommand else {
            panic!("not parsed as check");
        };
        assert!(!args.ca() && args.pva());
        assert!(Cli::try_parse_from(["nameshim", "check"]).is_err());
        assert!(Cli::try_parse_from(["nameshim", "check", "ioc", "--protocol", "http"]).is_err());
    }

    #[test]
    fn serving_invocations_still_parse_without_a_subcommand() {
        let cli = Cli::parse_from(["nameshim"]);
        assert!(cli.subcommand.is_none() && cli.command.is_empty());
        let cli = Cli::parse_from(["nameshim", "--listen", "0.0.0.0:5067"]);
        assert!(cli.subcommand.is_none());
        assert_eq!(cli.listen.port(), 5067);
        let cli = Cli::parse_from(["nameshim", "--", "softIoc", "-d", "x.db"]);
        assert!(cli.subcommand.is_none());
        assert_eq!(cli.command, ["softIoc", "-d", "x.db"]);
        let cli = Cli::parse_from(["nameshim", "--listen", "0.0.0.0:5067", "--", "check", "x"]);
        assert!(
            cli.subcommand.is_none(),
            "after -- the words are the command's"
        );
        assert_eq!(cli.command, ["check", "x"]);
        // A command must still come after `--`.
        assert!(Cli::try_parse_from(["nameshim", "softIoc"]).is_err());
    }

    #[test]
    fn trailing_command_is_kept_verbatim() {
        let cli = Cli::parse_from(["nameshim", "--", "softIoc", "-d", "x.db"]);
        assert_eq!(cli.command, ["softIoc", "-d", "x.db"]);
    }

    #[test]
    fn no_command_means_no_wrapper() {
        let cli = Cli::parse_from(["nameshim", "--grace", "3s"]);
        assert_eq!(wrapper_options(&cli), None);
    }

    #[test]
    fn wrapper_options_default_to_10s_grace_and_the_pid() {
        let cli = Cli::parse_from(["nameshim", "--", "bash", "-c", "${IOC}/start.sh"]);
        let options = wrapper_options(&cli).expect("a command was given");
        assert_eq!(options.command, ["bash", "-c", "${IOC}/start.sh"]);
        assert_eq!(options.grace, Duration::from_secs(10));
        assert!(!options.signal_group);
    }

    #[test]
    fn wrapper_options_are_read_before_the_separator() {
        let cli = Cli::parse_from([
            "nameshim",
            "--grace",
            "2.5",
            "--signal-group",
            "--",
            "softIoc",
            "--grace",
        ]);
        let options = wrapper_options(&cli).expect("a command was given");
        assert_eq!(options.grace, Duration::from_millis(2500));
        assert!(options.signal_group);
        // Options after `--` belong to the command.
        assert_eq!(options.command, ["softIoc", "--grace"]);
    }
}

/// docs/configuration.md, generated from these definitions.
#[cfg(test)]
mod doc;
