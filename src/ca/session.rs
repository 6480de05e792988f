//! The shim's side of one CA client circuit: what is particular to CA on
//! top of the session core (`crate::session`).
//!
//! Towards the client the shim is a name server that libca can also create
//! channels on: it answers searches over TCP with address 0xFFFFFFFF, so
//! libca puts each found channel on this same circuit. Towards the servers
//! it opens one circuit per server that owns a channel of this client, with
//! the client's priority, minor version, user and host names.
//!
//! Ids (epics-base `caProto.h`): the client chooses channel ids (cid), io ids
//! and subscription ids, which pass unchanged because they are unique on the
//! client circuit. Servers choose server ids (sid), which the shim replaces
//! by its own, so channels on several servers never collide.
//!
//! Never send NOT_FOUND or an unexpected command to libca over TCP: its TCP
//! jump table treats both as fatal for the circuit. Unknown names get silence.

use super::backend::{self, BackendConfig};
use super::wire::{self, Command, Header, Message};
use super::{frame, CaDecoder};
use crate::relay::listener::Reception;
use crate::relay::metrics::{Proto, Refusal, METRICS};
use crate::relay::outbox::{Frame, Outbox};
use crate::relay::upstream::BackendLink;
use crate::session::{
    self, Channel, ClientReader, Core, Events, FoundNames, LargeMessage, SessionError,
    SessionSettings,
};
use bytes::Bytes;
use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Longest user or host name kept and passed on: rsrv drops a circuit whose
/// CLIENT_NAME or HOST_NAME, with its NUL, exceeds 512 bytes
/// (`camessage.c` client_name_action, host_name_action).
const MAX_CLIENT_NAME_LEN: usize = 511;

/// What every CA session shares.
pub struct CaContext {
    pub session: SessionSettings,
    pub backend: BackendConfig,
}

/// How a CA client broke the protocol.
#[derive(Debug)]
pub enum CaFault {
    Unexpected(Command),
    UnknownCommand(u16),
    /// A CLIENT_NAME or HOST_NAME longer than rsrv accepts.
    NameTooLong(Command, usize),
}

impl fmt::Display for CaFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaFault::Unexpected(c) => write!(f, "unexpected command {c:?} from a client"),
            CaFault::UnknownCommand(c) => write!(f, "unknown command code {c}"),
            CaFault::NameTooLong(c, n) => write!(
                f,
                "{c:?} of {n} bytes (servers accept at most {MAX_CLIENT_NAME_LEN})"
            ),
        }
    }
}

impl std::error::Error for CaFault {}

impl From<CaFault> for SessionError {
    fn from(fault: CaFault) -> Self {
        SessionError::Protocol(Box::new(fault))
    }
}

/// The user or host name of a CLIENT_NAME or HOST_NAME message, copied
/// out of the receive buffer so that keeping it does not keep the buffer.
fn owned_client_name(message: &Message, command: Command) -> Result<Bytes, CaFault> {
    let name = wire::payload_name(&message.payload);
    if name.len() > MAX_CLIENT_NAME_LEN {
        return Err(CaFault::NameTooLong(command, name.len()));
    }
    Ok(Bytes::copy_from_slice(name))
}

/// Serves one client circuit until it closes or misbehaves.
/// Says whether the client sent anything, for the shared port's choice of
/// greeting (`ports::greeting`).
pub async fn serve(stream: TcpStream, peer: SocketAddr, ctx: Arc<CaContext>) -> Reception {
    session::serve::<CaSession>(stream, peer, ctx).await
}

/// The circuit's priority and minor version, from the client's VERSION.
#[derive(Clone, Copy)]
struct Circuit {
    priority: u16,
    minor: u16,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Waiter {
    /// A search from the client, answered only if the name is found.
    Search { id: u32 },
    /// A CREATE_CHAN for a name this circuit's searches had not just found.
    Create { cid: u32 },
}

impl session::Waiter for Waiter {
    /// libca must never hear "not found" over TCP: a search is answered
    /// only when found.
    fn wants_prompt_answer(&self) -> bool {
        false
    }
}

/// What CA adds to the session core for one client circuit: what it has
/// told the shim of itself, which every new server circuit is told too.
struct CaSession {
    ctx: Arc<CaContext>,
    /// The port the client connected to, named in search replies.
    listen_port: u16,
    circuit: Option<Circuit>,
    client_name: Option<Bytes>,
    host_name: Option<Bytes>,
    events_off: bool,
    /// Names this circuit's searches found, for the CREATE_CHAN that
    /// follows each answer.
    found: FoundNames,
}

impl session::Protocol for CaSession {
    type Context = CaContext;
    type Decoder = CaDecoder;
    type Message = Message;
    type Waiter = Waiter;
    const PROTO: Proto = Proto::Ca;

