//! Reads whole protocol messages from a byte stream.
//!
//! The reader owns one growing buffer. "Need more bytes" is not an error;
//! an invalid message is, and so is EOF in the middle of a message.

use bytes::BytesMut;
use std::fmt;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt};

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
}

#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    Protocol(Box<dyn std::error::Error + Send + Sync>),
    /// The peer closed the connection in the middle of a message.
    TruncatedAtEof {
        buffered: usize,
    },
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
        }
    }
}

impl std::error::Error for ReadError {}

pub struct FrameReader<R, D> {
    io: R,
    buf: BytesMut,
    decoder: D,
    /// The buffer was grown beyond its usual size for a large message.
    grown: bool,
}

impl<R: AsyncRead + Unpin, D: Decoder> FrameReader<R, D> {
    pub fn new(io: R, decoder: D) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(MIN_READ),
            decoder,
            grown: false,
        }
    }

    /// The next message, or `None` at a clean EOF between messages.
    /// Cancel-safe: a dropped call loses no bytes.
    pub async fn next(&mut self) -> Result<Option<D::Item>, ReadError> {
        loop {
            let mut needed = 0;
            match self.decoder.decode(&mut self.buf, &mut needed) {
                Ok(Some(item)) => return Ok(Some(item)),
                Ok(None) => {}
                Err(e) => return Err(ReadError::Protocol(Box::new(e))),
            }
            if self.grown && self.buf.is_empty() {
                // Messages cut from a grown buffer share its allocation,
                // and so does the empty rest of it: start a small one, so
                // an idle connection does not keep a large message's
                // memory once that message is gone.
                self.buf = BytesMut::with_capacity(MIN_READ);
                self.grown = false;
            }
            let spare = self.buf.capacity() - self.buf.len();
            if spare < MIN_READ {
                let missing = needed.saturating_sub(self.buf.len());
                self.buf.reserve(missing.clamp(MIN_READ, MAX_GROW));
                self.grown |= self.buf.capacity() > 4 * MIN_READ;
            }
            let read = self
                .io
                .read_buf(&mut self.buf)
                .await
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Buf, Bytes};
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// Frames of a u32 length and that many bytes.
    struct LengthPrefixed;

    impl Decoder for LengthPrefixed {
        type Item = Bytes;
        type Error = io::Error;

        fn decode(
            &mut self,
            buf: &mut BytesMut,
            needed: &mut usize,
        ) -> Result<Option<Bytes>, io::Error> {
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
            frame.advance(4);
            Ok(Some(frame.freeze()))
        }
    }

    #[tokio::test]
    async fn an_idle_reader_does_not_keep_a_large_message_buffer() {
        let (mut writer, reader) = tokio::io::duplex(1 << 16);
        let mut frames = FrameReader::new(reader, LengthPrefixed);
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
}
