//! The shim's side of one PVA client connection: what is particular to
//! PVA on top of the session core (`crate::session`).
//!
//! Towards the client the shim is a PVA server and name server: it greets
//! (SET_BYTE_ORDER, CONNECTION_VALIDATION offering "anonymous" and "ca"),
//! answers ECHO, and answers SEARCH with SEARCH_RESPONSE. By default the
//! response has a zero address and port 0, which a pvxs client reads as "this
//! connection", so it creates its channels here whatever NAT did. Clients
//! that dial the port they are given (pvAccessCPP, Phoebus) search again,
//! and get the listen port (`reply_port`); `--advertise-port` puts the
//! externally visible port there always.
//!
//! Towards the servers it opens one connection per server that owns a
//! channel of this client, with the client's credentials. Ids: the client
//! chooses channel ids (cid) and request ids (ioid), which pass unchanged;
//! servers choose server channel ids (sid), which the shim replaces by its
//! own so channels on several servers share one client connection.
//! Client-to-server requests carry the sid first (`sid, ioid, ...`); server
//! responses carry only the ioid, and pass through untouched.
//!
//! Payloads pass through unchanged while a client connection has channels
//! on one server; once it spans several, type descriptions are re-emitted
//! in plain form so type-cache keys cannot collide (see `translate`).
//! A request is routed before it is read: one whose sid names no connected
//! channel is dropped without any type translation, which costs work.
//!
//! A channel the client destroys stays until its server confirms; the
//! confirmation goes back to the client with the client's sid. A server's
//! DESTROY_CHANNEL must name the channel by both its own sid and the cid.

use super::backend::{self, BackendConfig};
use super::frame;
use super::reply_port::ReplyPorts;
use super::translate::Translator;
use super::unanswered::{self, Unanswered, Verdict};
use super::wire::Direction;
use super::wire::{self, Command, Message, WireError};
use crate::relay::framing::FrameReader;
use crate::relay::listener::Reception;
use crate::relay::metrics::{Proto, Refusal, METRICS};
use crate::relay::outbox::{Frame, Outbox};
use crate::relay::upstream::{BackendLink, LinkError};
use crate::session::{
    self, Channel, ClientReader, Core, Events, LargeMessage, Route, SessionError, SessionSettings,
};
use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

/// The byte order the shim announces and uses.
pub const BIG_ENDIAN: bool = wire::HOST_BIG_ENDIAN;
/// The sid a server puts in a failed CREATE_CHANNEL response.
const NO_SID: u32 = 0xFFFF_FFFF;

pub struct PvaContext {
    pub session: SessionSettings,
    pub backend: BackendConfig,
    /// Port put in search responses; None means 0 ("this connection").
    pub advertise_port: Option<u16>,
}

/// How a PVA client broke the protocol.
#[derive(Debug)]
pub enum PvaFault {
    Malformed(WireError),
    /// A message the shim could not follow (a type-cache key the client
    /// never defined, or a limit).
    Untranslatable(WireError),
}

impl fmt::Display for PvaFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PvaFault::Malformed(e) => write!(f, "{e}"),
            PvaFault::Untranslatable(e) => write!(f, "cannot follow a client message: {e}"),
        }
    }
}

impl std::error::Error for PvaFault {}

impl From<PvaFault> for SessionError {
    fn from(fault: PvaFault) -> Self {
        SessionError::Protocol(Box::new(fault))
    }
}

impl From<WireError> for SessionError {
    fn from(e: WireError) -> Self {
        PvaFault::Malformed(e).into()
    }
}

/// Serves one PVA client connection until it closes or misbehaves.
/// Says whether the client sent anything, for the shared port's choice of
/// greeting (`ports::greeting`).
pub async fn serve(stream: TcpStream, peer: SocketAddr, ctx: Arc<PvaContext>) -> Reception {
    session::serve::<PvaSession>(stream, peer, ctx).await
}

