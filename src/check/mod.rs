//! `nameshim check HOST:PORT [PV...]`: connects to a shim the way libca and
//! pvxs clients do, and prints each step with its time, so "why can't I see
//! my PV?" is answered from the client's side.
//!
//! Exit code: 0 when every PV named was read by at least one protocol (with
//! no PV: when every protocol checked greeted); 1 when some PV was not (with
//! no PV: some protocol did not greet); 2 when the host name could not be
//! resolved or no protocol could connect (and for usage errors).

mod ca;
mod pva;
mod report;

use crate::config::{CheckArgs, DEFAULT_PORT};
use crate::relay::framing::{Decoder, FrameReader};
use report::{Outcome, Report};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncRead;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub const EXIT_REACHED: u8 = 0;
pub const EXIT_NOT_REACHED: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 2;

/// Runs the check and returns the exit code.
pub fn run(args: &CheckArgs) -> u8 {
    let mut report = Report::to_stdout();
    let (host, port) = match split_target(&args.target) {
        Ok(split) => split,
        Err(why) => {
            report.line(&format!("nameshim check: {why}"));
            return EXIT_UNREACHABLE;
        }
    };
    let started = Instant::now();
    let resolved = crate::resolve::resolve(&host, port, args.timeout);
    let outcome: Outcome = match &resolved {
        Ok(_) if host.parse::<std::net::IpAddr>().is_ok() => {
            Ok(format!("{host} (an address: nothing to look up)"))
        }
        Ok(addrs) => Ok(format!(
            "{host} -> {}",
            addrs
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Err(e) => Err(e.to_string()),
    };
    report.step("", "resolve", started.elapsed(), &outcome);
    let Ok(addrs) = resolved else {
        return EXIT_UNREACHABLE;
    };
    // The first address, as libca and pvxs take the first of a lookup.
    let Some(&addr) = addrs.first() else {
        return EXIT_UNREACHABLE;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            report.line(&format!(
                "nameshim check: cannot start the async runtime: {e}"
            ));
            return EXIT_UNREACHABLE;
        }
    };
    let (ca, pva) = runtime.block_on(async {
        let ca = match args.ca() {
            true => Some(ca::check(addr, &args.pvs, args.timeout, &mut report).await),
            false => None,
        };
        let pva = match args.pva() {
            true => Some(pva::check(addr, &args.pvs, args.timeout, &mut report).await),
            false => None,
        };
        (ca, pva)
    });
    summarize(&mut report, args, &host, port, ca.as_ref(), pva.as_ref())
}

/// Prints the per-PV summary, the reply-port verdict and the lines to set,
/// and decides the exit code.
fn summarize(
    report: &mut Report,
    args: &CheckArgs,
    host: &str,
    port: u16,
    ca: Option<&ca::CaResult>,
    pva: Option<&pva::PvaResult>,
) -> u8 {
    let connected = ca.is_some_and(|r| r.connected) || pva.is_some_and(|r| r.connected);
    let ca_greeted = ca.is_some_and(|r| r.greeted);
    let pva_greeted = pva.is_some_and(|r| r.greeted);
    let mut code = report_pvs(report, &args.pvs, ca, pva);
    if args.pvs.is_empty() && ((ca.is_some() && !ca_greeted) || (pva.is_some() && !pva_greeted)) {
        code = EXIT_NOT_REACHED;
    }
    if !connected {
        report.line("");
        report.line(&format!(
            "nothing reached {host}:{port}: is the shim running, is the port published, does a firewall drop it?"
        ));
        return EXIT_UNREACHABLE;
    }
    let advertise = pva.and_then(|pva| report_reply_port(report, pva, port));
    report_settings(report, host, port, ca_greeted, pva_greeted, advertise);
    report_exit(report, code, args.pvs.is_empty());
    code
}

/// One line per PV saying which protocols read it; EXIT_NOT_REACHED when
/// some PV was read by none.
fn report_pvs(
    report: &mut Report,
    pvs: &[String],
    ca: Option<&ca::CaResult>,
    pva: Option<&pva::PvaResult>,
) -> u8 {
    let mut code = EXIT_REACHED;
    if !pvs.is_empty() {
        report.line("");
        report.line("PVs:");
    }
    for (index, pv) in pvs.iter().enumerate() {
        let ca_got = ca.map(|r| r.reached.get(index).copied().unwrap_or(false));
        let pva_got = pva.map(|r| r.reached.get(index).copied().unwrap_or(false));
        let mut parts = Vec::new();
        for (name, got) in [("CA", ca_got), ("PVA", pva_got)] {
            match got {
                Some(true) => parts.push(format!("{name} ok")),
                Some(false) => parts.push(format!("{name} NOT REACHED")),
                None => {}
            }
        }
        if !(ca_got == Some(true) || pva_got == Some(true)) {
            code = EXIT_NOT_REACHED;
        }
        report.line(&format!("  {pv}: {}", parts.join(", ")));
    }
    code
}

/// Which PVA clients can use the port the search answers named; returns
/// the port to advertise when some cannot.
fn report_reply_port(report: &mut Report, pva: &pva::PvaResult, dialed: u16) -> Option<u16> {
    report.line("");
    match pva.ports {
        Some(ports) => {
            for line in report::reply_port_verdict(ports, dialed) {
                report.line(&line);
            }
            (!report::all_pva_clients_work(ports, dialed)).then_some(dialed)
        }
        None if pva.greeted => {
            report.line(
                "reply port: not checked (name a PV the shim can find to check which PVA clients can use its answers)",
            );
            None
        }
        None => None,
    }
}

/// The "Set on clients" lines, and the shim option when PVA answers need
/// `advertise` to work for every client.
fn report_settings(
    report: &mut Report,
    host: &str,
    port: u16,
    ca_greeted: bool,
    pva_greeted: bool,
    advertise: Option<u16>,
) {
    report.line("");
    report.line("Set on clients:");
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    for line in report::environment_lines(&target, ca_greeted, pva_greeted) {
        report.line(&format!("  {line}"));
    }
    if let Some(port) = advertise {
        report.line("Set on the shim (for pvAccessCPP and Phoebus clients):");
        report.line(&format!(
            "  --advertise-port {port}   (or NAMESHIM_ADVERTISE_PORT={port})"
        ));
    }
}

fn report_exit(report: &mut Report, code: u8, no_pvs: bool) {
    report.line("");
    report.line(&format!(
        "exit {code}: {}",
        match (code, no_pvs) {
            (EXIT_REACHED, false) => "every PV was read by at least one protocol",
            (EXIT_REACHED, true) => "every protocol checked greeted",
            (_, false) => "some PV was not read by any protocol",
            (_, true) => "some protocol did not greet",
        }
    ));
}

/// `HOST:PORT`, `[IPV6]:PORT`, `HOST` or `IPV6` (port 5066).
pub fn split_target(target: &str) -> Result<(String, u16), String> {
    let port_of = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("'{p}' in '{target}' is not a port number"))
    };
    if let Some(rest) = target.strip_prefix('[') {
        let (host, tail) = rest
            .split_once(']')
            .ok_or_else(|| format!("'{target}': '[' without ']'"))?;
        return match tail.strip_prefix(':') {
            Some(p) => Ok((host.to_string(), port_of(p)?)),
            None if tail.is_empty() => Ok((host.to_string(), DEFAULT_PORT)),
            None => Err(format!("'{target}': expected [ADDRESS]:PORT")),
        };
    }
    match target.matches(':').count() {
        0 if !target.is_empty() => Ok((target.to_string(), DEFAULT_PORT)),
        1 => {
            let (host, p) = target.split_once(':').unwrap_or((target, ""));
            if host.is_empty() {
                return Err(format!("'{target}': no host"));
            }
            Ok((host.to_string(), port_of(p)?))
        }
        // A bare IPv6 address.
        _ if target.parse::<std::net::Ipv6Addr>().is_ok() => Ok((target.to_string(), DEFAULT_PORT)),
        _ => Err(format!("'{target}' is not HOST:PORT")),
    }
}

