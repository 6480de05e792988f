//! Fuzz targets for the decoders that peers drive: the CA and PVA stream
//! framing (with PVA segment reassembly), the search-answer parsers, the
//! PVA type and value walkers and the type-cache translation.
//!
//! The decoders are compiled in from the main crate's own files, so the
//! fuzzer tests exactly the code the shim runs; they depend on nothing but
//! `bytes` and std (no tokio), which keeps that possible.
//!
//! Each target checks properties, not only the absence of panics:
//! - a stream decodes to the same messages (and the same error) whatever
//!   the sizes of the reads it arrives in, as `relay/framing.rs` feeds it;
//! - "need more bytes" always asks for more than the buffer holds;
//! - a type and value re-emitted in plain form walk again, with a fresh
//!   cache and no references, to the very same bytes.
#![allow(dead_code)]

pub mod ca;
pub mod pva;

use bytes::{Bytes, BytesMut};
use std::net::{Ipv4Addr, SocketAddrV4};

/// A tiny xorshift generator: read sizes chosen from the input's first
/// bytes, so a finding replays exactly.
struct Chunks(u64);

impl Chunks {
    fn new(seed: u8) -> Chunks {
        Chunks(0x9E37_79B9_7F4A_7C15 ^ u64::from(seed) << 17 | 1)
    }

    /// The size of the next read: mostly small (split headers), at times large.
    fn next(&mut self) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        match self.0 % 8 {
            0 => 1 + (self.0 >> 8) as usize % 4096,
            _ => 1 + (self.0 >> 8) as usize % 9,
        }
    }
}