    fn settings(ctx: &CaContext) -> &SessionSettings {
        &ctx.session
    }

    fn decoder(ctx: &CaContext) -> CaDecoder {
        CaDecoder {
            max_payload: ctx.session.max_client_message,
        }
    }

    async fn greet(
        ctx: Arc<CaContext>,
        client: &Outbox,
        _reader: &mut ClientReader<CaDecoder>,
        listen_port: u16,
    ) -> Result<Self, SessionError> {
        // rsrv greets on accept; libca searches over TCP only after it.
        client.send_control(frame(&wire::server_version())).await?;
        let found = FoundNames::new(ctx.session.max_searches);
        Ok(CaSession {
            ctx,
            listen_port,
            circuit: None,
            client_name: None,
            host_name: None,
            events_off: false,
            found,
        })
    }

    async fn on_client(
        &mut self,
        core: &mut Core<Self>,
        message: Message,
    ) -> Result<(), SessionError> {
        let header = message.header;
        let command = header.command().map_err(CaFault::UnknownCommand)?;
        match command {
            Command::Version => {
                // Later VERSIONs prefix search batches; the first one
                // carries the circuit's priority and minor version.
                if self.circuit.is_none() {
                    self.circuit = Some(Circuit {
                        priority: header.data_type,
                        minor: (header.count.min(u32::from(wire::MINOR_VERSION))) as u16,
                    });
                }
            }
            Command::Echo => core.to_client(frame(&wire::echo())).await?,
            // Old clients use READ_SYNC as an echo.
            Command::ReadSync => core.to_client(frame(&wire::read_sync())).await?,
            Command::ClientName | Command::HostName => {
                let name = Some(owned_client_name(&message, command)?);
                if command == Command::ClientName {
                    self.client_name = name;
                } else {
                    self.host_name = name;
                }
                core.send_to_every_server(&frame(&message));
            }
            Command::EventsOff | Command::EventsOn => {
                self.events_off = command == Command::EventsOff;
                core.send_to_every_server(&frame(&message));
            }
            Command::Search => self.on_search(core, &message).await?,
            Command::CreateChan => self.on_create(core, &message).await?,
            Command::Write | Command::WriteNotify if core.access.read_only => {
                refuse_write(core, command, &message).await?
            }
            Command::EventAdd
            | Command::EventCancel
            | Command::Read
            | Command::ReadNotify
            | Command::Write
            | Command::WriteNotify
            | Command::ClearChannel => forward_to_channel_server(core, message),
            other => return Err(CaFault::Unexpected(other).into()),
        }
        Ok(())
    }

    fn on_server(
        &mut self,
        core: &mut Core<Self>,
        server: SocketAddrV4,
        message: Message,
    ) -> Result<Option<Frame>, SessionError> {
        let Ok(command) = message.header.command() else {
            warn!(%server, cmd = message.header.command, "unknown command from a server dropped");
            return Ok(None);
        };
        let relayed = relayed_server_message(core, server, command, message);
        Ok(relayed.as_ref().map(frame))
    }

    /// Data answers pass unchanged: their header names the client's own
    /// subscription or ioid, never a channel's sid.
    fn on_server_head(
        &mut self,
        _core: &mut Core<Self>,
        _server: SocketAddrV4,
        head: &Message,
    ) -> Result<LargeMessage, SessionError> {
        Ok(match head.header.command() {
            Ok(Command::EventAdd | Command::Read | Command::ReadNotify) => LargeMessage::Stream,
            _ => LargeMessage::Whole,
        })
    }

    async fn settle(
        &mut self,
        core: &mut Core<Self>,
        waiter: Waiter,
        name: &Bytes,
        server: Option<SocketAddrV4>,
    ) -> Result<(), SessionError> {
        match (waiter, server) {
            (Waiter::Search { id }, Some(server)) => {
                self.found.remember(name, server, Instant::now());
                let reply = wire::tcp_search_reply(id, self.listen_port);
                core.to_client(frame(&reply)).await?
            }
            (Waiter::Search { .. }, None) => {}
            (Waiter::Create { cid }, Some(server)) => {
                if core.channels.is_resolving(cid) {
                    let minor = self.circuit.map_or(wire::MINOR_VERSION, |c| c.minor);
                    let request = Message::with_name(
                        Header::new(Command::CreateChan, 0, 0, cid, u32::from(minor)),
                        name,
                    );
                    core.create_on(self, server, cid, frame(&request));
                }
            }
            (Waiter::Create { cid }, None) => {
                if core.channels.not_found(cid) {
                    core.to_client(frame(&wire::create_ch_fail(cid))).await?;
                }
            }
        }
        Ok(())
    }

