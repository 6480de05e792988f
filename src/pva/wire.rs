//! PV Access message codec. Pure: no I/O, no tokio.
//!
//! Header (pvxs `pvaproto.h`): 8 bytes, `0xCA, version, flags, command, u32
//! size`. Flags: 0x01 control, 0x10/0x30/0x20 first/middle/last segment, 0x40
//! sent by a server, 0x80 big-endian. A control message's size is a value, not
//! a payload length. A segmented message is a run of messages with the same
//! command, each with its own header and size; control messages may come
//! between them. The decoder hands out whole messages with the segment bits
//! cleared.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;

pub const MAGIC: u8 = 0xCA;
/// The protocol version pvxs and pvAccessCPP send.
pub const VERSION: u8 = 2;

pub const FLAG_CONTROL: u8 = 0x01;
pub const FLAG_SEGMENT_MASK: u8 = 0x30;
pub const FLAG_SEGMENT_FIRST: u8 = 0x10;
pub const FLAG_SEGMENT_LAST: u8 = 0x20;
pub const FLAG_SEGMENT_MIDDLE: u8 = 0x30;
pub const FLAG_FROM_SERVER: u8 = 0x40;
pub const FLAG_BIG_ENDIAN: u8 = 0x80;

/// Control command: the sender's byte order, in the flags of this message.
pub const CONTROL_SET_BYTE_ORDER: u8 = 2;

/// Application commands (pvxs `pva_app_msg_t`).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Beacon = 0,
    ConnectionValidation = 1,
    Echo = 2,
    Search = 3,
    SearchResponse = 4,
    AuthNZ = 5,
    AclChange = 6,
    CreateChannel = 7,
    DestroyChannel = 8,
    ConnectionValidated = 9,
    Get = 10,
    Put = 11,
    PutGet = 12,
    Monitor = 13,
    Array = 14,
    DestroyRequest = 15,
    Process = 16,
    GetField = 17,
    Message = 18,
    MultipleData = 19,
    Rpc = 20,
    CancelRequest = 21,
    OriginTag = 22,
}

impl TryFrom<u8> for Command {
    type Error = u8;

    fn try_from(code: u8) -> Result<Self, u8> {
        use Command::*;
        const ALL: [Command; 23] = [
            Beacon,
            ConnectionValidation,
            Echo,
            Search,
            SearchResponse,
            AuthNZ,
            AclChange,
            CreateChannel,
            DestroyChannel,
            ConnectionValidated,
            Get,
            Put,
            PutGet,
            Monitor,
            Array,
            DestroyRequest,
            Process,
            GetField,
            Message,
            MultipleData,
            Rpc,
            CancelRequest,
            OriginTag,
        ];
        ALL.get(usize::from(code)).copied().ok_or(code)
    }
}

impl Command {
    /// An operation on a channel, with an INIT and an ioid for its life
    /// (pvxs `serverchan.cpp` and `servermon.cpp`, pvAccessCPP
    /// `serverContext.cpp`).
    pub fn is_operation(self) -> bool {
        use Command::*;
        matches!(self, Get | Put | PutGet | Monitor | Array | Process | Rpc)
    }

    /// A client request that names its channel by sid, first in its
    /// payload: the operations and the requests about them.
    pub fn is_channel_request(self) -> bool {
        use Command::*;
        self.is_operation() || matches!(self, DestroyRequest | GetField | CancelRequest)
    }

    /// An operation that can change a value on the server: PUT, PUT_GET,
    /// and RPC, whose service may do anything.
    pub fn writes(self) -> bool {
        matches!(self, Command::Put | Command::PutGet | Command::Rpc)
    }

    /// A server's answer to a channel request, named by its ioid.
    pub fn is_ioid_response(self) -> bool {
        self.is_operation() || self == Command::GetField
    }
}

/// Which end sent a message: the direction flag of its header. A stream
/// carries one direction only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    FromClient,
    FromServer,
}

/// The byte order of this host, which the shim announces and uses, like
/// both reference implementations.
pub const HOST_BIG_ENDIAN: bool = cfg!(target_endian = "big");

pub const HEADER_LEN: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub flags: u8,
    pub command: u8,
    /// Payload length, or a value for control messages.
    pub size: u32,
}

impl Header {
    /// A whole (unsegmented) application message header.
    pub fn new(command: Command, direction: Direction, big_endian: bool, size: u32) -> Header {
        let mut flags = 0;
        if direction == Direction::FromServer {
            flags |= FLAG_FROM_SERVER;
        }
        if big_endian {
            flags |= FLAG_BIG_ENDIAN;
        }
        Header {
            version: VERSION,
            flags,
            command: command as u8,
            size,
        }
    }

    /// The header in the first 8 bytes of a message, in the byte order its
    /// flags name (pvxs `pvaproto.h` `Header`). The one place headers are
    /// read, for TCP streams and UDP datagrams alike.
    pub fn parse(head: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        if head[0] != MAGIC {
            return Err(WireError::BadMagic(head[0]));
        }
        let flags = head[2];
        let size_bytes = [head[4], head[5], head[6], head[7]];
        let size = if flags & FLAG_BIG_ENDIAN != 0 {
            u32::from_be_bytes(size_bytes)
        } else {
            u32::from_le_bytes(size_bytes)
        };
        Ok(Header {
            version: head[1],
            flags,
            command: head[3],
            size,
        })
    }

    pub fn is_control(&self) -> bool {
        self.flags & FLAG_CONTROL != 0
    }

