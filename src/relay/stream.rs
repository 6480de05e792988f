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

use bytes::Bytes;
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
}
