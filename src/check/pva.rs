//! The PV Access side of `nameshim check`: one connection, as a pvxs client
//! opens it to a name server (`EPICS_PVA_NAME_SERVERS`), then for each PV a
//! TCP search, CREATE_CHANNEL on the same connection, and one GET.
//!
//! A PVA client speaks only after the server's greeting (SET_BYTE_ORDER,
//! CONNECTION_VALIDATION); on the shared port the shim sends it once the
//! connection has stayed silent through the classification window. The
//! client answers CONNECTION_VALIDATION (here with "ca" credentials, as pvxs
//! does when offered) and waits for CONNECTION_VALIDATED.
//!
//! The search answers' port decides which clients can use the shim
//! (docs/clients.md): port 0 means "this connection" to pvxs only;
//! pvAccessCPP and Phoebus dial the port named. So every answer's port is
//! kept, and a name found without any non-zero port is searched once more.

use super::report::{Outcome, ReplyPorts, Report};
use super::{next_before, step, step_with, Failure};
use crate::pva::types::{FieldType, Registry, Shape, Walker};
use crate::pva::wire::Direction;
use crate::pva::wire::{self, Command, Message, Reader, Writer};
use crate::relay::framing::FrameReader;
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

const PROTOCOL: &str = "PVA";
/// Largest message read (a GET of a large array is read whole).
const MAX_MESSAGE: u32 = 64 << 20;
/// Elements printed of an array.
const SHOWN: usize = 5;
/// How long more answers to one search are awaited after the first: the
/// shim writes its answers for one name back to back.
const MORE_ANSWERS: Duration = Duration::from_millis(300);
/// SEARCH flags as pvxs sends them over TCP: must reply, unicast.
const SEARCH_FLAGS: u8 = wire::SEARCH_MUST_REPLY | 0x80;
/// GET subcommands (pvxs `pva_app_msg_t` handling): INIT, then plain GET.
const SUBCMD_INIT: u8 = 0x08;
const SUBCMD_GET: u8 = 0x00;
/// An empty pvRequest: `field()` as a plain structure with no id or members.
const EMPTY_PV_REQUEST: [u8; 3] = [0x80, 0x00, 0x00];

#[derive(Debug, Default)]
pub struct PvaResult {
    pub connected: bool,
    pub greeted: bool,
    /// One per PV, in order: its value was read.
    pub reached: Vec<bool>,
    /// The ports the answers for found names gave, if any name was found.
    pub ports: Option<ReplyPorts>,
}

struct Connection {
    reader: FrameReader<OwnedReadHalf, wire::Decoder>,
    writer: OwnedWriteHalf,
    step: Duration,
    /// The byte order the server announced; this client uses it too.
    big_endian: bool,
    /// The server's introspection cache on this connection.
    types: Registry,
    sequence: u32,
    ports: Option<ReplyPorts>,
    /// The connection failed (closed, bad bytes): no further step can use it.
    broken: bool,
}

pub async fn check(
    addr: SocketAddr,
    pvs: &[String],
    step_time: Duration,
    report: &mut Report,
) -> PvaResult {
    let mut result = PvaResult {
        reached: vec![false; pvs.len()],
        ..PvaResult::default()
    };
    let Some(stream) = super::connect_step(PROTOCOL, addr, step_time, report).await else {
        return result;
    };
    result.connected = true;
    let started = Instant::now();
    if let Err(why) = first_byte_is_pva(&stream, step_time).await {
        report.step(PROTOCOL, "greeting", started.elapsed(), &Err(why));
        return result;
    }
    let (read, writer) = stream.into_split();
    let mut conn = Connection {
        reader: FrameReader::new(read, wire::Decoder::new(MAX_MESSAGE, Direction::FromServer)),
        writer,
        step: step_time,
        big_endian: false,
        types: Registry::default(),
        sequence: 0,
        ports: None,
        broken: false,
    };
    let greeting = conn.greet().await;
    report.step(PROTOCOL, "greeting", started.elapsed(), &greeting);
    if greeting.is_err() {
        return result;
    }
    result.greeted = true;
    for (index, pv) in pvs.iter().enumerate() {
        if conn.broken {
            report.line(&format!(
                "  {PROTOCOL:<4} {pv}: not checked, the connection failed above"
            ));
            continue;
        }
        result.reached[index] = conn.check_pv(pv, index as u32 + 1, report).await;
    }
    result.ports = conn.ports;
    result
}

