//! Operations a server never answers: PUT_GET, ARRAY and PROCESS.
//!
//! pvxs servers do not implement ARRAY and PROCESS, and PUT_GET is a stub:
//! they send no answer to the INIT, and a pvAccessCPP client that asks
//! waits for ever. The shim learns it from the server's behaviour: an INIT
//! of one of these operations that its server has not answered within
//! `ANSWER_WITHIN` gets an error reply made by the shim, and from then on
//! this client connection's INITs of that operation towards that server get
//! the error at once. A server that answers (even with an error of its own)
//! is relayed as before.

use super::wire::{self, Command, Message};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddrV4;
use std::time::Duration;
use tokio::time::Instant;

/// How long a server has to answer the INIT of an operation it may lack.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// INITs watched at once per client connection; beyond it they pass
/// unwatched, as before.
pub const MAX_WATCHED: usize = 256;
/// The subcommand bit of an INIT.
const SUBCMD_INIT: u8 = 0x08;

/// Whether this command is one a server may silently lack.
pub fn may_be_lacking(command: Command) -> bool {
    matches!(command, Command::PutGet | Command::Array | Command::Process)
}

struct Pending {
    server: SocketAddrV4,
    command: Command,
    due: Instant,
}

#[derive(Default)]
pub struct Unanswered {
    pending: HashMap<u32, Pending>,
    lacking: HashSet<(SocketAddrV4, u8)>,
    /// Requests the shim answered with an error: a late answer from the
    /// server must not reach the client as a second one.
    answered_by_shim: HashMap<u32, SocketAddrV4>,
}

/// What to do with a client's request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    /// Answer the client with this error instead.
    Refuse,
}

impl Unanswered {
    /// A client request `command` for request `ioid` with subcommand
    /// `subcommand`, going to `server`.
    pub fn on_request(
        &mut self,
        server: SocketAddrV4,
        command: Command,
        ioid: u32,
        subcommand: u8,
        now: Instant,
    ) -> Verdict {
        if !may_be_lacking(command) || subcommand & SUBCMD_INIT == 0 {
            return Verdict::Forward;
        }
        if self.lacking.contains(&(server, command as u8)) {
            return Verdict::Refuse;
        }
        if self.pending.len() < MAX_WATCHED {
            let due = now + ANSWER_WITHIN;
            self.pending.insert(
                ioid,
                Pending {
                    server,
                    command,
                    due,
                },
            );
        }
        Verdict::Forward
    }

    /// The server answered request `ioid`; false if the shim already did,
    /// and the answer must not be passed on.
    pub fn answered(&mut self, ioid: u32) -> bool {
        self.pending.remove(&ioid);
        !self.answered_by_shim.contains_key(&ioid)
    }

    /// The client ended request `ioid` itself.
    pub fn destroyed(&mut self, ioid: u32) {
        self.pending.remove(&ioid);
        self.answered_by_shim.remove(&ioid);
    }

    /// The server is gone: its requests end with its channels.
    pub fn forget_server(&mut self, server: SocketAddrV4) {
        self.pending.retain(|_, p| p.server != server);
        self.lacking.retain(|(s, _)| *s != server);
        self.answered_by_shim.retain(|_, s| *s != server);
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.due).min()
    }

    /// Requests past their time, as (ioid, command); their servers are
    /// remembered as lacking the command.
    pub fn take_overdue(&mut self, now: Instant) -> Vec<(u32, Command)> {
        let overdue: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(ioid, _)| *ioid)
            .collect();
        let mut out = Vec::with_capacity(overdue.len());
        for ioid in overdue {
            if let Some(p) = self.pending.remove(&ioid) {
                self.lacking.insert((p.server, p.command as u8));
                if self.answered_by_shim.len() < MAX_WATCHED {
                    self.answered_by_shim.insert(ioid, p.server);
                }
                out.push((ioid, p.command));
            }
        }
        out
    }
}

