//! The ports a TCP SEARCH_RESPONSE names, when `--advertise-port` is unset.
//!
//! Port 0 with a zero address means "this connection" to pvxs
//! (`procSearchReply` in pvxs `client.cpp`: `if(istcp && port==0) port =
//! src.port()`), so a pvxs client creates its channel on the name-server
//! connection whatever a NAT did to the port. pvAccessCPP
//! (`SearchResponseHandler` in `clientContextImpl.cpp`) takes the port as
//! given and dials it: port 0 is refused at once, `createChannelFailed`
//! registers the channel for a new search with a penalty (next search about
//! 29 s later: `MAX_FALLBACK_COUNT_VALUE` in `channelSearchManager.cpp`).
//!
//! So a name's first "found" answer is sent twice: with port 0, then with
//! the port the client connected to. pvxs acts on the first and ignores the
//! second (the channel is no longer `Searching`, and the GUID is the same).
//! pvAccessCPP handles both in order on its receive thread: the first fails
//! at once and puts the channel back into its search list, the second
//! connects it. That works wherever the port is published under its own
//! number. Elsewhere only `--advertise-port` can; a client that searches
//! again for a name it was told is found, without creating it on this
//! connection, dials the reply port, and the shim says so once per
//! connection. A pvxs client that searches again after its channel was lost
//! (IOC restart) created it here before, and is not warned.
//!
//! See docs/clients.md.

use bytes::Bytes;
use std::collections::HashSet;

/// Names remembered per connection as "told found, not created here".
/// Beyond it, names are answered with port 0 and not remembered.
pub const MAX_REMEMBERED: usize = 4096;

pub struct ReplyPorts {
    listen_port: u16,
    advertise: Option<u16>,
    found_not_created: HashSet<Bytes>,
    warned: bool,
}

/// The ports to send "found" answers with, in order, and whether to warn.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub port: u16,
    pub then: Option<u16>,
    pub warn: bool,
}

impl ReplyPorts {
    pub fn new(listen_port: u16, advertise: Option<u16>) -> Self {
        ReplyPorts {
            listen_port,
            advertise,
            found_not_created: HashSet::new(),
            warned: false,
        }
    }

    /// The port for an answer that says `name` is found.
    pub fn found(&mut self, name: &Bytes) -> Reply {
        if let Some(port) = self.advertise {
            return Reply {
                port,
                then: None,
                warn: false,
            };
        }
        let warn = self.found_not_created.contains(name) && !self.warned;
        self.warned |= warn;
        if self.found_not_created.len() < MAX_REMEMBERED {
            self.found_not_created.insert(name.clone());
        }
        Reply {
            port: 0,
            then: (self.listen_port != 0).then_some(self.listen_port),
            warn,
        }
    }

    /// The client creates `name` on this connection.
    pub fn created_here(&mut self, name: &[u8]) {
        self.found_not_created.remove(name);
    }

    /// The port the client connected to.
    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn a_found_answer_names_port_zero_then_the_listen_port() {
        let mut p = ReplyPorts::new(5075, None);
        let both = Reply {
            port: 0,
            then: Some(5075),
            warn: false,
        };
        assert_eq!(p.found(&name("A")), both);
        assert_eq!(p.found(&name("B")), both);
    }

    #[test]
    fn a_repeated_search_for_a_name_not_created_here_warns_once_per_connection() {
        let mut p = ReplyPorts::new(5075, None);
        p.found(&name("A"));
        p.found(&name("B"));
        assert!(p.found(&name("A")).warn);
        assert!(!p.found(&name("B")).warn);
        assert!(!p.found(&name("A")).warn);
    }

    #[test]
    fn a_name_created_here_and_searched_again_is_not_warned_about() {
        // pvxs after an IOC restart: it searches again for a channel it
        // had created on this connection.
        let mut p = ReplyPorts::new(5075, None);
        p.found(&name("A"));
        p.created_here(b"A");
        p.created_here(b"A");
        assert!(!p.found(&name("A")).warn);
    }

    #[test]
    fn advertise_port_is_the_only_port_given() {
        let mut p = ReplyPorts::new(5075, Some(8066));
        let advertised = Reply {
            port: 8066,
            then: None,
            warn: false,
        };
        assert_eq!(p.found(&name("A")), advertised);
        assert_eq!(p.found(&name("A")), advertised);
    }

    #[test]
    fn remembered_names_are_bounded() {
        let mut p = ReplyPorts::new(5075, None);
        for n in 0..MAX_REMEMBERED + 10 {
            p.found(&name(&n.to_string()));
        }
        assert_eq!(p.found_not_created.len(), MAX_REMEMBERED);
    }
}
