//! CA searches for the shared search relay (`relay::discovery`).
//!
//! Datagrams are libca's: VERSION first (rsrv ignores searches without it
//! since R3.16.1), then SEARCH messages with DONT_REPLY, at most 1024 bytes.
//! They go by default to the loopback broadcast address, which reaches every
//! socket bound to the CA server port in this network namespace (unicast to
//! 127.0.0.1 reaches only one of the sockets that share the port). An answer
//! carries the server's TCP port in its data type, and an address of
//! 0xFFFFFFFF that means "the sender".

use super::wire::{self, Command};
use crate::relay::discovery::{self, Resolver, SearchConfig, SearchProtocol};
use bytes::BytesMut;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

pub struct CaSearch;

impl SearchProtocol for CaSearch {
    const NAME: &'static str = "ca";
    const MAX_NAME_LEN: usize = wire::MAX_NAME_LEN;
    /// rsrv answers on the socket the search arrived on, bound to the UDP
    /// server port (`cast_server.c`), and so does caproto.
    const ANSWERS_FROM_SERVER_PORT: bool = true;

    fn encode(
        &mut self,
        names: &[(u32, &[u8])],
        sequence: u32,
        _reply_port: u16,
        out: &mut BytesMut,
    ) -> usize {
        wire::encode_search_datagram(names, sequence, out)
    }

    fn answers(
        &mut self,
        datagram: &[u8],
        from: SocketAddrV4,
        found: &mut Vec<(u32, SocketAddrV4)>,
    ) {
        let messages = match wire::decode_datagram(datagram) {
            Ok(messages) => messages,
            Err(e) => {
                tracing::debug!(target: "nameshim::ca::search", peer = %from, cause = %e, "bad search answer");
                return;
            }
        };
        for (header, _payload) in messages {
            if header.command() != Ok(Command::Search) {
                continue;
            }
            let ip = if header.p1 == wire::ADDR_OF_SENDER {
                Ipv4Addr::UNSPECIFIED
            } else {
                Ipv4Addr::from(header.p1)
            };
            found.push((header.p2, SocketAddrV4::new(ip, header.data_type)));
        }
    }
}

