//! Channel Access message codec. Pure: no I/O, no tokio.
//!
//! Wire format (epics-base `modules/ca/src/client/caProto.h`): a 16-byte
//! big-endian header `command u16, payload size u16, data type u16, count u16,
//! p1 u32, p2 u32`, then the payload, padded to 8 bytes by the sender. From
//! minor version 9 a message whose payload or count does not fit 16 bits uses
//! the extended form: payload size 0xFFFF and count 0 in the header, followed
//! by `payload size u32, count u32`.
//!
//! Receivers take the payload size 0xFFFF alone as the mark of the extended
//! form, whatever the 16-bit count says: libca `tcpiiu::processIncoming`
//! (`if ( this->curMsg.m_postsize == 0xffff )`) and rsrv `camessage_tcp`
//! (`CA_V49(...) && msg.m_postsize == 0xffff`). So does this decoder, so it
//! frames a stream exactly as the servers behind it do.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;

/// Minor protocol version the shim speaks (`CA_MINOR_PROTOCOL_REVISION` in
/// epics-base 7). 13 is the first with name-server searches over TCP.
pub const MINOR_VERSION: u16 = 13;

/// Search reply address meaning "the address this reply came from"
/// (`INADDR_BROADCAST` in `tcpiiu::searchRespNotify` and `udpiiu`).
pub const ADDR_OF_SENDER: u32 = 0xFFFF_FFFF;

/// Search data type: the server must not answer a name it does not have.
pub const DONT_REPLY: u16 = 5;

/// libca sends at most this much in one search datagram (`MAX_UDP_SEND`).
pub const MAX_UDP_SEND: usize = 1024;

const HEADER_LEN: usize = 16;
const EXTENDED_HEADER_LEN: usize = 24;
const EXTENDED_MARKER: u16 = 0xFFFF;

/// Command codes (`CA_PROTO_*` in caProto.h).
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Version = 0,
    EventAdd = 1,
    EventCancel = 2,
    Read = 3,
    Write = 4,
    Snapshot = 5,
    Search = 6,
    Build = 7,
    EventsOff = 8,
    EventsOn = 9,
    ReadSync = 10,
    Error = 11,
    ClearChannel = 12,
    RsrvIsUp = 13,
    NotFound = 14,
    ReadNotify = 15,
    ReadBuild = 16,
    RepeaterConfirm = 17,
    CreateChan = 18,
    WriteNotify = 19,
    ClientName = 20,
    HostName = 21,
    AccessRights = 22,
    Echo = 23,
    RepeaterRegister = 24,
    Signal = 25,
    CreateChFail = 26,
    ServerDisconn = 27,
}

impl TryFrom<u16> for Command {
    type Error = u16;

    fn try_from(code: u16) -> Result<Self, u16> {
        use Command::*;
        const ALL: [Command; 28] = [
            Version,
            EventAdd,
            EventCancel,
            Read,
            Write,
            Snapshot,
            Search,
            Build,
            EventsOff,
            EventsOn,
            ReadSync,
            Error,
            ClearChannel,
            RsrvIsUp,
            NotFound,
            ReadNotify,
            ReadBuild,
            RepeaterConfirm,
            CreateChan,
            WriteNotify,
            ClientName,
            HostName,
            AccessRights,
            Echo,
            RepeaterRegister,
            Signal,
            CreateChFail,
            ServerDisconn,
        ];
        ALL.get(usize::from(code)).copied().ok_or(code)
    }
}

/// A decoded header. `command` stays a raw code so that an unknown command
/// can still be named in a log line before the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub command: u16,
    pub payload_size: u32,
    pub data_type: u16,
    pub count: u32,
    pub p1: u32,
    pub p2: u32,
}

impl Header {
    pub fn new(command: Command, data_type: u16, count: u32, p1: u32, p2: u32) -> Self {
        Header {
            command: command as u16,
            payload_size: 0,
            data_type,
            count,
            p1,
            p2,
        }
    }

    pub fn command(&self) -> Result<Command, u16> {
        Command::try_from(self.command)
    }

    /// Same rule as libca's `comQueSend::insertRequestHeader`.
    fn is_extended(&self) -> bool {
        self.payload_size >= u32::from(EXTENDED_MARKER) || self.count >= u32::from(EXTENDED_MARKER)
    }

    pub fn encoded_len(&self) -> usize {
        if self.is_extended() {
            EXTENDED_HEADER_LEN
        } else {
            HEADER_LEN
        }
    }