/// The server side of the handshake; returns the client's credentials as
/// sent, the type-cache state they set up, and the same credentials with a
/// plain type for servers that never saw the client's cache.
async fn validate(
    client: &Outbox,
    reader: &mut FrameReader<OwnedReadHalf, wire::Decoder>,
    within: std::time::Duration,
) -> Result<(wire::ClientValidation, Translator, Bytes), SessionError> {
    client
        .send_control(frame(&wire::set_byte_order(
            Direction::FromServer,
            BIG_ENDIAN,
        )))
        .await?;
    client
        .send_control(frame(&wire::server_validation(BIG_ENDIAN)))
        .await?;
    let answer = tokio::time::timeout(within, async {
        loop {
            match reader.next().await.map_err(SessionError::Read)? {
                None => return Err(SessionError::ClientGone),
                Some(m)
                    if !m.header.is_control()
                        && m.header.command() == Ok(Command::ConnectionValidation) =>
                {
                    return Ok(m);
                }
                Some(_) => continue,
            }
        }
    })
    .await
    .map_err(|_| SessionError::NotValidated(within))??;
    let validation = wire::parse_client_validation(&answer)?;
    let mut translator = Translator::default();
    let plain_credentials = translator
        .credentials(&validation.credentials, answer.header.is_big_endian())
        .map_err(PvaFault::Untranslatable)?;
    client
        .send_control(frame(&wire::connection_validated_ok(BIG_ENDIAN)))
        .await?;
    Ok((validation, translator, plain_credentials))
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Waiter {
    Search {
        id: u32,
        sequence: u32,
        must_reply: bool,
    },
    Create {
        cid: u32,
    },
}

impl session::Waiter for Waiter {
    fn wants_prompt_answer(&self) -> bool {
        matches!(
            self,
            Waiter::Search {
                must_reply: true,
                ..
            }
        )
    }
}

/// What PVA adds to the session core for one client connection.
struct PvaSession {
    ctx: Arc<PvaContext>,
    /// INITs of operations a server may lack, waiting for its answer.
    unanswered: Unanswered,
    /// Which port "found" answers name.
    reply_ports: ReplyPorts,
    validation: wire::ClientValidation,
    plain_credentials: Bytes,
    translator: Translator,
}

impl session::Protocol for PvaSession {
    type Context = PvaContext;
    type Decoder = wire::Decoder;
    type Message = Message;
    type Waiter = Waiter;
    const PROTO: Proto = Proto::Pva;
    const RESERVED_SID: Option<u32> = Some(NO_SID);

    fn settings(ctx: &PvaContext) -> &SessionSettings {
        &ctx.session
    }

    fn decoder(ctx: &PvaContext) -> wire::Decoder {
        wire::Decoder::new(ctx.session.max_client_message, Direction::FromClient)
    }

    /// The client must validate within the hello deadline (5 s by default,
    /// pvAccessCPP's own limit).
    async fn greet(
        ctx: Arc<PvaContext>,
        client: &Outbox,
        reader: &mut ClientReader<wire::Decoder>,
        listen_port: u16,
    ) -> Result<Self, SessionError> {
        let within = ctx.session.deadlines.hello;
        let (validation, translator, plain_credentials) = validate(client, reader, within).await?;
        Ok(PvaSession {
            reply_ports: ReplyPorts::new(listen_port, ctx.advertise_port),
            ctx,
            unanswered: Unanswered::default(),
            validation,
            plain_credentials,
            translator,
        })
    }

    async fn on_client(
        &mut self,
        core: &mut Core<Self>,
        message: Message,
    ) -> Result<(), SessionError> {
        if message.header.is_control() {
            return Ok(());
        }
        let Ok(command) = message.header.command() else {
            debug!(cmd = message.header.command, "unknown command ignored");
            return Ok(());
        };
        match command {
            Command::Echo => {
                let mut reply = message.clone();
                reply.header.flags |= wire::FLAG_FROM_SERVER;
                core.to_client(frame(&reply)).await?;
            }
            Command::Search => self.on_search(core, &message).await?,
            Command::CreateChannel => self.on_create(core, &message).await?,
            Command::DestroyChannel => self.on_destroy(core, &message),
            command if command.is_channel_request() => {
                self.on_request(core, command, message).await?
            }
            other => debug!(cmd = ?other, "client message not relayed"),
        }
        Ok(())
    }

    fn on_server(
        &mut self,
        core: &mut Core<Self>,
        server: SocketAddrV4,
        message: Message,
    ) -> Result<Option<Frame>, SessionError> {
        if message.header.is_control() {
            return Ok(None);
        }
        let Ok(command) = message.header.command() else {
            return Ok(None);
        };
        let relayed = match command {
            Command::CreateChannel => self.on_created(core, server, message),
            Command::DestroyChannel => self.on_destroyed(core, server, message),
            command if command.is_ioid_response() => self.on_response(core, server, message),
            Command::Message => Some(message),
            // ECHO answers the shim's own keepalive.
            _ => None,
        };
        Ok(relayed.as_ref().map(frame))
    }

    /// Data answers whose values hold no type descriptions pass unchanged
    /// (see `Translator::passes_unread`); the rest is read whole.
    fn on_server_head(
        &mut self,
        _core: &mut Core<Self>,
        server: SocketAddrV4,
        head: &Message,
    ) -> Result<LargeMessage, SessionError> {
        let Ok(command) = head.header.command() else {
            return Ok(LargeMessage::Whole);
        };
        if !command.is_ioid_response() {
            return Ok(LargeMessage::Whole);
        }
        let mut r = wire::Reader::new(&head.payload, head.header.is_big_endian());
        let (ioid, subcmd) = (r.u32("ioid"), r.u8("subcommand"));
        if r.finish().is_err() {
            return Ok(LargeMessage::Whole);
        }
        // As `on_response`: an answer the shim already gave is dropped.
        // (A second `answered` for the same answer, there, says the same.)
        if !self.unanswered.answered(ioid) {
            return Ok(LargeMessage::Drop);
        }
        Ok(
            if self.translator.passes_unread(server, command, ioid, subcmd) {
                LargeMessage::Stream
            } else {
                LargeMessage::Whole
            },
        )
    }

    async fn settle(
        &mut self,
        core: &mut Core<Self>,
        waiter: Waiter,
        name: &Bytes,
        server: Option<SocketAddrV4>,
    ) -> Result<(), SessionError> {
        match waiter {
            Waiter::Search {
                id,
                sequence,
                must_reply,
            } => {
                let ports = match server {
                    Some(_) => self.found_ports(core, name),
                    None if must_reply => vec![0],
                    None => vec![],
                };
                for port in ports {
                    let found = server.is_some();
                    let reply = wire::search_response(BIG_ENDIAN, sequence, port, found, &[id]);
                    core.to_client(frame(&reply)).await?;
                }
            }
            Waiter::Create { cid } => match server {
                Some(server) if core.channels.is_resolving(cid) => {
                    let mut w = wire::Writer::new(BIG_ENDIAN);
                    w.u16(1).u32(cid).string(name);
                    let request = w.into_message(Command::CreateChannel, Direction::FromClient);
                    core.create_on(self, server, cid, frame(&request));
                }
                Some(_) => {}
                None => {
                    if core.channels.not_found(cid) {
                        let failed = create_failed(cid, b"channel not found");
                        core.to_client(frame(&failed)).await?;
                    }
                }
            },
        }
        Ok(())
    }

    fn open_link(
        &mut self,
        server: SocketAddrV4,
        id: u64,
        client: Outbox,
        events: Events<Message>,
    ) -> BackendLink {
        // From the second server connection on, whether the first is still
        // open or was replaced (an IOC restart): the client's type cache no
        // longer matches any one server's.
        if id > 1 && !self.translator.active {
            debug!(%server, "client connection spans several server connections: translating type descriptions");
            self.translator.active = true;
        }
        let mut validation = self.validation.clone();
        if self.translator.active {
            validation.credentials = self.plain_credentials.clone();
        }
        backend::open(server, id, &self.ctx.backend, validation, client, events)
    }

    fn lost_channel_notice(&self, cid: u32, channel: Channel) -> Option<Frame> {
        let notice = match channel {
            // For a channel being destroyed, this is the confirmation.
            Channel::Connected(c) | Channel::Destroying(c) => {
                let mut w = wire::Writer::new(BIG_ENDIAN);
                w.u32(c.sid).u32(cid);
                w.into_message(Command::DestroyChannel, Direction::FromServer)
            }
            Channel::Creating { .. } => create_failed(cid, b"server connection lost"),
            Channel::Abandoned { .. } | Channel::Resolving => return None,
        };
        Some(frame(&notice))
    }

    fn forget_server(&mut self, server: SocketAddrV4) {
        self.translator.forget_server(server);
        self.unanswered.forget_server(server);
    }

    fn next_due(&self) -> Option<Instant> {
        self.unanswered.next_due()
    }

    /// INITs their servers did not answer get the shim's error reply.
    async fn on_due(&mut self, core: &mut Core<Self>) -> Result<(), SessionError> {
        for (ioid, command) in self.unanswered.take_overdue(Instant::now()) {
            warn!(
                ioid,
                ?command,
                "server did not answer the request's INIT; answering the client with an error"
            );
            let error = unanswered::init_error(command, ioid, BIG_ENDIAN);
            core.to_client(frame(&error)).await?;
        }
        Ok(())
    }
}

impl PvaSession {
    async fn on_search(
        &mut self,
        core: &mut Core<Self>,
        message: &Message,
    ) -> Result<(), SessionError> {
        let search = wire::parse_search(message)?;
        let must_reply = search.flags & wire::SEARCH_MUST_REPLY != 0;
        for (id, name) in search.names {
            if name.is_empty() {
                continue;
            }
            let waiter = Waiter::Search {
                id,
                sequence: search.sequence,
                must_reply,
            };
            core.await_name(self, name, waiter).await?;
        }
        Ok(())
    }

    async fn on_create(
        &mut self,
        core: &mut Core<Self>,
        message: &Message,
    ) -> Result<(), SessionError> {
        let mut r = wire::Reader::new(&message.payload, message.header.is_big_endian());
        let count = r.u16("channel count");
        let mut requests = Vec::new();
        for _ in 0..count {
            let cid = r.u32("cid");
            let name = r.string("channel name");
            r.finish()?;
            requests.push((cid, message.payload.slice_ref(name)));
        }
        for (cid, name) in requests {
            if name.is_empty() || !core.channels.begin_create(cid)? {
                continue;
            }
            self.reply_ports.created_here(&name);
            core.await_name(self, name, Waiter::Create { cid }).await?;
        }
        Ok(())
    }

    /// sid, cid: the client is done with the channel. It stays (its sid
    /// taken, requests dropped) until the server confirms. A channel not
    /// created yet has no sid the client knows, so the cid alone names it.
    fn on_destroy(&mut self, core: &mut Core<Self>, message: &Message) {
        let Some(route) = connected_route(core, message) else {
            let mut r = wire::Reader::new(&message.payload, message.header.is_big_endian());
            let (_, cid) = (r.u32("sid"), r.u32("cid"));
            if r.finish().is_ok() {
                core.channels.abandon(cid);
            }
            return;
        };
        core.channels.destroying(route);
        self.translator.forget_channel(route.connection.sid);
        forward(core, route, message.clone());
    }

    /// A request on a connected channel: GET, PUT, MONITOR and the others.
    async fn on_request(
        &mut self,
        core: &mut Core<Self>,
        command: Command,
        message: Message,
    ) -> Result<(), SessionError> {
        // Route first: a request for no channel costs no translation.
        let Some(route) = connected_route(core, &message) else {
            return Ok(());
        };
        let server = route.connection.server;
        // sid, ioid, subcommand
        let mut r = wire::Reader::new(&message.payload, message.header.is_big_endian());
        let (_, ioid, subcommand) = (r.u32("sid"), r.u32("ioid"), r.u8("subcommand"));
        if core.access.read_only && command.writes() {
            METRICS.refused(Refusal::WriteRefused);
            debug!(ioid, ?command, "write refused: read-only");
            let why = "write refused by nameshim --read-only";
            let refusal = wire::operation_error(command, ioid, subcommand, why, BIG_ENDIAN);
            return Ok(core.to_client(frame(&refusal)).await?);
        }
        if r.finish().is_ok() {
            if command == Command::DestroyRequest {
                self.unanswered.destroyed(ioid);
            }
            let verdict =
                self.unanswered
                    .on_request(server, command, ioid, subcommand, Instant::now());
            if verdict == Verdict::Refuse {
                let error = unanswered::init_error(command, ioid, BIG_ENDIAN);
                core.to_client(frame(&error)).await?;
                return Ok(());
            }
        }
        let message = self
            .translator
            .client_message(server, &message)
            .and_then(|payload| with_payload(message, payload))
            .map_err(PvaFault::Untranslatable)?;
        forward(core, route, message);
        Ok(())
    }

    /// The ports for a "found" answer, in order (see `reply_port`).
    fn found_ports(&mut self, core: &Core<Self>, name: &Bytes) -> Vec<u16> {
        let reply = self.reply_ports.found(name);
        if reply.warn {
            let listen = self.reply_ports.listen_port();
            warn!(
                peer = %core.peer,
                name = %String::from_utf8_lossy(name),
                "PVA client searched again for a name it was told is found on this connection, without creating it here: \
                 it dials the port in the answer (pvAccessCPP, Phoebus), port {listen}. \
                 If this port is published under another number, start nameshim with --advertise-port <that number>"
            );
        }
        std::iter::once(reply.port).chain(reply.then).collect()
    }

    /// cid, sid, status: the server's answer to a CREATE_CHANNEL.
    fn on_created(
        &mut self,
        core: &mut Core<Self>,
        server: SocketAddrV4,
        message: Message,
    ) -> Option<Message> {
        let mut r = wire::Reader::new(&message.payload, message.header.is_big_endian());
        let (cid, server_sid) = (r.u32("cid"), r.u32("sid"));
        r.finish().ok()?;
        if core.channels.is_abandoned_on(cid, server) {
            core.channels.forget(server, cid);
            if server_sid != NO_SID {
                let mut w = wire::Writer::new(BIG_ENDIAN);
                w.u32(server_sid).u32(cid);
                let destroy = w.into_message(Command::DestroyChannel, Direction::FromClient);
                core.control_to_server(server, frame(&destroy));
            }
            return None;
        }
        if !core.channels.is_creating_on(cid, server) {
            return None;
        }
        if server_sid == NO_SID {
            core.channels.forget(server, cid);
            return Some(message);
        }
        let sid = core.channels.connect(cid, server, server_sid)?;
        Some(with_u32_at(&message, 4, sid))
    }

    /// sid, cid: the server dropped the channel, or confirms the client's
    /// destroy. Both ids must name this server's channel.
    fn on_destroyed(
        &mut self,
        core: &mut Core<Self>,
        server: SocketAddrV4,
        message: Message,
    ) -> Option<Message> {
        let mut r = wire::Reader::new(&message.payload, message.header.is_big_endian());
        let (server_sid, cid) = (r.u32("sid"), r.u32("cid"));
        r.finish().ok()?;
        let sid = core.channels.forget_named(server, cid, server_sid)?;
        self.translator.forget_channel(sid);
        Some(with_u32_at(&message, 0, sid))
    }

    /// A response to an operation: passed on, with its types translated
    /// when they must be.
    fn on_response(
        &mut self,
        core: &mut Core<Self>,
        server: SocketAddrV4,
        message: Message,
    ) -> Option<Message> {
        let mut r = wire::Reader::new(&message.payload, message.header.is_big_endian());
        let ioid = r.u32("ioid");
        if r.finish().is_ok() && !self.unanswered.answered(ioid) {
            return None;
        }
        let translated = self
            .translator
            .server_message(server, &message)
            .and_then(|payload| with_payload(message, payload));
        match translated {
            Ok(message) => Some(message),
            Err(e) => {
                // The shim can no longer follow this server's types: drop
                // the connection, so its channels start afresh.
                warn!(%server, cause = %e, "cannot follow a server message; closing that server connection");
                core.close_link(server, LinkError::Protocol(e.to_string()));
                None
            }
        }
    }
}

/// The connected channel whose sid the client put first in `message`.
fn connected_route(core: &Core<PvaSession>, message: &Message) -> Option<Route> {
    let mut r = wire::Reader::new(&message.payload, message.header.is_big_endian());
    let sid = r.u32("sid");
    let route = r.finish().ok().and_then(|()| core.channels.route(sid));
    if route.is_none() {
        // pvxs clients destroy a channel the server already dropped.
        debug!(
            sid,
            cmd = message.header.command,
            "request for an unknown channel dropped"
        );
    }
    route
}

/// Forwards a request that starts with a sid to its channel's server,
/// with the server's own sid; the rest of the payload is not copied.
fn forward(core: &mut Core<PvaSession>, route: Route, message: Message) {
    let connection = route.connection;
    let big_endian = message.header.is_big_endian();
    let body = message.payload.slice(4..);
    let header = message.header;
    let rewritten = Frame::new(
        |head| {
            header.encode(head);
            if big_endian {
                head.put_u32(connection.server_sid)
            } else {
                head.put_u32_le(connection.server_sid)
            }
        },
        body,
    );
    core.send_to_server(connection.server, rewritten);
}

/// A failed CREATE_CHANNEL response: cid, no sid, an error status.
fn create_failed(cid: u32, why: &[u8]) -> Message {
    let mut w = wire::Writer::new(BIG_ENDIAN);
    w.u32(cid)
        .u32(NO_SID)
        .u8(wire::STATUS_ERROR)
        .string(why)
        .string(b"");
    w.into_message(Command::CreateChannel, Direction::FromServer)
}

/// The message with its payload replaced by `rewritten`, if any. A size
/// the header cannot hold is an error, never a truncated header.
fn with_payload(message: Message, rewritten: Option<Bytes>) -> Result<Message, WireError> {
    let Some(payload) = rewritten else {
        return Ok(message);
    };
    let mut header = message.header;
    header.size = u32::try_from(payload.len())
        .map_err(|_| WireError::Limit("a translated message over 4 GiB"))?;
    Ok(Message { header, payload })
}

/// A copy of a small message with the u32 at `offset` replaced.
fn with_u32_at(message: &Message, offset: usize, value: u32) -> Message {
    let mut payload = BytesMut::from(&message.payload[..]);
    let bytes = if message.header.is_big_endian() {
        value.to_be_bytes()
    } else {
        value.to_le_bytes()
    };
    if let Some(slot) = payload.get_mut(offset..offset + 4) {
        slot.copy_from_slice(&bytes);
    }
    Message {
        header: message.header,
        payload: payload.freeze(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pva::search;
    use crate::relay::discovery::SearchConfig;
    use crate::session::test_support::{read_at_least, write_while_reading};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, UdpSocket};
    use tokio::sync::mpsc;

    const WAIT: Duration = Duration::from_secs(2);

    /// One end of a PVA connection: sends messages, reads whole ones.
    struct Peer {
        stream: TcpStream,
        buf: BytesMut,
        decoder: wire::Decoder,
    }

    impl Peer {
        /// `direction`: what the direction flag of incoming messages says.
        fn new(stream: TcpStream, direction: Direction) -> Peer {
            Peer {
                stream,
                buf: BytesMut::new(),
                decoder: wire::Decoder::new(1 << 20, direction),
            }
        }

        async fn send(&mut self, m: &Message) {
            let mut out = BytesMut::new();
            m.encode(&mut out);
            self.stream.write_all(&out).await.unwrap();
        }

        /// The next application message; None on EOF or after `WAIT`.
        async fn next(&mut self) -> Option<Message> {
            loop {
                let mut needed = 0;
                match self.decoder.decode(&mut self.buf, &mut needed) {
                    Ok(Some(m)) if m.header.is_control() => continue,
                    Ok(Some(m)) => return Some(m),
                    Ok(None) => {}
                    Err(_) => return None,
                }
                let mut chunk = [0u8; 4096];
                match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                    _ => return None,
                }
            }
        }
    }

    fn u32s(m: &Message) -> (u32, u32) {
        let mut r = wire::Reader::new(&m.payload, false);
        (r.u32("a"), r.u32("b"))
    }

    /// Channels from this cid on are created after `SLOW_CREATE`.
    const SLOW_CIDS: u32 = 100;
    const SLOW_CREATE: Duration = Duration::from_millis(400);

    /// Answers every PVA search with `tcp_port`; returns the search address.
    async fn answering_searches(tcp_port: u16) -> SocketAddrV4 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(udp_addr) = udp.local_addr().unwrap() else {
            unreachable!()
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((len, from)) = udp.recv_from(&mut buf).await {
                for m in wire::decode_datagram(&buf[..len]) {
                    let Ok(search) = wire::parse_search(&m) else {
                        continue;
                    };
                    let mut w = wire::Writer::new(false);
                    w.bytes(&[7; 12])
                        .u32(search.sequence)
                        .bytes(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 127, 0, 0, 1])
                        .u16(tcp_port)
                        .string(b"tcp")
                        .u8(1)
                        .u16(search.names.len() as u16);
                    for (id, _) in &search.names {
                        w.u32(*id);
                    }
                    let mut out = BytesMut::new();
                    w.into_message(Command::SearchResponse, Direction::FromServer)
                        .encode(&mut out);
                    let _ = udp.send_to(&out, from).await;
                }
            }
        });
        udp_addr
    }

    /// A PVA server that answers every search, validates the shim's
    /// connection, creates one channel, and then writes `updates` MONITOR
    /// updates of 1 MiB each (for ever if None) before it reads anything
    /// more; then it reads everything. The receiver gets the number of
    /// bytes it read.
    async fn flooding_server(
        updates: Option<usize>,
    ) -> (SocketAddrV4, mpsc::UnboundedReceiver<usize>) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let udp_addr = answering_searches(tcp.local_addr().unwrap().port()).await;
        let (read_tx, read_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (s, _) = tcp.accept().await.unwrap();
            let mut shim = Peer::new(s, Direction::FromClient);
            shim.send(&wire::set_byte_order(Direction::FromServer, false))
                .await;
            shim.send(&wire::server_validation(false)).await;
            let cid = loop {
                let m = shim.next().await.expect("the shim's requests");
                match m.header.command() {
                    Ok(Command::ConnectionValidation) => {
                        shim.send(&wire::connection_validated_ok(false)).await
                    }
                    Ok(Command::CreateChannel) => {
                        let mut r = wire::Reader::new(&m.payload, false);
                        r.u16("count");
                        break r.u32("cid");
                    }
                    _ => {}
                }
            };
            let mut w = wire::Writer::new(false);
            w.u32(cid).u32(1000 + cid).u8(wire::STATUS_OK);
            shim.send(&w.into_message(Command::CreateChannel, Direction::FromServer))
                .await;
            // Each update fills a whole queue of the test's shim (1 MiB):
            // header, ioid, subcommand and the rest.
            let mut w = wire::Writer::new(false);
            w.u32(1).u8(0).bytes(&vec![0u8; (1 << 20) - 13]);
            let mut update = BytesMut::new();
            w.into_message(Command::Monitor, Direction::FromServer)
                .encode(&mut update);
            for _ in 0..updates.unwrap_or(usize::MAX) {
                if shim.stream.write_all(&update).await.is_err() {
                    return;
                }
            }
            let mut chunk = vec![0u8; 1 << 16];
            while let Ok(n) = shim.stream.read(&mut chunk).await {
                if n == 0 || read_tx.send(n).is_err() {
                    break;
                }
            }
        });
        (udp_addr, read_rx)
    }

    // A server that reads only after it has written fills its link's
    // queue. The session must go on passing that server's updates to the
    // client meanwhile, or the server never gets to reading, and both wait
    // for ever. (The CA session's test of the same rule: the core runs
    // flow control for both.)
    #[tokio::test]
    async fn requests_to_a_server_busy_writing_do_not_stall_its_updates() {
        let (search_addr, mut server_read) = flooding_server(Some(40)).await;
        let mut client = client_of_shim(search_addr).await;
        let sid = create(&mut client, 1).await;
        // Updates pass as they arrive, so the first may have begun in
        // what the test client read with the channel's creation.
        let read_ahead = client.buf.len();
        let (mut reading, writing) = client.stream.into_split();
        // 24 MB of PUTs: more than the link's queue and the sockets on the
        // way to a server that does not read.
        let mut w = wire::Writer::new(false);
        w.u32(sid).u32(5).u8(0).bytes(&vec![0u8; 64_000]);
        let mut put = BytesMut::new();
        w.into_message(Command::Put, Direction::FromClient)
            .encode(&mut put);
        let put = put.to_vec();
        let updates = (40 << 20) - read_ahead;
        write_while_reading(writing, put, 384, &mut reading, updates, &mut server_read).await;
    }

    // Relayed updates take the client's queue budget before the session
    // passes them on; the session's own ECHO reply must not wait for that
    // budget, or the session waits for itself forever. (The same rule as
    // the CA session's test: the core runs flow control for both.)
    #[tokio::test]
    async fn echo_reply_does_not_stall_a_client_behind_large_updates() {
        let (search_addr, _) = flooding_server(None).await;
        let mut client = client_of_shim(search_addr).await;
        create(&mut client, 1).await;
        // Stop reading until every buffer on the way is full, then ask.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        client
            .send(&wire::Writer::new(false).into_message(Command::Echo, Direction::FromClient))
            .await;
        let (mut reading, _writing) = client.stream.into_split();
        read_at_least(&mut reading, 100_000_000).await;
    }

    /// Reads until `client` holds `len` bytes past what it decoded, each
    /// read within 3 s; returns them.
    async fn read_raw(client: &mut Peer, len: usize) -> BytesMut {
        while client.buf.len() < len {
            let n = tokio::time::timeout(WAIT, client.stream.read_buf(&mut client.buf))
                .await
                .unwrap_or_else(|_| panic!("{} of {len} bytes in time", client.buf.len()))
                .unwrap();
            assert!(n > 0, "connection closed");
        }
        client.buf.split_to(len)
    }

    fn encoded(m: &Message) -> BytesMut {
        let mut out = BytesMut::new();
        m.encode(&mut out);
        out
    }

    // A segmented update (as pvAccessCPP sends large values) passes as
    // segments, each as it arrives, never joined; a control message
    // between segments is for the shim alone.
    #[tokio::test]
    async fn segments_pass_to_the_client_as_they_arrive() {
        let (search_addr, _got, inject) = fake_server().await;
        let mut client = client_of_shim(search_addr).await;
        create(&mut client, 1).await;
        let mut w = wire::Writer::new(false);
        w.u32(1).u8(0).bytes(&vec![5u8; 200_000]);
        let mut first = w.into_message(Command::Monitor, Direction::FromServer);
        first.header.flags |= wire::FLAG_SEGMENT_FIRST;
        let mut w = wire::Writer::new(false);
        w.bytes(&vec![6u8; 100_000]);
        let mut last = w.into_message(Command::Monitor, Direction::FromServer);
        last.header.flags |= wire::FLAG_SEGMENT_LAST;

        inject.send(first.clone()).unwrap();
        let got = read_raw(&mut client, encoded(&first).len()).await;
        assert!(got == encoded(&first), "the first segment, unchanged");
        inject
            .send(wire::set_byte_order(Direction::FromServer, false))
            .unwrap();
        inject.send(last.clone()).unwrap();
        let got = read_raw(&mut client, encoded(&last).len()).await;
        assert!(got == encoded(&last), "the last segment, unchanged");
        assert!(echo_round_trip(&mut client).await.is_some());
    }

    /// A PVA server on the loopback: answers every search, accepts one
    /// connection, creates every channel with server sid 1000 + cid (after
    /// `SLOW_CREATE` from cid `SLOW_CIDS` on),
    /// confirms each DESTROY_CHANNEL, and reports what it receives.
    /// Messages sent on the returned sender go to the shim.
    async fn fake_server() -> (
        SocketAddrV4,
        mpsc::UnboundedReceiver<Message>,
        mpsc::UnboundedSender<Message>,
    ) {
        fake_server_silent_on_first(0).await
    }

    /// [`fake_server`], holding its first `silent` connections open
    /// without a word, as if they were never accepted.
    async fn fake_server_silent_on_first(
        silent: usize,
    ) -> (
        SocketAddrV4,
        mpsc::UnboundedReceiver<Message>,
        mpsc::UnboundedSender<Message>,
    ) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_port = tcp.local_addr().unwrap().port();
        let udp_addr = answering_searches(tcp_port).await;
        let (got_tx, got_rx) = mpsc::unbounded_channel();
        let (inject_tx, mut inject_rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..silent {
                held.push(tcp.accept().await.unwrap());
            }
            let (s, _) = tcp.accept().await.unwrap();
            let mut shim = Peer::new(s, Direction::FromClient);
            shim.send(&wire::set_byte_order(Direction::FromServer, false))
                .await;
            shim.send(&wire::server_validation(false)).await;
            loop {
                tokio::select! {
                    m = shim.next() => {
                        let Some(m) = m else { continue };
                        let reply = match m.header.command() {
                            Ok(Command::ConnectionValidation) => {
                                Some(wire::connection_validated_ok(false))
                            }
                            Ok(Command::CreateChannel) => {
                                let mut r = wire::Reader::new(&m.payload, false);
                                r.u16("count");
                                let cid = r.u32("cid");
                                if cid >= SLOW_CIDS {
                                    tokio::time::sleep(SLOW_CREATE).await;
                                }
                                let mut w = wire::Writer::new(false);
                                w.u32(cid).u32(1000 + cid).u8(wire::STATUS_OK);
                                Some(w.into_message(Command::CreateChannel, Direction::FromServer))
                            }
                            Ok(Command::DestroyChannel) => {
                                let mut w = wire::Writer::new(false);
                                w.bytes(&m.payload);
                                Some(w.into_message(Command::DestroyChannel, Direction::FromServer))
                            }
                            _ => None,
                        };
                        if let Some(reply) = reply {
                            shim.send(&reply).await;
                        }
                        let _ = got_tx.send(m);
                    }
                    Some(m) = inject_rx.recv() => {
                        // Messages injected together arrive in one write.
                        let mut out = BytesMut::new();
                        m.encode(&mut out);
                        while let Ok(m) = inject_rx.try_recv() {
                            m.encode(&mut out);
                        }
                        shim.stream.write_all(&out).await.unwrap();
                    }
                }
            }
        });
        (udp_addr, got_rx, inject_tx)
    }

    /// A shim port whose one session searches `search_addr` for `timeout`.
    async fn shim_port(search_addr: SocketAddrV4, timeout: Duration) -> SocketAddr {
        let ctx = Arc::new(PvaContext {
            session: SessionSettings {
                resolver: search::start(SearchConfig {
                    targets: vec![search_addr],
                    timeout,
                    cache_ttl: Duration::from_secs(5),
                    max_pending: 100,
                    max_pending_per_address: 100,
                    max_cached: 100,
                    max_rate_per_address: 1_000_000,
                    max_rate: 1_000_000,
                })
                .unwrap(),
                max_client_message: 1 << 20,
                queue_bytes: 1 << 20,
                deadlines: crate::relay::limits::ClientDeadlines::default(),
                channels_in_all: crate::relay::limits::ChannelBudget::new(1000),
                max_channels: 100,
                max_searches: 100,
                access: Default::default(),
            },
            backend: BackendConfig {
                max_server_message: 1 << 20,
                queue_bytes: 1 << 20,
                connect_timeout: WAIT,
                big_endian: BIG_ENDIAN,
                source: crate::relay::upstream::DEFAULT_SOURCE,
            },
            advertise_port: None,
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, p) = front.accept().await.unwrap();
            serve(s, p, ctx).await;
        });
        addr
    }

    /// A shim session on the loopback searching `search_addr`, and a
    /// validated client connected to it.
    async fn client_of_shim(search_addr: SocketAddrV4) -> Peer {
        let addr = shim_port(search_addr, Duration::from_secs(1)).await;
        let mut client = Peer::new(
            TcpStream::connect(addr).await.unwrap(),
            Direction::FromServer,
        );
        let greeting = client.next().await.unwrap();
        assert_eq!(greeting.header.command(), Ok(Command::ConnectionValidation));
        client
            .send(&wire::client_validation(
                false,
                &wire::ClientValidation {
                    buffer_size: 0x10000,
                    registry_size: 0x7FFF,
                    qos: 0,
                    method: Bytes::from_static(b"anonymous"),
                    credentials: Bytes::from_static(&[0xFF]),
                },
            ))
            .await;
        let validated = client.next().await.unwrap();
        assert_eq!(validated.header.command(), Ok(Command::ConnectionValidated));
        client
    }

    /// Creates channel `cid`; returns the sid the shim gave it.
    async fn create(client: &mut Peer, cid: u32) -> u32 {
        let mut w = wire::Writer::new(false);
        w.u16(1).u32(cid).string(b"pv");
        client
            .send(&w.into_message(Command::CreateChannel, Direction::FromClient))
            .await;
        let created = client.next().await.unwrap();
        assert_eq!(created.header.command(), Ok(Command::CreateChannel));
        let (got_cid, sid) = u32s(&created);
        assert_eq!(got_cid, cid);
        sid
    }

    fn two_u32(command: Command, direction: Direction, a: u32, b: u32) -> Message {
        let mut w = wire::Writer::new(false);
        w.u32(a).u32(b);
        w.into_message(command, direction)
    }

    async fn echo_round_trip(client: &mut Peer) -> Option<Message> {
        client
            .send(&wire::Writer::new(false).into_message(Command::Echo, Direction::FromClient))
            .await;
        client.next().await
    }

    // A PVA server speaks first. A connection on which it says nothing is
    // one it never accepted (a full listen backlog leaves such connections
    // open on the shim's side only): the shim connects again, and the
    // client's channel is created rather than failed after the handshake
    // timeout.
    #[tokio::test]
    async fn a_server_connection_that_brings_no_greeting_is_made_again() {
        let (search_addr, _got, _inject) = fake_server_silent_on_first(1).await;
        let mut client = client_of_shim(search_addr).await;
        let mut w = wire::Writer::new(false);
        w.u16(1).u32(5).string(b"pv");
        client
            .send(&w.into_message(Command::CreateChannel, Direction::FromClient))
            .await;
        let created = tokio::time::timeout(Duration::from_millis(4500), async {
            loop {
                if let Some(m) = client.next().await {
                    return m;
                }
            }
        })
        .await
        .expect("an answer to the creation before the handshake timeout");
        assert_eq!(created.header.command(), Ok(Command::CreateChannel));
        let mut r = wire::Reader::new(&created.payload, false);
        assert_eq!(r.u32("cid"), 5);
        r.u32("the shim's sid");
        assert_eq!(r.u8("status"), wire::STATUS_OK, "created, not failed");
    }

    // Translation costs work, and a request for no channel goes nowhere:
    // it must be dropped before any type is read. A pvRequest naming a key
    // never defined used to close the client's connection.
    #[tokio::test]
    async fn requests_for_unknown_channels_are_dropped_before_translation() {
        let nobody: SocketAddrV4 = "127.0.0.1:9".parse().unwrap();
        let mut client = client_of_shim(nobody).await;
        let get_init = [77, 0, 0, 0, 1, 0, 0, 0, 0x08, 0xFE, 9, 0, 0xFF];
        let mut w = wire::Writer::new(false);
        w.bytes(&get_init);
        client
            .send(&w.into_message(Command::Get, Direction::FromClient))
            .await;
        let echo = echo_round_trip(&mut client).await;
        assert_eq!(
            echo.map(|m| m.header.command()),
            Some(Ok(Command::Echo)),
            "the connection stays open"
        );
    }

    // pvxs and pvAccessCPP clients wait for the server's DESTROY_CHANNEL
    // confirmation; it comes back with the sid the client knows.
    #[tokio::test]
    async fn client_destroy_channel_is_confirmed_with_the_clients_sid() {
        let (search_addr, mut server_got, _inject) = fake_server().await;
        let mut client = client_of_shim(search_addr).await;
        let sid = create(&mut client, 7).await;
        client
            .send(&two_u32(
                Command::DestroyChannel,
                Direction::FromClient,
                sid,
                7,
            ))
            .await;
        let confirmed = client.next().await.expect("a confirmation");
        assert_eq!(confirmed.header.command(), Ok(Command::DestroyChannel));
        assert_eq!(u32s(&confirmed), (sid, 7));
        let mut destroyed_on_server = None;
        while let Ok(m) = server_got.try_recv() {
            if m.header.command() == Ok(Command::DestroyChannel) {
                destroyed_on_server = Some(u32s(&m));
            }
        }
        assert_eq!(destroyed_on_server, Some((1007, 7)));
    }

    // A client that gives a channel up before the server's CREATE_CHANNEL
    // answer arrives: the channel the server made must be destroyed there,
    // and the answer must not reach the client.
    #[tokio::test]
    async fn a_channel_abandoned_while_its_create_is_pending_is_destroyed_on_the_server() {
        let (search_addr, mut server_got, _inject) = fake_server().await;
        let mut client = client_of_shim(search_addr).await;
        // The name is now known, so the next CREATE goes out at once; the
        // server answers it only after SLOW_CREATE.
        create(&mut client, 1).await;
        let mut w = wire::Writer::new(false);
        w.u16(1).u32(SLOW_CIDS).string(b"pv");
        client
            .send(&w.into_message(Command::CreateChannel, Direction::FromClient))
            .await;
        tokio::time::sleep(SLOW_CREATE / 2).await;
        client
            .send(&two_u32(
                Command::DestroyChannel,
                Direction::FromClient,
                0,
                SLOW_CIDS,
            ))
            .await;
        let destroyed = tokio::time::timeout(WAIT, async {
            while let Some(m) = server_got.recv().await {
                if m.header.command() == Ok(Command::DestroyChannel) {
                    return Some(u32s(&m));
                }
            }
            None
        })
        .await;
        assert_eq!(
            destroyed,
            Ok(Some((1000 + SLOW_CIDS, SLOW_CIDS))),
            "destroyed on the server"
        );
        let next = echo_round_trip(&mut client).await;
        assert_eq!(
            next.map(|m| m.header.command()),
            Some(Ok(Command::Echo)),
            "no CREATE_CHANNEL answer for the abandoned channel"
        );
    }

    // Once the shim has decided to close a server connection (here: a type
    // it cannot follow), what that server sent after it must not reach
    // the client; the client hears only that its channel is gone.
    #[tokio::test]
    async fn messages_queued_from_a_server_being_closed_do_not_reach_the_client() {
        let (search_addr, _server_got, inject) = fake_server().await;
        let mut client = client_of_shim(search_addr).await;
        let sid = create(&mut client, 7).await;
        // GET_FIELD answer: ioid, status OK, then a type-cache reference
        // (0xFE, key 99) that was never defined.
        let mut w = wire::Writer::new(false);
        w.u32(5).u8(wire::STATUS_OK).bytes(&[0xFE, 99, 0]);
        inject
            .send(w.into_message(Command::GetField, Direction::FromServer))
            .unwrap();
        let mut w = wire::Writer::new(false);
        w.u32(5).u8(0).string(b"after the decision to close");
        inject
            .send(w.into_message(Command::Message, Direction::FromServer))
            .unwrap();
        let first = client.next().await.expect("a destroy notice");
        assert_eq!(first.header.command(), Ok(Command::DestroyChannel));
        assert_eq!(u32s(&first), (sid, 7));
    }

    // A server DESTROY_CHANNEL must name the channel by its own sid as well
    // as the cid: one naming another sid is ignored.
    #[tokio::test]
    async fn server_destroy_channel_naming_another_sid_is_ignored() {
        let (search_addr, mut server_got, inject) = fake_server().await;
        let mut client = client_of_shim(search_addr).await;
        let sid = create(&mut client, 7).await;
        inject
            .send(two_u32(
                Command::DestroyChannel,
                Direction::FromServer,
                999,
                7,
            ))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let echo = echo_round_trip(&mut client).await;
        assert_eq!(echo.map(|m| m.header.command()), Some(Ok(Command::Echo)));
        // The channel still works: a request reaches the server.
        let mut w = wire::Writer::new(false);
        w.u32(sid).u32(1).u8(0x08).bytes(&[0x80, 0, 0]);
        client
            .send(&w.into_message(Command::Get, Direction::FromClient))
            .await;
        let reached = tokio::time::timeout(WAIT, async {
            while let Some(m) = server_got.recv().await {
                if m.header.command() == Ok(Command::Get) {
                    return Some(u32s(&m));
                }
            }
            None
        })
        .await;
        assert_eq!(reached, Ok(Some((1007, 1))));
        // The right sid destroys it.
        inject
            .send(two_u32(
                Command::DestroyChannel,
                Direction::FromServer,
                1007,
                7,
            ))
            .unwrap();
        let destroyed = client.next().await.expect("a destroy notice");
        assert_eq!(destroyed.header.command(), Ok(Command::DestroyChannel));
        assert_eq!(u32s(&destroyed), (sid, 7));
    }

    /// A shim session whose search relay asks a server that never answers.
    async fn session_with_silent_servers() -> (TcpStream, UdpSocket) {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(target) = silent.local_addr().unwrap() else {
            unreachable!()
        };
        let addr = shim_port(target, Duration::from_secs(30)).await;
        (TcpStream::connect(addr).await.unwrap(), silent)
    }

    /// The next message from the shim that is not a control message.
    async fn next_message(client: &mut TcpStream, buf: &mut BytesMut) -> Message {
        let mut decoder = wire::Decoder::new(1 << 20, Direction::FromServer);
        loop {
            let mut needed = 0;
            if let Some(m) = decoder.decode(buf, &mut needed).unwrap() {
                if !m.header.is_control() {
                    return m;
                }
                continue;
            }
            let mut chunk = vec![0u8; 4096];
            let n = client.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the shim closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    #[tokio::test]
    async fn must_reply_search_for_an_unknown_name_is_answered_promptly() {
        let (mut client, _silent) = session_with_silent_servers().await;
        let mut buf = BytesMut::new();
        let greeting = next_message(&mut client, &mut buf).await;
        assert_eq!(greeting.header.command(), Ok(Command::ConnectionValidation));
        let validation = wire::ClientValidation {
            buffer_size: 0x4000,
            registry_size: 0x7FFF,
            qos: 0,
            method: Bytes::from_static(b"anonymous"),
            credentials: Bytes::from_static(&[0xFF]),
        };
        let mut out = BytesMut::new();
        wire::client_validation(false, &validation).encode(&mut out);
        // A SEARCH as a client sends it, with the must-reply flag.
        let search_at = out.len();
        wire::encode_search_datagram(&[(77, b"NO:SUCH:PV")], 9, 0, 1400, &mut out);
        out[search_at + wire::HEADER_LEN + 4] |= wire::SEARCH_MUST_REPLY;
        client.write_all(&out).await.unwrap();
        let validated = next_message(&mut client, &mut buf).await;
        assert_eq!(validated.header.command(), Ok(Command::ConnectionValidated));
        let reply =
            tokio::time::timeout(Duration::from_secs(3), next_message(&mut client, &mut buf))
                .await
                .expect("no answer within 3 s to a must-reply search");
        assert_eq!(reply.header.command(), Ok(Command::SearchResponse));
        let answer = wire::parse_search_response(&reply).unwrap();
        assert!(!answer.found);
        assert_eq!(answer.ids, [77]);
    }
}