/// The error answer to the INIT of `command` for `ioid`.
pub fn init_error(command: Command, ioid: u32, big_endian: bool) -> Message {
    let why = format!(
        "the server did not answer this {} request within {} s: it does not implement it (pvxs servers lack ARRAY and PROCESS, and PUT_GET is a stub)",
        name(command),
        ANSWER_WITHIN.as_secs()
    );
    wire::operation_error(command, ioid, SUBCMD_INIT, &why, big_endian)
}

fn name(command: Command) -> &'static str {
    match command {
        Command::PutGet => "PUT_GET",
        Command::Array => "ARRAY",
        Command::Process => "PROCESS",
        _ => "request",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5075);

    #[test]
    fn an_unanswered_init_is_overdue_and_the_next_one_is_refused_at_once() {
        let mut u = Unanswered::default();
        let now = Instant::now();
        assert_eq!(
            u.on_request(SERVER, Command::Process, 7, SUBCMD_INIT, now),
            Verdict::Forward
        );
        assert!(u.take_overdue(now).is_empty());
        assert_eq!(u.next_due(), Some(now + ANSWER_WITHIN));
        assert_eq!(
            u.take_overdue(now + ANSWER_WITHIN),
            vec![(7, Command::Process)]
        );
        assert_eq!(
            u.on_request(SERVER, Command::Process, 8, SUBCMD_INIT, now),
            Verdict::Refuse
        );
        assert_eq!(
            u.on_request(SERVER, Command::Array, 9, SUBCMD_INIT, now),
            Verdict::Forward,
            "per command"
        );
    }

    #[test]
    fn an_answered_init_is_not_overdue() {
        let mut u = Unanswered::default();
        let now = Instant::now();
        u.on_request(SERVER, Command::PutGet, 7, SUBCMD_INIT, now);
        assert!(u.answered(7));
        assert!(u.take_overdue(now + ANSWER_WITHIN).is_empty());
        assert_eq!(u.next_due(), None);
    }

    #[test]
    fn a_late_answer_after_the_shims_error_is_not_passed_on_until_the_request_ends() {
        let mut u = Unanswered::default();
        let now = Instant::now();
        u.on_request(SERVER, Command::PutGet, 7, SUBCMD_INIT, now);
        u.take_overdue(now + ANSWER_WITHIN);
        assert!(!u.answered(7), "the late INIT answer is dropped");
        u.destroyed(7);
        assert!(u.answered(7), "a new request with that ioid is passed on");
    }

    #[test]
    fn watched_inits_per_connection_are_bounded() {
        let mut u = Unanswered::default();
        let now = Instant::now();
        for ioid in 0..(MAX_WATCHED as u32 + 100) {
            u.on_request(SERVER, Command::PutGet, ioid, SUBCMD_INIT, now);
        }
        assert_eq!(u.pending.len(), MAX_WATCHED);
        assert_eq!(u.take_overdue(now + ANSWER_WITHIN).len(), MAX_WATCHED);
    }

    #[test]
    fn other_commands_and_subcommands_are_not_watched() {
        let mut u = Unanswered::default();
        let now = Instant::now();
        u.on_request(SERVER, Command::Get, 1, SUBCMD_INIT, now);
        u.on_request(SERVER, Command::Process, 2, 0x00, now);
        assert_eq!(u.next_due(), None);
    }

    #[test]
    fn a_lost_server_ends_its_pending_requests() {
        let mut u = Unanswered::default();
        let now = Instant::now();
        u.on_request(SERVER, Command::Process, 7, SUBCMD_INIT, now);
        u.forget_server(SERVER);
        assert!(u.take_overdue(now + ANSWER_WITHIN).is_empty());
    }

    #[test]
    fn the_error_reply_is_an_init_response_with_an_error_status() {
        let m = init_error(Command::Process, 0x0102_0304, true);
        assert_eq!(m.header.command(), Ok(Command::Process));
        assert_eq!(
            &m.payload[..6],
            &[1, 2, 3, 4, SUBCMD_INIT, wire::STATUS_ERROR]
        );
    }
}