/// Waits for the server's first byte without taking it: a CA-only port
/// greets with a CA VERSION (first byte 0x00), which is no PVA message.
async fn first_byte_is_pva(
    stream: &tokio::net::TcpStream,
    step_time: Duration,
) -> Result<(), String> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(step_time, stream.peek(&mut first)).await {
        Err(_) => Err(format!(
            "no greeting within {step_time:?}: not a PVA server?"
        )),
        Ok(Ok(0)) => Err("the shim closed the connection without a greeting".into()),
        Ok(Ok(_)) if first[0] == wire::MAGIC => Ok(()),
        Ok(Ok(_)) if first[0] == 0 => {
            Err("the port greeted with Channel Access bytes: a CA-only port (--ca-listen)?".into())
        }
        Ok(Ok(_)) => Err(format!(
            "the port greeted with byte {:#04x}: not PV Access",
            first[0]
        )),
        Ok(Err(e)) => Err(format!("read failed: {e}")),
    }
}

impl Connection {
    /// Search, create and get `pv`; whether its value was read.
    async fn check_pv(&mut self, pv: &str, id: u32, report: &mut Report) -> bool {
        if step(PROTOCOL, "search", report, self.search(pv, id))
            .await
            .is_err()
        {
            return false;
        }
        let Ok(sid) = step_with(PROTOCOL, "create", report, self.create(pv, id)).await else {
            return false;
        };
        step(PROTOCOL, "get", report, self.get(pv, sid, id))
            .await
            .is_ok()
    }

    async fn send(&mut self, message: Message) -> Result<(), String> {
        let mut out = BytesMut::with_capacity(message.wire_len());
        message.encode(&mut out);
        self.writer
            .write_all(&out)
            .await
            .map_err(|e| format!("send failed: {e}"))
    }

    fn writer(&self) -> Writer {
        Writer::new(self.big_endian)
    }

    /// The next message before `deadline` that `want` takes.
    async fn expect<T>(
        &mut self,
        deadline: Instant,
        what: &str,
        mut want: impl FnMut(&Message, &mut Registry) -> Option<Result<T, String>>,
    ) -> Result<T, Failure> {
        loop {
            let message = self.next(deadline, what).await?;
            if message.header.is_control() {
                continue;
            }
            if let Some(answer) = want(&message, &mut self.types) {
                return answer.map_err(Failure::Answer);
            }
        }
    }

    /// The next message, noting a connection that can no longer be used.
    async fn next(&mut self, deadline: Instant, what: &str) -> Result<Message, Failure> {
        let next = next_before(&mut self.reader, deadline, what).await;
        self.broken |= matches!(next, Err(Failure::Connection(_)));
        next
    }