/// A TCP connection within `step`, with the failure said plainly.
/// The "connect" step of `protocol`: connects and reports how it went.
async fn connect_step(
    protocol: &str,
    addr: SocketAddr,
    step: Duration,
    report: &mut Report,
) -> Option<TcpStream> {
    let started = std::time::Instant::now();
    let stream = connect(addr, step).await;
    let outcome = stream
        .as_ref()
        .map(|_| addr.to_string())
        .map_err(Clone::clone);
    report.step(protocol, "connect", started.elapsed(), &outcome);
    stream.ok()
}

async fn connect(addr: SocketAddr, step: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(step, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(format!(
            "connection refused: nothing listens on {addr} (wrong port, or the port is not published)"
        )),
        Ok(Err(e)) => Err(format!("cannot connect to {addr}: {e}")),
        Err(_) => Err(format!(
            "no answer from {addr} within {step:?} (the host is down, or a firewall drops the port)"
        )),
    }
}

/// Why a wait for a message ended without the message.
#[derive(Debug)]
pub enum Failure {
    /// Nothing came in time; the connection may still be used.
    TimedOut(String),
    /// Closed, unreadable or broken: the connection is of no further use.
    Connection(String),
    /// The peer answered, and the answer is a failure (refused, not found).
    Answer(String),
}