    /// The circuit to `server`, opened with the client's VERSION, user
    /// name, host name and flow-control state.
    fn open_link(
        &mut self,
        server: SocketAddrV4,
        id: u64,
        client: Outbox,
        events: Events<Message>,
    ) -> BackendLink {
        let link = backend::open(server, id, &self.ctx.backend, client, events);
        // The queue is empty, so these fit without waiting.
        for message in self.introduction() {
            if let Ok(permit) = link.outbox.try_reserve_now(message.wire_len()) {
                let _ = link.outbox.send_reserved(frame(&message), permit);
            }
        }
        link
    }

    fn forget_server(&mut self, server: SocketAddrV4) {
        self.found.forget(server);
    }

    fn lost_channel_notice(&self, cid: u32, channel: Channel) -> Option<Frame> {
        match channel {
            Channel::Connected(_) => Some(frame(&wire::server_disconn(cid))),
            Channel::Creating { .. } => Some(frame(&wire::create_ch_fail(cid))),
            _ => None,
        }
    }
}

impl CaSession {
    async fn on_search(
        &mut self,
        core: &mut Core<Self>,
        message: &Message,
    ) -> Result<(), SessionError> {
        let name = wire::payload_name(&message.payload);
        if name.is_empty() {
            return Ok(());
        }
        let name = message.payload.slice_ref(name);
        let waiter = Waiter::Search {
            id: message.header.p2,
        };
        core.await_name(self, name, waiter).await
    }

    async fn on_create(
        &mut self,
        core: &mut Core<Self>,
        message: &Message,
    ) -> Result<(), SessionError> {
        let cid = message.header.p1;
        let name = wire::payload_name(&message.payload);
        if name.is_empty() || !core.channels.begin_create(cid)? {
            debug!(cid, "ignored CREATE_CHAN with empty name or a cid in use");
            return Ok(());
        }
        let name = message.payload.slice_ref(name);
        let waiter = Waiter::Create { cid };
        match self.found.take(&name, Instant::now()) {
            Some(server) => {
                session::Protocol::settle(self, core, waiter, &name, Some(server)).await
            }
            None => core.await_name(self, name, waiter).await,
        }
    }