    pub fn is_big_endian(&self) -> bool {
        self.flags & FLAG_BIG_ENDIAN != 0
    }

    pub fn is_from_server(&self) -> bool {
        self.flags & FLAG_FROM_SERVER != 0
    }

    pub fn direction(&self) -> Direction {
        if self.is_from_server() {
            Direction::FromServer
        } else {
            Direction::FromClient
        }
    }

    pub fn command(&self) -> Result<Command, u8> {
        Command::try_from(self.command)
    }

    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u8(MAGIC);
        out.put_u8(self.version);
        out.put_u8(self.flags);
        out.put_u8(self.command);
        if self.is_big_endian() {
            out.put_u32(self.size);
        } else {
            out.put_u32_le(self.size);
        }
    }
}

/// A whole message: control messages have an empty payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub payload: Bytes,
}

impl Message {
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    pub fn encode(&self, out: &mut BytesMut) {
        self.header.encode(out);
        out.put_slice(&self.payload);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    BadMagic(u8),
    BadVersion,
    /// The server-direction flag says the message came the wrong way.
    WrongDirection,
    TooLarge {
        size: u64,
        limit: u32,
    },
    /// Segments out of order, or another command inside a segmented message.
    Segmentation,
    /// A payload ended before a field it must hold.
    Truncated(&'static str),
    /// A message is well formed but exceeds one of the shim's limits.
    Limit(&'static str),
    /// A type description refers to a cache key the sender never defined.
    UndefinedCacheKey(u16),
    /// A type description holds a type code pvData does not have.
    UnknownTypeCode(u8),
    /// A union value selects a member its type does not have.
    NoSuchUnionMember {
        selector: u64,
        members: usize,
    },
    /// Fields are present but contradict each other or the protocol.
    Malformed(&'static str),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::BadMagic(b) => write!(f, "first byte {b:#04x} is not the PVA magic 0xCA"),
            WireError::BadVersion => write!(f, "protocol version 0"),
            WireError::WrongDirection => write!(f, "message direction flag is wrong"),
            WireError::TooLarge { size, limit } => {
                write!(f, "message of {size} bytes exceeds the limit of {limit}")
            }
            WireError::Segmentation => write!(f, "segmented message out of order"),
            WireError::Truncated(what) => write!(f, "message too short for {what}"),
            WireError::Limit(what) => write!(f, "limit: {what}"),
            WireError::UndefinedCacheKey(key) => {
                write!(f, "type cache key {key} used before it was defined")
            }
            WireError::UnknownTypeCode(code) => write!(f, "unknown type code {code:#04x}"),
            WireError::NoSuchUnionMember { selector, members } => {
                write!(
                    f,
                    "union member {selector} selected, its type has {members}"
                )
            }
            WireError::Malformed(what) => write!(f, "malformed message: {what}"),
        }
    }
}

impl std::error::Error for WireError {}

/// Frames a PVA byte stream into whole messages, joining segments.
pub struct Decoder {
    max_message: u32,
    /// What the direction flag of every message must say.
    direction: Direction,
    partial: Option<(Header, BytesMut)>,
    /// The command of a segmented message passing in parts, if any, and
    /// its payload bytes so far (held to `max_message` as when joining).
    passing: Option<(u8, u64)>,
}

/// Payload bytes a message passing in parts shows the session: its ioid
/// and sub-command, and room to spare.
pub const HEAD_PREFIX: usize = 16;

/// The start of a message that passes in parts.
pub struct Split {
    /// Its header, and its payload cut to [`HEAD_PREFIX`] bytes.
    pub head: Message,
    /// Its bytes on the wire, header included; a segmented message's
    /// first segment only.
    pub len: usize,
    /// Further segments follow.
    pub continues: bool,
}

/// A run of bytes inside a segmented message passing in parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuation {
    /// A further segment of that many bytes, header included; `last` ends
    /// the message.
    Segment { len: usize, last: bool },
    /// A control message between segments, for the shim, not the client.
    Control,
}

impl Decoder {
    pub fn new(max_message: u32, direction: Direction) -> Decoder {
        Decoder {
            max_message,
            direction,
            partial: None,
            passing: None,
        }
    }

    /// The head of the message at the front of `buf` if it passes in
    /// parts: a segmented message (segments pass as segments, never
    /// joined), or a whole one whose payload is at least `min` bytes.
    /// `Ok(None)` with `needed` set: more bytes are needed to tell.
    pub fn split(
        &mut self,
        buf: &BytesMut,
        min: usize,
        needed: &mut usize,
    ) -> Result<Option<Split>, WireError> {
        if self.partial.is_some() {
            // Joining began: it goes on as it began.
            return Ok(None);
        }
        let Some(header) = self.next_header(buf, needed)? else {
            return Ok(None);
        };
        let segment = header.flags & FLAG_SEGMENT_MASK;
        let first = segment == FLAG_SEGMENT_FIRST;
        let size = header.size as usize;
        if header.is_control() || !(first || (segment == 0 && size >= min)) {
            return Ok(None);
        }
        let prefix = size.min(HEAD_PREFIX);
        let Some(shown) = buf.get(HEADER_LEN..HEADER_LEN + prefix) else {
            *needed = HEADER_LEN + prefix;
            return Ok(None);
        };
        if first {
            self.passing = Some((header.command, u64::from(header.size)));
        }
        Ok(Some(Split {
            head: Message {
                header,
                payload: Bytes::copy_from_slice(shown),
            },
            len: HEADER_LEN + size,
            continues: first,
        }))
    }

