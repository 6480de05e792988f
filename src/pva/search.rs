//! PVA searches for the shared search relay (`relay::discovery`).
//!
//! pvxs servers bind the wildcard search port and join the 224.0.0.128 group
//! on the loopback. pvAccessCPP servers bind the search port on each
//! interface address and, when the interface has one, on its broadcast
//! address, but on the wildcard address only when it has none (as in a
//! namespace whose veth has no broadcast address); they always join
//! 224.0.0.128 on the loopback. So the default targets are the loopback
//! broadcast address 127.255.255.255 and the group 224.0.0.128, sent out of
//! the loopback interface with TTL 1: every server in the namespace hears one
//! of them, and nothing leaves the namespace. The reply address in the
//! payload is the shim's own socket on 127.0.0.1, because pvAccessCPP answers
//! the payload's address from a random source port. The unicast flag stays
//! clear, so no server re-forwards the search.

use super::wire::{self, Command};
use crate::relay::discovery::{self, Resolver, SearchConfig, SearchProtocol};
use bytes::BytesMut;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

/// Largest search datagram (pvxs keeps its search payloads near this).
const MAX_DATAGRAM: usize = 1400;

pub struct PvaSearch;

impl SearchProtocol for PvaSearch {
    const NAME: &'static str = "pva";
    const MAX_NAME_LEN: usize = wire::MAX_NAME_LEN;
    /// pvAccessCPP answers from a random UDP source port.
    const ANSWERS_FROM_SERVER_PORT: bool = false;

    fn encode(
        &mut self,
        names: &[(u32, &[u8])],
        sequence: u32,
        reply_port: u16,
        out: &mut BytesMut,
    ) -> usize {
        wire::encode_search_datagram(names, sequence, reply_port, MAX_DATAGRAM, out)
    }

    fn answers(
        &mut self,
        datagram: &[u8],
        from: SocketAddrV4,
        found: &mut Vec<(u32, SocketAddrV4)>,
    ) {
        for message in wire::decode_datagram(datagram) {
            if message.header.command() != Ok(Command::SearchResponse) {
                continue;
            }
            match wire::parse_search_response(&message) {
                Ok(answer) if answer.found => {
                    let server = SocketAddrV4::new(answer.ip, answer.port);
                    found.extend(answer.ids.iter().map(|&id| (id, server)));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(target: "nameshim::pva::search", peer = %from, cause = %e, "bad search answer")
                }
            }
        }
    }
}

/// Binds the PVA search socket and starts the relay. Multicast leaves by
/// the loopback interface only, and comes back to local members.
pub fn start(config: SearchConfig) -> io::Result<Resolver> {
    let socket = discovery::bind_search_socket(Ipv4Addr::UNSPECIFIED)?;
    socket2::SockRef::from(&socket).set_multicast_if_v4(&Ipv4Addr::LOCALHOST)?;
    socket.set_multicast_loop_v4(true)?;
    socket.set_multicast_ttl_v4(1)?;
    Resolver::start(PvaSearch, socket, config)
}