    /// What a new server circuit is told first.
    fn introduction(&self) -> Vec<Message> {
        let circuit = self.circuit.unwrap_or(Circuit {
            priority: 0,
            minor: wire::MINOR_VERSION,
        });
        let mut intro = vec![wire::client_version(circuit.priority, circuit.minor)];
        for (command, name) in [
            (Command::ClientName, &self.client_name),
            (Command::HostName, &self.host_name),
        ] {
            if let Some(name) = name {
                intro.push(Message::with_name(Header::new(command, 0, 0, 0, 0), name));
            }
        }
        if self.events_off {
            intro.push(Message::new(Header::new(Command::EventsOff, 0, 0, 0, 0)));
        }
        intro
    }
}

/// Answers a write as rsrv answers one without write access (`--read-only`):
/// the client's put callback, or its exception handler, says "write access
/// denied".
async fn refuse_write(
    core: &mut Core<CaSession>,
    command: Command,
    request: &Message,
) -> Result<(), SessionError> {
    let Some(route) = core.channels.route(request.header.p1) else {
        debug!(
            sid = request.header.p1,
            "write for an unknown channel dropped"
        );
        return Ok(());
    };
    METRICS.refused(Refusal::WriteRefused);
    debug!(cid = route.cid, ?command, "write refused: read-only");
    let refusal = if command == Command::WriteNotify {
        wire::write_notify_refused(&request.header)
    } else {
        wire::write_refused(
            &request.header,
            route.cid,
            "write refused by nameshim --read-only",
        )
    };
    Ok(core.to_client(frame(&refusal)).await?)
}

/// Forwards a request addressed by sid (p1) to the channel's server,
/// with the server's own sid.
fn forward_to_channel_server(core: &mut Core<CaSession>, mut message: Message) {
    let sid = message.header.p1;
    let Some(route) = core.channels.route(sid) else {
        debug!(
            sid,
            cmd = message.header.command,
            "request for an unknown channel dropped"
        );
        return;
    };
    message.header.p1 = route.connection.server_sid;
    core.send_to_server(route.connection.server, frame(&message));
}

/// What the client gets of a server's message, with the client's ids in
/// it, if anything.
fn relayed_server_message(
    core: &mut Core<CaSession>,
    server: SocketAddrV4,
    command: Command,
    mut message: Message,
) -> Option<Message> {
    let header = &mut message.header;
    match command {
        Command::CreateChan => {
            let cid = header.p1;
            let Some(sid) = core.channels.connect(cid, server, header.p2) else {
                debug!(%server, cid, "CREATE_CHAN answer for no pending channel");
                return None;
            };
            header.p2 = sid;
        }
        Command::ClearChannel => {
            // p1 = sid, p2 = cid: both must name the same channel, so a
            // server cannot clear another channel by its cid alone.
            let (server_sid, cid) = (header.p1, header.p2);
            let Some(sid) = core.channels.forget_named(server, cid, server_sid) else {
                debug!(%server, cid, sid = server_sid, "CLEAR_CHANNEL naming no channel of this server dropped");
                return None;
            };
            header.p1 = sid;
        }
        Command::ServerDisconn | Command::CreateChFail => {
            core.channels.forget(server, header.p1)?;
        }
        Command::AccessRights => {
            // p1 = cid, p2 = rights: a read-only shim says so, so displays
            // grey out the controls that would only be refused.
            if core.access.read_only {
                header.p2 &= !wire::ACCESS_RIGHT_WRITE;
            }
        }
        Command::EventAdd | Command::Read | Command::ReadNotify | Command::WriteNotify => {}
        Command::Error => {
            // The echoed request names the channel by the server's sid.
            if let Some(server_sid) = wire::error_request_sid(&message.payload) {
                let sid = core.channels.client_sid(server, server_sid);
                let Some(payload) =
                    sid.and_then(|sid| wire::error_with_request_sid(&message.payload, sid))
                else {
                    debug!(%server, server_sid, "error for no channel of this client dropped");
                    return None;
                };
                message.payload = payload;
            }
        }
        // Answers to the shim itself, or nothing libca may receive.
        other => {
            if !matches!(other, Command::Version | Command::Echo | Command::ReadSync) {
                debug!(%server, cmd = ?other, "server message not relayed");
            }
            return None;
        }
    }
    Some(message)
}

/// A context for tests: searches go to `search_addr` only, for
/// `search_timeout`, and channels count against `channels_in_all`.
#[cfg(test)]
pub(crate) fn context_for_tests(
    search_addr: SocketAddrV4,
    search_timeout: std::time::Duration,
    channels_in_all: Arc<crate::relay::limits::ChannelBudget>,
) -> Arc<CaContext> {
    let cache_ttl = std::time::Duration::from_secs(5);
    context_caching_for_tests(search_addr, search_timeout, cache_ttl, channels_in_all)
}

/// [`context_for_tests`] with the search relay caching answers for
/// `cache_ttl`.
#[cfg(test)]
pub(crate) fn context_caching_for_tests(
    search_addr: SocketAddrV4,
    search_timeout: std::time::Duration,
    cache_ttl: std::time::Duration,
    channels_in_all: Arc<crate::relay::limits::ChannelBudget>,
) -> Arc<CaContext> {
    use crate::relay::discovery::SearchConfig;
    use std::time::Duration;
    Arc::new(CaContext {
        session: SessionSettings {
            resolver: super::search::start(SearchConfig {
                targets: vec![search_addr],
                timeout: search_timeout,
                cache_ttl,
                max_pending: 100,
                max_pending_per_address: 100,
                max_cached: 100,
                max_rate_per_address: 1_000_000,
                max_rate: 1_000_000,
            })
            .expect("a search relay on the loopback"),
            max_client_message: 1 << 24,
            deadlines: crate::relay::limits::ClientDeadlines::default(),
            channels_in_all,
            queue_bytes: 4 << 20,
            max_channels: 100,
            max_searches: 100,
            access: Default::default(),
        },
        backend: BackendConfig {
            max_server_message: 1 << 24,
            queue_bytes: 1 << 16,
            connect_timeout: Duration::from_secs(2),
            source: crate::relay::upstream::DEFAULT_SOURCE,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::test_support::{read_at_least, write_while_reading};
    use bytes::BytesMut;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::{TcpListener, UdpSocket};
    use tokio::sync::mpsc;

    #[test]
    fn a_kept_user_name_does_not_pin_the_message_it_came_in() {
        let mut header = Header::new(Command::ClientName, 0, 0, 0, 0);
        header.payload_size = 1 << 20;
        let mut payload = vec![0u8; 1 << 20];
        payload[..5].copy_from_slice(b"alice");
        let message = Message {
            header,
            payload: Bytes::from(payload),
        };
        let name = owned_client_name(&message, Command::ClientName).unwrap();
        assert_eq!(&name[..], b"alice");
        assert!(message.payload.is_unique());
    }

    #[test]
    fn a_user_name_longer_than_rsrv_accepts_is_refused() {
        let name = vec![b'u'; MAX_CLIENT_NAME_LEN + 1];
        let message = Message::with_name(Header::new(Command::HostName, 0, 0, 0, 0), &name);
        assert!(matches!(
            owned_client_name(&message, Command::HostName),
            Err(CaFault::NameTooLong(Command::HostName, 512))
        ));
        let fits = Message::with_name(Header::new(Command::HostName, 0, 0, 0, 0), &name[1..]);
        assert!(owned_client_name(&fits, Command::HostName).is_ok());
    }

    fn bytes_of(m: &Message) -> Vec<u8> {
        let mut b = BytesMut::new();
        m.encode(&mut b);
        b.to_vec()
    }

    /// A context whose searches go to `search_addr` only.
    fn test_context(search_addr: SocketAddrV4) -> Arc<CaContext> {
        context_for_tests(
            search_addr,
            Duration::from_secs(5),
            crate::relay::limits::ChannelBudget::new(1000),
        )
    }

    /// A client connection to one session served with `test_context`.
    async fn shim_session(search_addr: SocketAddrV4) -> TcpStream {
        session_of(test_context(search_addr)).await
    }

    /// A client connection to one session served with `ctx`.
    async fn session_of(ctx: Arc<CaContext>) -> TcpStream {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, p) = front.accept().await.unwrap();
            serve(s, p, ctx).await;
        });
        TcpStream::connect(addr).await.unwrap()
    }

    /// Answers every UDP search with `tcp_port`; returns the search address.
    async fn answering_searches(tcp_port: u16) -> SocketAddrV4 {
        answering(tcp_port, false).await
    }

    /// Answers the first UDP search for each name with `tcp_port`, and
    /// later searches for it with silence; returns the search address.
    async fn answering_each_name_once(tcp_port: u16) -> SocketAddrV4 {
        answering(tcp_port, true).await
    }

    /// Answers UDP searches with `tcp_port`, each name only once if
    /// `once`; returns the search address.
    async fn answering(tcp_port: u16, once: bool) -> SocketAddrV4 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(udp_addr) = udp.local_addr().unwrap() else {
            unreachable!()
        };
        tokio::spawn(async move {
            let mut answered = std::collections::HashSet::new();
            let mut buf = vec![0u8; 2048];
            while let Ok((len, from)) = udp.recv_from(&mut buf).await {
                let mut reply = BytesMut::new();
                for (h, payload) in wire::decode_datagram(&buf[..len]).unwrap_or_default() {
                    let first = answered.insert(wire::payload_name(payload).to_vec());
                    if h.command() == Ok(Command::Search) && (first || !once) {
                        Header::new(Command::Search, tcp_port, 0, !0, h.p2).encode(&mut reply);
                    }
                }
                let _ = udp.send_to(&reply, from).await;
            }
        });
        udp_addr
    }

