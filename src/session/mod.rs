//! The session core: what one client connection does, whatever its
//! protocol. It owns the client's outbox, the links to servers, the names
//! under search and the channel table, and it runs flow control. A
//! [`Protocol`] supplies only what differs: the greeting, what each client
//! and server message means, how a link is opened, and the notice for a
//! channel lost with its server (as `relay::discovery::SearchProtocol` does
//! for the search relay).
//!
//! Flow control: a protocol never waits for a server's queue. It queues
//! frames with [`Core::send_to_server`], and the core sends them once the
//! handler returns. While a server's queue is full, the core goes on
//! passing that server's messages to the client: the server may be waiting
//! for exactly that (its own sends blocked) before it reads again, and only
//! the session can pass them on.

pub mod channels;
mod error;
pub mod found;
pub mod waiters;

pub use channels::{Channel, ChannelTable, Route};
pub use error::SessionError;
pub use found::FoundNames;
pub use waiters::{Awaiting, Waiter};

use crate::access::Access;
use crate::relay::discovery::{Answer, Resolver};
use crate::relay::framing::{Decoder, FrameReader};
use crate::relay::limits::{self, ChannelBudget, ChannelShare, ClientDeadlines};
use crate::relay::listener::Reception;
use crate::relay::metrics::{ClientGauge, Proto, Refusal, METRICS};
use crate::relay::outbox::{ControlError, Frame, Outbox};
use crate::relay::stream::Pass;
use crate::relay::upstream::{BackendEvent, BackendLink, LinkError, WireLen};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

/// What every session of one protocol shares.
pub struct SessionSettings {
    pub resolver: Resolver,
    /// Largest message accepted from a client (--max-client-message).
    pub max_client_message: u32,
    /// Bytes queued towards one client, at most.
    pub queue_bytes: usize,
    /// Hello, idle and stall deadlines of a client connection.
    pub deadlines: ClientDeadlines,
    /// Channels one client connection may hold, at most.
    pub max_channels: usize,
    /// Channels held by all client connections together.
    pub channels_in_all: Arc<ChannelBudget>,
    /// Names one client connection may have under search at once.
    pub max_searches: usize,
    /// The shim's own access rules (read-only, names).
    pub access: Arc<Access>,
}

/// The reader of a client connection.
pub type ClientReader<D> = FrameReader<OwnedReadHalf, D>;

/// Where a link reports to its session.
pub type Events<M> = mpsc::UnboundedSender<BackendEvent<M>>;