    async fn greet(&mut self) -> Outcome {
        let deadline = Instant::now() + self.step;
        let mut order = None;
        let methods = loop {
            let message = self
                .next(deadline, "the server's CONNECTION_VALIDATION")
                .await?;
            if message.header.is_control() && message.header.command == wire::CONTROL_SET_BYTE_ORDER
            {
                order = Some(message.header.is_big_endian());
            } else if message.header.command() == Ok(Command::ConnectionValidation) {
                self.big_endian = order.unwrap_or(message.header.is_big_endian());
                break wire::parse_server_methods(&message)
                    .map_err(|e| format!("bad CONNECTION_VALIDATION: {e}"))?;
            }
        };
        let offered: Vec<String> = methods
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect();
        let method = if offered.iter().any(|m| m == "ca") {
            "ca"
        } else {
            "anonymous"
        };
        let mut w = self.writer();
        w.u32(wire::ANNOUNCED_BUFFER_SIZE)
            .u16(wire::ANNOUNCED_REGISTRY_SIZE)
            .u16(0)
            .string(method.as_bytes());
        if method == "ca" {
            // pvxs's "ca" credentials: a plain structure {string user; string host}.
            w.bytes(&[
                0x80, 0x00, 0x02, 4, b'u', b's', b'e', b'r', 0x60, 4, b'h', b'o', b's', b't', 0x60,
            ]);
            w.string(b"nameshim-check")
                .string(super::host_name().as_bytes());
        } else {
            w.u8(0xFF);
        }
        self.send(w.into_message(Command::ConnectionValidation, Direction::FromClient))
            .await?;
        self.expect(deadline, "CONNECTION_VALIDATED", |m, _| {
            (m.header.command() == Ok(Command::ConnectionValidated)).then(|| {
                let mut r = Reader::new(&m.payload, m.header.is_big_endian());
                read_status(&mut r).map_err(|why| format!("validation refused: {why}"))
            })
        })
        .await?;
        let order = match order {
            Some(true) => "big-endian",
            Some(false) => "little-endian",
            None => "no SET_BYTE_ORDER",
        };
        Ok(format!(
            "SET_BYTE_ORDER ({order}) + CONNECTION_VALIDATION offering {}; validated with \"{method}\"",
            offered.join(", ")
        ))
    }

    async fn send_search(&mut self, pv: &str, id: u32) -> Result<(), String> {
        self.sequence += 1;
        let mut w = self.writer();
        w.u32(self.sequence)
            .u8(SEARCH_FLAGS)
            .bytes(&[0; 3])
            .bytes(&[0; 16])
            .u16(0)
            .size(1)
            .string(b"tcp")
            .u16(1)
            .u32(id)
            .string(pv.as_bytes());
        self.send(w.into_message(Command::Search, Direction::FromClient))
            .await
    }

    /// Answers to search `id`, the first by `first_by`, more for
    /// `MORE_ANSWERS` after it: (found, ports), or None if none came.
    async fn answers(
        &mut self,
        id: u32,
        first_by: Instant,
    ) -> Result<Option<(bool, ReplyPorts)>, String> {
        let mut ports = ReplyPorts::default();
        let mut found = None;
        let mut deadline = first_by;
        loop {
            let answer = self
                .expect(deadline, "a search answer", |m, _| {
                    if m.header.command() != Ok(Command::SearchResponse) {
                        return None;
                    }
                    match wire::parse_search_response(m) {
                        Ok(a) if a.ids.contains(&id) => Some(Ok(a)),
                        Ok(_) => None,
                        Err(e) => Some(Err(format!("bad SEARCH_RESPONSE: {e}"))),
                    }
                })
                .await;
            let answer = match answer {
                Ok(answer) => answer,
                // Only the wait for more answers may end without one.
                Err(_) if found.is_some() => return Ok(found.map(|f| (f, ports))),
                Err(Failure::TimedOut(_)) => return Ok(None),
                Err(failure) => return Err(failure.into()),
            };
            if answer.found {
                match answer.port {
                    0 => ports.zero = true,
                    port => ports.named = Some(port),
                }
            }
            found = Some(found.unwrap_or(false) | answer.found);
            if ports.named.is_some() || found == Some(false) {
                // The port that decides the verdict is known, or the name
                // is not found: no answer to come changes the step.
                return Ok(found.map(|f| (f, ports)));
            }
            if deadline == first_by {
                deadline = Instant::now() + MORE_ANSWERS;
            }
        }
    }