    /// Writes the header. Sizes that fit 16 bits use the short form.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u16(self.command);
        if self.is_extended() {
            out.put_u16(EXTENDED_MARKER);
            out.put_u16(self.data_type);
            out.put_u16(0);
            out.put_u32(self.p1);
            out.put_u32(self.p2);
            out.put_u32(self.payload_size);
            out.put_u32(self.count);
        } else {
            // is_extended() is false, so both fit 16 bits.
            out.put_u16(self.payload_size as u16);
            out.put_u16(self.data_type);
            out.put_u16(self.count as u16);
            out.put_u32(self.p1);
            out.put_u32(self.p2);
        }
    }
}

/// One message: header and payload. The payload is shared, never copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub payload: Bytes,
}

impl Message {
    pub fn new(header: Header) -> Self {
        Message {
            header,
            payload: Bytes::new(),
        }
    }

    /// A message whose payload is `payload`, padded to 8 bytes.
    pub fn with_payload(mut header: Header, payload: &[u8]) -> Self {
        let padded = pad8(payload.len());
        let mut body = BytesMut::with_capacity(padded);
        body.put_slice(payload);
        body.resize(padded, 0);
        header.payload_size = padded as u32;
        Message {
            header,
            payload: body.freeze(),
        }
    }

    /// A message carrying a channel name, NUL-terminated and padded.
    pub fn with_name(header: Header, name: &[u8]) -> Self {
        let mut body = Vec::with_capacity(name.len() + 1);
        body.extend_from_slice(name);
        body.push(0);
        Message::with_payload(header, &body)
    }

    pub fn wire_len(&self) -> usize {
        self.header.encoded_len() + self.payload.len()
    }

    pub fn encode(&self, out: &mut BytesMut) {
        self.header.encode(out);
        out.put_slice(&self.payload);
    }
}

fn pad8(len: usize) -> usize {
    (len + 7) & !7
}

/// The string in a name payload: the bytes before the first NUL.
pub fn payload_name(payload: &[u8]) -> &[u8] {
    match payload.iter().position(|&b| b == 0) {
        Some(end) => &payload[..end],
        None => payload,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The declared payload is larger than the configured limit.
    TooLarge { size: u32, limit: u32 },
    /// A datagram ended inside a message.
    Truncated,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::TooLarge { size, limit } => {
                write!(
                    f,
                    "message payload of {size} bytes exceeds the limit of {limit}"
                )
            }
            WireError::Truncated => write!(f, "datagram ends inside a message"),
        }
    }
}

impl std::error::Error for WireError {}

/// Reads a header from the start of `buf` without consuming it.
/// `Ok(None)` means more bytes are needed.
fn peek_header(buf: &[u8]) -> Option<(Header, usize)> {
    let (short, rest) = buf.split_first_chunk::<HEADER_LEN>()?;
    let mut short = &short[..];
    let command = short.get_u16();
    let payload16 = short.get_u16();
    let data_type = short.get_u16();
    let count16 = short.get_u16();
    let p1 = short.get_u32();
    let p2 = short.get_u32();
    let mut header = Header {
        command,
        payload_size: u32::from(payload16),
        data_type,
        count: u32::from(count16),
        p1,
        p2,
    };
    if payload16 != EXTENDED_MARKER {
        return Some((header, HEADER_LEN));
    }
    let (ext, _) = rest.split_first_chunk::<8>()?;
    let mut ext = &ext[..];
    header.payload_size = ext.get_u32();
    header.count = ext.get_u32();
    Some((header, EXTENDED_HEADER_LEN))
}