impl From<Failure> for String {
    fn from(failure: Failure) -> String {
        match failure {
            Failure::TimedOut(text) | Failure::Connection(text) | Failure::Answer(text) => text,
        }
    }
}

/// The next message before `deadline`; `what` names what was awaited.
async fn next_before<R, D>(
    reader: &mut FrameReader<R, D>,
    deadline: Instant,
    what: &str,
) -> Result<D::Item, Failure>
where
    R: AsyncRead + Unpin,
    D: Decoder,
{
    match tokio::time::timeout_at(deadline, reader.next()).await {
        Ok(Ok(Some(message))) => Ok(message),
        Ok(Ok(None)) => Err(Failure::Connection(format!(
            "the shim closed the connection while this check waited for {what}"
        ))),
        Ok(Err(e)) => Err(Failure::Connection(format!(
            "{e}, while this check waited for {what}"
        ))),
        Err(_) => Err(Failure::TimedOut(format!("timed out waiting for {what}"))),
    }
}

/// Runs one step, prints it with its time, and returns its outcome.
async fn step(
    protocol: &str,
    name: &str,
    report: &mut Report,
    work: impl Future<Output = Outcome>,
) -> Outcome {
    let started = Instant::now();
    let outcome = work.await;
    report.step(protocol, name, started.elapsed(), &outcome);
    outcome
}

/// As [`step`], for a step that also yields a value.
async fn step_with<T>(
    protocol: &str,
    name: &str,
    report: &mut Report,
    work: impl Future<Output = Result<(String, T), String>>,
) -> Result<T, String> {
    let started = Instant::now();
    let outcome = work.await;
    let printed = outcome
        .as_ref()
        .map(|(detail, _)| detail.clone())
        .map_err(Clone::clone);
    report.step(protocol, name, started.elapsed(), &printed);
    outcome.map(|(_, value)| value)
}

/// This machine's name, for the CA HOST_NAME and PVA "ca" credentials, read
/// from the kernel (no NSS involved).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().chars().take(64).collect::<String>())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_take_host_port_brackets_and_default_port() {
        assert_eq!(split_target("ioc-host:8066"), Ok(("ioc-host".into(), 8066)));
        assert_eq!(
            split_target("10.0.0.1"),
            Ok(("10.0.0.1".into(), DEFAULT_PORT))
        );
        assert_eq!(split_target("[::1]:8066"), Ok(("::1".into(), 8066)));
        assert_eq!(
            split_target("[fd00::5]"),
            Ok(("fd00::5".into(), DEFAULT_PORT))
        );
        assert_eq!(
            split_target("fd00::5"),
            Ok(("fd00::5".into(), DEFAULT_PORT))
        );
        assert!(split_target("ioc:0").is_err());
        assert!(split_target("ioc:http").is_err());
        assert!(split_target(":5066").is_err());
        assert!(split_target("").is_err());
        assert!(split_target("[::1").is_err());
    }

    #[tokio::test]
    async fn a_closed_port_is_said_to_be_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let got = connect(addr, Duration::from_secs(2)).await;
        assert!(got.unwrap_err().starts_with("connection refused"));
    }
}