    async fn search(&mut self, pv: &str, id: u32) -> Outcome {
        let deadline = Instant::now() + self.step;
        self.send_search(pv, id).await?;
        let Some((found, mut ports)) = self.answers(id, deadline).await? else {
            return Err(format!(
                "no answer for {pv} within {:?} (the shim answers a must-reply search either way)",
                self.step
            ));
        };
        if !found {
            return Err(format!("{pv} not found: the shim's search of the servers behind it found no server with it"));
        }
        if ports.named.is_none() {
            // A shim may name the port only when a name is searched again
            // (pvAccessCPP and Phoebus search again after port 0 failed).
            self.send_search(pv, id).await?;
            if let Some((_, again)) = self.answers(id, Instant::now() + self.step).await? {
                ports.zero |= again.zero;
                ports.named = again.named;
            }
        }
        let seen = self.ports.get_or_insert_with(ReplyPorts::default);
        seen.zero |= ports.zero;
        seen.named = ports.named.or(seen.named);
        let mut named = Vec::new();
        if ports.zero {
            named.push("port 0 (this connection)".to_string());
        }
        if let Some(port) = ports.named {
            named.push(format!("port {port}"));
        }
        Ok(format!(
            "{pv} found; answers name {}",
            named.join(", then ")
        ))
    }

    async fn create(&mut self, pv: &str, cid: u32) -> Result<(String, u32), String> {
        let mut w = self.writer();
        w.u16(1).u32(cid).string(pv.as_bytes());
        self.send(w.into_message(Command::CreateChannel, Direction::FromClient))
            .await?;
        let deadline = Instant::now() + self.step;
        let what = format!("the CREATE_CHANNEL answer for {pv}");
        let sid = self
            .expect(deadline, &what, |m, _| {
                if m.header.command() != Ok(Command::CreateChannel) {
                    return None;
                }
                let mut r = Reader::new(&m.payload, m.header.is_big_endian());
                let (answer_cid, sid) = (r.u32("cid"), r.u32("sid"));
                let status = read_status(&mut r);
                if r.finish().is_err() {
                    return Some(Err("a CREATE_CHANNEL answer too short".into()));
                }
                (answer_cid == cid).then(|| {
                    status
                        .map(|()| sid)
                        .map_err(|why| format!("{pv}: channel refused: {why}"))
                })
            })
            .await?;
        Ok((format!("{pv} created on this connection"), sid))
    }

    /// GET INIT for the type, then one GET for the value.
    async fn get(&mut self, pv: &str, sid: u32, ioid: u32) -> Outcome {
        self.send_get(sid, ioid, SUBCMD_INIT, &EMPTY_PV_REQUEST)
            .await?;
        let deadline = Instant::now() + self.step;
        let what = format!("the GET answers for {pv}");
        let top = self
            .expect(deadline, &what, |m, types| {
                read_get_init(m, types, pv, ioid)
            })
            .await?;
        self.send_get(sid, ioid, SUBCMD_GET, &[]).await?;
        let type_id = String::from_utf8_lossy(top.type_id().unwrap_or_default()).into_owned();
        let type_id = if type_id.is_empty() {
            "a structure without type id".to_string()
        } else {
            type_id
        };
        let value = self
            .expect(deadline, &what, |m, types| {
                read_get_value(m, types, pv, ioid, &top, &type_id)
            })
            .await?;
        Ok(value)
    }

    async fn send_get(
        &mut self,
        sid: u32,
        ioid: u32,
        subcmd: u8,
        pv_request: &[u8],
    ) -> Result<(), String> {
        let mut w = self.writer();
        w.u32(sid).u32(ioid).u8(subcmd).bytes(pv_request);
        self.send(w.into_message(Command::Get, Direction::FromClient))
            .await
    }
}

/// A GET answer for `ioid` to subcommand `subcmd`.
fn is_get_answer(m: &Message, ioid: u32, subcmd: u8) -> bool {
    let mut r = Reader::new(&m.payload, m.header.is_big_endian());
    m.header.command() == Ok(Command::Get) && r.u32("ioid") == ioid && r.u8("subcmd") == subcmd
}