/// Takes one whole message off the front of a stream buffer.
/// `Ok(None)` means more bytes are needed; nothing is consumed then.
/// `needed` (if given) receives how many bytes the buffer must hold for the
/// next message, so the reader can grow its buffer once.
pub fn decode(
    buf: &mut BytesMut,
    max_payload: u32,
    needed: &mut usize,
) -> Result<Option<Message>, WireError> {
    let Some((header, header_len)) = peek_header(buf) else {
        *needed = EXTENDED_HEADER_LEN;
        return Ok(None);
    };
    if header.payload_size > max_payload {
        return Err(WireError::TooLarge {
            size: header.payload_size,
            limit: max_payload,
        });
    }
    let total = header_len + header.payload_size as usize;
    if buf.len() < total {
        *needed = total;
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(header_len);
    Ok(Some(Message {
        header,
        payload: frame.freeze(),
    }))
}

/// The header of the message at the front of `buf` if its payload is at
/// least `min` bytes, for passing it in parts; `None` for a smaller one.
/// With `needed` set, the header is not all there yet.
pub fn large_header(
    buf: &[u8],
    max_payload: u32,
    min: usize,
    needed: &mut usize,
) -> Result<Option<(Header, usize)>, WireError> {
    let Some((header, header_len)) = peek_header(buf) else {
        *needed = if buf.len() < HEADER_LEN {
            HEADER_LEN
        } else {
            EXTENDED_HEADER_LEN
        };
        return Ok(None);
    };
    if header.payload_size > max_payload {
        return Err(WireError::TooLarge {
            size: header.payload_size,
            limit: max_payload,
        });
    }
    Ok((header.payload_size as usize >= min).then_some((header, header_len)))
}

/// Splits a datagram into its messages. A datagram that ends inside a
/// message is an error as a whole.
pub fn decode_datagram(datagram: &[u8]) -> Result<Vec<(Header, &[u8])>, WireError> {
    let mut messages = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let (header, header_len) = peek_header(rest).ok_or(WireError::Truncated)?;
        let total = header_len
            .checked_add(header.payload_size as usize)
            .ok_or(WireError::Truncated)?;
        let (message, tail) = rest.split_at_checked(total).ok_or(WireError::Truncated)?;
        messages.push((header, &message[header_len..]));
        rest = tail;
    }
    Ok(messages)
}

// ----- messages the shim builds -----

/// The VERSION a server sends on accept (rsrv `rsrv_version_reply`).
pub fn server_version() -> Message {
    Message::new(Header::new(
        Command::Version,
        0,
        u32::from(MINOR_VERSION),
        0,
        0,
    ))
}

/// The VERSION a client sends first on a circuit: data type is the priority.
pub fn client_version(priority: u16, minor: u16) -> Message {
    Message::new(Header::new(
        Command::Version,
        priority,
        u32::from(minor),
        0,
        0,
    ))
}

/// A search reply sent over TCP that tells libca to create the channel on
/// this same circuit (rsrv `search_reply_tcp`; libca `searchRespNotify`).
pub fn tcp_search_reply(search_id: u32, port: u16) -> Message {
    Message::new(Header::new(
        Command::Search,
        port,
        0,
        ADDR_OF_SENDER,
        search_id,
    ))
}

pub fn echo() -> Message {
    Message::new(Header::new(Command::Echo, 0, 0, 0, 0))
}

pub fn read_sync() -> Message {
    Message::new(Header::new(Command::ReadSync, 0, 0, 0, 0))
}

/// Tells libca the channel is gone, so it searches again (p1 = cid).
pub fn server_disconn(cid: u32) -> Message {
    Message::new(Header::new(Command::ServerDisconn, 0, 0, cid, 0))
}

/// Tells libca the channel could not be created, so it searches again.
pub fn create_ch_fail(cid: u32) -> Message {
    Message::new(Header::new(Command::CreateChFail, 0, 0, cid, 0))
}

/// Appends a UDP search request for `names` to `out`, prefixed by the
/// VERSION message rsrv requires (R3.16.1 and later ignore searches without it).
/// Each name is `(search id, name)`. Returns how many names fit in
/// `MAX_UDP_SEND` bytes; at least one if the first fits at all.
pub fn encode_search_datagram(names: &[(u32, &[u8])], sequence: u32, out: &mut BytesMut) -> usize {
    let start = out.len();
    Header::new(Command::Version, 0, u32::from(MINOR_VERSION), sequence, 0).encode(out);
    let mut fitted = 0;
    for &(id, name) in names {
        let padded = pad8(name.len() + 1);
        if out.len() - start + HEADER_LEN + padded > MAX_UDP_SEND {
            break;
        }
        let mut header = Header::new(
            Command::Search,
            DONT_REPLY,
            u32::from(MINOR_VERSION),
            id,
            id,
        );
        header.payload_size = padded as u32;
        header.encode(out);
        out.put_slice(name);
        out.put_bytes(0, padded - name.len());
        fitted += 1;
    }
    fitted
}

/// The longest name that fits a search datagram next to the VERSION prefix.
pub const MAX_NAME_LEN: usize = MAX_UDP_SEND - 2 * HEADER_LEN - 8;