    /// Inside a segmented message passing in parts: what is at the front
    /// of `buf`. Anything but a further segment of the same command, or a
    /// control message, is an error, as when joining.
    pub fn split_next(
        &mut self,
        buf: &BytesMut,
        needed: &mut usize,
    ) -> Result<Option<Continuation>, WireError> {
        let Some(header) = self.next_header(buf, needed)? else {
            return Ok(None);
        };
        if header.is_control() {
            return Ok(Some(Continuation::Control));
        }
        let segment = header.flags & FLAG_SEGMENT_MASK;
        let further = segment == FLAG_SEGMENT_MIDDLE || segment == FLAG_SEGMENT_LAST;
        let Some((command, so_far)) = self.passing.filter(|_| further) else {
            return Err(WireError::Segmentation);
        };
        if command != header.command {
            return Err(WireError::Segmentation);
        }
        let size = so_far + u64::from(header.size);
        if size > u64::from(self.max_message) {
            return Err(WireError::TooLarge {
                size,
                limit: self.max_message,
            });
        }
        let last = segment == FLAG_SEGMENT_LAST;
        self.passing = (!last).then_some((command, size));
        Ok(Some(Continuation::Segment {
            len: HEADER_LEN + header.size as usize,
            last,
        }))
    }

    /// Bytes of a segmented message joined so far, waiting for the rest.
    pub fn partial_len(&self) -> usize {
        self.partial
            .as_ref()
            .map_or(0, |(_, joined)| joined.len().max(1))
    }

    /// One whole message off the front of `buf`, `Ok(None)` if more bytes
    /// are needed (`needed` then says how many the buffer should hold).
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        needed: &mut usize,
    ) -> Result<Option<Message>, WireError> {
        loop {
            let Some(header) = self.next_header(buf, needed)? else {
                return Ok(None);
            };
            if header.is_control() {
                buf.advance(HEADER_LEN);
                return Ok(Some(Message {
                    header,
                    payload: Bytes::new(),
                }));
            }
            let total = HEADER_LEN + header.size as usize;
            if buf.len() < total {
                *needed = total;
                return Ok(None);
            }
            let mut body = buf.split_to(total);
            body.advance(HEADER_LEN);
            if let Some(message) = self.join(header, body)? {
                return Ok(Some(message));
            }
        }
    }

    /// The header at the front of `buf`, checked against this stream's
    /// direction and size limit.
    fn next_header(&self, buf: &BytesMut, needed: &mut usize) -> Result<Option<Header>, WireError> {
        let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
            *needed = HEADER_LEN;
            return Ok(None);
        };
        let header = Header::parse(head)?;
        if header.version == 0 {
            return Err(WireError::BadVersion);
        }
        if header.direction() != self.direction {
            return Err(WireError::WrongDirection);
        }
        if !header.is_control() && header.size > self.max_message {
            return Err(WireError::TooLarge {
                size: u64::from(header.size),
                limit: self.max_message,
            });
        }
        Ok(Some(header))
    }

    /// Joins a segmented message: returns it whole once its last segment is
    /// in, `None` while segments are still to come.
    fn join(&mut self, header: Header, body: BytesMut) -> Result<Option<Message>, WireError> {
        let segment = header.flags & FLAG_SEGMENT_MASK;
        if segment == 0 || segment == FLAG_SEGMENT_FIRST {
            if self.partial.is_some() {
                return Err(WireError::Segmentation);
            }
            if segment == 0 {
                return Ok(Some(Message {
                    header,
                    payload: body.freeze(),
                }));
            }
            self.partial = Some((header, body));
            return Ok(None);
        }
        // Middle or last. pvAccessCPP may send an empty stray
        // continuation, which carries nothing.
        let Some((first, mut joined)) = self.partial.take() else {
            if header.size == 0 {
                return Ok(None);
            }
            return Err(WireError::Segmentation);
        };
        if first.command != header.command {
            return Err(WireError::Segmentation);
        }
        let joined_len = joined.len() as u64 + u64::from(header.size);
        if joined_len > u64::from(self.max_message) {
            return Err(WireError::TooLarge {
                size: joined_len,
                limit: self.max_message,
            });
        }
        joined.unsplit(body);
        if segment == FLAG_SEGMENT_MIDDLE {
            self.partial = Some((first, joined));
            return Ok(None);
        }
        let mut whole = first;
        whole.flags &= !FLAG_SEGMENT_MASK;
        whole.size = joined.len() as u32;
        Ok(Some(Message {
            header: whole,
            payload: joined.freeze(),
        }))
    }
}

// ----- field codecs -----

