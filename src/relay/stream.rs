//! Large server messages passed to the client as they arrive.
//!
//! A message from a server whose payload is at least [`STREAM_MIN`] bytes
//! is not held whole: the link reads it in parts of at most [`PART_MAX`]
//! bytes and hands them to the client's writer through a small channel of
//! [`PART_SLOTS`] parts, so what one client connection holds of such a
//! message is bounded whatever the message's size (an 8 MiB image costs
//! at most about 1.5 MiB on its way through). PVA segments pass as segments.
//!
//! The session decides for each such message, from its header and first
//! bytes, whether it passes this way unchanged, must be read whole first
//! (the shim has to rewrite it), or is dropped. A passing message holds the
//! client's queue for itself until its last byte: nothing can be written
//! into the middle of a message, so other frames for that client wait
//! behind it, in order.
//!
//! A message cut short (its server lost mid-message) cannot be taken back
//! from the client: the client's connection is then closed, so it never
//! reads the next message from the middle of this one.

use bytes::{Bytes, BytesMut};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;

/// Payloads at least this large pass in parts. Smaller ones are read whole:
/// one message, one event, the usual batching of small writes.
pub const STREAM_MIN: usize = 64 * 1024;
/// The largest part read and handed on at once.
pub const PART_MAX: usize = 256 * 1024;
/// Parts waiting for the client's writer, at most, per message.
pub const PART_SLOTS: usize = 4;
/// A server that sends no byte of a message it has begun for this long
/// loses its link: its message holds the client's queue meanwhile.
pub const PART_STALL: Duration = Duration::from_secs(30);

/// What the session does with a large message, from its head.
pub enum Pass {
    /// The client gets it as it arrives, unchanged, through this sink.
    Stream(StreamSink),
    /// It must be read whole first, then it is handled as any message.
    Whole,
    /// Nobody gets it: its bytes are read and dropped.
    Drop,
}

/// One item of a passing message.
pub(crate) enum Part {
    Bytes(Bytes),
    /// The message is complete.
    End,
}

/// Where a link writes the parts of one passing message.
pub struct StreamSink {
    tx: mpsc::Sender<Part>,
}

/// The client's writer reads the parts of one passing message from here.
pub(crate) type StreamSource = mpsc::Receiver<Part>;

/// The client's writer is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterGone;

impl StreamSink {
    pub(crate) fn new() -> (StreamSink, StreamSource) {
        let (tx, rx) = mpsc::channel(PART_SLOTS);
        (StreamSink { tx }, rx)
    }

    /// Waits for room, then hands on `bytes` of the message.
    pub async fn send(&self, bytes: Bytes) -> Result<(), WriterGone> {
        self.tx
            .send(Part::Bytes(bytes))
            .await
            .map_err(|_| WriterGone)
    }

    /// The message is complete. A sink dropped without this cuts the
    /// message short, and the client's connection closes.
    pub async fn finish(self) -> Result<(), WriterGone> {
        self.tx.send(Part::End).await.map_err(|_| WriterGone)
    }
}

/// Part buffers written to a client and handed back, for the next reads:
/// a fresh allocation per part would be a fresh mapping to fault in (the
/// allocator returns freed large blocks to the system), which cost about a
/// tenth of the shim's CPU while relaying 8 MiB waveforms.
pub(crate) struct PartPool {
    free: Mutex<Vec<BytesMut>>,
}

/// The pool every link reads parts from.
pub(crate) static PARTS: PartPool = PartPool::new();

/// Free part buffers kept for reuse, at most (4 MiB).
const FREE_PARTS_KEPT: usize = 16;

impl PartPool {
    const fn new() -> PartPool {
        PartPool {
            free: Mutex::new(Vec::new()),
        }
    }

    /// An empty buffer with room for one part.
    pub(crate) fn buffer(&self) -> BytesMut {
        let reused = self.free.lock().ok().and_then(|mut free| free.pop());
        reused.unwrap_or_else(|| BytesMut::with_capacity(PART_MAX))
    }

    /// Takes back a part once it is written, if nothing else holds it.
    pub(crate) fn give_back(&self, part: Bytes) {
        let Ok(mut buf) = part.try_into_mut() else {
            return;
        };
        if buf.capacity() < PART_MAX {
            return;
        }
        buf.clear();
        if let Ok(mut free) = self.free.lock() {
            if free.len() < FREE_PARTS_KEPT {
                free.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sink_holds_at_most_its_slots() {
        let (sink, mut source) = StreamSink::new();
        for _ in 0..PART_SLOTS {
            sink.send(Bytes::from_static(b"x")).await.unwrap();
        }
        let full = tokio::time::timeout(
            Duration::from_millis(50),
            sink.send(Bytes::from_static(b"y")),
        )
        .await;
        assert!(full.is_err(), "a send beyond the slots must wait");
        assert!(matches!(source.recv().await, Some(Part::Bytes(_))));
    }

    #[test]
    fn a_written_part_is_reused_and_a_shared_one_is_not() {
        let pool = PartPool::new();
        let mut part = pool.buffer();
        part.extend_from_slice(b"abc");
        let part = part.freeze();
        let pointer = part.as_ptr();
        let shared = part.clone();
        pool.give_back(part);
        assert_ne!(pool.buffer().as_ptr(), pointer, "still held elsewhere");
        pool.give_back(shared);
        let reused = pool.buffer();
        assert_eq!(reused.as_ptr(), pointer);
        assert!(reused.is_empty() && reused.capacity() >= PART_MAX);
    }
}
