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
use bytes::BytesMut;
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

pub struct FrameReader<R, D> {
    io: R,
    buf: BytesMut,
    decoder: D,
    watch: Option<Watch>,
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
            watch: None,
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

    /// The next message, or `None` at a clean EOF between messages.
    /// Cancel-safe: a dropped call loses no bytes.
    pub async fn next(&mut self) -> Result<Option<D::Item>, ReadError> {
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
            let spare = self.buf.capacity() - self.buf.len();
            if spare < MIN_READ {
                let missing = needed.saturating_sub(self.buf.len());
                self.buf.reserve(missing.clamp(MIN_READ, MAX_GROW));
            }
            let read = match &mut self.watch {
                None => self.io.read_buf(&mut self.buf).await,
                Some(watch) => {
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
                    if matches!(read, Ok(n) if n > 0) {
                        watch.received = Instant::now();
                    }
                    read
                }
            }
            .map_err(ReadError::Io)?;
            if read == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::TruncatedAtEof {
                        buffered: self.buf.len(),
                    })
                };
            }
        }
    }
}