/// Reads fields in one byte order. Errors are sticky: read many fields,
/// then check [`Reader::finish`] once.
pub struct Reader<'a> {
    buf: &'a [u8],
    big_endian: bool,
    failed: Option<&'static str>,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], big_endian: bool) -> Self {
        Reader {
            buf,
            big_endian,
            failed: None,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> &'a [u8] {
        if self.failed.is_some() {
            return &[];
        }
        match self.buf.split_at_checked(n) {
            Some((head, rest)) => {
                self.buf = rest;
                head
            }
            None => {
                self.failed = Some(what);
                self.buf = &[];
                &[]
            }
        }
    }

    pub fn u8(&mut self, what: &'static str) -> u8 {
        self.take(1, what).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self, what: &'static str) -> u16 {
        let b = self.take(2, what);
        let b: [u8; 2] = b.try_into().unwrap_or([0; 2]);
        if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    pub fn u32(&mut self, what: &'static str) -> u32 {
        let b = self.take(4, what);
        let b: [u8; 4] = b.try_into().unwrap_or([0; 4]);
        if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    pub fn u64(&mut self, what: &'static str) -> u64 {
        let b = self.take(8, what);
        let b: [u8; 8] = b.try_into().unwrap_or([0; 8]);
        if self.big_endian {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        }
    }

    pub fn bytes(&mut self, n: usize, what: &'static str) -> &'a [u8] {
        self.take(n, what)
    }

    /// A pvData Size: one byte below 254, 254 + u32, 255 = null (None).
    pub fn size(&mut self, what: &'static str) -> Option<u32> {
        match self.u8(what) {
            0xFF => None,
            0xFE => Some(self.u32(what)),
            n => Some(u32::from(n)),
        }
    }

    pub fn string(&mut self, what: &'static str) -> &'a [u8] {
        let len = self.size(what).unwrap_or(0);
        self.take(len as usize, what)
    }

    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn finish(&self) -> Result<(), WireError> {
        match self.failed {
            Some(what) => Err(WireError::Truncated(what)),
            None => Ok(()),
        }
    }
}

/// Writes fields in one byte order.
pub struct Writer {
    pub out: BytesMut,
    big_endian: bool,
}

impl Writer {
    pub fn new(big_endian: bool) -> Writer {
        Writer {
            out: BytesMut::new(),
            big_endian,
        }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.out.put_u8(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        if self.big_endian {
            self.out.put_u16(v)
        } else {
            self.out.put_u16_le(v)
        }
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        if self.big_endian {
            self.out.put_u32(v)
        } else {
            self.out.put_u32_le(v)
        }
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.out.put_slice(v);
        self
    }

    pub fn size(&mut self, n: usize) -> &mut Self {
        if n < 254 {
            self.out.put_u8(n as u8);
        } else {
            self.out.put_u8(0xFE);
            self.u32(n as u32);
        }
        self
    }

    pub fn string(&mut self, s: &[u8]) -> &mut Self {
        self.size(s.len());
        self.bytes(s)
    }

    /// Wraps what was written in a message header.
    pub fn into_message(self, command: Command, direction: Direction) -> Message {
        let header = Header::new(command, direction, self.big_endian, self.out.len() as u32);
        Message {
            header,
            payload: self.out.freeze(),
        }
    }
}

// ----- messages -----

/// The status "OK" with no message.
pub const STATUS_OK: u8 = 0xFF;
/// Status type "error".
pub const STATUS_ERROR: u8 = 2;

/// The control message that announces the sender's byte order.
pub fn set_byte_order(direction: Direction, big_endian: bool) -> Message {
    let mut header = Header::new(Command::Beacon, direction, big_endian, 0);
    header.flags |= FLAG_CONTROL;
    header.command = CONTROL_SET_BYTE_ORDER;
    Message {
        header,
        payload: Bytes::new(),
    }
}

/// A server's error answer to a request of operation `ioid`: the
/// subcommand it answers, an error status and its text (pvxs
/// `serverchan.cpp` answers a refused INIT this way).
pub fn operation_error(
    command: Command,
    ioid: u32,
    subcommand: u8,
    why: &str,
    big_endian: bool,
) -> Message {
    let mut w = Writer::new(big_endian);
    w.u32(ioid)
        .u8(subcommand)
        .u8(STATUS_ERROR)
        .string(why.as_bytes())
        .string(b"");
    w.into_message(command, Direction::FromServer)
}

/// The receive buffer size announced in CONNECTION_VALIDATION: what a pvxs
/// server sends, with the comment "not used" (pvxs `serverconn.cpp`).
pub const ANNOUNCED_BUFFER_SIZE: u32 = 0x10000;
/// The type registry size announced beside it: pvxs's value, "also not
/// used" (same place).
pub const ANNOUNCED_REGISTRY_SIZE: u16 = 0x7FFF;
/// Authentication methods read from a server's offer, at most: pvxs offers
/// two or three; more is not a server worth following.
const MAX_OFFERED_METHODS: u32 = 64;

/// The server's CONNECTION_VALIDATION: receive buffer size, type registry
/// size, and the offered authentication methods ("ca" last: clients take
/// the last one they know).
pub fn server_validation(big_endian: bool) -> Message {
    let mut w = Writer::new(big_endian);
    w.u32(ANNOUNCED_BUFFER_SIZE)
        .u16(ANNOUNCED_REGISTRY_SIZE)
        .size(2)
        .string(b"anonymous")
        .string(b"ca");
    w.into_message(Command::ConnectionValidation, Direction::FromServer)
}

/// What a client answered to CONNECTION_VALIDATION.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientValidation {
    pub buffer_size: u32,
    pub registry_size: u16,
    pub qos: u16,
    pub method: Bytes,
    /// The credentials as sent: a type description and a value, possibly
    /// through the client's type cache, kept verbatim.
    pub credentials: Bytes,
}

pub fn parse_client_validation(message: &Message) -> Result<ClientValidation, WireError> {
    let mut r = Reader::new(&message.payload, message.header.is_big_endian());
    let buffer_size = r.u32("buffer size");
    let registry_size = r.u16("registry size");
    let qos = r.u16("qos");
    let method = r.string("auth method");
    r.finish()?;
    // Copies: the session keeps these for its whole life, and a slice
    // would keep the whole receive buffer they came in.
    let method = Bytes::copy_from_slice(method);
    let credentials = Bytes::copy_from_slice(r.remaining());
    Ok(ClientValidation {
        buffer_size,
        registry_size,
        qos,
        method,
        credentials,
    })
}

/// A client's CONNECTION_VALIDATION towards a server.
pub fn client_validation(big_endian: bool, v: &ClientValidation) -> Message {
    let mut w = Writer::new(big_endian);
    w.u32(v.buffer_size)
        .u16(v.registry_size)
        .u16(v.qos)
        .string(&v.method)
        .bytes(&v.credentials);
    w.into_message(Command::ConnectionValidation, Direction::FromClient)
}

/// The methods a server offers in its CONNECTION_VALIDATION.
pub fn parse_server_methods(message: &Message) -> Result<Vec<Bytes>, WireError> {
    let mut r = Reader::new(&message.payload, message.header.is_big_endian());
    r.u32("buffer size");
    r.u16("registry size");
    let count = r.size("method count").unwrap_or(0).min(MAX_OFFERED_METHODS);
    let mut methods = Vec::new();
    for _ in 0..count {
        let m = r.string("method");
        methods.push(message.payload.slice_ref(m));
    }
    r.finish()?;
    Ok(methods)
}

pub fn connection_validated_ok(big_endian: bool) -> Message {
    let mut w = Writer::new(big_endian);
    w.u8(STATUS_OK);
    w.into_message(Command::ConnectionValidated, Direction::FromServer)
}

/// A SEARCH request: who asks, and for which names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchRequest {
    pub sequence: u32,
    pub flags: u8,
    /// (search id, name)
    pub names: Vec<(u32, Bytes)>,
}

/// Search flag: the server must answer even when it has none of the names.
pub const SEARCH_MUST_REPLY: u8 = 0x01;
/// Longest name accepted in a search (pvAccessCPP refuses longer ones).
pub const MAX_NAME_LEN: usize = 500;
/// Names taken from one search message, at most.
const MAX_SEARCH_NAMES: usize = 1024;

pub fn parse_search(message: &Message) -> Result<SearchRequest, WireError> {
    let mut r = Reader::new(&message.payload, message.header.is_big_endian());
    let sequence = r.u32("search sequence");
    let flags = r.u8("search flags");
    r.bytes(3, "reserved");
    r.bytes(16, "reply address");
    r.u16("reply port");
    let protocols = r.size("protocol count").unwrap_or(0);
    for _ in 0..protocols.min(16) {
        r.string("protocol");
    }
    let _count = r.u16("name count");
    r.finish()?;
    // The count is not trusted: some clients patch it wrongly; the names
    // run to the end of the payload.
    let mut names = Vec::new();
    while !r.is_empty() && names.len() < MAX_SEARCH_NAMES {
        let id = r.u32("search id");
        let name = r.string("name");
        r.finish()?;
        names.push((id, message.payload.slice_ref(name)));
    }
    Ok(SearchRequest {
        sequence,
        flags,
        names,
    })
}

/// The GUID the shim puts in its own search responses.
pub const SHIM_GUID: [u8; 12] = *b"nameshim\0\0\0\x01";

/// A SEARCH_RESPONSE sent over TCP. `port` 0 with the zero address tells a
/// pvxs client "this connection"; a pvAccessCPP client needs a real port.
pub fn search_response(
    big_endian: bool,
    sequence: u32,
    port: u16,
    found: bool,
    ids: &[u32],
) -> Message {
    let mut w = Writer::new(big_endian);
    w.bytes(&SHIM_GUID)
        .u32(sequence)
        .bytes(&[0; 16])
        .u16(port)
        .string(b"tcp")
        .u8(u8::from(found))
        .u16(ids.len() as u16);
    for &id in ids {
        w.u32(id);
    }
    w.into_message(Command::SearchResponse, Direction::FromServer)
}

/// A UDP SEARCH datagram asking the servers to answer `reply_port` on the
/// loopback. Returns how many names it holds.
pub fn encode_search_datagram(
    names: &[(u32, &[u8])],
    sequence: u32,
    reply_port: u16,
    max_len: usize,
    out: &mut BytesMut,
) -> usize {
    let start = out.len();
    let mut w = Writer::new(false);
    w.u32(sequence)
        .u8(0)
        .bytes(&[0; 3])
        .bytes(&[0; 10])
        .bytes(&[0xFF, 0xFF])
        .bytes(&[127, 0, 0, 1])
        .u16(reply_port)
        .size(1)
        .string(b"tcp");
    let count_at = w.out.len();
    w.u16(0);
    let mut fitted = 0u16;
    for &(id, name) in names {
        let entry = 4 + 5 + name.len();
        if HEADER_LEN + w.out.len() + entry > max_len && fitted > 0 {
            break;
        }
        w.u32(id).string(name);
        fitted += 1;
    }
    w.out[count_at..count_at + 2].copy_from_slice(&fitted.to_le_bytes());
    let message = w.into_message(Command::Search, Direction::FromClient);
    out.reserve(message.wire_len());
    message.header.encode(out);
    out.put_slice(&message.payload);
    debug_assert!(out.len() > start);
    usize::from(fitted)
}

/// A SEARCH_RESPONSE received by UDP: which ids the server has, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchAnswer {
    /// The server's IPv4 address, 0.0.0.0 when it left it to the receiver.
    pub ip: std::net::Ipv4Addr,
    pub port: u16,
    pub found: bool,
    pub ids: Vec<u32>,
}

pub fn parse_search_response(message: &Message) -> Result<SearchAnswer, WireError> {
    let mut r = Reader::new(&message.payload, message.header.is_big_endian());
    r.bytes(12, "guid");
    r.u32("sequence");
    let addr = r.bytes(16, "server address");
    let port = r.u16("server port");
    r.string("protocol");
    let found = r.u8("found") != 0;
    let count = usize::from(r.u16("id count"));
    // The ids as one block, so a count the payload cannot hold (up to
    // 65535, in any datagram) fails before any work or memory per id.
    let block = r.bytes(count * 4, "the search response's ids");
    r.finish()?;
    let mut ids_reader = Reader::new(block, message.header.is_big_endian());
    let ids = (0..count).map(|_| ids_reader.u32("id")).collect();
    // An IPv4-mapped address (::ffff:a.b.c.d) or all zero.
    let ip = match addr {
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, a, b, c, d] => {
            std::net::Ipv4Addr::new(*a, *b, *c, *d)
        }
        _ => std::net::Ipv4Addr::UNSPECIFIED,
    };
    Ok(SearchAnswer {
        ip,
        port,
        found,
        ids,
    })
}