/// Write access denied: caerr.h `ECA_NOWTACCESS`, `DEFMSG(CA_K_WARNING, 47)`,
/// the message number shifted past the 3 severity bits (warning is 0).
pub const ECA_NOWTACCESS: u32 = 47 << 3;
/// The write bit of ACCESS_RIGHTS' p2 (caProto.h
/// `CA_PROTO_ACCESS_RIGHT_WRITE`; read is 1).
pub const ACCESS_RIGHT_WRITE: u32 = 2;

/// rsrv's answer to a WRITE without write access (`camessage.c`
/// write_action, send_err): CA_PROTO_ERROR with the channel's cid and the
/// status, then the request's header (with the client's own sid) and a
/// text.
pub fn write_refused(request: &Header, cid: u32, why: &str) -> Message {
    let mut payload = BytesMut::new();
    request.encode(&mut payload);
    payload.put_slice(why.as_bytes());
    payload.put_u8(0);
    Message::with_payload(
        Header::new(Command::Error, 0, 0, cid, ECA_NOWTACCESS),
        &payload,
    )
}

/// rsrv's answer to a WRITE_NOTIFY without write access (`camessage.c`
/// putNotifyErrorReply): the request's type and count, the status in p1
/// and the request's ioid in p2, no payload.
pub fn write_notify_refused(request: &Header) -> Message {
    Message::new(Header::new(
        Command::WriteNotify,
        request.data_type,
        request.count,
        ECA_NOWTACCESS,
        request.p2,
    ))
}

/// The server sid in the request header that a CA_PROTO_ERROR payload
/// echoes (rsrv `send_err`: the failed request's header, then the text),
/// if that request names its channel by sid: EVENT_ADD, EVENT_CANCEL, READ,
/// WRITE, CLEAR_CHANNEL, READ_NOTIFY, WRITE_NOTIFY carry it in p1.
pub fn error_request_sid(payload: &[u8]) -> Option<u32> {
    let command = u16::from_be_bytes([*payload.first()?, *payload.get(1)?]);
    let names_sid = [
        Command::EventAdd,
        Command::EventCancel,
        Command::Read,
        Command::Write,
        Command::ClearChannel,
        Command::ReadNotify,
        Command::WriteNotify,
    ]
    .iter()
    .any(|c| *c as u16 == command);
    let p1: [u8; 4] = payload.get(8..12)?.try_into().ok()?;
    names_sid.then_some(u32::from_be_bytes(p1))
}

