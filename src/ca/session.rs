//! The shim's side of one CA client circuit.
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

use super::backend::{self, BackendConfig, BackendEvent};
use super::wire::{self, Command, Header, Message};
use super::{frame, CaDecoder};
use crate::relay::discovery::{Answer, Awaiting, Resolver};
use crate::relay::framing::{FrameReader, ReadError};
use crate::relay::limits::{self, ChannelBudget, ChannelShare, ClientDeadlines};
use crate::relay::listener::Reception;
use crate::relay::outbox::{Closed, ControlError, Frame, Outbox, Permit};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Longest user or host name kept and passed on: rsrv drops a circuit whose
/// CLIENT_NAME or HOST_NAME, with its NUL, exceeds 512 bytes
/// (`camessage.c` client_name_action, host_name_action).
const MAX_CLIENT_NAME_LEN: usize = 511;

/// The user or host name of a CLIENT_NAME or HOST_NAME message, copied
/// out of the receive buffer so that keeping it does not keep the buffer.
fn owned_client_name(message: &Message, command: Command) -> Result<Bytes, SessionError> {
    let name = wire::payload_name(&message.payload);
    if name.len() > MAX_CLIENT_NAME_LEN {
        return Err(SessionError::NameTooLong(command, name.len()));
    }
    Ok(Bytes::copy_from_slice(name))
}

/// What every CA session shares.
pub struct CaContext {
    pub resolver: Resolver,
    pub backend: BackendConfig,
    /// Largest payload accepted from a client (--max-client-message).
    pub max_client_message: u32,
    /// Hello, idle and stall deadlines of a client connection.
    pub deadlines: ClientDeadlines,
    /// Channels held by all client connections together.
    pub channels_in_all: Arc<ChannelBudget>,
    /// Bytes queued towards one client, at most.
    pub queue_bytes: usize,
    /// Channels one client connection may hold, at most.
    pub max_channels: usize,
    /// Names one client connection may have under search at once.
    pub max_searches: usize,
}

#[derive(Debug)]
enum SessionError {
    Read(ReadError),
    Unexpected(Command),
    UnknownCommand(u16),
    TooManyChannels(usize),
    /// A CLIENT_NAME or HOST_NAME longer than rsrv accepts.
    NameTooLong(Command, usize),
    TooManyChannelsInAll(usize),
    Refused(ControlError),
    ClientGone,
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Read(e) => write!(f, "{e}"),
            SessionError::Unexpected(c) => write!(f, "unexpected command {c:?} from a client"),
            SessionError::UnknownCommand(c) => write!(f, "unknown command code {c}"),
            SessionError::TooManyChannels(n) => write!(f, "client exceeds {n} channels"),
            SessionError::NameTooLong(c, n) => write!(
                f,
                "{c:?} of {n} bytes (servers accept at most {MAX_CLIENT_NAME_LEN})"
            ),
            SessionError::TooManyChannelsInAll(n) => {
                write!(f, "all clients together would exceed {n} channels")
            }
            SessionError::Refused(e) => write!(f, "{e}"),
            SessionError::ClientGone => write!(f, "client connection closed"),
        }
    }
}

