//! The shim's side of one PVA client connection.
//!
//! Towards the client the shim is a PVA server and name server: it greets
//! (SET_BYTE_ORDER, CONNECTION_VALIDATION offering "anonymous" and "ca"),
//! answers ECHO, and answers SEARCH with SEARCH_RESPONSE. By default the
//! response has a zero address and port 0, which a pvxs client reads as "this
//! connection", so it creates its channels here whatever NAT did;
//! `--advertise-port` puts the externally visible port there instead, for
//! pvAccessCPP clients, which open a new connection to it.
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

use super::backend::{self, BackendConfig, BackendEvent};
use super::frame;
use super::translate::Translator;
use super::wire::{self, Command, Message};
use crate::relay::discovery::{Answer, Awaiting, Resolver};
use crate::relay::framing::{FrameReader, ReadError};
use crate::relay::limits::{self, ChannelBudget, ChannelShare, ClientDeadlines};
use crate::relay::outbox::{Closed, ControlError, Frame, Outbox, Permit};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// The byte order the shim announces and uses: the host's, like both
/// reference implementations.
pub const BIG_ENDIAN: bool = cfg!(target_endian = "big");
/// The sid a server puts in a failed CREATE_CHANNEL response.
const NO_SID: u32 = 0xFFFF_FFFF;

pub struct PvaContext {
    pub resolver: Resolver,
    pub backend: BackendConfig,
    /// Largest message accepted from a client (--max-client-message).
    pub max_message: u32,
    pub queue_bytes: usize,
    /// The client must validate within the hello deadline (5 s by
    /// default, pvAccessCPP's own limit).
    pub deadlines: ClientDeadlines,
    pub max_channels: usize,
    /// Channels held by all client connections together.
    pub channels_in_all: Arc<ChannelBudget>,
    pub max_searches: usize,
    /// Port put in search responses; None means 0 ("this connection").
    pub advertise_port: Option<u16>,
}

#[derive(Debug)]
enum SessionError {
    Read(ReadError),
    Wire(wire::WireError),
    /// A message the shim could not follow (malformed, or using a
    /// type-cache key the client never defined).
    Untranslatable(wire::WireError),
    NotValidated(std::time::Duration),
    TooManyChannels(usize),
    TooManyChannelsInAll(usize),
    Refused(ControlError),
    ClientGone,
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Read(e) => write!(f, "{e}"),
            SessionError::Wire(e) => write!(f, "{e}"),
            SessionError::Untranslatable(e) => write!(f, "cannot follow a client message: {e}"),
            SessionError::NotValidated(d) => {
                write!(f, "client did not validate the connection within {d:?}")
            }
            SessionError::TooManyChannels(n) => write!(f, "client exceeds {n} channels"),
            SessionError::TooManyChannelsInAll(n) => {
                write!(f, "all clients together would exceed {n} channels")
            }
            SessionError::Refused(e) => write!(f, "{e}"),
            SessionError::ClientGone => write!(f, "client connection closed"),
        }
    }
}

impl From<Closed> for SessionError {
    fn from(_: Closed) -> Self {
        SessionError::ClientGone
    }
}

impl From<ControlError> for SessionError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Closed => SessionError::ClientGone,
            e => SessionError::Refused(e),
        }
    }
}

impl From<wire::WireError> for SessionError {
    fn from(e: wire::WireError) -> Self {
        SessionError::Wire(e)
    }
}

