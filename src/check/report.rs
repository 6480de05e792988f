//! What `nameshim check` prints: one line per step as it finishes, the
//! reply-port verdict for PVA clients, and the lines to set on clients.

use std::fmt::Write as _;
use std::time::Duration;

/// Prints each step when it ends, so a hang shows where it is.
pub struct Report {
    out: Box<dyn std::io::Write>,
    /// Every line printed, for tests.
    #[cfg(test)]
    pub lines: Vec<String>,
}

/// A step's result: what was seen, or why it failed.
pub type Outcome = Result<String, String>;

impl Report {
    pub fn to_stdout() -> Report {
        Report {
            out: Box::new(std::io::stdout()),
            #[cfg(test)]
            lines: Vec::new(),
        }
    }

    #[cfg(test)]
    pub fn to_sink() -> Report {
        Report {
            out: Box::new(std::io::sink()),
            lines: Vec::new(),
        }
    }

    pub fn line(&mut self, text: &str) {
        // A closed stdout (piped to `head`) must not end the check.
        let _ = writeln!(self.out, "{text}");
        let _ = self.out.flush();
        #[cfg(test)]
        self.lines.push(text.to_string());
    }

    /// `  PVA  search    ok     12.3 ms  QSRV2:VAL found ...`
    pub fn step(&mut self, protocol: &str, step: &str, took: Duration, outcome: &Outcome) {
        let (status, detail) = match outcome {
            Ok(detail) => ("ok", detail.as_str()),
            Err(why) => ("FAILED", why.as_str()),
        };
        let line = format!(
            "  {protocol:<4} {step:<9} {status:<6} {:>9}  {detail}",
            millis(took)
        );
        self.line(&line);
    }
}

pub fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// What the PVA search answers named, over every answer for found names.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplyPorts {
    /// An answer named port 0: "this connection" to pvxs.
    pub zero: bool,
    /// The last non-zero port an answer named.
    pub named: Option<u16>,
}

/// Who can use the port the answers name. `dialed` is the port this check
/// connected to: the one clients at this place dial.
pub fn reply_port_verdict(ports: ReplyPorts, dialed: u16) -> Vec<String> {
    let mut lines = Vec::new();
    let mut named = String::new();
    if ports.zero {
        named.push_str("port 0 (this connection)");
    }
    if let Some(port) = ports.named {
        if !named.is_empty() {
            named.push_str(", then ");
        }
        let _ = write!(named, "port {port}");
    }
    lines.push(format!(
        "reply port: the shim's answers name {named}; this check dialed port {dialed}"
    ));
    // pvxs (client.cpp procSearchReply): port 0 over TCP is the port of the
    // connection; another port is dialed.
    let pvxs_ok = ports.zero || ports.named == Some(dialed);
    lines.push(if pvxs_ok {
        "  pvxs (p4p, pvxget, pvxslibs): works (channels on this connection)".to_string()
    } else {
        format!(
            "  pvxs (p4p, pvxget, pvxslibs): FAILS: it dials port {} (start the shim with --advertise-port {dialed})",
            ports.named.unwrap_or(0)
        )
    });
    // pvAccessCPP (clientContextImpl.cpp) and Phoebus (SearchResponseHandler,
    // PVAClient) take the port as given: 0 fails; another one is dialed.
    let cpp = "  pvAccessCPP (pvapy, C++ tools) and Phoebus:";
    lines.push(match ports.named {
        Some(port) if port == dialed => format!("{cpp} work (they dial port {port}, which reaches this shim)"),
        Some(port) => format!(
            "{cpp} FAIL: they dial port {port}, but clients here reach the shim at port {dialed}: start the shim with --advertise-port {dialed}"
        ),
        None => format!(
            "{cpp} FAIL: no answer names a port: start the shim with --advertise-port {dialed}"
        ),
    });
    lines
}

/// Whether every PVA client family can use these answers.
pub fn all_pva_clients_work(ports: ReplyPorts, dialed: u16) -> bool {
    ports.named == Some(dialed)
}

/// The shell lines that point clients at the shim.
pub fn environment_lines(target: &str, ca: bool, pva: bool) -> Vec<String> {
    let mut lines = Vec::new();
    if ca {
        lines.push(format!("export EPICS_CA_NAME_SERVERS={target}"));
    }
    if pva {
        lines.push(format!("export EPICS_PVA_NAME_SERVERS={target}"));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remapped_port_tells_pvaccesscpp_and_phoebus_to_set_advertise_port() {
        let ports = ReplyPorts {
            zero: true,
            named: Some(5066),
        };
        let lines = reply_port_verdict(ports, 8066).join("\n");
        assert!(
            lines.contains("pvxs (p4p, pvxget, pvxslibs): works"),
            "{lines}"
        );
        assert!(lines.contains("FAIL: they dial port 5066"), "{lines}");
        assert!(lines.contains("--advertise-port 8066"), "{lines}");
        assert!(!all_pva_clients_work(ports, 8066));
    }

    #[test]
    fn the_dialed_port_in_the_answer_works_for_every_client() {
        for zero in [true, false] {
            let ports = ReplyPorts {
                zero,
                named: Some(8066),
            };
            let lines = reply_port_verdict(ports, 8066).join("\n");
            assert!(!lines.contains("FAIL"), "{lines}");
            assert!(all_pva_clients_work(ports, 8066));
        }
    }

    #[test]
    fn port_zero_alone_serves_pvxs_only() {
        let ports = ReplyPorts {
            zero: true,
            named: None,
        };
        let lines = reply_port_verdict(ports, 5066).join("\n");
        assert!(
            lines.contains("pvxs (p4p, pvxget, pvxslibs): works"),
            "{lines}"
        );
        assert!(lines.contains("FAIL: no answer names a port"), "{lines}");
    }

    #[test]
    fn a_step_line_names_protocol_step_status_time_and_detail() {
        let mut report = Report::to_sink();
        report.step(
            "CA",
            "connect",
            Duration::from_micros(1500),
            &Ok("10.0.0.1:5066".into()),
        );
        report.step(
            "PVA",
            "get",
            Duration::ZERO,
            &Err("no answer within 3s".into()),
        );
        assert_eq!(
            report.lines[0],
            "  CA   connect   ok        1.5 ms  10.0.0.1:5066"
        );
        assert_eq!(
            report.lines[1],
            "  PVA  get       FAILED    0.0 ms  no answer within 3s"
        );
    }
}