/// The type from the answer to GET INIT; None for another message.
fn read_get_init(
    m: &Message,
    types: &mut Registry,
    pv: &str,
    ioid: u32,
) -> Option<Result<Arc<FieldType>, String>> {
    if !is_get_answer(m, ioid, SUBCMD_INIT) {
        return None;
    }
    let mut walker = Walker::new(&m.payload, m.header.is_big_endian(), types, None);
    walker.r.bytes(5, "ioid and subcommand");
    if let Err(why) = read_status(&mut walker.r) {
        return Some(Err(format!("{pv}: GET refused: {why}")));
    }
    let top = walker.field_desc();
    Some(match (walker.finish(), top) {
        (Ok(()), Some(top)) => Ok(top),
        (Err(e), _) => Err(format!("{pv}: bad type in the GET answer: {e}")),
        (Ok(()), None) => Err(format!("{pv}: the GET answer has no type")),
    })
}

/// The value field shown from the answer to GET, which `top` describes;
/// None for another message.
fn read_get_value(
    m: &Message,
    types: &mut Registry,
    pv: &str,
    ioid: u32,
    top: &FieldType,
    type_id: &str,
) -> Option<Result<String, String>> {
    if !is_get_answer(m, ioid, SUBCMD_GET) {
        return None;
    }
    let big_endian = m.header.is_big_endian();
    let mut walker = Walker::new(&m.payload, big_endian, types, None);
    walker.r.bytes(5, "ioid and subcommand");
    if let Err(why) = read_status(&mut walker.r) {
        return Some(Err(format!("{pv}: GET failed: {why}")));
    }
    let Some((bit, value_type)) = top.member(b"value") else {
        return Some(Ok(format!("{pv} {type_id} (no value field)")));
    };
    let bytes = walker.changed_value_field(top, bit);
    if let Err(e) = walker.finish() {
        return Some(Err(format!("{pv}: bad value in the GET answer: {e}")));
    }
    let shown = match bytes {
        Some(bytes) => format_value(value_type.shape(), bytes, big_endian),
        None => "not sent".to_string(),
    };
    Some(Ok(format!("{pv} {type_id} value = {shown}")))
}

/// A Status: Ok for OK or warning, else the error's message.
fn read_status(r: &mut Reader) -> Result<(), String> {
    match r.u8("status") {
        0xFF => Ok(()),
        kind => {
            let message = String::from_utf8_lossy(r.string("status message")).into_owned();
            r.string("status stack");
            if kind <= 1 {
                Ok(())
            } else {
                Err(if message.is_empty() {
                    format!("status {kind}")
                } else {
                    message
                })
            }
        }
    }
}

/// A value field's bytes as text: scalars and strings in full, arrays by
/// their length and first elements, anything else by its size.
pub fn format_value(shape: Shape, bytes: &[u8], big_endian: bool) -> String {
    let mut r = Reader::new(bytes, big_endian);
    let text = match shape {
        Shape::Scalar(code) => {
            scalar_name(code).map(|name| format!("{} ({name})", scalar(&mut r, code)))
        }
        Shape::Array(code) => scalar_name(code).map(|name| {
            let n = r.size("array length").unwrap_or(0);
            let shown: Vec<String> = (0..(n as usize).min(SHOWN))
                .map(|_| scalar(&mut r, code))
                .collect();
            let more = if n as usize > shown.len() {
                ", ..."
            } else {
                ""
            };
            format!("[{}{more}] ({n} x {name})", shown.join(", "))
        }),
        Shape::Other(kind) => Some(format!("a {kind} of {} bytes", bytes.len())),
    };
    match (text, r.finish()) {
        (Some(text), Ok(())) => text,
        _ => format!("{} bytes that do not decode", bytes.len()),
    }
}

/// The pvData name of a scalar type code; None for an unknown code.
fn scalar_name(code: u8) -> Option<&'static str> {
    Some(match code {
        0x00 => "boolean",
        0x20 => "byte",
        0x21 => "short",
        0x22 => "int",
        0x23 => "long",
        0x24 => "ubyte",
        0x25 => "ushort",
        0x26 => "uint",
        0x27 => "ulong",
        0x42 => "float",
        0x43 => "double",
        0x60 => "string",
        _ => return None,
    })
}

