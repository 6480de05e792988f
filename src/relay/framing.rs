//! Reads whole protocol messages from a byte stream.
//!
//! The reader owns one growing buffer. "Need more bytes" is not an error;
//! an invalid message is, and so is EOF in the middle of a message.
//!
//! A reader of client connections also enforces the client deadlines (see
//! `limits`), so both protocols get them from one place. They are judged
//! only while the reader waits for bytes: when the session was busy
//! elsewhere, bytes that arrived meanwhile are read before any deadline is.

use super::limits::{Activity, ClientDeadlines};
use super::metrics::BadInput;
use super::stream::{self, PART_MAX};
use bytes::{Buf, Bytes, BytesMut};
use std::fmt;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// Reads at least this much per call, so small messages batch well.
const MIN_READ: usize = 16 * 1024;
/// Grows the buffer by at most this much at a time, so a header that
/// announces a huge message costs memory only as its bytes arrive.
const MAX_GROW: usize = 4 * 1024 * 1024;

/// A protocol's framing rule.
pub trait Decoder {
    type Item;
    type Error: std::error::Error + Send + Sync + 'static;

    /// Takes one message off the front of `buf`. `Ok(None)` means more bytes
    /// are needed, and `needed` is set to the buffer length that would do.
    fn decode(
        &mut self,
        buf: &mut BytesMut,
        needed: &mut usize,
    ) -> Result<Option<Self::Item>, Self::Error>;

    /// Bytes of a message begun but kept by the decoder itself (segments
    /// already joined), so a stalled message is seen even between segments.
    fn partial_len(&self) -> usize {
        0
    }

    /// Whether the message at the front of `buf` passes in parts (see
    /// `relay::stream`): if so, its head. `Ok(None)` with `needed` left at
    /// 0 means it is decoded whole; with `needed` set, more bytes are
    /// needed to tell.
    fn split(
        &mut self,
        _buf: &BytesMut,
        _needed: &mut usize,
    ) -> Result<Option<Split<Self::Item>>, Self::Error> {
        Ok(None)
    }

    /// Inside a message passing in parts whose last span continues: the
    /// span at the front of `buf` (a further segment, or a control message
    /// between segments). `Ok(None)`: `needed` says how many bytes to tell.
    fn split_next(
        &mut self,
        _buf: &BytesMut,
        _needed: &mut usize,
    ) -> Result<Option<Span>, Self::Error> {
        Ok(Some(Span {
            len: 0,
            continues: false,
            dropped: false,
        }))
    }
}

/// The start of a message that passes in parts.
pub struct Split<M> {
    /// The message with its payload cut to its first bytes, for the
    /// session to decide on; its header is the message's own.
    pub head: M,
    /// The bytes on the wire that follow from here.
    pub span: Span,
}

/// A run of bytes of a message passing in parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Bytes on the wire, headers included.
    pub len: usize,
    /// More spans of the same message follow (PVA segments).
    pub continues: bool,
    /// Read and dropped, not passed on (a control message between
    /// segments, meant for the shim).
    pub dropped: bool,
}

/// What [`FrameReader::next_piece`] yields.
pub enum Piece<M> {
    Whole(M),
    /// A large message begun: next, [`FrameReader::pass_in_parts`] then
    /// [`FrameReader::next_part`] until `None`, or [`FrameReader::next`]
    /// to read it whole.
    Head(M),
}

#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    Protocol(Box<dyn std::error::Error + Send + Sync>),
    /// The peer closed the connection in the middle of a message.
    TruncatedAtEof {
        buffered: usize,
    },
    /// The client broke one of its deadlines.
    TimedOut(Timeout),
}

/// Which client deadline ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// No complete message within this time of connecting.
    Hello(Duration),
    /// Nothing received and nothing sent for this long.
    Idle(Duration),
    /// A message begun, then no byte for this long.
    Stalled { after: Duration, buffered: usize },
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Timeout::Hello(d) => write!(f, "no complete message within {d:?} of connecting"),
            Timeout::Idle(d) => write!(f, "idle for {d:?} (nothing received or sent)"),
            Timeout::Stalled { after, buffered } => write!(
                f,
                "message stalled for {after:?} mid-payload ({buffered} bytes received)"
            ),
        }
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "read failed: {e}"),
            ReadError::Protocol(e) => write!(f, "protocol error: {e}"),
            ReadError::TruncatedAtEof { buffered } => {
                write!(
                    f,
                    "connection closed inside a message ({buffered} bytes pending)"
                )
            }
            ReadError::TimedOut(timeout) => write!(f, "{timeout}"),
        }
    }
}

