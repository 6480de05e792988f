//! Channel Access: the name-server side of a client circuit, the UDP search
//! relay towards the local servers, and the channel relay.

pub mod backend;
pub mod search;
pub mod session;
pub mod wire;

#[cfg(test)]
mod limit_tests;

use crate::relay::framing::{Decoder, Span, Split};
use crate::relay::outbox::Frame;
use crate::relay::stream::STREAM_MIN;
use crate::relay::upstream::WireLen;
use bytes::BytesMut;

/// Frames CA messages on a TCP stream, refusing payloads above a limit.
pub struct CaDecoder {
    pub max_payload: u32,
}

impl Decoder for CaDecoder {
    type Item = wire::Message;
    type Error = wire::WireError;

    fn decode(
        &mut self,
        buf: &mut BytesMut,
        needed: &mut usize,
    ) -> Result<Option<wire::Message>, wire::WireError> {
        wire::decode(buf, self.max_payload, needed)
    }

    /// A large payload passes as it arrives; the head carries no payload,
    /// as nothing the session decides on is in it.
    fn split(
        &mut self,
        buf: &BytesMut,
        needed: &mut usize,
    ) -> Result<Option<Split<wire::Message>>, wire::WireError> {
        let large = wire::large_header(buf, self.max_payload, STREAM_MIN, needed)?;
        Ok(large.map(|(header, header_len)| Split {
            span: Span {
                len: header_len + header.payload_size as usize,
                continues: false,
                dropped: false,
            },
            head: wire::Message::new(header),
        }))
    }
}

/// Reserves a server's message towards the client at its size on the wire.
impl WireLen for wire::Message {
    fn wire_len(&self) -> usize {
        wire::Message::wire_len(self)
    }
}

/// A message as an outbox frame; the payload is shared, not copied.
pub fn frame(message: &wire::Message) -> Frame {
    Frame::new(|head| message.header.encode(head), message.payload.clone())
}