/// One scalar of a code `scalar_name` knows. A short read shows as 0 and
/// leaves the reader failed, which the caller checks.
fn scalar(r: &mut Reader, code: u8) -> String {
    match code {
        0x00 => (r.u8("boolean") != 0).to_string(),
        0x20 => (r.u8("byte") as i8).to_string(),
        0x21 => (r.u16("short") as i16).to_string(),
        0x22 => (r.u32("int") as i32).to_string(),
        0x23 => (r.u64("long") as i64).to_string(),
        0x24 => r.u8("ubyte").to_string(),
        0x25 => r.u16("ushort").to_string(),
        0x26 => r.u32("uint").to_string(),
        0x27 => r.u64("ulong").to_string(),
        0x42 => f32::from_bits(r.u32("float")).to_string(),
        0x43 => f64::from_bits(r.u64("double")).to_string(),
        _ => format!("{:?}", String::from_utf8_lossy(r.string("string"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_values_are_shown_with_their_type() {
        assert_eq!(
            format_value(Shape::Scalar(0x43), &2.5f64.to_le_bytes(), false),
            "2.5 (double)"
        );
        assert_eq!(
            format_value(Shape::Scalar(0x43), &2.5f64.to_be_bytes(), true),
            "2.5 (double)"
        );
        assert_eq!(
            format_value(Shape::Scalar(0x22), &(-7i32).to_le_bytes(), false),
            "-7 (int)"
        );
        assert_eq!(
            format_value(Shape::Scalar(0x60), b"\x05QSRV2", false),
            "\"QSRV2\" (string)"
        );
    }

    #[test]
    fn arrays_show_length_and_first_elements() {
        let mut bytes = vec![7u8];
        for n in 0..7i16 {
            bytes.extend_from_slice(&n.to_le_bytes());
        }
        assert_eq!(
            format_value(Shape::Array(0x21), &bytes, false),
            "[0, 1, 2, 3, 4, ...] (7 x short)"
        );
    }

    #[test]
    fn an_empty_array_still_names_its_element_type() {
        assert_eq!(
            format_value(Shape::Array(0x43), &[0], false),
            "[] (0 x double)"
        );
        assert_eq!(
            format_value(Shape::Array(0x60), &[1, 2, b'o', b'k'], false),
            "[\"ok\"] (1 x string)"
        );
    }

    #[tokio::test]
    async fn a_peer_that_sends_no_pva_message_fails_that_step_and_skips_the_rest() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut peer, _) = listener.accept().await.unwrap();
            let mut out = BytesMut::new();
            wire::set_byte_order(Direction::FromServer, false).encode(&mut out);
            wire::server_validation(false).encode(&mut out);
            peer.write_all(&out).await.unwrap();
            let mut buf = [0u8; 512];
            let _ = peer.read(&mut buf).await; // the client's validation
            let mut out = BytesMut::new();
            wire::connection_validated_ok(false).encode(&mut out);
            peer.write_all(&out).await.unwrap();
            let _ = peer.read(&mut buf).await; // the search
            peer.write_all(&[0x47; 8]).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let mut report = Report::to_sink();
        let pvs = ["A".to_string(), "B".to_string()];
        let result = check(addr, &pvs, Duration::from_secs(2), &mut report).await;
        assert!(result.greeted);
        assert_eq!(result.reached, [false, false]);
        assert_eq!(result.ports, None);
        let lines = report.lines.join("\n");
        assert!(
            lines.contains("search    FAILED") && lines.contains("not the PVA magic"),
            "{lines}"
        );
        assert!(
            lines.contains("B: not checked, the connection failed above"),
            "{lines}"
        );
    }

    #[test]
    fn other_shapes_and_short_bytes_are_described_not_decoded() {
        assert_eq!(
            format_value(Shape::Other("structure"), &[1, 2, 3], false),
            "a structure of 3 bytes"
        );
        assert_eq!(
            format_value(Shape::Scalar(0x43), &[1, 2, 3], false),
            "3 bytes that do not decode"
        );
    }
}