/// Binds the CA search socket and starts the relay.
pub fn start(config: SearchConfig) -> io::Result<Resolver> {
    let socket = discovery::bind_search_socket(Ipv4Addr::UNSPECIFIED)?;
    Resolver::start(CaSearch, socket, config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::net::SocketAddr;
    use std::time::Duration;
    use tokio::net::UdpSocket;
    use tokio::sync::mpsc;

    /// The client address searches are charged to.
    const CLIENT: std::net::IpAddr = std::net::IpAddr::V4(Ipv4Addr::LOCALHOST);

    async fn fake_server() -> (UdpSocket, SearchConfig) {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(addr) = server.local_addr().unwrap() else {
            unreachable!()
        };
        let config = SearchConfig {
            targets: vec![addr],
            timeout: Duration::from_millis(300),
            cache_ttl: Duration::from_secs(5),
            max_pending: 100,
            max_pending_per_address: 100,
            max_cached: 100,
            max_rate_per_address: 1_000_000,
            max_rate: 1_000_000,
        };
        (server, config)
    }

    /// Answers every searched name as rsrv would, with TCP port `port`.
    async fn answer_all(server: &UdpSocket, port: u16) -> Vec<Bytes> {
        answer_all_from(server, server, port).await
    }

    /// Reads one search datagram on `server` and answers it from `sender`.
    async fn answer_all_from(server: &UdpSocket, sender: &UdpSocket, port: u16) -> Vec<Bytes> {
        let mut buf = vec![0u8; 2048];
        let (len, from) = server.recv_from(&mut buf).await.unwrap();
        let mut names = Vec::new();
        let mut reply = BytesMut::new();
        wire::server_version().encode(&mut reply);
        for (header, payload) in wire::decode_datagram(&buf[..len]).unwrap() {
            if header.command() == Ok(Command::Search) {
                names.push(Bytes::copy_from_slice(wire::payload_name(payload)));
                let mut answer = wire::Header::new(Command::Search, port, 0, !0, header.p2);
                answer.payload_size = 8;
                answer.encode(&mut reply);
                reply.extend_from_slice(&[0, 13, 0, 0, 0, 0, 0, 0]);
            }
        }
        sender.send_to(&reply, from).await.unwrap();
        names
    }

    /// The search ids of one search datagram.
    async fn searched_ids(server: &UdpSocket) -> Vec<u32> {
        let mut buf = vec![0u8; 2048];
        let (len, _) = server.recv_from(&mut buf).await.unwrap();
        wire::decode_datagram(&buf[..len])
            .unwrap()
            .into_iter()
            .filter(|(header, _)| header.command() == Ok(Command::Search))
            .map(|(header, _)| header.p2)
            .collect()
    }

    #[tokio::test]
    async fn answer_from_a_port_no_server_uses_is_ignored() {
        let (server, config) = fake_server().await;
        let resolver = start(config).unwrap();
        let forger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        resolver
            .lookup(Bytes::from_static(b"F"), CLIENT, &tx)
            .unwrap();
        // The forger sees the search and answers it with the right id,
        // but from its own port rather than the CA server port.
        answer_all_from(&server, &forger, 40666).await;
        assert_eq!(rx.recv().await.unwrap().server, None);
    }

    #[tokio::test]
    async fn search_ids_are_not_sequential() {
        let (server, config) = fake_server().await;
        let resolver = start(config).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        for name in [&b"ID:0"[..], b"ID:1", b"ID:2", b"ID:3", b"ID:4", b"ID:5"] {
            resolver
                .lookup(Bytes::from_static(name), CLIENT, &tx)
                .unwrap();
        }
        let ids = searched_ids(&server).await;
        assert_eq!(ids.len(), 6);
        for a in &ids {
            for b in &ids {
                assert!(
                    a.wrapping_sub(*b) != 1,
                    "consecutive search ids {b} and {a} in {ids:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn names_asked_together_share_one_datagram_and_are_found() {
        let (server, config) = fake_server().await;
        let resolver = start(config).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        resolver
            .lookup(Bytes::from_static(b"A:ONE"), CLIENT, &tx)
            .unwrap();
        resolver
            .lookup(Bytes::from_static(b"A:TWO"), CLIENT, &tx)
            .unwrap();
        let mut names = answer_all(&server, 40000).await;
        names.sort();
        assert_eq!(names, [&b"A:ONE"[..], &b"A:TWO"[..]]);
        let expected = Some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 40000));
        for _ in 0..2 {
            assert_eq!(rx.recv().await.unwrap().server, expected);
        }
    }

    #[tokio::test]
    async fn cached_answer_needs_no_datagram() {
        let (server, config) = fake_server().await;
        let resolver = start(config).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        resolver
            .lookup(Bytes::from_static(b"B"), CLIENT, &tx)
            .unwrap();
        answer_all(&server, 40001).await;
        rx.recv().await.unwrap();
        resolver
            .lookup(Bytes::from_static(b"B"), CLIENT, &tx)
            .unwrap();
        let again = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
        assert_eq!(
            again.unwrap().unwrap().server.map(|s| s.port()),
            Some(40001)
        );
        let mut buf = [0u8; 64];
        let extra =
            tokio::time::timeout(Duration::from_millis(50), server.recv_from(&mut buf)).await;
        assert!(extra.is_err(), "no second search for a cached name");
    }

    #[tokio::test]
    async fn unanswered_name_is_resent_then_not_found() {
        let (server, config) = fake_server().await;
        let resolver = start(config).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        resolver
            .lookup(Bytes::from_static(b"NOBODY"), CLIENT, &tx)
            .unwrap();
        let answer = rx.recv().await.unwrap();
        assert_eq!(answer.server, None);
        let mut buf = [0u8; 256];
        let mut sends = 0;
        while tokio::time::timeout(Duration::from_millis(10), server.recv_from(&mut buf))
            .await
            .is_ok()
        {
            sends += 1;
        }
        assert!(sends >= 3, "searched {sends} times in 300 ms");
    }

    #[tokio::test]
    async fn search_stops_when_every_asker_is_gone() {
        let (server, config) = fake_server().await;
        let resolver = start(config).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        resolver
            .lookup(Bytes::from_static(b"ORPHAN"), CLIENT, &tx)
            .unwrap();
        let mut buf = [0u8; 256];
        server.recv_from(&mut buf).await.unwrap();
        drop((tx, rx));
        // Let the resend that notices the closed waiter go by.
        tokio::time::sleep(Duration::from_millis(60)).await;
        while tokio::time::timeout(Duration::from_millis(5), server.recv_from(&mut buf))
            .await
            .is_ok()
        {}
        let more =
            tokio::time::timeout(Duration::from_millis(150), server.recv_from(&mut buf)).await;
        assert!(more.is_err(), "searched on after the only asker left");
    }

    #[tokio::test]
    async fn forgotten_server_is_searched_again() {
        let (server, config) = fake_server().await;
        let resolver = start(config).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        resolver
            .lookup(Bytes::from_static(b"C"), CLIENT, &tx)
            .unwrap();
        answer_all(&server, 40002).await;
        let first = rx.recv().await.unwrap().server.unwrap();
        resolver.forget(first);
        resolver
            .lookup(Bytes::from_static(b"C"), CLIENT, &tx)
            .unwrap();
        assert_eq!(answer_all(&server, 40003).await, [&b"C"[..]]);
        assert_eq!(
            rx.recv().await.unwrap().server.map(|s| s.port()),
            Some(40003)
        );
    }
}