/// What a protocol supplies to the session core. Its value is the
/// protocol's own state for one client connection.
// Sessions are spawned with a concrete protocol, where the compiler checks
// that their futures are Send; no caller needs a bound on these methods.
#[allow(async_fn_in_trait)]
pub trait Protocol: Sized + Send + 'static {
    /// Shared by every session of the protocol.
    type Context: Send + Sync + 'static;
    type Decoder: Decoder<Item = Self::Message> + Send + 'static;
    type Message: WireLen + Send + 'static;
    type Waiter: Waiter + Send + 'static;
    const PROTO: Proto;
    /// A sid the shim must never give a channel.
    const RESERVED_SID: Option<u32> = None;

    fn settings(ctx: &Self::Context) -> &SessionSettings;

    fn decoder(ctx: &Self::Context) -> Self::Decoder;

    /// Greets the client, does the server side of the handshake, and
    /// returns the protocol's state for this connection.
    async fn greet(
        ctx: Arc<Self::Context>,
        client: &Outbox,
        reader: &mut ClientReader<Self::Decoder>,
        listen_port: u16,
    ) -> Result<Self, SessionError>;

    async fn on_client(
        &mut self,
        core: &mut Core<Self>,
        message: Self::Message,
    ) -> Result<(), SessionError>;

    /// A message from `server`; returns what the client is to get of it,
    /// if anything. Its room in the client's queue is already reserved.
    fn on_server(
        &mut self,
        core: &mut Core<Self>,
        server: SocketAddrV4,
        message: Self::Message,
    ) -> Result<Option<Frame>, SessionError>;

    /// The head of a large message from `server` (its payload cut to the
    /// first bytes): whether it passes to the client unchanged as it
    /// arrives, is handled whole by `on_server`, or is dropped. A protocol
    /// that passes a message keeps here whatever `on_server` would have
    /// noted of it.
    fn on_server_head(
        &mut self,
        _core: &mut Core<Self>,
        _server: SocketAddrV4,
        _head: &Self::Message,
    ) -> Result<LargeMessage, SessionError> {
        Ok(LargeMessage::Whole)
    }

    /// The search for `name` ended: found on `server`, or not found.
    async fn settle(
        &mut self,
        core: &mut Core<Self>,
        waiter: Self::Waiter,
        name: &Bytes,
        server: Option<SocketAddrV4>,
    ) -> Result<(), SessionError>;

    /// Starts a link to `server`, with this client's handshake.
    fn open_link(
        &mut self,
        server: SocketAddrV4,
        id: u64,
        client: Outbox,
        events: Events<Self::Message>,
    ) -> BackendLink;

    /// What the client is told of channel `cid`, lost with its server.
    fn lost_channel_notice(&self, cid: u32, channel: Channel) -> Option<Frame>;

    /// `server`'s link is gone: forget what the protocol knew of it.
    fn forget_server(&mut self, _server: SocketAddrV4) {}

    /// When `on_due` is next to run, if ever.
    fn next_due(&self) -> Option<Instant> {
        None
    }

    async fn on_due(&mut self, _core: &mut Core<Self>) -> Result<(), SessionError> {
        Ok(())
    }
}

/// Serves one client connection until it closes or misbehaves, logging in
/// a span that names the client. Says whether the client sent anything,
/// for the shared port's choice of greeting (`ports::greeting`).
pub async fn serve<P: Protocol>(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<P::Context>,
) -> Reception {
    let span = tracing::info_span!("client", %peer, proto = P::PROTO.label());
    serve_client::<P>(stream, peer, ctx).instrument(span).await
}