/// Feeds `input` to `decode` in reads of the sizes `chunks` picks, as the
/// frame reader does, and returns every message and the final error.
fn feed<M, E>(
    input: &[u8],
    mut chunks: Option<Chunks>,
    mut decode: impl FnMut(&mut BytesMut, &mut usize) -> Result<Option<M>, E>,
) -> (Vec<M>, Option<E>) {
    let mut buf = BytesMut::new();
    let mut rest = input;
    let mut messages = Vec::new();
    loop {
        let mut needed = 0;
        match decode(&mut buf, &mut needed) {
            Ok(Some(m)) => {
                messages.push(m);
                continue;
            }
            Ok(None) => {
                assert!(
                    needed > buf.len(),
                    "need-more-bytes must ask for more than the {} held, asked {needed}",
                    buf.len()
                );
            }
            Err(e) => return (messages, Some(e)),
        }
        if rest.is_empty() {
            return (messages, None);
        }
        let n = chunks
            .as_mut()
            .map_or(rest.len(), Chunks::next)
            .min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
}

/// CA stream framing (`ca::wire::decode`), and the payload helpers that
/// read what a server or client sent.
pub fn ca_stream(data: &[u8]) {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    // Small limits reach the TooLarge path; large ones the extended header.
    let max = if seed & 0x80 != 0 { 16_384 } else { 1 << 20 };
    let decode = |buf: &mut BytesMut, needed: &mut usize| ca::wire::decode(buf, max, needed);
    let whole = feed(input, None, decode);
    let split = feed(input, Some(Chunks::new(seed)), decode);
    assert_eq!(whole, split, "split reads changed what was decoded");
    for m in &whole.0 {
        assert_eq!(m.payload.len(), m.header.payload_size as usize);
        assert!(m.header.payload_size <= max);
        let _ = ca::wire::payload_name(&m.payload);
        if let Some(sid) = ca::wire::error_request_sid(&m.payload) {
            let rewritten = ca::wire::error_with_request_sid(&m.payload, sid ^ 1);
            assert_eq!(rewritten.map(|b| b.len()), Some(m.payload.len()));
        }
        let _ = m.header.command();
        let _ = format!("{:?}", m.header);
        // What the shim re-encodes (after rewriting ids) means the same.
        let mut out = BytesMut::new();
        m.encode(&mut out);
        assert_eq!(out.len(), m.wire_len());
        let mut needed = 0;
        let again = ca::wire::decode(&mut out, u32::MAX, &mut needed);
        assert_eq!(again.as_ref().ok().and_then(Option::as_ref), Some(m));
        assert!(out.is_empty());
    }
}

/// CA search answers: a datagram split into messages, then each SEARCH
/// reply read as `ca::search` reads it.
pub fn ca_search(data: &[u8]) {
    let Ok(messages) = ca::wire::decode_datagram(data) else {
        return;
    };
    let mut covered = 0;
    for (header, payload) in messages {
        covered += payload.len();
        assert_eq!(payload.len(), header.payload_size as usize);
        if header.command() == Ok(ca::wire::Command::Search) {
            let ip = if header.p1 == ca::wire::ADDR_OF_SENDER {
                Ipv4Addr::UNSPECIFIED
            } else {
                Ipv4Addr::from(header.p1)
            };
            let _ = SocketAddrV4::new(ip, header.data_type);
        }
    }
    assert!(covered <= data.len());
}

/// PVA stream framing with segment reassembly (`pva::wire::Decoder`), both
/// directions, and the parsers of the messages a session reads.
pub fn pva_stream(data: &[u8]) {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let direction = if seed & 1 != 0 {
        pva::wire::Direction::FromServer
    } else {
        pva::wire::Direction::FromClient
    };
    let max = if seed & 0x80 != 0 { 4096 } else { 1 << 20 };
    let mut whole_decoder = pva::wire::Decoder::new(max, direction);
    let mut split_decoder = pva::wire::Decoder::new(max, direction);
    let whole = feed(input, None, |buf, needed| whole_decoder.decode(buf, needed));
    let split = feed(input, Some(Chunks::new(seed)), |buf, needed| {
        split_decoder.decode(buf, needed)
    });
    assert_eq!(whole, split, "split reads changed what was decoded");
    // Passing large messages in parts (as `relay/framing.rs` does for a
    // server's): the parts, joined again, are the messages decoded whole.
    let min = [0, 16, 1 << 16][usize::from(seed >> 1) % 3];
    let mut passing = Passing::new(max, direction, min);
    let passed = feed(input, Some(Chunks::new(seed ^ 0x55)), |buf, needed| {
        passing.decode(buf, needed)
    });
    if whole.1.is_none() && passed.1.is_none() {
        let application = |ms: &[pva::wire::Message]| -> Vec<pva::wire::Message> {
            ms.iter().filter(|m| !m.header.is_control()).cloned().collect()
        };
        assert_eq!(application(&whole.0), application(&passed.0), "passing in parts changed the messages");
    }
    for m in &whole.0 {
        assert_eq!(m.header.direction(), direction);
        if m.header.is_control() {
            assert!(m.payload.is_empty());
            let mut out = BytesMut::new();
            m.header.encode(&mut out);
            let mut decoder = pva::wire::Decoder::new(u32::MAX, direction);
            let mut needed = 0;
            let again = decoder.decode(&mut out, &mut needed);
            assert_eq!(again.as_ref().ok().and_then(Option::as_ref), Some(m));
            continue;
        }
        assert_eq!(m.header.flags & pva::wire::FLAG_SEGMENT_MASK, 0);
        assert_eq!(m.payload.len(), m.header.size as usize);
        assert!(m.header.size <= max);
        let _ = pva::wire::parse_client_validation(m);
        let _ = pva::wire::parse_server_methods(m);
        let _ = pva::wire::parse_search(m).map(|s| assert!(s.names.len() <= 1024));
        let _ = pva::wire::parse_search_response(m);
        let mut out = BytesMut::new();
        m.encode(&mut out);
        assert_eq!(out.len(), m.wire_len());
        // Re-encoded (segments joined), it decodes to the same message.
        let mut decoder = pva::wire::Decoder::new(u32::MAX, direction);
        let mut needed = 0;
        let again = decoder.decode(&mut out, &mut needed);
        assert_eq!(again.as_ref().ok().and_then(Option::as_ref), Some(m));
        assert!(out.is_empty());
    }
}

/// Decodes as a server's link does: a large or segmented message passes in
/// parts (its spans, control messages between segments dropped), which are
/// joined again here to compare with decoding whole.
struct Passing {
    decoder: pva::wire::Decoder,
    direction: pva::wire::Direction,
    min: usize,
    /// Inside a passing message: bytes left of the current span, more spans
    /// follow, this span is dropped.
    span: Option<(usize, bool, bool)>,
    passed: BytesMut,
}

impl Passing {
    fn new(max: u32, direction: pva::wire::Direction, min: usize) -> Passing {
        Passing {
            decoder: pva::wire::Decoder::new(max, direction),
            direction,
            min,
            span: None,
            passed: BytesMut::new(),
        }
    }

    fn decode(
        &mut self,
        buf: &mut BytesMut,
        needed: &mut usize,
    ) -> Result<Option<pva::wire::Message>, pva::wire::WireError> {
        loop {
            let Some((left, continues, dropped)) = self.span else {
                let mut need = 0;
                match self.decoder.split(buf, self.min, &mut need)? {
                    Some(split) => {
                        assert!(split.len >= pva::wire::HEADER_LEN);
                        assert!(split.head.payload.len() <= pva::wire::HEAD_PREFIX);
                        self.span = Some((split.len, split.continues, false));
                    }
                    None if need > 0 => {
                        *needed = need;
                        return Ok(None);
                    }
                    None => return self.decoder.decode(buf, needed),
                }
                continue;
            };
            if left == 0 {
                if !continues {
                    self.span = None;
                    return Ok(Some(self.joined()));
                }
                match self.decoder.split_next(buf, needed)? {
                    Some(pva::wire::Continuation::Segment { len, last }) => {
                        self.span = Some((len, !last, false))
                    }
                    Some(pva::wire::Continuation::Control) => {
                        self.span = Some((pva::wire::HEADER_LEN, true, true))
                    }
                    None => return Ok(None),
                }
                continue;
            }
            if buf.is_empty() {
                *needed = 1;
                return Ok(None);
            }
            let n = left.min(buf.len());
            let part = buf.split_to(n);
            if !dropped {
                self.passed.extend_from_slice(&part);
            }
            self.span = Some((left - n, continues, dropped));
        }
    }

    /// The passed bytes decoded whole: one message, segments joined.
    fn joined(&mut self) -> pva::wire::Message {
        let mut bytes = std::mem::take(&mut self.passed);
        let mut decoder = pva::wire::Decoder::new(u32::MAX, self.direction);
        let mut needed = 0;
        let message = decoder.decode(&mut bytes, &mut needed);
        let message = message.ok().flatten().expect("passed bytes decode whole");
        assert!(bytes.is_empty(), "one message passed");
        message
    }
}

/// PVA search answers as `pva::search` reads them.
pub fn pva_search(data: &[u8]) {
    for message in pva::wire::decode_datagram(data) {
        assert_eq!(message.payload.len(), message.header.size as usize);
        if let Ok(answer) = pva::wire::parse_search_response(&message) {
            // Ids come from the payload: at most one per four bytes.
            assert!(answer.ids.len() <= message.payload.len() / 4);
        }
        let _ = pva::wire::parse_search(&message);
    }
}

/// The PVA type and value walkers: descriptions (through the cache) and
/// values, re-emitted in plain form; the plain form walks again, without
/// a cache, to the same bytes.
pub fn pva_types(data: &[u8]) {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let big_endian = mode & 1 != 0;
    let client = mode & 2 != 0;
    let mut registry = pva::types::Registry::default();
    let mut out = BytesMut::new();
    let ok = walk_typed_values(input, big_endian, client, &mut registry, &mut out, mode);
    if !ok {
        return;
    }
    let first = out.freeze();
    let mut fresh = pva::types::Registry::default();
    let mut again = BytesMut::new();
    let ok = walk_typed_values(&first, big_endian, false, &mut fresh, &mut again, mode);
    assert!(ok, "plain output does not walk again");
    assert_eq!(first, again.freeze(), "plain output is not stable");
}

/// Walks up to four (description, value) pairs; false if the walk failed.
fn walk_typed_values(
    input: &[u8],
    big_endian: bool,
    client: bool,
    registry: &mut pva::types::Registry,
    out: &mut BytesMut,
    mode: u8,
) -> bool {
    let mut w = pva::types::Walker::new(input, big_endian, registry, Some(out));
    if client {
        w = w.for_client_message();
    }
    for _ in 0..4 {
        if w.r.is_empty() {
            break;
        }
        let Some(t) = w.field_desc() else {
            continue;
        };
        if mode & 4 != 0 {
            w.changed_value(&t);
        } else {
            w.value(&t);
        }
        let _ = t.shape();
    }
    w.copy_rest();
    w.finish().is_ok()
}

/// The type-cache translation: a sequence of client and server messages
/// for one client connection that spans two servers.
///
/// Input: a record is `[kind, command, flags, len_lo, len_hi, payload..]`.
/// `kind` bit 0: from the server; bit 1: server B rather than A; bit 2:
/// the connection spans both servers from now on; 0xFF forgets server A,
/// 0xFE forgets the channel named by the next four bytes, 0xFD reads
/// credentials.
pub fn pva_translate(data: &[u8]) {
    let servers = [
        SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 5075),
        SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 5076),
    ];
    let mut translator = pva::translate::Translator::default();
    let mut rest = data;
    while let [kind, command, flags, lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (payload, next) = tail.split_at(len);
        rest = next;
        let big_endian = flags & pva::wire::FLAG_BIG_ENDIAN != 0;
        match kind {
            0xFF => translator.forget_server(servers[0]),
            0xFE => {
                let sid = payload
                    .first_chunk::<4>()
                    .map_or(0, |b| u32::from_le_bytes(*b));
                translator.forget_channel(sid);
            }
            0xFD => {
                let _ = translator.credentials(payload, big_endian);
            }
            _ => {
                if kind & 4 != 0 {
                    translator.active = true;
                }
                let from_server = kind & 1 != 0;
                let server = servers[usize::from(kind >> 1 & 1)];
                let mut header_flags = flags & pva::wire::FLAG_BIG_ENDIAN;
                if from_server {
                    header_flags |= pva::wire::FLAG_FROM_SERVER;
                }
                let message = pva::wire::Message {
                    header: pva::wire::Header {
                        version: pva::wire::VERSION,
                        flags: header_flags,
                        command: *command,
                        size: payload.len() as u32,
                    },
                    payload: Bytes::copy_from_slice(payload),
                };
                let result = if from_server {
                    translator.server_message(server, &message)
                } else {
                    translator.client_message(server, &message)
                };
                if let Ok(Some(rewritten)) = result {
                    // What a rewrite may cost: the walkers' own bound.
                    assert!(rewritten.len() <= payload.len() * 4 + (256 << 10));
                }
            }
        }
    }
}