impl SessionError {
    /// Counts a close for bad input or a limit in the metrics.
    fn count(&self) {
        use crate::relay::metrics::{BadInput, Refusal, METRICS};
        match self {
            SessionError::Read(e) => e.bad_input().into_iter().for_each(|k| METRICS.bad_input(k)),
            SessionError::TooManyChannels(_) => METRICS.refused(Refusal::ChannelsPerClient),
            SessionError::TooManyChannelsInAll(_) => METRICS.refused(Refusal::ChannelsInAll),
            SessionError::Refused(_) => METRICS.bad_input(BadInput::TooLarge),
            SessionError::ClientGone => {}
            SessionError::Unexpected(_)
            | SessionError::UnknownCommand(_)
            | SessionError::NameTooLong(..) => METRICS.bad_input(BadInput::Protocol),
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

/// Serves one client circuit until it closes or misbehaves.
/// Says whether the client sent anything, for the shared port's choice of
/// greeting (`ports::greeting`).
pub async fn serve(stream: TcpStream, peer: SocketAddr, ctx: Arc<CaContext>) -> Reception {
    let local_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let _counted = crate::relay::metrics::ClientGauge::enter(crate::relay::metrics::Proto::Ca);
    let decoder = CaDecoder {
        max_payload: ctx.max_client_message,
    };
    let (mut reader, client, writer) =
        limits::client_io(stream, decoder, ctx.queue_bytes, ctx.deadlines);
    let (backend_tx, backend_rx) = mpsc::unbounded_channel();
    let (answer_tx, answer_rx) = mpsc::unbounded_channel();
    let awaiting = Awaiting::new(ctx.max_searches, peer.ip());
    let share = ChannelShare::new(
        ctx.channels_in_all.clone(),
        crate::relay::metrics::Proto::Ca,
    );
    let mut session = Session {
        peer,
        local_port,
        ctx,
        client,
        backend_tx,
        backend_rx,
        failed: None,
        answer_tx,
        circuit: None,
        client_name: None,
        host_name: None,
        events_off: false,
        links: HashMap::new(),
        channels: HashMap::new(),
        routes: HashMap::new(),
        awaiting,
        next_sid: 1,
        next_link: 1,
        share,
    };
    let outcome = session.run(&mut reader, answer_rx).await;
    let channels = session.channels.len();
    drop(session);
    match outcome {
        Ok(()) | Err(SessionError::ClientGone) => {
            info!(target: "nameshim::ca::session", %peer, channels, "CA client disconnected")
        }
        Err(e) => {
            e.count();
            warn!(target: "nameshim::ca::session", %peer, cause = %e, "closing CA client connection")
        }
    }
    // The writer ends once the queue is flushed and every sender is gone.
    let _ = writer.await;
    if reader.received_any() {
        Reception::Spoke
    } else {
        Reception::Silent
    }
}

#[derive(Clone, Copy)]
struct Circuit {
    priority: u16,
    minor: u16,
}

enum Channel {
    /// Waiting for the search relay to name the server.
    Resolving,
    /// CREATE_CHAN sent to the server, no answer yet.
    Creating { server: SocketAddrV4 },
    Connected {
        server: SocketAddrV4,
        sid: u32,
        server_sid: u32,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Waiter {
    /// A search from the client, answered only if the name is found.
    Search { id: u32 },
    /// A CREATE_CHAN for a name the relay had not (or no longer) cached.
    Create { cid: u32 },
}

impl crate::relay::discovery::Waiter for Waiter {
    /// libca must never hear "not found" over TCP: a search is answered
    /// only when found.
    fn wants_prompt_answer(&self) -> bool {
        false
    }
}

struct Link {
    backend: crate::relay::upstream::BackendLink,
    cids: HashSet<u32>,
}

struct Session {
    peer: SocketAddr,
    local_port: u16,
    ctx: Arc<CaContext>,
    client: Outbox,
    backend_tx: mpsc::UnboundedSender<BackendEvent>,
    backend_rx: mpsc::UnboundedReceiver<BackendEvent>,
    /// An error met while the session waited for a server's queue.
    failed: Option<SessionError>,
    answer_tx: mpsc::UnboundedSender<Answer>,
    circuit: Option<Circuit>,
    client_name: Option<Bytes>,
    host_name: Option<Bytes>,
    events_off: bool,
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
        reader: &mut FrameReader<tokio::net::tcp::OwnedReadHalf, CaDecoder>,
        mut answer_rx: mpsc::UnboundedReceiver<Answer>,
    ) -> Result<(), SessionError> {
        // rsrv greets on accept; libca searches over TCP only after it.
        self.to_client(&wire::server_version()).await?;
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
        let header = message.header;
        let command = header.command().map_err(SessionError::UnknownCommand)?;
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
            Command::Echo => self.to_client(&wire::echo()).await?,
            // Old clients use READ_SYNC as an echo.
            Command::ReadSync => self.to_client(&wire::read_sync()).await?,
            Command::ClientName => {
                self.client_name = Some(owned_client_name(&message, command)?);
                self.forward_to_every_server(&message).await;
            }
            Command::HostName => {
                self.host_name = Some(owned_client_name(&message, command)?);
                self.forward_to_every_server(&message).await;
            }
            Command::EventsOff | Command::EventsOn => {
                self.events_off = command == Command::EventsOff;
                self.forward_to_every_server(&message).await;
            }
            Command::Search => self.on_search(&message).await?,
            Command::CreateChan => self.on_create(&message).await?,
            Command::EventAdd
            | Command::EventCancel
            | Command::Read
            | Command::ReadNotify
            | Command::Write
            | Command::WriteNotify
            | Command::ClearChannel => self.forward_to_channel_server(message).await,
            other => return Err(SessionError::Unexpected(other)),
        }
        Ok(())
    }

    async fn on_search(&mut self, message: &Message) -> Result<(), SessionError> {
        let name = wire::payload_name(&message.payload);
        if name.is_empty() {
            return Ok(());
        }
        let name = message.payload.slice_ref(name);
        self.await_name(
            name,
            Waiter::Search {
                id: message.header.p2,
            },
        )
        .await
    }

    async fn on_create(&mut self, message: &Message) -> Result<(), SessionError> {
        let cid = message.header.p1;
        let name = wire::payload_name(&message.payload);
        if name.is_empty() || self.channels.contains_key(&cid) {
            debug!(target: "nameshim::ca::session", peer = %self.peer, cid, "ignored CREATE_CHAN with empty name or a cid in use");
            return Ok(());
        }
        if self.channels.len() >= self.ctx.max_channels {
            return Err(SessionError::TooManyChannels(self.ctx.max_channels));
        }
        if !self.share.fit(self.channels.len() + 1) {
            return Err(SessionError::TooManyChannelsInAll(self.share.cap()));
        }
        let name = message.payload.slice_ref(name);
        self.channels.insert(cid, Channel::Resolving);
        self.await_name(name, Waiter::Create { cid }).await
    }

    /// Registers interest in `name`; the relay is asked once per name.
    async fn await_name(&mut self, name: Bytes, waiter: Waiter) -> Result<(), SessionError> {
        let refused = self
            .awaiting
            .add(name.clone(), waiter, &self.ctx.resolver, &self.answer_tx);
        match refused {
            Some(waiter) => {
                debug!(target: "nameshim::ca::session", peer = %self.peer, "search refused (limit)");
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
        match (waiter, server) {
            (Waiter::Search { id }, Some(_)) => {
                self.to_client(&wire::tcp_search_reply(id, self.local_port))
                    .await?
            }
            (Waiter::Search { .. }, None) => {}
            (Waiter::Create { cid }, Some(server)) => {
                if matches!(self.channels.get(&cid), Some(Channel::Resolving)) {
                    self.create_on(server, cid, name).await;
                }
            }
            (Waiter::Create { cid }, None) => {
                if self.channels.remove(&cid).is_some() {
                    self.to_client(&wire::create_ch_fail(cid)).await?;
                }
            }
        }
        Ok(())
    }

    async fn create_on(&mut self, server: SocketAddrV4, cid: u32, name: &[u8]) {
        let minor = self.circuit.map_or(wire::MINOR_VERSION, |c| c.minor);
        let request = Message::with_name(
            Header::new(Command::CreateChan, 0, 0, cid, u32::from(minor)),
            name,
        );
        self.channels.insert(cid, Channel::Creating { server });
        self.link(server).cids.insert(cid);
        self.send_to_server(server, frame(&request)).await;
    }

    /// The circuit to `server`, opened on first use with the client's
    /// VERSION, user name, host name and flow-control state.
    fn link(&mut self, server: SocketAddrV4) -> &mut Link {
        if !self.links.contains_key(&server) {
            let id = self.next_link;
            self.next_link += 1;
            let backend = backend::open(
                server,
                id,
                &self.ctx.backend,
                self.client.clone(),
                self.backend_tx.clone(),
            );
            let circuit = self.circuit.unwrap_or(Circuit {
                priority: 0,
                minor: wire::MINOR_VERSION,
            });
            let mut intro = vec![wire::client_version(circuit.priority, circuit.minor)];
            for (command, payload) in [
                (Command::ClientName, &self.client_name),
                (Command::HostName, &self.host_name),
            ] {
                if let Some(name) = payload {
                    intro.push(Message::with_name(Header::new(command, 0, 0, 0, 0), name));
                }
            }
            if self.events_off {
                intro.push(Message::new(Header::new(Command::EventsOff, 0, 0, 0, 0)));
            }
            // The queue is empty, so these fit without waiting.
            for message in &intro {
                if let Ok(permit) = backend.outbox.try_reserve_now(message.wire_len()) {
                    let _ = backend.outbox.send_reserved(frame(message), permit);
                }
            }
            debug!(target: "nameshim::ca::session", peer = %self.peer, %server, "opening server circuit");
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

    async fn forward_to_every_server(&mut self, message: &Message) {
        let servers: Vec<SocketAddrV4> = self.links.keys().copied().collect();
        for server in servers {
            self.send_to_server(server, frame(message)).await;
        }
    }

    /// Forwards a request addressed by sid (p1) to the channel's server,
    /// with the server's own sid.
    async fn forward_to_channel_server(&mut self, mut message: Message) {
        let sid = message.header.p1;
        let route = self.routes.get(&sid).and_then(|cid| self.channels.get(cid));
        let Some(&Channel::Connected {
            server, server_sid, ..
        }) = route
        else {
            debug!(target: "nameshim::ca::session", peer = %self.peer, sid, cmd = message.header.command, "request for an unknown channel dropped");
            return;
        };
        message.header.p1 = server_sid;
        self.send_to_server(server, frame(&message)).await;
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
        mut message: Message,
        permit: Permit,
    ) -> Result<(), SessionError> {
        let header = &mut message.header;
        let Ok(command) = header.command() else {
            warn!(target: "nameshim::ca::session", %server, cmd = header.command, "unknown command from a server dropped");
            return Ok(());
        };
        match command {
            Command::CreateChan => {
                let cid = header.p1;
                if !matches!(self.channels.get(&cid), Some(Channel::Creating { server: s }) if *s == server)
                {
                    debug!(target: "nameshim::ca::session", %server, cid, "CREATE_CHAN answer for no pending channel");
                    return Ok(());
                }
                let sid = self.allocate_sid();
                self.channels.insert(
                    cid,
                    Channel::Connected {
                        server,
                        sid,
                        server_sid: header.p2,
                    },
                );
                self.routes.insert(sid, cid);
                header.p2 = sid;
            }
            Command::ClearChannel => {
                // p1 = sid, p2 = cid: both must name the same channel, so a
                // server cannot clear another channel by its cid alone.
                let cid = header.p2;
                let named = matches!(self.channels.get(&cid),
                    Some(Channel::Connected { server: s, server_sid, .. })
                        if *s == server && *server_sid == header.p1);
                if !named {
                    debug!(target: "nameshim::ca::session", %server, cid, sid = header.p1, "CLEAR_CHANNEL naming no channel of this server dropped");
                    return Ok(());
                }
                let Some(Channel::Connected { sid, .. }) = self.forget_channel(server, cid) else {
                    return Ok(());
                };
                header.p1 = sid;
            }
            Command::ServerDisconn | Command::CreateChFail => {
                if self.forget_channel(server, header.p1).is_none() {
                    return Ok(());
                }
            }
            Command::AccessRights
            | Command::EventAdd
            | Command::Read
            | Command::ReadNotify
            | Command::WriteNotify => {}
            Command::Error => {
                // The echoed request names the channel by the server's sid.
                if let Some(server_sid) = wire::error_request_sid(&message.payload) {
                    let sid = self.channels.values().find_map(|c| match c {
                        Channel::Connected {
                            server: s,
                            sid,
                            server_sid: ss,
                        } if *s == server && *ss == server_sid => Some(*sid),
                        _ => None,
                    });
                    let Some(payload) =
                        sid.and_then(|sid| wire::error_with_request_sid(&message.payload, sid))
                    else {
                        debug!(target: "nameshim::ca::session", %server, server_sid, "error for no channel of this client dropped");
                        return Ok(());
                    };
                    message.payload = payload;
                }
            }
            // Answers to the shim itself, or nothing libca may receive.
            other => {
                if !matches!(other, Command::Version | Command::Echo | Command::ReadSync) {
                    debug!(target: "nameshim::ca::session", %server, cmd = ?other, "server message not relayed");
                }
                return Ok(());
            }
        }
        self.client.send_reserved(frame(&message), permit)?;
        Ok(())
    }

    /// Drops what the session knows of channel `cid` on `server`.
    fn forget_channel(&mut self, server: SocketAddrV4, cid: u32) -> Option<Channel> {
        let on_this_server = match self.channels.get(&cid)? {
            Channel::Resolving => false,
            Channel::Creating { server: s } | Channel::Connected { server: s, .. } => *s == server,
        };
        if !on_this_server {
            return None;
        }
        let channel = self.channels.remove(&cid)?;
        if let Channel::Connected { sid, .. } = channel {
            self.routes.remove(&sid);
        }
        if let Some(link) = self.links.get_mut(&server) {
            link.cids.remove(&cid);
        }
        Some(channel)
    }

    /// Every channel of a lost server is disconnected towards the client,
    /// which then searches again and reconnects when the server is back.
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
        info!(target: "nameshim::ca::session", peer = %self.peer, %server, channels = lost.cids.len(), cause = reason, "server circuit closed");
        for cid in lost.cids {
            let notice = match self.channels.remove(&cid) {
                Some(Channel::Connected { sid, .. }) => {
                    self.routes.remove(&sid);
                    wire::server_disconn(cid)
                }
                Some(Channel::Creating { .. }) => wire::create_ch_fail(cid),
                Some(other @ Channel::Resolving) => {
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
            if !self.routes.contains_key(&sid) {
                return sid;
            }
        }
    }
}

/// A context for tests: searches go to `search_addr` only, for
/// `search_timeout`, and channels count against `channels_in_all`.
#[cfg(test)]
pub(crate) fn context_for_tests(
    search_addr: SocketAddrV4,
    search_timeout: std::time::Duration,
    channels_in_all: Arc<crate::relay::limits::ChannelBudget>,
) -> Arc<CaContext> {
    use crate::relay::discovery::SearchConfig;
    use std::time::Duration;
    Arc::new(CaContext {
        resolver: super::search::start(SearchConfig {
            targets: vec![search_addr],
            timeout: search_timeout,
            cache_ttl: Duration::from_secs(5),
            max_pending: 100,
            max_pending_per_address: 100,
            max_cached: 100,
        })
        .expect("a search relay on the loopback"),
        backend: BackendConfig {
            max_server_message: 1 << 24,
            queue_bytes: 1 << 16,
            connect_timeout: Duration::from_secs(2),
            source: crate::relay::upstream::DEFAULT_SOURCE,
        },
        max_client_message: 1 << 24,
        deadlines: crate::relay::limits::ClientDeadlines::default(),
        channels_in_all,
        queue_bytes: 4 << 20,
        max_channels: 100,
        max_searches: 100,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, UdpSocket};

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
            Err(SessionError::NameTooLong(Command::HostName, 512))
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
        let ctx = test_context(search_addr);
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
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(udp_addr) = udp.local_addr().unwrap() else {
            unreachable!()
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((len, from)) = udp.recv_from(&mut buf).await {
                let mut reply = BytesMut::new();
                for (h, _) in wire::decode_datagram(&buf[..len]).unwrap_or_default() {
                    if h.command() == Ok(Command::Search) {
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
        let mut client = shim_session(search_addr).await;
        client
            .write_all(&bytes_of(&wire::client_version(0, 13)))
            .await
            .unwrap();
        let create = Message::with_name(Header::new(Command::CreateChan, 0, 0, 1, 13), b"A");
        client.write_all(&bytes_of(&create)).await.unwrap();
        let mut buf = BytesMut::new();
        let sid = next_of(&mut client, &mut buf, Command::CreateChan)
            .await
            .header
            .p2;
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

    // Relayed updates take the client's queue budget before the session
    // passes them on; the session's own ECHO reply must not wait for that
    // budget, or the session waits for itself forever.
    #[tokio::test]
    async fn echo_reply_does_not_stall_a_client_behind_large_updates() {
        let search_addr = flooding_server().await;
        let mut client = shim_session(search_addr).await;
        client
            .write_all(&bytes_of(&wire::client_version(0, 13)))
            .await
            .unwrap();
        let create = Message::with_name(Header::new(Command::CreateChan, 0, 0, 1, 13), b"X");
        client.write_all(&bytes_of(&create)).await.unwrap();
        // Stop reading until every buffer on the way is full, then ask.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        client.write_all(&bytes_of(&wire::echo())).await.unwrap();
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        while total < 100_000_000 {
            match tokio::time::timeout(Duration::from_secs(3), client.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => total += n,
                other => panic!("relay stalled after {total} bytes: {other:?}"),
            }
        }
    }
}