async fn serve_client<P: Protocol>(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<P::Context>,
) -> Reception {
    let _counted = ClientGauge::enter(P::PROTO);
    let listen_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let settings = P::settings(&ctx);
    let (mut reader, client, writer) = limits::client_io(
        stream,
        P::decoder(&ctx),
        settings.queue_bytes,
        settings.deadlines,
    );
    let mut channels = 0;
    let outcome = match P::greet(ctx.clone(), &client, &mut reader, listen_port).await {
        Ok(mut protocol) => {
            let mut core = Core::<P>::new(peer, client.clone(), P::settings(&ctx));
            let outcome = core.run(&mut protocol, &mut reader).await;
            channels = core.channels.len();
            core.report_unanswered_creates();
            outcome
        }
        Err(e) => Err(e),
    };
    drop(client);
    match outcome {
        Ok(()) => info!(channels, "client disconnected"),
        Err(e) if e.is_client_gone() => info!(channels, "client disconnected"),
        Err(e) => {
            e.count();
            warn!(cause = %e, channels, "closing client connection")
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

/// What becomes of a large message, from its head (see `relay::stream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LargeMessage {
    /// It passes to the client unchanged, as it arrives.
    Stream,
    /// It is read whole, then handled by `Protocol::on_server`.
    Whole,
    /// Nobody gets it.
    Drop,
}

/// A link from this client connection to one server.
struct Link {
    backend: BackendLink,
    /// The shim decided to close it: what the server sent meanwhile is
    /// not passed on.
    closing: bool,
}

/// A frame waiting to go to a server once the handler that made it
/// returns.
enum Outgoing {
    /// Relayed for the client: it waits for room in the server's queue.
    Relayed(SocketAddrV4, Frame),
    /// Made by the shim: it takes the queue's control allowance.
    Control(SocketAddrV4, Frame),
}

/// The protocol-independent state of one client connection.
pub struct Core<P: Protocol> {
    pub peer: SocketAddr,
    pub client: Outbox,
    pub channels: ChannelTable,
    /// The shim's own access rules.
    pub access: Arc<Access>,
    resolver: Resolver,
    links: HashMap<SocketAddrV4, Link>,
    next_link: u64,
    events_tx: Events<P::Message>,
    events_rx: mpsc::UnboundedReceiver<BackendEvent<P::Message>>,
    answer_tx: mpsc::UnboundedSender<Answer>,
    answer_rx: mpsc::UnboundedReceiver<Answer>,
    awaiting: Awaiting<P::Waiter>,
    outgoing: VecDeque<Outgoing>,
}

impl<P: Protocol> Core<P> {
    fn new(peer: SocketAddr, client: Outbox, settings: &SessionSettings) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (answer_tx, answer_rx) = mpsc::unbounded_channel();
        let share = ChannelShare::new(settings.channels_in_all.clone(), P::PROTO);
        Core {
            peer,
            client,
            channels: ChannelTable::new(settings.max_channels, share, P::RESERVED_SID),
            access: settings.access.clone(),
            resolver: settings.resolver.clone(),
            links: HashMap::new(),
            next_link: 1,
            events_tx,
            events_rx,
            answer_tx,
            answer_rx,
            awaiting: Awaiting::new(settings.max_searches, peer.ip()),
            outgoing: VecDeque::new(),
        }
    }

    async fn run(
        &mut self,
        protocol: &mut P,
        reader: &mut ClientReader<P::Decoder>,
    ) -> Result<(), SessionError> {
        loop {
            tokio::select! {
                message = reader.next() => match message.map_err(SessionError::Read)? {
                    Some(message) => protocol.on_client(self, message).await?,
                    None => return Ok(()),
                },
                Some(event) = self.events_rx.recv() => self.on_event(protocol, event).await?,
                Some(answer) = self.answer_rx.recv() => self.on_answer(protocol, answer).await?,
                _ = self.awaiting.prompt_due() => self.on_prompt_due(protocol).await?,
                _ = waiters::sleep_until(protocol.next_due()) => protocol.on_due(self).await?,
            }
            self.flush(protocol).await?;
        }
    }

    // ----- for protocols -----

    /// Queues a message the shim made itself (see `Outbox::send_control`).
    pub async fn to_client(&self, frame: Frame) -> Result<(), ControlError> {
        self.client.send_control(frame).await
    }

    /// Queues a frame for `server`, sent when the handler returns. Nothing
    /// is sent to a server with no link.
    pub fn send_to_server(&mut self, server: SocketAddrV4, frame: Frame) {
        self.outgoing.push_back(Outgoing::Relayed(server, frame));
    }

    /// Queues a frame the shim made itself for `server`.
    pub fn control_to_server(&mut self, server: SocketAddrV4, frame: Frame) {
        self.outgoing.push_back(Outgoing::Control(server, frame));
    }

    /// Queues a frame for every server this client has a link to.
    pub fn send_to_every_server(&mut self, frame: &Frame) {
        let servers: Vec<SocketAddrV4> = self.links.keys().copied().collect();
        for server in servers {
            self.send_to_server(server, frame.clone());
        }
    }

    /// Starts creating resolving channel `cid` on `server` with `request`,
    /// opening the link to `server` on first use.
    pub fn create_on(&mut self, protocol: &mut P, server: SocketAddrV4, cid: u32, request: Frame) {
        if !self.channels.is_resolving(cid) {
            return;
        }
        if !self.links.contains_key(&server) {
            let id = self.next_link;
            self.next_link += 1;
            debug!(%server, link = id, "opening server connection");
            let backend =
                protocol.open_link(server, id, self.client.clone(), self.events_tx.clone());
            let link = Link {
                backend,
                closing: false,
            };
            self.links.insert(server, link);
        }
        self.channels.creating_on(cid, server);
        self.send_to_server(server, request);
    }

    /// Waits for the search relay to name the server of `name`; a waiter
    /// the limits refuse, or for a name the access rules keep from the
    /// servers, is settled as not found at once.
    pub async fn await_name(
        &mut self,
        protocol: &mut P,
        name: Bytes,
        waiter: P::Waiter,
    ) -> Result<(), SessionError> {
        if !self.access.allows_name(&name) {
            METRICS.refused(Refusal::NameDenied);
            debug!(name = %String::from_utf8_lossy(&name), "search for a name the access rules deny");
            return protocol.settle(self, waiter, &name, None).await;
        }
        let refused = self
            .awaiting
            .add(name.clone(), waiter, &self.resolver, &self.answer_tx);
        match refused {
            Some(waiter) => {
                METRICS.refused(Refusal::Searches);
                debug!("search refused (limit)");
                protocol.settle(self, waiter, &name, None).await
            }
            None => Ok(()),
        }
    }

    /// Closes the link to `server` for `error`: from now on what it sent
    /// is dropped, and its channels end as if the server were lost.
    pub fn close_link(&mut self, server: SocketAddrV4, error: LinkError) {
        if let Some(link) = self.links.get_mut(&server) {
            link.closing = true;
            let _ = self.events_tx.send(BackendEvent::Closed {
                server,
                link: link.backend.id,
                error,
            });
        }
    }

    // ----- the core's own work -----

    /// Names the servers that never answered a channel creation of this
    /// client, which is leaving: a server that accepts and then stays
    /// silent is otherwise seen only by its clients' timeouts.
    fn report_unanswered_creates(&self) {
        for (server, channels) in self.channels.creating_per_server() {
            warn!(%server, channels, "server did not answer channel creations before the client left");
        }
    }

    async fn on_answer(&mut self, protocol: &mut P, answer: Answer) -> Result<(), SessionError> {
        for waiter in self.awaiting.take(&answer.name) {
            protocol
                .settle(self, waiter, &answer.name, answer.server)
                .await?;
        }
        Ok(())
    }

    /// Waiters that want a prompt answer and have waited long enough are
    /// told "not found", while the name is still searched for the others.
    async fn on_prompt_due(&mut self, protocol: &mut P) -> Result<(), SessionError> {
        for (name, waiter) in self.awaiting.take_prompted(Instant::now()) {
            protocol.settle(self, waiter, &name, None).await?;
        }
        Ok(())
    }

    async fn on_event(
        &mut self,
        protocol: &mut P,
        event: BackendEvent<P::Message>,
    ) -> Result<(), SessionError> {
        match event {
            BackendEvent::Message {
                server,
                link,
                message,
                permit,
            } => {
                let current = |l: &Link| l.backend.id == link && !l.closing;
                if self.links.get(&server).is_some_and(current) {
                    if let Some(frame) = protocol.on_server(self, server, message)? {
                        self.client.send_reserved(frame, permit)?;
                    }
                }
                Ok(())
            }
            BackendEvent::Head {
                server,
                link,
                head,
                answer,
            } => {
                let current = |l: &Link| l.backend.id == link && !l.closing;
                let large = if self.links.get(&server).is_some_and(current) {
                    protocol.on_server_head(self, server, &head)?
                } else {
                    LargeMessage::Drop
                };
                let pass = match large {
                    LargeMessage::Stream => Pass::Stream(self.client.open_stream()?),
                    LargeMessage::Whole => Pass::Whole,
                    LargeMessage::Drop => Pass::Drop,
                };
                // A link that is gone needs no answer.
                let _ = answer.send(pass);
                Ok(())
            }
            BackendEvent::Closed {
                server,
                link,
                error,
            } => self.on_link_closed(protocol, server, link, error).await,
        }
    }

    /// Every channel of a lost server ends towards the client, which then
    /// searches again and reconnects when the server is back.
    async fn on_link_closed(
        &mut self,
        protocol: &mut P,
        server: SocketAddrV4,
        link: u64,
        error: LinkError,
    ) -> Result<(), SessionError> {
        if self.links.get(&server).map(|l| l.backend.id) != Some(link) {
            return Ok(());
        }
        self.links.remove(&server);
        self.resolver.forget(server);
        protocol.forget_server(server);
        let lost = self.channels.drain(server);
        info!(%server, channels = lost.len(), cause = %error, "server connection closed");
        for (cid, channel) in lost {
            if let Some(notice) = protocol.lost_channel_notice(cid, channel) {
                self.to_client(notice).await?;
            }
        }
        Ok(())
    }

    /// Sends what the last handler queued for servers, in order.
    async fn flush(&mut self, protocol: &mut P) -> Result<(), SessionError> {
        while let Some(outgoing) = self.outgoing.pop_front() {
            match outgoing {
                Outgoing::Relayed(server, frame) => {
                    self.send_when_room(protocol, server, frame).await?
                }
                Outgoing::Control(server, frame) => {
                    if let Some(outbox) = self.link_outbox(server) {
                        // A closed link reports itself as an event.
                        let _ = outbox.send_control(frame).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Queues `frame` for `server` once it fits, passing server messages to
    /// the client meanwhile (see the module doc).
    async fn send_when_room(
        &mut self,
        protocol: &mut P,
        server: SocketAddrV4,
        frame: Frame,
    ) -> Result<(), SessionError> {
        let Some(outbox) = self.link_outbox(server) else {
            return Ok(());
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
                    return Ok(());
                }
                Some(event) = self.events_rx.recv() => self.on_event(protocol, event).await?,
            }
        }
    }

    fn link_outbox(&self, server: SocketAddrV4) -> Option<Outbox> {
        self.links.get(&server).map(|l| l.backend.outbox.clone())
    }
}

/// Helpers for the sessions' tests.
#[cfg(test)]
pub mod test_support {
    use std::time::Duration;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::sync::mpsc;

    /// Reads from `client` until `bytes` have come, each read within 3 s.
    pub async fn read_at_least(client: &mut (impl AsyncRead + Unpin), bytes: usize) {
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        while total < bytes {
            match tokio::time::timeout(Duration::from_secs(3), client.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => total += n,
                other => panic!("relay stalled after {total} bytes: {other:?}"),
            }
        }
    }

    /// A client that writes `request` `times` over (in a task of its own)
    /// while it reads `to_read` bytes, as a flow-control test needs: the
    /// writes must all be taken within 5 s of the reads, and the test
    /// server must report having read them all.
    pub async fn write_while_reading(
        mut writing: OwnedWriteHalf,
        request: Vec<u8>,
        times: usize,
        reading: &mut OwnedReadHalf,
        to_read: usize,
        server_reads: &mut mpsc::UnboundedReceiver<usize>,
    ) {
        let total = times * request.len();
        let writer = tokio::spawn(async move {
            for _ in 0..times {
                writing.write_all(&request).await.unwrap();
            }
            writing
        });
        read_at_least(reading, to_read).await;
        let _writing = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the client's requests all taken within 5 s");
        server_read_at_least(server_reads, total).await;
    }

    /// Waits until a test server reports having read `bytes`, each report
    /// within 3 s.
    pub async fn server_read_at_least(reads: &mut mpsc::UnboundedReceiver<usize>, bytes: usize) {
        let mut taken = 0;
        while taken < bytes {
            match tokio::time::timeout(Duration::from_secs(3), reads.recv()).await {
                Ok(Some(n)) => taken += n,
                other => panic!("server read {taken} bytes, then {other:?}"),
            }
        }
    }
}
