//! A byte-bounded send queue in front of one socket, drained by one writer.
//!
//! Every frame takes permits from a budget of bytes before it is queued and
//! gives them back only once it is written. A peer that reads slowly makes
//! `reserve` wait, so whoever feeds the queue stops reading its own source:
//! memory stays bounded and TCP flow control reaches the far end.
//! A frame larger than the whole budget takes the whole budget, so it can
//! never wait forever.
//!
//! Frames the session makes itself draw on a separate control allowance at
//! their real size; one larger than the whole allowance is refused, so a
//! client cannot have the shim echo an arbitrarily large payload back.
//!
//! The writer notes each write that makes progress in an [`Activity`], which
//! the client's reader counts against the idle deadline.

use super::limits::Activity;
use super::stream::{self, Part, StreamSink, StreamSource};
use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Longest header a frame carries inline (the CA extended header).
const MAX_HEAD: usize = 24;
/// Bodies up to this size are copied into the write batch; larger ones are
/// written from their own buffer to avoid the copy.
const COPY_LIMIT: usize = 16 * 1024;
/// How much one write call gathers from queued frames.
const BATCH_BYTES: usize = 256 * 1024;
/// The separate allowance for frames a session makes itself (greetings,
/// echo and search replies, disconnect notices). They must never wait for
/// the main budget: relayed messages may hold all of it while they wait for
/// that same session to pass them on.
pub const CONTROL_BYTES: usize = 64 * 1024;

/// One message ready for the wire: a short header and a shared body.
#[derive(Debug, Clone)]
pub struct Frame {
    head: [u8; MAX_HEAD],
    head_len: u8,
    body: Bytes,
}

impl Frame {
    /// `encode_head` writes at most 24 bytes.
    pub fn new(encode_head: impl FnOnce(&mut &mut [u8]), body: Bytes) -> Frame {
        let mut head = [0u8; MAX_HEAD];
        let mut cursor = &mut head[..];
        encode_head(&mut cursor);
        let head_len = (MAX_HEAD - cursor.len()) as u8;
        Frame {
            head,
            head_len,
            body,
        }
    }

    pub fn head(&self) -> &[u8] {
        &self.head[..usize::from(self.head_len)]
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    pub fn len(&self) -> usize {
        usize::from(self.head_len) + self.body.len()
    }
}

/// The far end is gone: nothing more can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// Why a frame the session made itself was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlError {
    Closed,
    /// The frame is larger than the whole control allowance.
    TooLarge {
        len: usize,
    },
}

impl From<Closed> for ControlError {
    fn from(_: Closed) -> Self {
        ControlError::Closed
    }
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::Closed => write!(f, "connection closed"),
            ControlError::TooLarge { len } => write!(
                f,
                "reply (echo payload) of {len} bytes exceeds the {} KiB control allowance",
                CONTROL_BYTES / 1024
            ),
        }
    }
}

impl std::error::Error for ControlError {}

/// Bytes set aside in an outbox for one frame.
#[derive(Debug)]
pub struct Permit(#[allow(dead_code)] OwnedSemaphorePermit);

struct Queued {
    entry: Entry,
    /// Frames hold their bytes of the budget until written. A passing
    /// message is bounded by its own channel instead (see `stream`).
    _permit: Option<Permit>,
    _counted: Option<Counted>,
}

enum Entry {
    Frame(Frame),
    /// A large message passing as it arrives: it holds the queue until its
    /// last part is written.
    Stream(StreamSource),
}

/// The sending side. Cheap to clone; all clones feed the same socket.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Queued>,
    budget: Arc<Semaphore>,
    control: Arc<Semaphore>,
    limit: usize,
    /// Where queued frames are counted until written, if anywhere.
    unwritten: Option<&'static Unwritten>,
}

/// The receiving side, consumed by [`OutboxReceiver::drain_into`].
pub struct OutboxReceiver {
    rx: mpsc::UnboundedReceiver<Queued>,
    budget: Arc<Semaphore>,
    control: Arc<Semaphore>,
    activity: Activity,
    /// Fail a write that makes no progress for this long.
    give_up_after: Option<Duration>,
    /// Count what is written as bytes sent to clients (for metrics).
    to_client: bool,
}

