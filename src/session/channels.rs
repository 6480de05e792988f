//! The channels of one client connection, in one type that keeps its
//! indexes consistent.
//!
//! The client names a channel by the id it chose (cid). The shim gives each
//! connected channel a sid of its own, because channels on several servers
//! share the one client connection and their servers' sids may collide.
//!
//! Invariants, kept by every method and checked by `check` in tests:
//! - `routes` holds a sid exactly when a Connected or Destroying channel
//!   has it, and maps it to that channel's cid;
//! - `by_server[s]` holds a cid exactly when that channel is on server `s`
//!   (every state but Resolving);
//! - this connection's part of the channels of all clients (`share`) is
//!   the number of channels, after every change.

use super::SessionError;
use crate::relay::limits::ChannelShare;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddrV4;

/// A channel the client asked for, from its creation to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Waiting for the search relay to name the server.
    Resolving,
    /// The create request went to the server; no answer yet.
    Creating {
        server: SocketAddrV4,
    },
    Connected(Connection),
    /// The client gave it up while its create was on the way: the server's
    /// answer is not passed on, and a channel it made is destroyed (PVA).
    Abandoned {
        server: SocketAddrV4,
    },
    /// The client destroyed it; the server's confirmation (or the loss of
    /// the server) ends it. Its sid stays taken meanwhile (PVA).
    Destroying(Connection),
}

/// A channel the server created: where it is, and its ids at both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    pub server: SocketAddrV4,
    /// The sid the client was given.
    pub sid: u32,
    /// The server's own sid.
    pub server_sid: u32,
}

impl Channel {
    fn server(&self) -> Option<SocketAddrV4> {
        match *self {
            Channel::Resolving => None,
            Channel::Creating { server } | Channel::Abandoned { server } => Some(server),
            Channel::Connected(c) | Channel::Destroying(c) => Some(c.server),
        }
    }

    fn sid(&self) -> Option<u32> {
        match self {
            Channel::Connected(c) | Channel::Destroying(c) => Some(c.sid),
            _ => None,
        }
    }
}

/// Where a request for a connected channel goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub cid: u32,
    pub connection: Connection,
}

pub struct ChannelTable {
    /// Channels by cid.
    channels: HashMap<u32, Channel>,
    /// Cid by the sid the client was given.
    routes: HashMap<u32, u32>,
    /// Cids of the channels on each server.
    by_server: HashMap<SocketAddrV4, HashSet<u32>>,
    next_sid: u32,
    /// A sid never given out (PVA's "no channel" marker).
    reserved_sid: Option<u32>,
    max_channels: usize,
    share: ChannelShare,
}