impl std::error::Error for ReadError {}

impl ReadError {
    /// The bad-input kind this error counts as in the metrics, if any: a
    /// failed read is the network's fault, not the peer's input.
    pub fn bad_input(&self) -> Option<BadInput> {
        match self {
            ReadError::Io(_) => None,
            ReadError::Protocol(_) => Some(BadInput::Protocol),
            ReadError::TruncatedAtEof { .. } => Some(BadInput::Truncated),
            ReadError::TimedOut(_) => Some(BadInput::Timeout),
        }
    }
}

pub struct FrameReader<R, D> {
    io: R,
    buf: BytesMut,
    decoder: D,
    /// The buffer was grown beyond its usual size for a large message.
    grown: bool,
    watch: Option<Watch>,
    /// Some read has brought bytes.
    received_any: bool,
    /// The message whose head was last yielded, not yet passing.
    split: Option<Span>,
    /// The message passing in parts: what is left of its current span.
    passing: Option<Span>,
}

/// A client connection's deadlines and the clocks they are judged by.
struct Watch {
    deadlines: ClientDeadlines,
    opened: Instant,
    /// A whole message has been read.
    greeted: bool,
    /// The last read that brought bytes.
    received: Instant,
    /// What the writer sent, shared with it.
    sent: Activity,
}

impl Watch {
    /// The earliest moment a deadline could run out.
    fn next_deadline(&self, buffered: usize) -> Instant {
        let mut at = self.received.max(self.sent.last()) + self.deadlines.idle;
        if !self.greeted {
            at = at.min(self.opened + self.deadlines.hello);
        }
        if buffered > 0 {
            at = at.min(self.received + self.deadlines.stall);
        }
        at
    }

    /// The deadline that has run out at `now`, if any. The writer may have
    /// sent since the deadline was computed, so idle is judged afresh.
    fn expired(&self, now: Instant, buffered: usize) -> Option<Timeout> {
        let d = &self.deadlines;
        if !self.greeted && now >= self.opened + d.hello {
            Some(Timeout::Hello(d.hello))
        } else if buffered > 0 && now >= self.received + d.stall {
            Some(Timeout::Stalled {
                after: d.stall,
                buffered,
            })
        } else if now >= self.received.max(self.sent.last()) + d.idle {
            Some(Timeout::Idle(d.idle))
        } else {
            None
        }
    }
}