/// Frames queued in a set of outboxes and not yet written, so a shutdown
/// can wait until what was queued for clients is on the wire.
pub struct Unwritten(AtomicUsize);

/// Frames queued towards clients.
pub static UNWRITTEN_TO_CLIENTS: Unwritten = Unwritten::new();

impl Unwritten {
    pub const fn new() -> Unwritten {
        Unwritten(AtomicUsize::new(0))
    }

    /// Waits until every counted frame is written, for at most `within`;
    /// says whether they all were.
    pub async fn written_within(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.0.load(Ordering::Relaxed) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// One frame counted in an [`Unwritten`] until it is written (dropped).
struct Counted(&'static Unwritten);

impl Counted {
    fn new(count: &'static Unwritten) -> Counted {
        count.0.fetch_add(1, Ordering::Relaxed);
        Counted(count)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        // Wakes every sender waiting for budget that will never come back.
        self.budget.close();
        self.control.close();
    }
}

impl Outbox {
    /// An outbox that holds at most `limit_bytes` of queued frames
    /// (or one frame, if that frame is larger).
    pub fn new(limit_bytes: usize) -> (Outbox, OutboxReceiver) {
        let limit = limit_bytes
            .clamp(1, Semaphore::MAX_PERMITS)
            .min(u32::MAX as usize);
        let budget = Arc::new(Semaphore::new(limit));
        let control = Arc::new(Semaphore::new(CONTROL_BYTES));
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Outbox {
                tx,
                budget: budget.clone(),
                control: control.clone(),
                limit,
                unwritten: None,
            },
            OutboxReceiver {
                rx,
                budget,
                control,
                activity: Activity::new(),
                give_up_after: None,
                to_client: false,
            },
        )
    }

    /// Waits until `len` bytes fit in the queue.
    pub async fn reserve(&self, len: usize) -> Result<Permit, Closed> {
        let cost = len.clamp(1, self.limit) as u32;
        self.acquire(&self.budget, cost).await
    }

    async fn acquire(&self, semaphore: &Arc<Semaphore>, cost: u32) -> Result<Permit, Closed> {
        tokio::select! {
            permit = semaphore.clone().acquire_many_owned(cost) => {
                permit.map(Permit).map_err(|_| Closed)
            }
            _ = self.tx.closed() => Err(Closed),
        }
    }

    /// Queues a frame the session made itself, from the control allowance,
    /// charged at its real size: it waits only for frames already in the
    /// queue to be written, never for relayed messages that are still on
    /// their way to the queue. A frame larger than the whole allowance is
    /// refused.
    pub async fn send_control(&self, frame: Frame) -> Result<(), ControlError> {
        let len = frame.len();
        if len > CONTROL_BYTES {
            return Err(ControlError::TooLarge { len });
        }
        // At most CONTROL_BYTES, so it fits u32.
        let permit = self.acquire(&self.control, len.max(1) as u32).await?;
        Ok(self.send_reserved(frame, permit)?)
    }

    /// Reserves `len` bytes if they fit now, without waiting.
    pub fn try_reserve_now(&self, len: usize) -> Result<Permit, Closed> {
        let cost = len.clamp(1, self.limit) as u32;
        self.budget
            .clone()
            .try_acquire_many_owned(cost)
            .map(Permit)
            .map_err(|_| Closed)
    }

    /// Counts this outbox's frames in `unwritten` from when they are queued
    /// until they are written.
    pub fn counted_in(mut self, unwritten: &'static Unwritten) -> Self {
        self.unwritten = Some(unwritten);
        self
    }

    /// Queues a frame whose bytes were reserved.
    pub fn send_reserved(&self, frame: Frame, permit: Permit) -> Result<(), Closed> {
        self.tx
            .send(Queued {
                entry: Entry::Frame(frame),
                _permit: Some(permit),
                _counted: self.unwritten.map(Counted::new),
            })
            .map_err(|_| Closed)
    }

    /// Queues a large message that will pass as it arrives; its parts go
    /// to the returned sink. Frames queued after it wait for its end.
    pub fn open_stream(&self) -> Result<StreamSink, Closed> {
        let (sink, source) = StreamSink::new();
        self.tx
            .send(Queued {
                entry: Entry::Stream(source),
                _permit: None,
                _counted: self.unwritten.map(Counted::new),
            })
            .map_err(|_| Closed)?;
        Ok(sink)
    }

    /// Waits for room, then queues the frame.
    pub async fn send(&self, frame: Frame) -> Result<(), Closed> {
        let permit = self.reserve(frame.len()).await?;
        self.send_reserved(frame, permit)
    }
}

impl OutboxReceiver {
    /// Notes every write that makes progress.
    pub fn activity(&self) -> Activity {
        self.activity.clone()
    }

    /// Fails the writer when the peer accepts no byte for `limit` while
    /// bytes wait for it, so a peer that stops reading cannot hold the
    /// connection (and its writer) forever.
    pub fn give_up_after(mut self, limit: Duration) -> Self {
        self.give_up_after = Some(limit);
        self
    }

    /// Counts what this writer sends in the bytes-to-clients metric.
    pub fn counting_client_bytes(mut self) -> Self {
        self.to_client = true;
        self
    }

    /// Writes all of `bytes`, noting progress.
    async fn write_all<W: AsyncWrite + Unpin>(&self, out: &mut W, bytes: &[u8]) -> io::Result<()> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let written = match self.give_up_after {
                None => out.write(rest).await?,
                Some(limit) => tokio::time::timeout(limit, out.write(rest))
                    .await
                    .map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("peer accepted no bytes for {limit:?}"),
                        )
                    })??,
            };
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.activity.touch();
            if self.to_client {
                super::metrics::METRICS.bytes_to_clients(written);
            }
            rest = &rest[written..];
        }
        Ok(())
    }

    /// Writes queued frames until every sender is gone or the socket fails.
    /// Frames that are ready together go out in one write; a passing
    /// message goes out part by part, before anything queued after it.
    pub async fn drain_into<W: AsyncWrite + Unpin>(mut self, mut out: W) -> io::Result<()> {
        let mut batch: Vec<Queued> = Vec::new();
        let mut buf = BytesMut::with_capacity(64 * 1024);
        // A passing message met while gathering a batch: it goes next.
        let mut waiting: Option<Queued> = None;
        loop {
            let first = match waiting.take() {
                Some(queued) => queued,
                None => match self.rx.recv().await {
                    Some(queued) => queued,
                    None => break,
                },
            };
            if let Entry::Stream(source) = first.entry {
                self.write_stream(&mut out, source).await?;
                // Counted until here: now it is written.
                drop(first._counted);
                continue;
            }
            let mut gathered = 0;
            let mut next = Some(first);
            while let Some(queued) = next.take() {
                if let Entry::Frame(frame) = &queued.entry {
                    gathered += frame.len();
                    batch.push(queued);
                } else {
                    waiting = Some(queued);
                    break;
                }
                if gathered < BATCH_BYTES {
                    next = self.rx.try_recv().ok();
                }
            }
            self.write_batch(&mut out, &mut buf, &batch).await?;
            // Written: give the budget back.
            batch.clear();
        }
        out.shutdown().await
    }

    /// Writes frames, copying small bodies into one buffer.
    async fn write_batch<W: AsyncWrite + Unpin>(
        &self,
        out: &mut W,
        buf: &mut BytesMut,
        batch: &[Queued],
    ) -> io::Result<()> {
        for queued in batch {
            let Entry::Frame(frame) = &queued.entry else {
                continue;
            };
            buf.put_slice(frame.head());
            if frame.body().len() <= COPY_LIMIT {
                buf.put_slice(frame.body());
            } else {
                self.write_all(out, buf).await?;
                buf.clear();
                self.write_all(out, frame.body()).await?;
            }
        }
        if !buf.is_empty() {
            self.write_all(out, buf).await?;
            buf.clear();
        }
        Ok(())
    }

    /// Writes a passing message's parts until its end. One cut short fails
    /// the writer: the peer must not read on from the middle of a message.
    async fn write_stream<W: AsyncWrite + Unpin>(
        &self,
        out: &mut W,
        mut source: StreamSource,
    ) -> io::Result<()> {
        loop {
            match source.recv().await {
                Some(Part::Bytes(bytes)) => {
                    self.write_all(out, &bytes).await?;
                    stream::PARTS.give_back(bytes);
                }
                Some(Part::End) => return Ok(()),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server connection lost inside a message passing to this client",
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn frame(body_len: usize) -> Frame {
        Frame::new(|h| h.put_slice(b"HEAD"), Bytes::from(vec![7u8; body_len]))
    }

    // A shutdown waits for what was queued to be written: a frame whose
    // peer does not read stays counted, until the peer has read it.
    #[tokio::test]
    async fn queued_frames_count_until_written() {
        static UNWRITTEN: Unwritten = Unwritten::new();
        let (outbox, rx) = Outbox::new(1 << 20);
        let outbox = outbox.counted_in(&UNWRITTEN);
        let (near, mut far) = tokio::io::duplex(1024);
        tokio::spawn(rx.drain_into(near));
        assert!(UNWRITTEN.written_within(Duration::from_millis(50)).await);
        outbox.send(frame(100_000)).await.unwrap();
        assert!(!UNWRITTEN.written_within(Duration::from_millis(100)).await);
        let mut got = vec![0u8; 100_004];
        tokio::io::AsyncReadExt::read_exact(&mut far, &mut got)
            .await
            .unwrap();
        assert!(UNWRITTEN.written_within(Duration::from_millis(500)).await);
    }

    #[tokio::test]
    async fn sender_waits_when_budget_is_spent() {
        let (outbox, _rx) = Outbox::new(100);
        outbox.send(frame(60)).await.unwrap();
        let second = tokio::time::timeout(Duration::from_millis(50), outbox.send(frame(60))).await;
        assert!(
            second.is_err(),
            "a second frame must wait for the first to be written"
        );
    }

    #[tokio::test]
    async fn written_frames_free_the_budget() {
        let (outbox, rx) = Outbox::new(100);
        let (mut client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(rx.drain_into(server));
        for _ in 0..10 {
            outbox.send(frame(60)).await.unwrap();
        }
        let mut got = vec![0u8; 640];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut got)
            .await
            .unwrap();
        assert_eq!(&got[..4], b"HEAD");
    }

    // Nothing is written into the middle of a passing message.
    #[tokio::test]
    async fn frames_queued_after_a_passing_message_wait_for_its_end() {
        let (outbox, rx) = Outbox::new(1 << 20);
        let (mut client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(rx.drain_into(server));
        let sink = outbox.open_stream().unwrap();
        sink.send(Bytes::from_static(b"ab")).await.unwrap();
        outbox.send(frame(2)).await.unwrap();
        sink.send(Bytes::from_static(b"cd")).await.unwrap();
        sink.finish().await.unwrap();
        let mut got = vec![0u8; 10];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"abcdHEAD\x07\x07");
    }

    #[tokio::test]
    async fn a_passing_message_cut_short_fails_the_writer() {
        let (outbox, rx) = Outbox::new(1 << 20);
        let (_client, server) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(rx.drain_into(server));
        let sink = outbox.open_stream().unwrap();
        sink.send(Bytes::from_static(b"ab")).await.unwrap();
        drop(sink);
        let written = writer.await.unwrap();
        assert_eq!(
            written.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof,
            "the client must not read on from the middle of a message"
        );
    }

    #[tokio::test]
    async fn frame_larger_than_budget_still_passes() {
        let (outbox, rx) = Outbox::new(10);
        let (mut client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(rx.drain_into(server));
        outbox.send(frame(100_000)).await.unwrap();
        let mut got = vec![0u8; 100_004];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut got)
            .await
            .unwrap();
        assert!(got[4..].iter().all(|&b| b == 7));
    }

    #[tokio::test]
    async fn control_frames_pass_while_relayed_ones_hold_the_budget() {
        let (outbox, _rx) = Outbox::new(100);
        // A relayed message holds the whole budget and is not queued yet.
        let _held = outbox.reserve(100).await.unwrap();
        let control =
            tokio::time::timeout(Duration::from_millis(100), outbox.send_control(frame(16))).await;
        assert_eq!(
            control.ok(),
            Some(Ok(())),
            "a session's own reply must not wait for the held budget"
        );
    }

    // A PVA ECHO's payload comes back in the reply: without this, a client
    // could have the shim queue a 64 MiB echo outside every budget.
    #[tokio::test]
    async fn control_frame_larger_than_the_allowance_is_refused() {
        let (outbox, _rx) = Outbox::new(1 << 20);
        let refused = outbox.send_control(frame(100_000)).await;
        assert_eq!(refused, Err(ControlError::TooLarge { len: 100_004 }));
        assert_eq!(
            refused.unwrap_err().to_string(),
            "reply (echo payload) of 100004 bytes exceeds the 64 KiB control allowance"
        );
        let whole = frame(CONTROL_BYTES - 4);
        assert_eq!(outbox.send_control(whole).await, Ok(()));
    }

    #[tokio::test]
    async fn control_frames_are_charged_at_their_real_size() {
        let (outbox, _rx) = Outbox::new(1 << 20);
        outbox.send_control(frame(40_000)).await.unwrap();
        let second = tokio::time::timeout(
            Duration::from_millis(50),
            outbox.send_control(frame(40_000)),
        )
        .await;
        assert!(
            second.is_err(),
            "80 KB of replies exceed the 64 KiB allowance"
        );
        let small =
            tokio::time::timeout(Duration::from_millis(50), outbox.send_control(frame(16))).await;
        assert_eq!(small.ok(), Some(Ok(())), "a small reply still fits");
    }

    #[tokio::test(start_paused = true)]
    async fn writer_gives_up_on_a_peer_that_reads_nothing() {
        let (outbox, rx) = Outbox::new(1 << 20);
        let (_client, server) = tokio::io::duplex(64);
        let start = tokio::time::Instant::now();
        let writer = tokio::spawn(
            rx.give_up_after(Duration::from_secs(180))
                .drain_into(server),
        );
        outbox.send(frame(1000)).await.unwrap();
        let error = writer.await.unwrap().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(error.to_string(), "peer accepted no bytes for 180s");
        assert_eq!(start.elapsed(), Duration::from_secs(180));
    }

    #[tokio::test(start_paused = true)]
    async fn writer_keeps_a_slow_reader_and_notes_each_write() {
        let (outbox, rx) = Outbox::new(1 << 20);
        let sent = rx.activity();
        let before = sent.last();
        let (mut client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn(
            rx.give_up_after(Duration::from_secs(180))
                .drain_into(server),
        );
        outbox.send(frame(1000)).await.unwrap();
        drop(outbox);
        // 64 bytes every 100 s: slow, but never 180 s without progress.
        let mut got = 0;
        let mut buf = [0u8; 64];
        while got < 1004 {
            tokio::time::sleep(Duration::from_secs(100)).await;
            got += tokio::io::AsyncReadExt::read(&mut client, &mut buf)
                .await
                .unwrap();
        }
        writer.await.unwrap().unwrap();
        assert!(sent.last() - before >= Duration::from_secs(1500));
    }

    #[tokio::test]
    async fn waiting_sender_sees_closed_when_writer_goes() {
        let (outbox, rx) = Outbox::new(10);
        outbox.send(frame(10)).await.unwrap();
        let waiter = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.send(frame(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(rx);
        assert_eq!(waiter.await.unwrap(), Err(Closed));
    }
}