/// Splits a datagram into its messages (no segments or control over UDP).
pub fn decode_datagram(datagram: &[u8]) -> Vec<Message> {
    let mut messages = Vec::new();
    let mut rest = datagram;
    while let Some(head) = rest.first_chunk::<HEADER_LEN>() {
        let Ok(header) = Header::parse(head) else {
            break;
        };
        let Some(body) = rest[HEADER_LEN..].get(..header.size as usize) else {
            break;
        };
        rest = &rest[HEADER_LEN + body.len()..];
        messages.push(Message {
            header,
            payload: Bytes::copy_from_slice(body),
        });
    }
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8], direction: Direction) -> Result<Vec<Message>, WireError> {
        let mut d = Decoder::new(1 << 20, direction);
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        let mut needed = 0;
        while let Some(m) = d.decode(&mut buf, &mut needed)? {
            out.push(m);
        }
        Ok(out)
    }

    // pvxs server greeting (LE): SET_BYTE_ORDER then CONNECTION_VALIDATION
    // offering "anonymous" and "ca".
    const GREETING: [u8; 36] = [
        0xCA, 2, 0x41, 2, 0, 0, 0, 0, //
        0xCA, 2, 0x40, 1, 20, 0, 0, 0, //
        0, 0, 1, 0, 0xFF, 0x7F, 2, //
        9, b'a', b'n', b'o', b'n', b'y', b'm', b'o', b'u', b's', 2, b'c', b'a',
    ];

    #[test]
    fn client_validation_fields_do_not_pin_the_receive_buffer() {
        let sent = ClientValidation {
            buffer_size: 0x4000,
            registry_size: 0x7FFF,
            qos: 0,
            method: Bytes::from_static(b"ca"),
            credentials: Bytes::from_static(&[0xFF]),
        };
        let mut bytes = BytesMut::new();
        client_validation(false, &sent).encode(&mut bytes);
        let received = decode_all(&bytes, Direction::FromClient).unwrap().remove(0);
        let parsed = parse_client_validation(&received).unwrap();
        assert_eq!(parsed, sent);
        // The session keeps `parsed` for its whole life: nothing in it may
        // share the message's buffer.
        assert!(received.payload.is_unique());
    }

    #[test]
    fn encodes_server_greeting_golden_bytes() {
        let mut out = BytesMut::new();
        set_byte_order(Direction::FromServer, false).encode(&mut out);
        server_validation(false).encode(&mut out);
        assert_eq!(&out[..], &GREETING[..]);
    }

    #[test]
    fn decodes_greeting_as_client_and_lists_methods() {
        let messages = decode_all(&GREETING, Direction::FromServer).unwrap();
        assert_eq!(messages.len(), 2);
        assert!(messages[0].header.is_control());
        assert_eq!(messages[0].header.command, CONTROL_SET_BYTE_ORDER);
        let methods = parse_server_methods(&messages[1]).unwrap();
        assert_eq!(methods, [&b"anonymous"[..], &b"ca"[..]]);
    }

    #[test]
    fn wrong_direction_is_an_error() {
        assert_eq!(
            decode_all(&GREETING, Direction::FromClient),
            Err(WireError::WrongDirection)
        );
    }

    #[test]
    fn bad_magic_is_an_error() {
        assert_eq!(
            decode_all(&[0, 0, 0, 0, 0, 0, 0, 13], Direction::FromClient),
            Err(WireError::BadMagic(0))
        );
    }

    // A pvxs client's TCP search for "pv1", id 0x12345678: big-endian,
    // unicast flag, zero address and port (protocol-facts and pvxs tickSearch).
    const PVXS_TCP_SEARCH: [u8; 49] = [
        0xCA, 2, 0x80, 3, 0, 0, 0, 41, //
        0x66, 0x69, 0x6E, 0x64, 0x80, 0, 0, 0, //
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
        0, 0, 1, 3, b't', b'c', b'p', 0, 1, //
        0x12, 0x34, 0x56, 0x78, 3, b'p', b'v', b'1',
    ];

    #[test]
    fn parses_pvxs_tcp_search_golden_bytes() {
        let messages = decode_all(&PVXS_TCP_SEARCH, Direction::FromClient).unwrap();
        let search = parse_search(&messages[0]).unwrap();
        assert_eq!(search.sequence, 0x66696E64);
        assert_eq!(search.flags, 0x80);
        assert_eq!(search.names, [(0x12345678, Bytes::from_static(b"pv1"))]);
    }

    #[test]
    fn truncated_search_is_an_error() {
        let mut bytes = PVXS_TCP_SEARCH.to_vec();
        bytes.truncate(46);
        bytes[7] = 38;
        let messages = decode_all(&bytes, Direction::FromClient).unwrap();
        assert!(parse_search(&messages[0]).is_err());
    }

    #[test]
    fn segments_are_joined_around_control_messages() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&[0xCA, 2, 0x50, 13, 3, 0, 0, 0, 1, 2, 3]);
        bytes.extend_from_slice(&[0xCA, 2, 0x41, 2, 0, 0, 0, 0]); // control between
        bytes.extend_from_slice(&[0xCA, 2, 0x70, 13, 2, 0, 0, 0, 4, 5]);
        bytes.extend_from_slice(&[0xCA, 2, 0x60, 13, 1, 0, 0, 0, 6]);
        let messages = decode_all(&bytes, Direction::FromServer).unwrap();
        assert_eq!(messages.len(), 2);
        assert!(messages[0].header.is_control());
        assert_eq!(&messages[1].payload[..], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(messages[1].header.flags, 0x40);
        assert_eq!(messages[1].header.size, 6);
    }

    // Passing in parts: the first segment is a head whatever its size,
    // further segments and control messages follow, and anything else
    // inside the message is the same error as when joining.
    #[test]
    fn a_segmented_message_splits_into_segments_and_control_messages() {
        let first: BytesMut = (&[0xCA, 2, 0x50, 13, 5, 0, 0, 0, 1, 0, 0, 0, 0][..]).into();
        let mut decoder = Decoder::new(1 << 20, Direction::FromServer);
        let mut needed = 0;
        let split = decoder
            .split(&first, 1 << 16, &mut needed)
            .unwrap()
            .unwrap();
        assert_eq!((split.len, split.continues), (13, true));
        assert_eq!(&split.head.payload[..], &[1, 0, 0, 0, 0]);
        let control: BytesMut = (&[0xCA, 2, 0x41, 2, 0, 0, 0, 0][..]).into();
        let next = decoder.split_next(&control, &mut needed).unwrap();
        assert_eq!(next, Some(Continuation::Control));
        let other: BytesMut = (&[0xCA, 2, 0x60, 14, 1, 0, 0, 0, 6][..]).into();
        let wrong = decoder.split_next(&other, &mut needed);
        assert_eq!(wrong, Err(WireError::Segmentation));
        let last: BytesMut = (&[0xCA, 2, 0x60, 13, 1, 0, 0, 0, 6][..]).into();
        let next = decoder.split_next(&last, &mut needed).unwrap();
        assert_eq!(next, Some(Continuation::Segment { len: 9, last: true }));
    }

    // Segments that pass are never joined, but their sum is held to the
    // same limit as a joined message.
    #[test]
    fn passing_segments_are_held_to_the_message_limit() {
        let mut decoder = Decoder::new(8, Direction::FromServer);
        let first: BytesMut = (&[0xCA, 2, 0x50, 13, 5, 0, 0, 0, 1, 0, 0, 0, 0][..]).into();
        let mut needed = 0;
        decoder
            .split(&first, 1 << 16, &mut needed)
            .unwrap()
            .unwrap();
        let middle: BytesMut = (&[0xCA, 2, 0x70, 13, 3, 0, 0, 0, 1, 2, 3][..]).into();
        assert!(decoder.split_next(&middle, &mut needed).is_ok());
        let over: BytesMut = (&[0xCA, 2, 0x60, 13, 1, 0, 0, 0, 4][..]).into();
        let err = decoder.split_next(&over, &mut needed).unwrap_err();
        assert_eq!(err, WireError::TooLarge { size: 9, limit: 8 });
    }

    // A whole message passes in parts only from `min` bytes on, and its
    // head waits for the bytes the session decides on.
    #[test]
    fn a_whole_message_splits_from_its_minimum_size_once_its_head_is_in() {
        let mut decoder = Decoder::new(1 << 20, Direction::FromServer);
        let small: BytesMut = (&[0xCA, 2, 0x40, 13, 5, 0, 0, 0, 1, 0, 0, 0, 0][..]).into();
        let mut needed = 0;
        assert!(decoder.split(&small, 6, &mut needed).unwrap().is_none());
        assert_eq!(needed, 0, "decoded whole");
        let large: BytesMut = (&[0xCA, 2, 0x40, 13, 0, 0, 1, 0, 1, 0][..]).into();
        assert!(decoder.split(&large, 6, &mut needed).unwrap().is_none());
        assert_eq!(needed, HEADER_LEN + HEAD_PREFIX, "waits for its head");
    }

    // The client's reader counts these bytes as a message begun, so a
    // client that stops between segments is closed for a stalled message.
    #[test]
    fn joined_segments_count_as_a_message_begun() {
        let mut decoder = Decoder::new(1 << 20, Direction::FromClient);
        let mut buf = BytesMut::from(&[0xCA, 2, 0x10, 13, 3, 0, 0, 0, 1, 2, 3][..]);
        let mut needed = 0;
        assert_eq!(decoder.decode(&mut buf, &mut needed), Ok(None));
        assert!(buf.is_empty());
        assert_eq!(decoder.partial_len(), 3);
        buf.extend_from_slice(&[0xCA, 2, 0x20, 13, 1, 0, 0, 0, 4]);
        let whole = decoder.decode(&mut buf, &mut needed).unwrap().unwrap();
        assert_eq!(&whole.payload[..], &[1, 2, 3, 4]);
        assert_eq!(decoder.partial_len(), 0);
    }

    #[test]
    fn other_command_inside_segments_is_an_error() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&[0xCA, 2, 0x50, 13, 1, 0, 0, 0, 1]);
        bytes.extend_from_slice(&[0xCA, 2, 0x40, 10, 1, 0, 0, 0, 2]);
        assert_eq!(
            decode_all(&bytes, Direction::FromServer),
            Err(WireError::Segmentation)
        );
    }

    #[test]
    fn oversized_message_is_refused_before_buffering() {
        let bytes = [0xCA, 2, 0x00, 10, 0xFF, 0xFF, 0xFF, 0x7F];
        assert!(matches!(
            decode_all(&bytes, Direction::FromClient),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn search_response_tells_pvxs_this_connection() {
        let m = search_response(false, 7, 0, true, &[0x12345678]);
        let mut out = BytesMut::new();
        m.encode(&mut out);
        let mut expected = vec![0xCA, 2, 0x40, 4, 45, 0, 0, 0];
        expected.extend_from_slice(&SHIM_GUID);
        expected.extend_from_slice(&[7, 0, 0, 0]);
        expected.extend_from_slice(&[0; 16]);
        expected.extend_from_slice(&[0, 0, 3, b't', b'c', b'p', 1, 1, 0, 0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&out[..], &expected[..]);
    }

    // One SEARCH may list names up to the end of its payload; at most
    // MAX_SEARCH_NAMES of them are read, so one message cannot make the
    // session wait for more.
    #[test]
    fn names_read_from_one_search_are_bounded() {
        let names: Vec<(u32, Vec<u8>)> = (0..3000u32)
            .map(|i| (i, format!("N{i}").into_bytes()))
            .collect();
        let refs: Vec<(u32, &[u8])> = names.iter().map(|(i, n)| (*i, n.as_slice())).collect();
        let mut out = BytesMut::new();
        let n = encode_search_datagram(&refs, 1, 0, usize::MAX, &mut out);
        assert_eq!(n, 3000);
        let search = parse_search(&decode_datagram(&out)[0]).unwrap();
        assert_eq!(search.names.len(), MAX_SEARCH_NAMES);
    }

    #[test]
    fn udp_search_names_the_loopback_reply_port_and_round_trips() {
        let mut out = BytesMut::new();
        let n = encode_search_datagram(&[(5, b"a:b"), (6, b"c")], 9, 40000, 1400, &mut out);
        assert_eq!(n, 2);
        let messages = decode_datagram(&out);
        let search = parse_search(&messages[0]).unwrap();
        assert_eq!(
            search.names,
            [
                (5, Bytes::from_static(b"a:b")),
                (6, Bytes::from_static(b"c"))
            ]
        );
        // reply address ::ffff:127.0.0.1, port 40000 (LE)
        assert_eq!(
            &messages[0].payload[18..26],
            &[0xFF, 0xFF, 127, 0, 0, 1, 0x40, 0x9C]
        );
    }

    // Found by fuzzing (pva_search): a 45-byte answer claiming 65528 ids
    // made the parser read 65528 ids from an empty reader, and grow a
    // 256 KiB list, before it failed; four such messages in one datagram
    // cost about 2 ms.
    #[test]
    fn a_search_answer_claiming_more_ids_than_it_holds_fails_before_reading_them() {
        let datagram = [
            0xCA, 2, 0x40, 4, 0x2D, 0, 0, 0, b'p', b'v', 0, b'n', 1, 0, 0, 0, b'h', b'i', b'm', 0,
            0, 0, 1, 7, 0, 0, 0, 0, 0, 0, 0x0A, 4, 0, 0x40, 1, 0, 0, 0, b'h', b'i', b'm', 0, 0, 1,
            0, 0xF8, 0xFF, 0xEC, 0xFE, b'l', b'c', b'p', b'x',
        ];
        let messages = decode_datagram(&datagram);
        assert_eq!(messages.len(), 1);
        assert_eq!(
            parse_search_response(&messages[0]),
            Err(WireError::Truncated("the search response's ids"))
        );
    }

    #[test]
    fn parses_search_answer_with_zero_address() {
        let m = search_response(false, 1, 41234, true, &[5, 6]);
        let answer = parse_search_response(&m).unwrap();
        assert_eq!(answer.ip, std::net::Ipv4Addr::UNSPECIFIED);
        assert_eq!((answer.port, answer.found), (41234, true));
        assert_eq!(answer.ids, [5, 6]);
    }

    #[test]
    fn sizes_use_the_long_form_from_254() {
        let mut w = Writer::new(false);
        w.size(253).size(254);
        assert_eq!(&w.out[..], &[253, 0xFE, 254, 0, 0, 0]);
        let mut r = Reader::new(&[0xFF, 0xFE, 1, 0, 0, 0], false);
        assert_eq!(r.size("a"), None);
        assert_eq!(r.size("b"), Some(1));
        assert!(r.finish().is_ok());
    }
}