/// Serves one PVA client connection until it closes or misbehaves.
pub async fn serve(stream: TcpStream, peer: SocketAddr, ctx: Arc<PvaContext>) {
    let decoder = wire::Decoder::new(ctx.max_message, false);
    let (mut reader, client, writer) =
        limits::client_io(stream, decoder, ctx.queue_bytes, ctx.deadlines);
    let outcome = match validate(&client, &mut reader, ctx.deadlines.hello).await {
        Ok((validation, translator, plain_credentials)) => {
            let (backend_tx, backend_rx) = mpsc::unbounded_channel();
            let (answer_tx, answer_rx) = mpsc::unbounded_channel();
            let awaiting = Awaiting::new(ctx.max_searches);
            let share = ChannelShare::new(ctx.channels_in_all.clone());
            let mut session = Session {
                peer,
                ctx,
                client: client.clone(),
                validation,
                plain_credentials,
                translator,
                backend_tx,
                backend_rx,
                failed: None,
                answer_tx,
                links: HashMap::new(),
                channels: HashMap::new(),
                routes: HashMap::new(),
                awaiting,
                next_sid: 1,
                next_link: 1,
                share,
            };
            session.run(&mut reader, answer_rx).await
        }
        Err(e) => Err(e),
    };
    drop(client);
    match outcome {
        Ok(()) | Err(SessionError::ClientGone) => {
            info!(target: "nameshim::pva::session", %peer, "PVA client disconnected")
        }
        Err(e) => {
            warn!(target: "nameshim::pva::session", %peer, cause = %e, "closing PVA client connection")
        }
    }
    let _ = writer.await;
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
        .send_control(frame(&wire::set_byte_order(true, BIG_ENDIAN)))
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
        .map_err(SessionError::Untranslatable)?;
    client
        .send_control(frame(&wire::connection_validated_ok(BIG_ENDIAN)))
        .await?;
    Ok((validation, translator, plain_credentials))
}

enum Channel {
    Resolving,
    Creating {
        server: SocketAddrV4,
    },
    Connected {
        server: SocketAddrV4,
        sid: u32,
        server_sid: u32,
    },
}

#[derive(Clone, PartialEq, Eq)]
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

impl crate::relay::discovery::Waiter for Waiter {
    fn must_settle(&self) -> bool {
        matches!(self, Waiter::Create { .. })
    }
}

struct Link {
    backend: crate::relay::upstream::BackendLink,
    cids: HashSet<u32>,
}

struct Session {
    peer: SocketAddr,
    ctx: Arc<PvaContext>,
    client: Outbox,
    validation: wire::ClientValidation,
    plain_credentials: Bytes,
    translator: Translator,
    backend_tx: mpsc::UnboundedSender<BackendEvent>,
    backend_rx: mpsc::UnboundedReceiver<BackendEvent>,
    /// An error met while the session waited for a server's queue.
    failed: Option<SessionError>,
    answer_tx: mpsc::UnboundedSender<Answer>,
    links: HashMap<SocketAddrV4, Link>,
    /// Channels by client channel id.
    channels: HashMap<u32, Channel>,
    /// Client channel id by the sid the client was given.
    routes: HashMap<u32, u32>,
    awaiting: Awaiting<Waiter>,
    next_sid: u32,
    next_link: u64,
    /// This connection's part of the channels of all clients.
    share: ChannelShare,
}

impl Session {
    async fn run(
        &mut self,
        reader: &mut FrameReader<OwnedReadHalf, wire::Decoder>,
        mut answer_rx: mpsc::UnboundedReceiver<Answer>,
    ) -> Result<(), SessionError> {
        loop {
            tokio::select! {
                message = reader.next() => match message.map_err(SessionError::Read)? {
                    Some(message) => self.on_client(message).await?,
                    None => return Ok(()),
                },
                Some(event) = self.backend_rx.recv() => self.on_backend(event).await?,
                Some(answer) = answer_rx.recv() => self.on_answer(answer).await?,
            }
            self.share.fit(self.channels.len());
            if let Some(e) = self.failed.take() {
                return Err(e);
            }
        }
    }

    /// Queues a frame for `server`. While that server's queue is full, the
    /// session goes on passing server messages to the client: the server may
    /// be waiting for exactly that (its own sends blocked) before it reads
    /// again, and only the session can pass them on.
    async fn send_to_server(&mut self, server: SocketAddrV4, frame: Frame) {
        let Some(outbox) = self.links.get(&server).map(|l| l.backend.outbox.clone()) else {
            return;
        };
        let len = frame.len();
        let mut frame = Some(frame);
        loop {
            tokio::select! {
                permit = outbox.reserve(len) => {
                    // A closed link reports itself as an event.
                    if let (Ok(permit), Some(frame)) = (permit, frame.take()) {
                        let _ = outbox.send_reserved(frame, permit);
                    }
                    return;
                }
                Some(event) = self.backend_rx.recv() => {
                    if let Err(e) = self.on_backend(event).await {
                        self.failed.get_or_insert(e);
                        return;
                    }
                }
            }
        }
    }

