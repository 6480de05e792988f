//! PV Access: the server and name-server side of a client connection, the
//! UDP search relay towards the local servers, and the channel relay.
//! A connection that stays silent through the classification window is a
//! PVA client, which waits for the server's greeting.

pub mod backend;
pub mod reply_port;
pub mod search;
pub mod session;
pub mod translate;
pub mod types;
pub mod unanswered;
pub mod wire;

use crate::relay::framing::{Decoder, Span, Split};
use crate::relay::outbox::Frame;
use crate::relay::stream::STREAM_MIN;
use crate::relay::upstream::WireLen;
use bytes::BytesMut;
use wire::Continuation;

/// Frames PVA messages on a TCP stream (see `wire::Decoder`).
impl Decoder for wire::Decoder {
    type Item = wire::Message;
    type Error = wire::WireError;

    fn decode(
        &mut self,
        buf: &mut BytesMut,
        needed: &mut usize,
    ) -> Result<Option<wire::Message>, wire::WireError> {
        wire::Decoder::decode(self, buf, needed)
    }

    fn partial_len(&self) -> usize {
        wire::Decoder::partial_len(self)
    }

    fn split(
        &mut self,
        buf: &BytesMut,
        needed: &mut usize,
    ) -> Result<Option<Split<wire::Message>>, wire::WireError> {
        let split = wire::Decoder::split(self, buf, STREAM_MIN, needed)?;
        Ok(split.map(|split| Split {
            head: split.head,
            span: Span {
                len: split.len,
                continues: split.continues,
                dropped: false,
            },
        }))
    }

    fn split_next(
        &mut self,
        buf: &BytesMut,
        needed: &mut usize,
    ) -> Result<Option<Span>, wire::WireError> {
        let next = wire::Decoder::split_next(self, buf, needed)?;
        Ok(next.map(|next| match next {
            Continuation::Segment { len, last } => Span {
                len,
                continues: !last,
                dropped: false,
            },
            Continuation::Control => Span {
                len: wire::HEADER_LEN,
                continues: true,
                dropped: true,
            },
        }))
    }
}

/// A message as an outbox frame; the payload is shared, not copied.
pub fn frame(message: &wire::Message) -> Frame {
    Frame::new(|head| message.header.encode(head), message.payload.clone())
}

/// Reserves a server's message towards the client at its size on the wire.
impl WireLen for wire::Message {
    fn wire_len(&self) -> usize {
        wire::Message::wire_len(self)
    }
}