impl<R: AsyncRead + Unpin, D: Decoder> FrameReader<R, D> {
    pub fn new(io: R, decoder: D) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(MIN_READ),
            decoder,
            grown: false,
            watch: None,
            received_any: false,
            split: None,
            passing: None,
        }
    }

    /// Enforces a client's deadlines from now on; `sent` is the activity
    /// of the writer towards the same client.
    pub fn with_deadlines(mut self, deadlines: ClientDeadlines, sent: Activity) -> Self {
        let now = Instant::now();
        self.watch = Some(Watch {
            deadlines,
            opened: now,
            greeted: false,
            received: now,
            sent,
        });
        self
    }

    /// Whether the peer has sent any byte so far.
    pub fn received_any(&self) -> bool {
        self.received_any
    }

    /// Room for the next read, towards the `needed` bytes the decoder asked
    /// for.
    fn make_room(&mut self, needed: usize) {
        if self.grown && self.buf.is_empty() && needed <= 4 * MIN_READ {
            // Messages cut from a grown buffer share its allocation, and so
            // does the empty rest of it: start a small one, so an idle
            // connection does not keep a large message's memory once that
            // message is gone.
            self.buf = BytesMut::with_capacity(MIN_READ);
            self.grown = false;
        }
        let spare = self.buf.capacity() - self.buf.len();
        let missing = needed.saturating_sub(self.buf.len());
        // An empty buffer gets room for what is needed in one read: the
        // parts of a passing message are then as large as they can be.
        if spare < MIN_READ || (self.buf.is_empty() && spare < missing.min(MAX_GROW)) {
            self.buf.reserve(missing.clamp(MIN_READ, MAX_GROW));
            self.grown |= self.buf.capacity() > 4 * MIN_READ;
        }
    }

    /// The next message, or `None` at a clean EOF between messages.
    /// Cancel-safe: a dropped call loses no bytes.
    pub async fn next(&mut self) -> Result<Option<D::Item>, ReadError> {
        self.split = None;
        loop {
            let mut needed = 0;
            match self.decoder.decode(&mut self.buf, &mut needed) {
                Ok(Some(item)) => {
                    if let Some(watch) = &mut self.watch {
                        watch.greeted = true;
                    }
                    return Ok(Some(item));
                }
                Ok(None) => {}
                Err(e) => return Err(ReadError::Protocol(Box::new(e))),
            }
            if !self.fill(needed).await? {
                return Ok(None);
            }
        }
    }

    /// The next message whole, or the head of a large one (see
    /// [`Piece::Head`]); `None` at a clean EOF between messages.
    pub async fn next_piece(&mut self) -> Result<Option<Piece<D::Item>>, ReadError> {
        loop {
            let mut needed = 0;
            let split = self
                .decoder
                .split(&self.buf, &mut needed)
                .map_err(|e| ReadError::Protocol(Box::new(e)))?;
            if let Some(split) = split {
                self.split = Some(split.span);
                return Ok(Some(Piece::Head(split.head)));
            }
            if needed == 0 {
                return Ok(self.next().await?.map(Piece::Whole));
            }
            if !self.fill(needed).await? {
                return Ok(None);
            }
        }
    }

    /// Reads the message whose head was just yielded in parts.
    pub fn pass_in_parts(&mut self) {
        self.passing = self.split.take();
    }

    /// The next bytes of the message passing in parts, verbatim, headers
    /// included; `None` once it is complete.
    pub async fn next_part(&mut self) -> Result<Option<Bytes>, ReadError> {
        loop {
            let Some(span) = &mut self.passing else {
                return Ok(None);
            };
            if span.len == 0 {
                if !span.continues {
                    self.passing = None;
                    return Ok(None);
                }
                let mut needed = 0;
                match self.decoder.split_next(&self.buf, &mut needed) {
                    Ok(Some(next)) => *span = next,
                    Ok(None) => self.fill_inside(needed).await?,
                    Err(e) => return Err(ReadError::Protocol(Box::new(e))),
                }
                continue;
            }
            if self.buf.is_empty() {
                let wanted = span.len.min(PART_MAX);
                if self.watch.is_some() {
                    self.fill_inside(wanted).await?;
                    continue;
                }
                // Straight into a part of its own: no bytes of the next
                // message are read with it, and the part's memory comes
                // back for reuse once it is written (`stream::PARTS`).
                let mut part = stream::PARTS.buffer();
                let mut limited = (&mut self.io).take(wanted as u64);
                let n = limited.read_buf(&mut part).await.map_err(ReadError::Io)?;
                if n == 0 {
                    return Err(ReadError::TruncatedAtEof { buffered: 0 });
                }
                self.received_any = true;
                let Some(span) = &mut self.passing else {
                    return Ok(None);
                };
                span.len -= n;
                if span.dropped {
                    continue;
                }
                return Ok(Some(part.freeze()));
            }
            let n = span.len.min(self.buf.len()).min(PART_MAX);
            span.len -= n;
            if span.dropped {
                self.buf.advance(n);
                continue;
            }
            return Ok(Some(self.buf.split_to(n).freeze()));
        }
    }

    /// [`Self::fill`] inside a message, where EOF is an error.
    async fn fill_inside(&mut self, needed: usize) -> Result<(), ReadError> {
        if self.fill(needed.max(self.buf.len() + 1)).await? {
            Ok(())
        } else {
            Err(ReadError::TruncatedAtEof {
                buffered: self.buf.len(),
            })
        }
    }

    /// Reads more bytes towards `needed` in the buffer. `Ok(false)` at a
    /// clean EOF (nothing buffered); EOF with bytes buffered is an error.
    async fn fill(&mut self, needed: usize) -> Result<bool, ReadError> {
        self.make_room(needed);
        let read = match &mut self.watch {
            None => self.io.read_buf(&mut self.buf).await,
            Some(watch) => loop {
                let begun = self.buf.len() + self.decoder.partial_len();
                let deadline = watch.next_deadline(begun);
                let read = tokio::select! {
                    // Bytes that are there win over a deadline.
                    biased;
                    read = self.io.read_buf(&mut self.buf) => read,
                    () = tokio::time::sleep_until(deadline) => {
                        match watch.expired(Instant::now(), begun) {
                            Some(timeout) => return Err(ReadError::TimedOut(timeout)),
                            None => continue,
                        }
                    }
                };
                if let Ok(n @ 1..) = read {
                    super::metrics::METRICS.bytes_from_clients(n);
                    watch.received = Instant::now();
                }
                break read;
            },
        }
        .map_err(ReadError::Io)?;
        self.received_any |= read > 0;
        if read > 0 {
            Ok(true)
        } else if self.buf.is_empty() {
            Ok(false)
        } else {
            Err(ReadError::TruncatedAtEof {
                buffered: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, DuplexStream};

    /// Messages of one length byte and that many bytes.
    struct LengthPrefixed;

    #[derive(Debug)]
    struct Never;
    impl fmt::Display for Never {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "never")
        }
    }
    impl std::error::Error for Never {}

    impl Decoder for LengthPrefixed {
        type Item = Vec<u8>;
        type Error = Never;

        fn decode(
            &mut self,
            buf: &mut BytesMut,
            needed: &mut usize,
        ) -> Result<Option<Vec<u8>>, Never> {
            let Some(&len) = buf.first() else {
                *needed = 1;
                return Ok(None);
            };
            let total = 1 + usize::from(len);
            if buf.len() < total {
                *needed = total;
                return Ok(None);
            }
            Ok(Some(buf.split_to(total)[1..].to_vec()))
        }
    }

    const DEADLINES: ClientDeadlines = ClientDeadlines {
        hello: Duration::from_secs(5),
        idle: Duration::from_secs(180),
        stall: Duration::from_secs(30),
    };
    /// Longer than any deadline: a reader still waiting then has none.
    const FOREVER: Duration = Duration::from_secs(3600);

    fn watched() -> (
        DuplexStream,
        FrameReader<DuplexStream, LengthPrefixed>,
        Activity,
    ) {
        let (client, shim) = tokio::io::duplex(1 << 16);
        let sent = Activity::new();
        let reader = FrameReader::new(shim, LengthPrefixed).with_deadlines(DEADLINES, sent.clone());
        (client, reader, sent)
    }

    /// What `next` ends with, and after how long.
    async fn outcome(
        reader: &mut FrameReader<DuplexStream, LengthPrefixed>,
    ) -> (Result<Option<Vec<u8>>, String>, Duration) {
        let start = Instant::now();
        let result = match tokio::time::timeout(FOREVER, reader.next()).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("still waiting after an hour".to_string()),
        };
        (result, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_is_closed_after_the_hello_timeout() {
        let (_client, mut reader, _) = watched();
        let (result, after) = outcome(&mut reader).await;
        assert_eq!(
            result,
            Err("no complete message within 5s of connecting".into())
        );
        assert_eq!(after, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn one_byte_then_silence_is_closed_after_the_hello_timeout() {
        let (mut client, mut reader, _) = watched();
        client.write_all(&[9]).await.unwrap();
        let (result, after) = outcome(&mut reader).await;
        assert_eq!(
            result,
            Err("no complete message within 5s of connecting".into())
        );
        assert_eq!(after, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn message_stalled_mid_payload_is_closed_after_the_stall_timeout() {
        let (mut client, mut reader, _) = watched();
        client.write_all(&[1, 7, 4, 1, 2]).await.unwrap();
        assert_eq!(outcome(&mut reader).await.0, Ok(Some(vec![7])));
        let (result, after) = outcome(&mut reader).await;
        assert_eq!(
            result,
            Err("message stalled for 30s mid-payload (3 bytes received)".into())
        );
        assert_eq!(after, Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn each_byte_restarts_the_stall_clock() {
        let (mut client, mut reader, _) = watched();
        client.write_all(&[0, 3]).await.unwrap();
        assert_eq!(outcome(&mut reader).await.0, Ok(Some(vec![])));
        let feeder = tokio::spawn(async move {
            for byte in [1, 2, 3] {
                tokio::time::sleep(Duration::from_secs(20)).await;
                client.write_all(&[byte]).await.unwrap();
            }
            client
        });
        let (result, after) = outcome(&mut reader).await;
        assert_eq!(result, Ok(Some(vec![1, 2, 3])));
        assert_eq!(after, Duration::from_secs(60));
        drop(feeder);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_client_is_closed_after_the_idle_timeout() {
        let (mut client, mut reader, _) = watched();
        client.write_all(&[0]).await.unwrap();
        assert_eq!(outcome(&mut reader).await.0, Ok(Some(vec![])));
        let (result, after) = outcome(&mut reader).await;
        assert_eq!(
            result,
            Err("idle for 180s (nothing received or sent)".into())
        );
        assert_eq!(after, Duration::from_secs(180));
    }

    // A CA client that only receives monitor updates sends nothing at all.
    #[tokio::test(start_paused = true)]
    async fn bytes_sent_to_the_client_keep_it_open() {
        let (mut client, mut reader, sent) = watched();
        client.write_all(&[0]).await.unwrap();
        assert_eq!(outcome(&mut reader).await.0, Ok(Some(vec![])));
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(100)).await;
                sent.touch();
            }
        });
        let (result, after) = outcome(&mut reader).await;
        assert_eq!(
            result,
            Err("idle for 180s (nothing received or sent)".into())
        );
        assert_eq!(after, Duration::from_secs(1000 + 180));
    }

    // The session may be busy elsewhere (waiting for a server) while the
    // client finishes its message; that is no stall of the client's.
    #[tokio::test(start_paused = true)]
    async fn bytes_that_arrived_meanwhile_are_read_before_a_deadline() {
        let (mut client, mut reader, _) = watched();
        client.write_all(&[0, 2, 1]).await.unwrap();
        assert_eq!(outcome(&mut reader).await.0, Ok(Some(vec![])));
        let partial = tokio::time::timeout(Duration::from_secs(1), reader.next()).await;
        assert!(partial.is_err(), "half a message is not a message");
        client.write_all(&[2]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3 * 180)).await;
        assert_eq!(outcome(&mut reader).await.0, Ok(Some(vec![1, 2])));
    }

    /// Messages end at b'.'; the decoder keeps what it has taken so far
    /// (as a PVA decoder keeps joined segments).
    #[derive(Default)]
    struct Keeping {
        kept: Vec<u8>,
    }

    impl Decoder for Keeping {
        type Item = Vec<u8>;
        type Error = Never;

        fn decode(
            &mut self,
            buf: &mut BytesMut,
            needed: &mut usize,
        ) -> Result<Option<Vec<u8>>, Never> {
            if let Some(end) = buf.iter().position(|&b| b == b'.') {
                self.kept.extend_from_slice(&buf.split_to(end + 1)[..end]);
                return Ok(Some(std::mem::take(&mut self.kept)));
            }
            self.kept.extend_from_slice(&buf.split());
            *needed = 1;
            Ok(None)
        }

        fn partial_len(&self) -> usize {
            self.kept.len()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_kept_by_the_decoder_are_a_message_begun() {
        let (mut client, shim) = tokio::io::duplex(64);
        let mut reader =
            FrameReader::new(shim, Keeping::default()).with_deadlines(DEADLINES, Activity::new());
        client.write_all(b"a.bc").await.unwrap();
        assert_eq!(
            tokio::time::timeout(FOREVER, reader.next())
                .await
                .unwrap()
                .unwrap(),
            Some(b"a".to_vec())
        );
        let start = Instant::now();
        let stalled = tokio::time::timeout(FOREVER, reader.next()).await.unwrap();
        assert_eq!(
            stalled.map_err(|e| e.to_string()),
            Err("message stalled for 30s mid-payload (2 bytes received)".into())
        );
        assert_eq!(start.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_without_deadlines_waits() {
        let (_client, shim) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(shim, LengthPrefixed);
        let (result, _) = outcome(&mut reader).await;
        assert_eq!(result, Err("still waiting after an hour".into()));
    }

    /// Frames of a u32 length and that many bytes, cut from the buffer.
    struct U32Prefixed;

    impl Decoder for U32Prefixed {
        type Item = bytes::Bytes;
        type Error = Never;

        fn decode(
            &mut self,
            buf: &mut BytesMut,
            needed: &mut usize,
        ) -> Result<Option<bytes::Bytes>, Never> {
            let Some(len) = buf.get(..4) else {
                *needed = 4;
                return Ok(None);
            };
            let total = 4 + u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            if buf.len() < total {
                *needed = total;
                return Ok(None);
            }
            let mut frame = buf.split_to(total);
            bytes::Buf::advance(&mut frame, 4);
            Ok(Some(frame.freeze()))
        }
    }

    #[tokio::test]
    async fn an_idle_reader_does_not_keep_a_large_message_buffer() {
        let (mut writer, reader) = tokio::io::duplex(1 << 16);
        let mut frames = FrameReader::new(reader, U32Prefixed);
        let size = 4 << 20;
        tokio::spawn(async move {
            writer
                .write_all(&(size as u32).to_be_bytes())
                .await
                .unwrap();
            writer.write_all(&vec![7u8; size]).await.unwrap();
            // Stay open and silent.
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let big = frames.next().await.unwrap().unwrap();
        assert_eq!(big.len(), size);
        // The reader waits for the next message.
        let idle = tokio::time::timeout(Duration::from_millis(50), frames.next()).await;
        assert!(idle.is_err());
        assert!(
            big.is_unique(),
            "the reader still holds the large message's allocation"
        );
    }

    /// Hands out its bytes in reads of pseudo-random sizes (xorshift), as a
    /// TCP stream may: mostly a few bytes, so headers split, at times many.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        state: u64,
    }

    impl tokio::io::AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let me = &mut *self;
            me.state ^= me.state << 13;
            me.state ^= me.state >> 7;
            me.state ^= me.state << 17;
            let want = if (me.state >> 32) % 16 == 0 {
                4096
            } else {
                1 + (me.state >> 40) as usize % 9
            };
            let n = want.min(buf.remaining()).min(me.bytes.len() - me.at);
            buf.put_slice(&me.bytes[me.at..me.at + n]);
            me.at += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Every message the reader yields until EOF or an error, and how it ended.
    async fn read_all<D: Decoder>(
        bytes: &[u8],
        seed: u64,
        decoder: D,
    ) -> (Vec<D::Item>, Option<String>) {
        let trickle = Trickle {
            bytes: bytes.to_vec(),
            at: 0,
            state: seed | 1,
        };
        let mut reader = FrameReader::new(trickle, decoder);
        let mut items = Vec::new();
        loop {
            match reader.next().await {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return (items, None),
                Err(e) => return (items, Some(e.to_string())),
            }
        }
    }

    #[tokio::test]
    async fn the_real_decoders_yield_the_same_messages_whatever_the_read_sizes() {
        use crate::{ca, pva};
        // PVA: a segmented message around a control message, as pvxs and
        // pvAccessCPP send them, then a large one, then a cut-off header.
        let mut stream = vec![0xCA, 2, 0x50, 13, 3, 0, 0, 0, 1, 2, 3];
        stream.extend_from_slice(&[0xCA, 2, 0x41, 2, 0, 0, 0, 0]);
        stream.extend_from_slice(&[0xCA, 2, 0x70, 13, 2, 0, 0, 0, 4, 5]);
        stream.extend_from_slice(&[0xCA, 2, 0x60, 13, 1, 0, 0, 0, 6]);
        stream.extend_from_slice(&[0xCA, 2, 0x40, 10, 0x00, 0x50, 0, 0]);
        stream.extend(std::iter::repeat_n(9u8, 0x5000));
        stream.extend_from_slice(&[0xCA, 2, 0x40]);
        // CA: VERSION, an extended header, a cut-off payload.
        let mut ca_stream = vec![0, 0, 0, 0, 0, 0, 0, 13, 0, 0, 0, 0, 0, 0, 0, 0];
        ca_stream.extend_from_slice(&[0, 1, 0xFF, 0xFF, 0, 6, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2]);
        ca_stream.extend_from_slice(&[0, 0, 0x50, 0, 0, 0, 0, 2]);
        ca_stream.extend(std::iter::repeat_n(7u8, 0x5000));
        ca_stream.extend_from_slice(&[0, 1, 0, 8, 0, 6, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 1]);
        let pva = || pva::wire::Decoder::new(1 << 20, pva::wire::Direction::FromServer);
        let ca = || ca::CaDecoder {
            max_payload: 1 << 20,
        };
        let (pva_whole, pva_end) = read_all(&stream, u64::MAX, pva()).await;
        let (ca_whole, ca_end) = read_all(&ca_stream, u64::MAX, ca()).await;
        assert_eq!(pva_whole.len(), 3, "control, joined segments, large");
        assert_eq!(&pva_whole[1].payload[..], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(ca_whole.len(), 2);
        assert!(
            pva_end.is_some() && ca_end.is_some(),
            "both end inside a message"
        );
        for seed in 1..200u64 {
            let seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            assert_eq!(
                read_all(&stream, seed, pva()).await,
                (pva_whole.clone(), pva_end.clone())
            );
            assert_eq!(
                read_all(&ca_stream, seed, ca()).await,
                (ca_whole.clone(), ca_end.clone())
            );
        }
    }
}