    /// The next whole CA message from `stream`.
    async fn next_message(stream: &mut TcpStream, buf: &mut BytesMut) -> Message {
        loop {
            let mut needed = 0;
            if let Some(m) = wire::decode(buf, 1 << 24, &mut needed).unwrap() {
                return m;
            }
            let n = tokio::time::timeout(Duration::from_secs(3), stream.read_buf(buf))
                .await
                .expect("a message within 3 s")
                .unwrap();
            assert!(n > 0, "connection closed");
        }
    }

    /// The next message with `command`, skipping others.
    async fn next_of(stream: &mut TcpStream, buf: &mut BytesMut, command: Command) -> Message {
        loop {
            let m = next_message(stream, buf).await;
            if m.header.command() == Ok(command) {
                return m;
            }
        }
    }

    // A server's CLEAR_CHANNEL carries the sid and the cid of one channel.
    // One that pairs another channel's sid with a cid must not clear the
    // channel that cid names.
    #[tokio::test]
    async fn server_clear_channel_must_name_the_channel_by_sid_and_cid() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let search_addr = answering_searches(tcp.local_addr().unwrap().port()).await;
        tokio::spawn(async move {
            let (mut s, _) = tcp.accept().await.unwrap();
            let mut buf = BytesMut::new();
            // Channel cid 1 gets sid 101, cid 2 gets sid 102.
            for _ in 0..2 {
                let create = next_of(&mut s, &mut buf, Command::CreateChan).await;
                let cid = create.header.p1;
                let reply = Message::new(Header::new(Command::CreateChan, 6, 1, cid, 100 + cid));
                s.write_all(&bytes_of(&reply)).await.unwrap();
            }
            // The sid of channel 2 with the cid of channel 1.
            let bogus = Message::new(Header::new(Command::ClearChannel, 0, 0, 102, 1));
            s.write_all(&bytes_of(&bogus)).await.unwrap();
            // Channel 1 must still be routed here.
            let read = next_of(&mut s, &mut buf, Command::ReadNotify).await;
            assert_eq!(read.header.p1, 101, "the request carries channel 1's sid");
            let reply = Message::with_payload(
                Header::new(Command::ReadNotify, 6, 1, 1, read.header.p2),
                &[0; 8],
            );
            s.write_all(&bytes_of(&reply)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let mut client = shim_session(search_addr).await;
        client
            .write_all(&bytes_of(&wire::client_version(0, 13)))
            .await
            .unwrap();
        for (cid, name) in [(1, b"A"), (2, b"B")] {
            let create = Message::with_name(Header::new(Command::CreateChan, 0, 0, cid, 13), name);
            client.write_all(&bytes_of(&create)).await.unwrap();
        }
        let mut buf = BytesMut::new();
        let mut sid_of_channel_1 = None;
        for _ in 0..2 {
            let created = next_of(&mut client, &mut buf, Command::CreateChan).await;
            if created.header.p1 == 1 {
                sid_of_channel_1 = Some(created.header.p2);
            }
        }
        // Give the bogus CLEAR_CHANNEL time to arrive at the shim.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let read = Message::new(Header::new(
            Command::ReadNotify,
            6,
            1,
            sid_of_channel_1.unwrap(),
            7,
        ));
        client.write_all(&bytes_of(&read)).await.unwrap();
        let answer = next_of(&mut client, &mut buf, Command::ReadNotify).await;
        assert_eq!(answer.header.p2, 7);
    }