/// The CA_PROTO_ERROR payload with the echoed request's p1 set to `sid`.
pub fn error_with_request_sid(payload: &[u8], sid: u32) -> Option<Bytes> {
    let mut out = BytesMut::from(payload);
    out.get_mut(8..12)?.copy_from_slice(&sid.to_be_bytes());
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8], max: u32) -> Result<Vec<Message>, WireError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        let mut needed = 0;
        while let Some(m) = decode(&mut buf, max, &mut needed)? {
            out.push(m);
        }
        Ok(out)
    }

    // A libca CREATE_CHAN for "TEST:AI" from cid 7, minor 13, as libca
    // `tcpiiu::createChannelRequest` lays it out.
    const CREATE_CHAN: [u8; 24] = [
        0x00, 0x12, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, // cmd 18, size 8
        0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x0d, // cid 7, minor 13
        b'T', b'E', b'S', b'T', b':', b'A', b'I', 0x00,
    ];

    #[test]
    fn an_error_echoing_a_read_notify_names_its_sid_and_can_be_rewritten() {
        // READ_NOTIFY header (cmd 15, sid 0x11223344 in p1), then the text.
        let mut payload = vec![0, 15, 0, 0, 0, 6, 0, 1, 0x11, 0x22, 0x33, 0x44, 0, 0, 0, 9];
        payload.extend_from_slice(b"bad\0");
        assert_eq!(error_request_sid(&payload), Some(0x1122_3344));
        let rewritten = error_with_request_sid(&payload, 7).unwrap();
        assert_eq!(&rewritten[8..12], &[0, 0, 0, 7]);
        assert_eq!(&rewritten[..8], &payload[..8]);
        assert_eq!(&rewritten[12..], &payload[12..]);
    }

    #[test]
    fn an_error_echoing_a_search_or_a_short_payload_names_no_sid() {
        let search = [0, 6, 0, 8, 0, 5, 0, 13, 0, 0, 0, 1, 0, 0, 0, 1];
        assert_eq!(error_request_sid(&search), None);
        assert_eq!(error_request_sid(&[0, 15, 0]), None);
    }

    #[test]
    fn decodes_create_chan_golden_bytes() {
        let msgs = decode_all(&CREATE_CHAN, 1 << 20).unwrap();
        assert_eq!(msgs.len(), 1);
        let h = msgs[0].header;
        assert_eq!(h.command(), Ok(Command::CreateChan));
        assert_eq!((h.payload_size, h.p1, h.p2), (8, 7, 13));
        assert_eq!(payload_name(&msgs[0].payload), b"TEST:AI");
    }

    #[test]
    fn encodes_create_chan_golden_bytes() {
        let m = Message::with_name(Header::new(Command::CreateChan, 0, 0, 7, 13), b"TEST:AI");
        let mut out = BytesMut::new();
        m.encode(&mut out);
        assert_eq!(&out[..], &CREATE_CHAN[..]);
    }

    #[test]
    fn split_reads_wait_for_more_bytes() {
        for cut in 0..CREATE_CHAN.len() {
            let mut buf = BytesMut::from(&CREATE_CHAN[..cut]);
            let mut needed = 0;
            assert_eq!(
                decode(&mut buf, 1 << 20, &mut needed),
                Ok(None),
                "cut at {cut}"
            );
            assert_eq!(buf.len(), cut, "nothing consumed at cut {cut}");
            assert!(needed > cut);
            buf.extend_from_slice(&CREATE_CHAN[cut..]);
            assert!(decode(&mut buf, 1 << 20, &mut needed).unwrap().is_some());
        }
    }

    // An extended header as rsrv sends for a 100000-element DBR_DOUBLE
    // monitor update: size 800000, count 100000.
    #[test]
    fn decodes_extended_header() {
        let mut bytes = vec![
            0x00, 0x01, 0xff, 0xff, 0x00, 0x06, 0x00, 0x00, // EVENT_ADD, marker, DOUBLE, 0
            0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x2a, // status 1, subid 42
            0x00, 0x0c, 0x35, 0x00, 0x00, 0x01, 0x86, 0xa0, // 800000, 100000
        ];
        bytes.resize(24 + 800_000, 0xab);
        let msgs = decode_all(&bytes, 1 << 24).unwrap();
        let h = msgs[0].header;
        assert_eq!((h.payload_size, h.count, h.p2), (800_000, 100_000, 42));
        let mut out = BytesMut::new();
        msgs[0].encode(&mut out);
        assert_eq!(&out[..], &bytes[..], "re-encodes to the same bytes");
    }

    // libca and rsrv read the annex whenever the payload size is 0xFFFF,
    // even with a non-zero 16-bit count: a WRITE (cmd 4) with marker and
    // count 1, annex size 16 and count 2, then 16 payload bytes, then ECHO.
    const EXTENDED_WITH_COUNT: [u8; 56] = [
        0x00, 0x04, 0xff, 0xff, 0x00, 0x06, 0x00, 0x01, // WRITE, marker, DOUBLE, count 1
        0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x09, // sid 5, ioid 9
        0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x02, // size 16, count 2
        0x3f, 0xf0, 0, 0, 0, 0, 0, 0, // 1.0
        0x40, 0x00, 0, 0, 0, 0, 0, 0, // 2.0
        0x00, 0x17, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // ECHO
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn payload_marker_alone_means_extended_header_as_in_libca_and_rsrv() {
        let msgs = decode_all(&EXTENDED_WITH_COUNT, 1 << 20).unwrap();
        assert_eq!(msgs.len(), 2, "the WRITE, then the ECHO after it");
        let h = msgs[0].header;
        assert_eq!(h.command(), Ok(Command::Write));
        assert_eq!((h.payload_size, h.count, h.p1, h.p2), (16, 2, 5, 9));
        assert_eq!(&msgs[0].payload[..2], &[0x3f, 0xf0]);
        assert_eq!(msgs[1].header.command(), Ok(Command::Echo));
        // Sizes that fit 16 bits go out in the short form libca sends.
        let mut out = BytesMut::new();
        msgs[0].header.encode(&mut out);
        assert_eq!(&out[..], &[0, 4, 0, 16, 0, 6, 0, 2, 0, 0, 0, 5, 0, 0, 0, 9]);
    }

    #[test]
    fn payload_marker_with_count_waits_for_the_annex() {
        let mut buf = BytesMut::from(&EXTENDED_WITH_COUNT[..20]);
        let mut needed = 0;
        assert_eq!(decode(&mut buf, 1 << 20, &mut needed), Ok(None));
        assert_eq!(needed, 24);
    }

    #[test]
    fn oversized_payload_is_an_error_before_buffering() {
        let bytes = [
            0x00, 0x01, 0xff, 0xff, 0x00, 0x06, 0x00, 0x00, 0, 0, 0, 1, 0, 0, 0, 2, 0x7f, 0xff,
            0xff, 0xff, 0, 0, 0, 1,
        ];
        assert_eq!(
            decode_all(&bytes, 1000),
            Err(WireError::TooLarge {
                size: 0x7fff_ffff,
                limit: 1000
            })
        );
    }

    #[test]
    fn unknown_command_is_kept_raw() {
        let bytes = [0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let msgs = decode_all(&bytes, 100).unwrap();
        assert_eq!(msgs[0].header.command(), Err(0x0100));
    }

    // rsrv's UDP answer to a search for a name it has: VERSION, then SEARCH
    // with data type = TCP port 5064, p1 = ~0, p2 = cid 3, payload = minor 13.
    const RSRV_UDP_REPLY: [u8; 40] = [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0d, 0, 0, 0, 0, 0, 0, 0, 0, //
        0x00, 0x06, 0x00, 0x08, 0x13, 0xc8, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 3, //
        0x00, 0x0d, 0, 0, 0, 0, 0, 0,
    ];

    #[test]
    fn splits_rsrv_search_reply_datagram() {
        let msgs = decode_datagram(&RSRV_UDP_REPLY).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].0.command(), Ok(Command::Version));
        let (h, payload) = msgs[1];
        assert_eq!(h.command(), Ok(Command::Search));
        assert_eq!((h.data_type, h.p1, h.p2), (5064, ADDR_OF_SENDER, 3));
        assert_eq!(payload, &[0x00, 0x0d, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn truncated_datagram_is_an_error() {
        assert_eq!(
            decode_datagram(&RSRV_UDP_REPLY[..30]),
            Err(WireError::Truncated)
        );
        let mut huge = RSRV_UDP_REPLY;
        huge[18] = 0x7f; // payload size 0x7f08
        assert_eq!(decode_datagram(&huge), Err(WireError::Truncated));
    }

    #[test]
    fn search_datagram_matches_libca_layout() {
        let mut out = BytesMut::new();
        let n = encode_search_datagram(&[(3, b"AB"), (4, b"TEST:COUNTER")], 9, &mut out);
        assert_eq!(n, 2);
        let expected: Vec<u8> = [
            &[0u8, 0, 0, 0, 0, 0, 0, 13, 0, 0, 0, 9, 0, 0, 0, 0][..],
            &[0, 6, 0, 8, 0, 5, 0, 13, 0, 0, 0, 3, 0, 0, 0, 3],
            b"AB\0\0\0\0\0\0",
            &[0, 6, 0, 16, 0, 5, 0, 13, 0, 0, 0, 4, 0, 0, 0, 4],
            b"TEST:COUNTER\0\0\0\0",
        ]
        .concat();
        assert_eq!(&out[..], &expected[..]);
    }

    #[test]
    fn search_datagram_stops_at_max_udp_send() {
        let name = [b'x'; 200];
        let names: Vec<(u32, &[u8])> = (0..10).map(|i| (i, &name[..])).collect();
        let mut out = BytesMut::new();
        let n = encode_search_datagram(&names, 0, &mut out);
        assert_eq!(
            n, 4,
            "16 + 4 * (16 + 208) = 912 bytes; a fifth exceeds 1024"
        );
        assert!(out.len() <= MAX_UDP_SEND);
    }

    #[test]
    fn tcp_search_reply_points_at_this_circuit() {
        let mut out = BytesMut::new();
        tcp_search_reply(77, 5066).encode(&mut out);
        assert_eq!(
            &out[..],
            &[0, 6, 0, 0, 0x13, 0xca, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 77]
        );
    }

    #[test]
    fn every_command_code_round_trips() {
        for code in 0..28u16 {
            let command = Command::try_from(code).unwrap();
            assert_eq!(command as u16, code);
        }
        assert_eq!(Command::try_from(28), Err(28));
    }
}
