//! Channel Access: the name-server side of a client circuit, the UDP search
//! relay towards the local servers, and the channel relay.

pub mod backend;
pub mod search;
pub mod session;
pub mod wire;

#[cfg(test)]
mod limit_tests;

use crate::relay::framing::Decoder;
use crate::relay::outbox::Frame;
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