    // rsrv's CA_PROTO_ERROR echoes the failed request's header, which the
    // shim had given the server's sid: the client must see its own sid.
    #[tokio::test]
    async fn an_error_from_the_server_names_the_clients_sid() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let search_addr = answering_searches(tcp.local_addr().unwrap().port()).await;
        tokio::spawn(async move {
            let (mut s, _) = tcp.accept().await.unwrap();
            let mut buf = BytesMut::new();
            let create = next_of(&mut s, &mut buf, Command::CreateChan).await;
            let reply = Message::new(Header::new(
                Command::CreateChan,
                6,
                1,
                create.header.p1,
                4242,
            ));
            s.write_all(&bytes_of(&reply)).await.unwrap();
            let read = next_of(&mut s, &mut buf, Command::ReadNotify).await;
            assert_eq!(read.header.p1, 4242);
            let mut payload = bytes_of(&read);
            payload.extend_from_slice(b"bad request\0\0\0\0\0");
            let error = Message::with_payload(Header::new(Command::Error, 0, 0, 1, 114), &payload);
            s.write_all(&bytes_of(&error)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let (mut client, sid, mut buf) = client_with_channel(search_addr).await;
        assert_ne!(sid, 4242);
        let read = Message::new(Header::new(Command::ReadNotify, 6, 1, sid, 7));
        client.write_all(&bytes_of(&read)).await.unwrap();
        let error = next_of(&mut client, &mut buf, Command::Error).await;
        assert_eq!(&error.payload[0..2], &[0, 15], "the echoed READ_NOTIFY");
        assert_eq!(
            &error.payload[8..12],
            &sid.to_be_bytes(),
            "with the client's sid"
        );
    }

    /// A server that answers every search and then streams 5 MB monitor
    /// updates for cid 1 as fast as it may.
    async fn flooding_server() -> SocketAddrV4 {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let udp_addr = answering_searches(tcp.local_addr().unwrap().port()).await;
        tokio::spawn(async move {
            let (mut s, _) = tcp.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = s.read(&mut buf).await;
            let created = Message::new(Header::new(Command::CreateChan, 6, 1, 1, 99));
            s.write_all(&bytes_of(&created)).await.unwrap();
            let update = Message::with_payload(
                Header::new(Command::EventAdd, 6, 25, 1, 7),
                &vec![0u8; 5_000_000],
            );
            let update = bytes_of(&update);
            while s.write_all(&update).await.is_ok() {}
        });
        udp_addr
    }

    /// A server that creates channel 1, writes `updates` 1 MB updates to
    /// it without reading anything, and then reads everything; the
    /// returned receiver gets the number of bytes it read.
    async fn server_busy_writing(updates: usize) -> (SocketAddrV4, mpsc::UnboundedReceiver<usize>) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let udp_addr = answering_searches(tcp.local_addr().unwrap().port()).await;
        let (read_tx, read_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut s, _) = tcp.accept().await.unwrap();
            let mut buf = BytesMut::new();
            next_of(&mut s, &mut buf, Command::CreateChan).await;
            let created = Message::new(Header::new(Command::CreateChan, 6, 1, 1, 99));
            s.write_all(&bytes_of(&created)).await.unwrap();
            let update = Message::with_payload(
                Header::new(Command::EventAdd, 6, 25, 1, 7),
                &vec![0u8; 1_000_000],
            );
            let update = bytes_of(&update);
            for _ in 0..updates {
                s.write_all(&update).await.unwrap();
            }
            let mut chunk = vec![0u8; 1 << 16];
            while let Ok(n) = s.read(&mut chunk).await {
                if n == 0 || read_tx.send(n).is_err() {
                    break;
                }
            }
        });
        (udp_addr, read_rx)
    }

    // A server that reads only after it has written (as rsrv does while its
    // send queue is full) fills its link's queue. The session must go on
    // passing that server's updates to the client meanwhile, or the server
    // never gets to reading, and both wait for ever.
    #[tokio::test]
    async fn requests_to_a_server_busy_writing_do_not_stall_its_updates() {
        let (search_addr, mut server_read) = server_busy_writing(40).await;
        let client = shim_session(search_addr).await;
        let (mut reading, mut writing) = client.into_split();
        open_channel_1(&mut writing).await;
        let mut buf = BytesMut::new();
        let mut first = Vec::new();
        loop {
            let n = tokio::time::timeout(Duration::from_secs(3), reading.read_buf(&mut buf))
                .await
                .expect("the channel within 3 s")
                .unwrap();
            assert!(n > 0);
            let mut needed = 0;
            let m = wire::decode(&mut buf, 1 << 24, &mut needed).unwrap();
            if let Some(m) = m.filter(|m| m.header.command() == Ok(Command::CreateChan)) {
                first.push(m.header.p2);
                break;
            }
        }
        // 24 MB of writes: more than the link's queue and the sockets on the
        // way to a server that does not read.
        let write = bytes_of(&Message::with_payload(
            Header::new(Command::Write, 6, 1, first[0], 1),
            &vec![0u8; 64_000],
        ));
        let to_read = 40_000_000 - buf.len();
        write_while_reading(writing, write, 384, &mut reading, to_read, &mut server_read).await;
    }

    // Relayed updates take the client's queue budget before the session
    // passes them on; the session's own ECHO reply must not wait for that
    // budget, or the session waits for itself forever.
    #[tokio::test]
    async fn echo_reply_does_not_stall_a_client_behind_large_updates() {
        let search_addr = flooding_server().await;
        let mut client = shim_session(search_addr).await;
        open_channel_1(&mut client).await;
        // Stop reading until every buffer on the way is full, then ask.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        client.write_all(&bytes_of(&wire::echo())).await.unwrap();
        read_at_least(&mut client, 100_000_000).await;
    }

    /// A server that creates channel 1, then writes the first
    /// `sent_first` bytes of `update` and waits for `rest`: `true` to
    /// write the rest, `false` to close the connection instead.
    async fn server_pausing_inside(
        update: Vec<u8>,
        sent_first: usize,
        rest: tokio::sync::oneshot::Receiver<bool>,
    ) -> SocketAddrV4 {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let udp_addr = answering_searches(tcp.local_addr().unwrap().port()).await;
        tokio::spawn(async move {
            let (mut s, _) = tcp.accept().await.unwrap();
            let mut buf = BytesMut::new();
            next_of(&mut s, &mut buf, Command::CreateChan).await;
            let created = Message::new(Header::new(Command::CreateChan, 6, 1, 1, 99));
            s.write_all(&bytes_of(&created)).await.unwrap();
            s.write_all(&update[..sent_first]).await.unwrap();
            if rest.await == Ok(true) {
                s.write_all(&update[sent_first..]).await.unwrap();
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        udp_addr
    }

    // libca creates a channel on the circuit whose search found it, right
    // after the answer. The creation goes to the server that search found,
    // without searching again: here a second search would go unanswered,
    // as the relay caches nothing.
    #[tokio::test]
    async fn a_creation_goes_to_the_server_its_search_just_found() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let search_addr = answering_each_name_once(tcp.local_addr().unwrap().port()).await;
        tokio::spawn(async move {
            let (mut s, _) = tcp.accept().await.unwrap();
            let mut buf = BytesMut::new();
            let create = next_of(&mut s, &mut buf, Command::CreateChan).await;
            let reply = Message::new(Header::new(Command::CreateChan, 6, 1, create.header.p1, 9));
            s.write_all(&bytes_of(&reply)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let ctx = context_caching_for_tests(
            search_addr,
            Duration::from_secs(1),
            Duration::ZERO,
            crate::relay::limits::ChannelBudget::new(10),
        );
        let mut client = session_of(ctx).await;
        client
            .write_all(&bytes_of(&wire::client_version(0, 13)))
            .await
            .unwrap();
        let search = Message::with_name(Header::new(Command::Search, 10, 13, 1, 1), b"X");
        client.write_all(&bytes_of(&search)).await.unwrap();
        let mut buf = BytesMut::new();
        let found = next_of(&mut client, &mut buf, Command::Search).await;
        assert_eq!(found.header.p2, 1);
        let create = Message::with_name(Header::new(Command::CreateChan, 0, 0, 1, 13), b"X");
        client.write_all(&bytes_of(&create)).await.unwrap();
        let created = next_message(&mut client, &mut buf).await;
        assert_eq!(
            created.header.command(),
            Ok(Command::CreateChan),
            "the channel is created, not refused"
        );
        assert_eq!(created.header.p1, 1);
    }

    /// Sends a client's VERSION and the creation of channel 1 ("X").
    async fn open_channel_1(client: &mut (impl AsyncWrite + Unpin)) {
        client
            .write_all(&bytes_of(&wire::client_version(0, 13)))
            .await
            .unwrap();
        let create = Message::with_name(Header::new(Command::CreateChan, 0, 0, 1, 13), b"X");
        client.write_all(&bytes_of(&create)).await.unwrap();
    }

    /// A client of the shim with channel 1 created; returns the sid the
    /// shim gave it and what the client read beyond the creation's answer.
    async fn client_with_channel(search_addr: SocketAddrV4) -> (TcpStream, u32, BytesMut) {
        let mut client = shim_session(search_addr).await;
        open_channel_1(&mut client).await;
        let mut buf = BytesMut::new();
        let created = next_of(&mut client, &mut buf, Command::CreateChan).await;
        (client, created.header.p2, buf)
    }

    /// Reads into `buf` until it holds `len` bytes, each read within 3 s.
    async fn read_into(client: &mut TcpStream, buf: &mut BytesMut, len: usize) {
        while buf.len() < len {
            let n = tokio::time::timeout(Duration::from_secs(3), client.read_buf(buf))
                .await
                .unwrap_or_else(|_| panic!("{} of {len} bytes within 3 s", buf.len()))
                .unwrap();
            assert!(n > 0, "connection closed after {} bytes", buf.len());
        }
    }

    fn large_update() -> Vec<u8> {
        let payload: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        bytes_of(&Message::with_payload(
            Header::new(Command::EventAdd, 6, 500_000, 1, 7),
            &payload,
        ))
    }

    // A large update is not held whole: the client gets its first bytes
    // while the server has not yet sent the rest, and gets it unchanged.
    #[tokio::test]
    async fn a_large_update_reaches_the_client_while_the_server_still_sends_it() {
        let update = large_update();
        let (rest_tx, rest_rx) = tokio::sync::oneshot::channel();
        let search_addr = server_pausing_inside(update.clone(), 1_000_000, rest_rx).await;
        let (mut client, _, mut got) = client_with_channel(search_addr).await;
        read_into(&mut client, &mut got, 1_000_000).await;
        assert_eq!(&got[..], &update[..got.len()]);
        rest_tx.send(true).unwrap();
        read_into(&mut client, &mut got, update.len()).await;
        assert!(got[..] == update[..], "the update passes unchanged");
    }

    // What a client got of a message cut short cannot be taken back: its
    // connection closes, rather than go on from the middle of a message.
    #[tokio::test]
    async fn a_server_lost_inside_a_large_update_closes_the_client_connection() {
        let (rest_tx, rest_rx) = tokio::sync::oneshot::channel();
        let search_addr = server_pausing_inside(large_update(), 1_000_000, rest_rx).await;
        let (mut client, _, mut got) = client_with_channel(search_addr).await;
        read_into(&mut client, &mut got, 1_000_000).await;
        rest_tx.send(false).unwrap();
        loop {
            let read = tokio::time::timeout(Duration::from_secs(3), client.read_buf(&mut got))
                .await
                .expect("the connection closed within 3 s");
            if matches!(read, Ok(0) | Err(_)) {
                break;
            }
        }
        assert_eq!(got.len(), 1_000_000, "nothing after the cut");
    }
}