    /// Sends a message the shim made itself (see `Outbox::send_control`).
    async fn to_client(&self, message: &Message) -> Result<(), ControlError> {
        self.client.send_control(frame(message)).await
    }

    // ----- client to shim -----

    async fn on_client(&mut self, message: Message) -> Result<(), SessionError> {
        if message.header.is_control() {
            return Ok(());
        }
        let Ok(command) = message.header.command() else {
            debug!(target: "nameshim::pva::session", peer = %self.peer, cmd = message.header.command, "unknown command ignored");
            return Ok(());
        };
        match command {
            Command::Echo => {
                let mut reply = message.clone();
                reply.header.flags |= wire::FLAG_FROM_SERVER;
                self.to_client(&reply).await?;
            }
            Command::Search => self.on_search(&message).await?,
            Command::CreateChannel => self.on_create(&message).await?,
            Command::DestroyChannel => {
                // sid, cid: the client is done with the channel. Forward
                // first (the route is needed for it), then forget it.
                let cid = self.route(&message);
                self.forward_to_channel_server(message).await;
                if let Some(cid) = cid {
                    if let Some(Channel::Connected { server, sid, .. }) = self.channels.remove(&cid)
                    {
                        self.routes.remove(&sid);
                        self.forget_route(server, cid);
                    }
                }
            }
            Command::Get
            | Command::Put
            | Command::PutGet
            | Command::Monitor
            | Command::Array
            | Command::DestroyRequest
            | Command::Process
            | Command::GetField
            | Command::Rpc
            | Command::CancelRequest => {
                let message = match self.translator.client_message(&message) {
                    Ok(None) => message,
                    Ok(Some(payload)) => with_payload(&message, payload),
                    Err(e) => return Err(SessionError::Untranslatable(e)),
                };
                self.forward_to_channel_server(message).await
            }
            other => {
                debug!(target: "nameshim::pva::session", peer = %self.peer, cmd = ?other, "client message not relayed")
            }
        }
        Ok(())
    }