impl ChannelTable {
    pub fn new(max_channels: usize, share: ChannelShare, reserved_sid: Option<u32>) -> Self {
        ChannelTable {
            channels: HashMap::new(),
            routes: HashMap::new(),
            by_server: HashMap::new(),
            next_sid: 1,
            reserved_sid,
            max_channels,
            share,
        }
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    #[cfg(test)]
    pub fn get(&self, cid: u32) -> Option<&Channel> {
        self.channels.get(&cid)
    }

    /// Starts channel `cid`, resolving. Ok(false): the cid is in use, and
    /// the request is ignored. A channel beyond this connection's limit, or
    /// beyond the limit of all connections together, is an error.
    pub fn begin_create(&mut self, cid: u32) -> Result<bool, SessionError> {
        if self.channels.contains_key(&cid) {
            return Ok(false);
        }
        if self.channels.len() >= self.max_channels {
            return Err(SessionError::TooManyChannels(self.max_channels));
        }
        if !self.share.fit(self.channels.len() + 1) {
            return Err(SessionError::TooManyChannelsInAll(self.share.cap()));
        }
        self.channels.insert(cid, Channel::Resolving);
        Ok(true)
    }

    pub fn is_resolving(&self, cid: u32) -> bool {
        self.channels.get(&cid) == Some(&Channel::Resolving)
    }

    pub fn is_creating_on(&self, cid: u32, server: SocketAddrV4) -> bool {
        self.channels.get(&cid) == Some(&Channel::Creating { server })
    }

    pub fn is_abandoned_on(&self, cid: u32, server: SocketAddrV4) -> bool {
        self.channels.get(&cid) == Some(&Channel::Abandoned { server })
    }

    /// The name of resolving channel `cid` was not found: it ends.
    /// Says whether there was such a channel.
    pub fn not_found(&mut self, cid: u32) -> bool {
        if !self.is_resolving(cid) {
            return false;
        }
        self.remove(cid);
        true
    }

    /// Resolving channel `cid` is being created on `server`.
    pub fn creating_on(&mut self, cid: u32, server: SocketAddrV4) {
        if self.is_resolving(cid) {
            self.channels.insert(cid, Channel::Creating { server });
            self.by_server.entry(server).or_default().insert(cid);
        }
    }

    /// `server` created channel `cid` as `server_sid`; returns the sid the
    /// client is to be given. None if the channel was not being created
    /// there.
    pub fn connect(&mut self, cid: u32, server: SocketAddrV4, server_sid: u32) -> Option<u32> {
        if !self.is_creating_on(cid, server) {
            return None;
        }
        let sid = self.allocate_sid();
        let connection = Connection {
            server,
            sid,
            server_sid,
        };
        self.channels.insert(cid, Channel::Connected(connection));
        self.routes.insert(sid, cid);
        Some(sid)
    }

    /// How many channels each server was asked to create and has not
    /// answered for yet.
    pub fn creating_per_server(&self) -> Vec<(SocketAddrV4, usize)> {
        self.by_server
            .iter()
            .map(|(server, cids)| {
                let creating = cids
                    .iter()
                    .filter(|cid| matches!(self.channels.get(cid), Some(Channel::Creating { .. })))
                    .count();
                (*server, creating)
            })
            .filter(|(_, creating)| *creating > 0)
            .collect()
    }

    /// The connected channel the client calls `sid`.
    pub fn route(&self, sid: u32) -> Option<Route> {
        let cid = *self.routes.get(&sid)?;
        match self.channels.get(&cid)? {
            Channel::Connected(connection) => Some(Route {
                cid,
                connection: *connection,
            }),
            _ => None,
        }
    }

    /// The sid the client knows for the channel `server` calls `server_sid`.
    pub fn client_sid(&self, server: SocketAddrV4, server_sid: u32) -> Option<u32> {
        self.by_server
            .get(&server)?
            .iter()
            .find_map(|cid| match self.channels.get(cid)? {
                Channel::Connected(c) if c.server_sid == server_sid => Some(c.sid),
                _ => None,
            })
    }

    /// The client destroyed the connected channel of `route`; it stays until
    /// its server confirms.
    pub fn destroying(&mut self, route: Route) {
        if self.route(route.connection.sid) == Some(route) {
            self.channels
                .insert(route.cid, Channel::Destroying(route.connection));
        }
    }

    /// The client gave up channel `cid` before it had a sid: resolving, it
    /// ends; being created, it is abandoned.
    pub fn abandon(&mut self, cid: u32) {
        match self.channels.get(&cid) {
            Some(Channel::Resolving) => {
                self.remove(cid);
            }
            Some(&Channel::Creating { server }) => {
                self.channels.insert(cid, Channel::Abandoned { server });
            }
            _ => {}
        }
    }

    /// Ends channel `cid` on `server`, whatever its state there.
    pub fn forget(&mut self, server: SocketAddrV4, cid: u32) -> Option<Channel> {
        if self.channels.get(&cid)?.server() != Some(server) {
            return None;
        }
        self.remove(cid)
    }

    /// Ends the connected (or destroying) channel `cid` that `server` calls
    /// `server_sid`: a server must name a channel by both ids, so it cannot
    /// end another channel by its cid alone. Returns the client's sid.
    pub fn forget_named(&mut self, server: SocketAddrV4, cid: u32, server_sid: u32) -> Option<u32> {
        let named = match self.channels.get(&cid)? {
            Channel::Connected(c) | Channel::Destroying(c) => {
                c.server == server && c.server_sid == server_sid
            }
            _ => false,
        };
        if !named {
            return None;
        }
        self.remove(cid)?.sid()
    }

    /// Ends every channel on a lost server, and returns them for the
    /// client's notices. Resolving channels are on no server, and stay.
    pub fn drain(&mut self, server: SocketAddrV4) -> Vec<(u32, Channel)> {
        let cids = self.by_server.remove(&server).unwrap_or_default();
        let lost = cids
            .into_iter()
            .filter_map(|cid| Some((cid, self.remove(cid)?)))
            .collect();
        self.share.fit(self.channels.len());
        lost
    }

    fn remove(&mut self, cid: u32) -> Option<Channel> {
        let channel = self.channels.remove(&cid)?;
        if let Some(sid) = channel.sid() {
            self.routes.remove(&sid);
        }
        if let Some(server) = channel.server() {
            if let Some(cids) = self.by_server.get_mut(&server) {
                cids.remove(&cid);
                if cids.is_empty() {
                    self.by_server.remove(&server);
                }
            }
        }
        self.share.fit(self.channels.len());
        Some(channel)
    }

    fn allocate_sid(&mut self) -> u32 {
        loop {
            let sid = self.next_sid;
            self.next_sid = self.next_sid.wrapping_add(1);
            if Some(sid) != self.reserved_sid && !self.routes.contains_key(&sid) {
                return sid;
            }
        }
    }

    /// Panics if an invariant of the module doc does not hold.
    #[cfg(test)]
    pub fn check(&self) {
        for (sid, cid) in &self.routes {
            assert_eq!(self.channels[cid].sid(), Some(*sid), "route {sid}");
        }
        for (cid, channel) in &self.channels {
            if let Some(sid) = channel.sid() {
                assert_eq!(self.routes.get(&sid), Some(cid), "sid of {cid}");
            }
            if let Some(server) = channel.server() {
                assert!(self.by_server[&server].contains(cid), "server of {cid}");
            }
        }
        for (server, cids) in &self.by_server {
            assert!(!cids.is_empty());
            for cid in cids {
                assert_eq!(self.channels[cid].server(), Some(*server));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::limits::ChannelBudget;
    use crate::relay::metrics::Proto;
    use std::sync::Arc;

    const A: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(127, 0, 0, 1), 5064);
    const B: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(127, 0, 0, 1), 5065);

    fn table_with(budget: &Arc<ChannelBudget>, max: usize) -> ChannelTable {
        ChannelTable::new(max, ChannelShare::new(budget.clone(), Proto::Ca), None)
    }

    fn table() -> ChannelTable {
        table_with(&ChannelBudget::new(1000), 100)
    }

    /// Channel `cid` created on `server` as `server_sid`; returns its sid.
    fn connected(t: &mut ChannelTable, cid: u32, server: SocketAddrV4, server_sid: u32) -> u32 {
        assert_eq!(t.begin_create(cid).ok(), Some(true));
        t.creating_on(cid, server);
        t.connect(cid, server, server_sid).unwrap()
    }

    #[test]
    fn a_connected_channel_is_routed_by_its_new_sid() {
        let mut t = table();
        let sid = connected(&mut t, 7, A, 900);
        let route = t.route(sid).unwrap();
        assert_eq!(route.cid, 7);
        assert_eq!(route.connection.server_sid, 900);
        assert_eq!(t.client_sid(A, 900), Some(sid));
        t.check();
    }

    #[test]
    fn a_cid_in_use_is_ignored_and_limits_are_errors() {
        let budget = ChannelBudget::new(3);
        let mut t = table_with(&budget, 2);
        assert_eq!(t.begin_create(1).ok(), Some(true));
        assert_eq!(t.begin_create(1).ok(), Some(false));
        assert_eq!(t.begin_create(2).ok(), Some(true));
        assert!(matches!(
            t.begin_create(3),
            Err(SessionError::TooManyChannels(2))
        ));
        let mut other = table_with(&budget, 2);
        assert_eq!(other.begin_create(1).ok(), Some(true));
        assert!(matches!(
            other.begin_create(2),
            Err(SessionError::TooManyChannelsInAll(3))
        ));
        assert_eq!(budget.held(), 3);
        drop(t);
        assert_eq!(budget.held(), 1);
    }

    #[test]
    fn only_the_server_creating_a_channel_can_connect_it() {
        let mut t = table();
        t.begin_create(1).unwrap();
        assert_eq!(t.connect(1, A, 5), None, "still resolving");
        t.creating_on(1, A);
        assert_eq!(t.connect(1, B, 5), None, "another server");
        assert!(t.connect(1, A, 5).is_some());
        assert_eq!(t.connect(1, A, 6), None, "already connected");
        t.check();
    }

    #[test]
    fn a_server_must_name_a_channel_by_both_ids_to_end_it() {
        let mut t = table();
        let one = connected(&mut t, 1, A, 101);
        let two = connected(&mut t, 2, A, 102);
        assert_eq!(t.forget_named(A, 1, 102), None, "sid of 2, cid of 1");
        assert_eq!(t.forget_named(B, 1, 101), None, "another server");
        assert_eq!(t.forget_named(A, 1, 101), Some(one));
        assert_eq!(t.route(one), None);
        assert_eq!(t.route(two).map(|r| r.cid), Some(2));
        t.check();
    }

    #[test]
    fn a_destroying_channel_keeps_its_sid_but_takes_no_requests() {
        let mut t = table();
        let sid = connected(&mut t, 1, A, 101);
        t.destroying(t.route(sid).unwrap());
        assert_eq!(t.route(sid), None);
        let other = connected(&mut t, 2, A, 102);
        assert_ne!(other, sid, "the sid stays taken");
        assert_eq!(t.forget_named(A, 1, 101), Some(sid));
        t.check();
    }

    #[test]
    fn abandoning_ends_a_resolving_channel_and_marks_a_creating_one() {
        let mut t = table();
        t.begin_create(1).unwrap();
        t.abandon(1);
        assert_eq!(t.get(1), None);
        t.begin_create(2).unwrap();
        t.creating_on(2, A);
        t.abandon(2);
        assert!(t.is_abandoned_on(2, A));
        assert_eq!(t.connect(2, A, 5), None);
        assert_eq!(t.forget(A, 2), Some(Channel::Abandoned { server: A }));
        assert_eq!(t.len(), 0);
        t.check();
    }

    #[test]
    fn draining_a_lost_server_ends_its_channels_only() {
        let budget = ChannelBudget::new(1000);
        let mut t = table_with(&budget, 100);
        let on_a = connected(&mut t, 1, A, 101);
        t.begin_create(2).unwrap();
        t.creating_on(2, A);
        connected(&mut t, 3, B, 301);
        t.begin_create(4).unwrap();
        let mut lost = t.drain(A);
        lost.sort_by_key(|(cid, _)| *cid);
        assert_eq!(lost.len(), 2);
        assert!(matches!(lost[0], (1, Channel::Connected(c)) if c.sid == on_a));
        assert_eq!(lost[1], (2, Channel::Creating { server: A }));
        assert!(t.is_resolving(4), "a resolving channel is on no server");
        assert_eq!(t.route(on_a), None);
        assert_eq!(budget.held(), 2);
        t.check();
    }

    #[test]
    fn creations_not_answered_are_counted_per_server() {
        let mut t = table();
        for cid in 1..=3 {
            t.begin_create(cid).unwrap();
            t.creating_on(cid, if cid == 3 { B } else { A });
        }
        connected(&mut t, 4, A, 40);
        t.connect(1, A, 10);
        let mut pending = t.creating_per_server();
        pending.sort();
        assert_eq!(pending, [(A, 1), (B, 1)]);
    }

    #[test]
    fn the_reserved_sid_is_never_given() {
        let budget = ChannelBudget::new(1000);
        let mut t = ChannelTable::new(10, ChannelShare::new(budget, Proto::Pva), Some(2));
        let sids: Vec<u32> = (0..3).map(|cid| connected(&mut t, cid, A, cid)).collect();
        assert_eq!(sids, [1, 3, 4]);
    }

    #[test]
    fn a_name_not_found_ends_only_a_resolving_channel() {
        let mut t = table();
        t.begin_create(1).unwrap();
        assert!(t.not_found(1));
        assert!(!t.not_found(1));
        connected(&mut t, 2, A, 5);
        assert!(!t.not_found(2));
        t.check();
    }
}