    async fn on_search(&mut self, message: &Message) -> Result<(), SessionError> {
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
            self.await_name(name, waiter).await?;
        }
        Ok(())
    }

    async fn on_create(&mut self, message: &Message) -> Result<(), SessionError> {
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
            if name.is_empty() || self.channels.contains_key(&cid) {
                continue;
            }
            if self.channels.len() >= self.ctx.max_channels {
                return Err(SessionError::TooManyChannels(self.ctx.max_channels));
            }
            if !self.share.fit(self.channels.len() + 1) {
                return Err(SessionError::TooManyChannelsInAll(self.share.cap()));
            }
            self.channels.insert(cid, Channel::Resolving);
            self.await_name(name, Waiter::Create { cid }).await?;
        }
        Ok(())
    }

    async fn await_name(&mut self, name: Bytes, waiter: Waiter) -> Result<(), SessionError> {
        let refused = self
            .awaiting
            .add(name.clone(), waiter, &self.ctx.resolver, &self.answer_tx);
        match refused {
            Some(waiter) => {
                debug!(target: "nameshim::pva::session", peer = %self.peer, "search refused (limit)");
                self.settle(waiter, &name, None).await
            }
            None => Ok(()),
        }
    }

    async fn on_answer(&mut self, answer: Answer) -> Result<(), SessionError> {
        for waiter in self.awaiting.take(&answer.name) {
            self.settle(waiter, &answer.name, answer.server).await?;
        }
        Ok(())
    }

    async fn settle(
        &mut self,
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
                if server.is_some() || must_reply {
                    let port = self.ctx.advertise_port.unwrap_or(0);
                    let reply =
                        wire::search_response(BIG_ENDIAN, sequence, port, server.is_some(), &[id]);
                    self.to_client(&reply).await?;
                }
            }
            Waiter::Create { cid } => match server {
                Some(server) if matches!(self.channels.get(&cid), Some(Channel::Resolving)) => {
                    self.create_on(server, cid, name).await
                }
                Some(_) => {}
                None => {
                    if self.channels.remove(&cid).is_some() {
                        self.to_client(&create_failed(cid, b"channel not found"))
                            .await?;
                    }
                }
            },
        }
        Ok(())
    }

    async fn create_on(&mut self, server: SocketAddrV4, cid: u32, name: &[u8]) {
        let mut w = wire::Writer::new(BIG_ENDIAN);
        w.u16(1).u32(cid).string(name);
        let request = w.into_message(Command::CreateChannel, false);
        self.channels.insert(cid, Channel::Creating { server });
        self.link(server).cids.insert(cid);
        self.send_to_server(server, frame(&request)).await;
    }

    fn link(&mut self, server: SocketAddrV4) -> &mut Link {
        if !self.links.contains_key(&server) {
            let id = self.next_link;
            self.next_link += 1;
            // From the second server connection on, whether the first is
            // still open or was replaced (an IOC restart): the client's
            // type cache no longer matches any one server's.
            if id > 1 && !self.translator.active {
                debug!(target: "nameshim::pva::session", peer = %self.peer, %server, "client connection spans several server connections: translating type descriptions");
                self.translator.active = true;
            }
            let mut validation = self.validation.clone();
            if self.translator.active {
                validation.credentials = self.plain_credentials.clone();
            }
            let backend = backend::open(
                server,
                id,
                &self.ctx.backend,
                validation,
                self.client.clone(),
                self.backend_tx.clone(),
            );
            debug!(target: "nameshim::pva::session", peer = %self.peer, %server, "opening server connection");
            self.links.insert(
                server,
                Link {
                    backend,
                    cids: HashSet::new(),
                },
            );
        }
        self.links
            .get_mut(&server)
            .expect("inserted above when missing")
    }

    /// The cid of the channel whose sid the client put first in `message`.
    fn route(&self, message: &Message) -> Option<u32> {
        let mut r = wire::Reader::new(&message.payload, message.header.is_big_endian());
        let sid = r.u32("sid");
        r.finish().ok()?;
        self.routes.get(&sid).copied()
    }

    /// Forwards a request that starts with a sid to its channel's server,
    /// with the server's own sid; the rest of the payload is not copied.
    async fn forward_to_channel_server(&mut self, message: Message) {
        let route = self.route(&message).and_then(|cid| self.channels.get(&cid));
        let (server, server_sid) = match route {
            Some(&Channel::Connected {
                server, server_sid, ..
            }) => (server, server_sid),
            _ => {
                // pvxs clients destroy a channel the server already dropped.
                debug!(target: "nameshim::pva::session", peer = %self.peer, cmd = message.header.command, "request for an unknown channel dropped");
                return;
            }
        };
        let big_endian = message.header.is_big_endian();
        let body = message.payload.slice(4..);
        let header = message.header;
        let rewritten = Frame::new(
            |head| {
                header.encode(head);
                if big_endian {
                    head.put_u32(server_sid)
                } else {
                    head.put_u32_le(server_sid)
                }
            },
            body,
        );
        self.send_to_server(server, rewritten).await;
    }

    // ----- server to shim -----

    async fn on_backend(&mut self, event: BackendEvent) -> Result<(), SessionError> {
        match event {
            BackendEvent::Message {
                server,
                link,
                message,
                permit,
            } => {
                if self.links.get(&server).map(|l| l.backend.id) == Some(link) {
                    self.on_server_message(server, message, permit)?;
                }
                Ok(())
            }
            BackendEvent::Closed {
                server,
                link,
                reason,
            } => self.on_server_closed(server, link, &reason).await,
        }
    }

    fn on_server_message(
        &mut self,
        server: SocketAddrV4,
        message: Message,
        permit: Permit,
    ) -> Result<(), SessionError> {
        if message.header.is_control() {
            return Ok(());
        }
        let Ok(command) = message.header.command() else {
            return Ok(());
        };
        let big_endian = message.header.is_big_endian();
        let forwarded = match command {
            Command::CreateChannel => {
                // cid, sid, status
                let mut r = wire::Reader::new(&message.payload, big_endian);
                let cid = r.u32("cid");
                let server_sid = r.u32("sid");
                if r.finish().is_err() {
                    return Ok(());
                }
                if !matches!(self.channels.get(&cid), Some(Channel::Creating { server: s }) if *s == server)
                {
                    return Ok(());
                }
                if server_sid == NO_SID {
                    self.channels.remove(&cid);
                    self.forget_route(server, cid);
                    message
                } else {
                    let sid = self.allocate_sid();
                    self.channels.insert(
                        cid,
                        Channel::Connected {
                            server,
                            sid,
                            server_sid,
                        },
                    );
                    self.routes.insert(sid, cid);
                    with_u32_at(&message, 4, sid)
                }
            }
            Command::DestroyChannel => {
                // sid, cid: the server dropped the channel (or confirms).
                let mut r = wire::Reader::new(&message.payload, big_endian);
                r.u32("sid");
                let cid = r.u32("cid");
                if r.finish().is_err() {
                    return Ok(());
                }
                match self.channels.get(&cid) {
                    Some(&Channel::Connected { server: s, sid, .. }) if s == server => {
                        self.channels.remove(&cid);
                        self.routes.remove(&sid);
                        self.forget_route(server, cid);
                        with_u32_at(&message, 0, sid)
                    }
                    _ => return Ok(()),
                }
            }
            Command::Get
            | Command::Put
            | Command::PutGet
            | Command::Monitor
            | Command::Array
            | Command::Process
            | Command::GetField
            | Command::Rpc => match self.translator.server_message(server, &message) {
                Ok(None) => message,
                Ok(Some(payload)) => with_payload(&message, payload),
                Err(e) => {
                    // The shim can no longer follow this server's types:
                    // drop the connection, so its channels start afresh.
                    warn!(target: "nameshim::pva::session", %server, cause = %e, "cannot follow a server message; closing that server connection");
                    if let Some(link) = self.links.get(&server) {
                        let _ = self.backend_tx.send(BackendEvent::Closed {
                            server,
                            link: link.backend.id,
                            reason: format!("untranslatable message: {e}"),
                        });
                    }
                    return Ok(());
                }
            },
            Command::Message => message,
            // ECHO answers the shim's own keepalive.
            _ => return Ok(()),
        };
        self.client.send_reserved(frame(&forwarded), permit)?;
        Ok(())
    }

    fn forget_route(&mut self, server: SocketAddrV4, cid: u32) {
        if let Some(link) = self.links.get_mut(&server) {
            link.cids.remove(&cid);
        }
    }

    /// Every channel of a lost server is destroyed towards the client, which
    /// then searches again and reconnects when the server is back.
    async fn on_server_closed(
        &mut self,
        server: SocketAddrV4,
        link: u64,
        reason: &str,
    ) -> Result<(), SessionError> {
        if self.links.get(&server).map(|l| l.backend.id) != Some(link) {
            return Ok(());
        }
        let Some(lost) = self.links.remove(&server) else {
            return Ok(());
        };
        self.ctx.resolver.forget(server);
        self.translator.forget_server(server);
        info!(target: "nameshim::pva::session", peer = %self.peer, %server, channels = lost.cids.len(), cause = reason, "server connection closed");
        for cid in lost.cids {
            let notice = match self.channels.remove(&cid) {
                Some(Channel::Connected { sid, .. }) => {
                    self.routes.remove(&sid);
                    let mut w = wire::Writer::new(BIG_ENDIAN);
                    w.u32(sid).u32(cid);
                    w.into_message(Command::DestroyChannel, true)
                }
                Some(Channel::Creating { .. }) => create_failed(cid, b"server connection lost"),
                Some(other) => {
                    self.channels.insert(cid, other);
                    continue;
                }
                None => continue,
            };
            self.to_client(&notice).await?;
        }
        Ok(())
    }

    fn allocate_sid(&mut self) -> u32 {
        loop {
            let sid = self.next_sid;
            self.next_sid = self.next_sid.wrapping_add(1);
            if sid != NO_SID && !self.routes.contains_key(&sid) {
                return sid;
            }
        }
    }
}

/// A failed CREATE_CHANNEL response: cid, no sid, an error status.
fn create_failed(cid: u32, why: &[u8]) -> Message {
    let mut w = wire::Writer::new(BIG_ENDIAN);
    w.u32(cid)
        .u32(NO_SID)
        .u8(wire::STATUS_ERROR)
        .string(why)
        .string(b"");
    w.into_message(Command::CreateChannel, true)
}

/// The same message with a new payload.
fn with_payload(message: &Message, payload: Bytes) -> Message {
    let mut header = message.header;
    header.size = payload.len() as u32;
    Message { header, payload }
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
