//! The Channel Access side of `nameshim check`: one circuit, as libca opens
//! it to a name server (`EPICS_CA_NAME_SERVERS`), then for each PV a TCP
//! search, CREATE_CHAN on the same circuit, and one READ_NOTIFY.
//!
//! libca (`tcpiiu.cpp`) sends VERSION, CLIENT_NAME and HOST_NAME first; the
//! shared port takes a connection whose first byte is 0x00 for CA, and the
//! server answers with its VERSION. A search reply with p1 = 0xFFFFFFFF
//! (`searchRespNotify`) tells libca to create the channel on this circuit.
//! The shim never answers an unknown name over TCP (libca would drop the
//! circuit on NOT_FOUND), so "not found" is silence until the timeout.

use super::report::{Outcome, Report};
use super::{next_before, step, step_with, Failure};
use crate::ca::wire::{self, Command, Header, Message};
use crate::ca::CaDecoder;
use crate::relay::framing::FrameReader;
use bytes::BytesMut;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

const PROTOCOL: &str = "CA";
/// Largest message read: a READ_NOTIFY of `MAX_ELEMENTS` strings is 640 bytes.
const MAX_PAYLOAD: u32 = 64 * 1024;
/// Elements asked for in a get: enough to show the first few.
const MAX_ELEMENTS: u32 = 16;
/// Elements printed of an array.
const SHOWN: usize = 5;
/// READ_NOTIFY status "normal successful completion" (`ECA_NORMAL`).
const ECA_NORMAL: u32 = 1;
/// DBR_STRING element size (`MAX_STRING_SIZE`).
const STRING_SIZE: usize = 40;

/// What the CA side reached.
#[derive(Debug, Default)]
pub struct CaResult {
    pub connected: bool,
    pub greeted: bool,
    /// One per PV, in order: its value was read.
    pub reached: Vec<bool>,
}

struct Circuit {
    reader: FrameReader<OwnedReadHalf, CaDecoder>,
    writer: OwnedWriteHalf,
    step: Duration,
    /// The circuit failed (closed, bad bytes): no further step can use it.
    broken: bool,
}

pub async fn check(
    addr: SocketAddr,
    pvs: &[String],
    step_time: Duration,
    report: &mut Report,
) -> CaResult {
    let mut result = CaResult {
        reached: vec![false; pvs.len()],
        ..CaResult::default()
    };
    let Some(stream) = super::connect_step(PROTOCOL, addr, step_time, report).await else {
        return result;
    };
    result.connected = true;
    let (mut read, mut writer) = stream.into_split();
    let started = Instant::now();
    if let Err(why) = hello(&mut writer, &mut read, step_time).await {
        report.step(PROTOCOL, "greeting", started.elapsed(), &Err(why));
        return result;
    }
    let mut circuit = Circuit {
        reader: FrameReader::new(
            read,
            CaDecoder {
                max_payload: MAX_PAYLOAD,
            },
        ),
        writer,
        step: step_time,
        broken: false,
    };
    let greeting = circuit.server_version().await;
    report.step(PROTOCOL, "greeting", started.elapsed(), &greeting);
    if greeting.is_err() {
        return result;
    }
    result.greeted = true;
    for (index, pv) in pvs.iter().enumerate() {
        if circuit.broken {
            report.line(&format!(
                "  {PROTOCOL:<4} {pv}: not checked, the circuit failed above"
            ));
            continue;
        }
        result.reached[index] = circuit.check_pv(pv, index as u32 + 1, report).await;
    }
    result
}

/// What libca sends first (VERSION, CLIENT_NAME, HOST_NAME), then a look
/// at the first byte of the answer without taking it: a PVA-only port
/// greets with the PVA magic 0xCA, which no CA message starts with.
async fn hello(
    writer: &mut OwnedWriteHalf,
    read: &mut OwnedReadHalf,
    step_time: Duration,
) -> Result<(), String> {
    let host = super::host_name();
    let mut out = BytesMut::new();
    for message in [
        wire::client_version(0, wire::MINOR_VERSION),
        Message::with_name(
            Header::new(Command::ClientName, 0, 0, 0, 0),
            b"nameshim-check",
        ),
        Message::with_name(Header::new(Command::HostName, 0, 0, 0, 0), host.as_bytes()),
    ] {
        message.encode(&mut out);
    }
    writer
        .write_all(&out)
        .await
        .map_err(|e| format!("send failed: {e}"))?;
    let mut first = [0u8; 1];
    match tokio::time::timeout(step_time, read.peek(&mut first)).await {
        Err(_) => Err(format!("no answer within {step_time:?}: not a CA server?")),
        Ok(Ok(0)) => Err("the shim closed the connection without an answer".into()),
        Ok(Ok(_)) if first[0] == crate::pva::wire::MAGIC => {
            Err("the port greeted with PV Access bytes: a PVA-only port (--pva-listen)?".into())
        }
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("read failed: {e}")),
    }
}

impl Circuit {
    /// Search, create and get `pv`; whether its value was read.
    async fn check_pv(&mut self, pv: &str, id: u32, report: &mut Report) -> bool {
        if step(PROTOCOL, "search", report, self.search(pv, id))
            .await
            .is_err()
        {
            return false;
        }
        let Ok((data_type, count, sid)) =
            step_with(PROTOCOL, "create", report, self.create(pv, id)).await
        else {
            return false;
        };
        step(
            PROTOCOL,
            "get",
            report,
            self.get(pv, sid, id, data_type, count),
        )
        .await
        .is_ok()
    }

    async fn send(&mut self, messages: &[Message]) -> Result<(), String> {
        let mut out = BytesMut::new();
        for m in messages {
            m.encode(&mut out);
        }
        self.writer
            .write_all(&out)
            .await
            .map_err(|e| format!("send failed: {e}"))
    }

    /// The next message before `deadline`, skipping those `want` declines.
    async fn expect<T>(
        &mut self,
        deadline: Instant,
        what: &str,
        mut want: impl FnMut(&Message) -> Option<Result<T, String>>,
    ) -> Result<T, Failure> {
        loop {
            let message = match next_before(&mut self.reader, deadline, what).await {
                Ok(message) => message,
                Err(failure) => {
                    self.broken |= matches!(failure, Failure::Connection(_));
                    return Err(failure);
                }
            };
            if let Some(answer) = want(&message) {
                return answer.map_err(Failure::Answer);
            }
        }
    }

    /// The server's VERSION, the end of the greeting.
    async fn server_version(&mut self) -> Outcome {
        let deadline = Instant::now() + self.step;
        let version = self
            .expect(deadline, "the server's VERSION", |m| {
                (m.header.command() == Ok(Command::Version)).then_some(Ok(m.header.count))
            })
            .await?;
        if version < 12 {
            // libca sends searches over TCP only to servers of minor >= 12.
            return Err(format!(
                "server VERSION minor {version}: libca searches over TCP only from minor 12 (is this a CA server, not the shim?)"
            ));
        }
        Ok(format!("server VERSION, minor {version}"))
    }

    async fn search(&mut self, pv: &str, id: u32) -> Outcome {
        let search = Message::with_name(
            Header::new(
                Command::Search,
                wire::DONT_REPLY,
                u32::from(wire::MINOR_VERSION),
                id,
                id,
            ),
            pv.as_bytes(),
        );
        self.send(&[wire::client_version(0, wire::MINOR_VERSION), search])
            .await?;
        let deadline = Instant::now() + self.step;
        let what = format!(
            "a search reply for {pv} (over CA the shim does not answer names it cannot find)"
        );
        let (port, addr) = self
            .expect(deadline, &what, |m| {
                (m.header.command() == Ok(Command::Search) && m.header.p2 == id)
                    .then_some(Ok((m.header.data_type, m.header.p1)))
            })
            .await?;
        if addr == wire::ADDR_OF_SENDER {
            Ok(format!("{pv} found: create on this circuit"))
        } else {
            let ip = Ipv4Addr::from(addr);
            Ok(format!(
                "{pv} found at {ip}:{port}: libca opens a circuit there (not through this port)"
            ))
        }
    }

    /// CREATE_CHAN on this circuit: (native type, element count, sid).
    async fn create(&mut self, pv: &str, cid: u32) -> Result<(String, (u16, u32, u32)), String> {
        let request = Message::with_name(
            Header::new(
                Command::CreateChan,
                0,
                0,
                cid,
                u32::from(wire::MINOR_VERSION),
            ),
            pv.as_bytes(),
        );
        self.send(&[request]).await?;
        let deadline = Instant::now() + self.step;
        let mut rights = None;
        let what = format!("the CREATE_CHAN answer for {pv}");
        let (data_type, count, sid) = self
            .expect(deadline, &what, |m| {
                let mine = m.header.p1 == cid;
                match m.header.command() {
                    Ok(Command::AccessRights) if mine => {
                        rights = Some(m.header.p2);
                        None
                    }
                    Ok(Command::CreateChan) if mine => {
                        Some(Ok((m.header.data_type, m.header.count, m.header.p2)))
                    }
                    Ok(Command::CreateChFail) if mine => Some(Err(format!(
                        "{pv}: the server refused the channel (CREATE_CH_FAIL)"
                    ))),
                    Ok(Command::ServerDisconn) if mine => Some(Err(format!(
                        "{pv}: the server dropped the channel (SERVER_DISCONN)"
                    ))),
                    Ok(Command::Error) => Some(Err(format!("{pv}: {}", error_text(m)))),
                    _ => None,
                }
            })
            .await?;
        let access = match rights {
            Some(r) if r & 3 == 3 => "read/write",
            Some(r) if r & 1 == 1 => "read only",
            Some(r) if r & 2 == 2 => "write only",
            Some(_) => "no access",
            None => "access not told",
        };
        let detail = format!("{pv} {}[{count}], {access}", dbr_name(data_type));
        Ok((detail, (data_type, count, sid)))
    }

    async fn get(&mut self, pv: &str, sid: u32, ioid: u32, data_type: u16, count: u32) -> Outcome {
        if dbr_name(data_type).starts_with("type ") {
            return Err(format!(
                "{pv}: native type {data_type} is not a plain DBR type"
            ));
        }
        let asked = count.clamp(1, MAX_ELEMENTS);
        self.send(&[Message::new(Header::new(
            Command::ReadNotify,
            data_type,
            asked,
            sid,
            ioid,
        ))])
        .await?;
        let deadline = Instant::now() + self.step;
        let what = format!("the READ_NOTIFY answer for {pv}");
        let value = self
            .expect(deadline, &what, |m| match m.header.command() {
                Ok(Command::ReadNotify) if m.header.p2 == ioid => {
                    Some(if m.header.p1 == ECA_NORMAL {
                        Ok(format_value(m.header.data_type, m.header.count, &m.payload))
                    } else {
                        Err(format!(
                            "{pv}: read failed with CA status {:#x}",
                            m.header.p1
                        ))
                    })
                }
                Ok(Command::Error) => Some(Err(format!("{pv}: {}", error_text(m)))),
                _ => None,
            })
            .await?;
        let more = if count > asked {
            format!(" (first {asked} of {count} read)")
        } else {
            String::new()
        };
        Ok(format!("{pv} = {value}{more}"))
    }
}

/// A CA_PROTO_ERROR's text: after the 16-byte header of the failed request.
fn error_text(m: &Message) -> String {
    let text = m
        .payload
        .get(16..)
        .map(wire::payload_name)
        .unwrap_or_default();
    format!("server error: {}", String::from_utf8_lossy(text))
}

/// Names of the plain DBR types (`db_access.h`).
fn dbr_name(data_type: u16) -> String {
    const NAMES: [&str; 7] = [
        "DBR_STRING",
        "DBR_SHORT",
        "DBR_FLOAT",
        "DBR_ENUM",
        "DBR_CHAR",
        "DBR_LONG",
        "DBR_DOUBLE",
    ];
    NAMES
        .get(usize::from(data_type))
        .map_or_else(|| format!("type {data_type}"), |n| n.to_string())
}

/// A plain DBR value (big-endian), at most `SHOWN` elements of an array.
pub fn format_value(data_type: u16, count: u32, payload: &[u8]) -> String {
    let width = match data_type {
        0 => STRING_SIZE,
        1 | 3 => 2,
        2 | 5 => 4,
        4 => 1,
        6 => 8,
        _ => return format!("{} bytes of type {data_type}", payload.len()),
    };
    let elements: Vec<String> = payload
        .chunks_exact(width)
        .take((count as usize).min(SHOWN))
        .map(|b| match data_type {
            0 => format!("{:?}", String::from_utf8_lossy(wire::payload_name(b))),
            1 => i16::from_be_bytes([b[0], b[1]]).to_string(),
            3 => u16::from_be_bytes([b[0], b[1]]).to_string(),
            2 => f32::from_be_bytes([b[0], b[1], b[2], b[3]]).to_string(),
            5 => i32::from_be_bytes([b[0], b[1], b[2], b[3]]).to_string(),
            4 => b[0].to_string(),
            _ => f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]).to_string(),
        })
        .collect();
    if elements.is_empty() {
        return format!("no data ({} bytes)", payload.len());
    }
    match (count, elements.as_slice()) {
        (1, [one]) => one.clone(),
        _ if count as usize > elements.len() => format!("[{}, ...]", elements.join(", ")),
        _ => format!("[{}]", elements.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_of_each_plain_dbr_type_are_shown() {
        assert_eq!(format_value(6, 1, &2.5f64.to_be_bytes()), "2.5");
        assert_eq!(format_value(2, 1, &1.5f32.to_be_bytes()), "1.5");
        assert_eq!(format_value(1, 1, &(-3i16).to_be_bytes()), "-3");
        assert_eq!(format_value(3, 1, &[0, 2, 0, 0, 0, 0, 0, 0]), "2");
        assert_eq!(format_value(5, 1, &70000i32.to_be_bytes()), "70000");
        let mut s = b"hello".to_vec();
        s.resize(40, 0);
        assert_eq!(format_value(0, 1, &s), "\"hello\"");
        assert_eq!(format_value(4, 3, &[1, 2, 3, 0, 0, 0, 0, 0]), "[1, 2, 3]");
    }

    #[test]
    fn arrays_show_their_first_elements() {
        let payload: Vec<u8> = (0..8).flat_map(|n| (n as f64).to_be_bytes()).collect();
        assert_eq!(format_value(6, 8, &payload), "[0, 1, 2, 3, 4, ...]");
    }

    #[tokio::test]
    async fn a_peer_that_breaks_the_circuit_fails_that_step_and_skips_the_rest() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut peer, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = peer.read(&mut buf).await; // VERSION, CLIENT_NAME, HOST_NAME
            let mut out = BytesMut::new();
            wire::server_version().encode(&mut out);
            peer.write_all(&out).await.unwrap();
            let _ = peer.read(&mut buf).await; // the search
                                               // An extended header announcing a 256 MiB search reply.
            let huge = [
                0, 6, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x10, 0, 0, 0, 0, 0, 0, 0,
            ];
            peer.write_all(&huge).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let mut report = Report::to_sink();
        let pvs = ["A".to_string(), "B".to_string()];
        let result = check(addr, &pvs, Duration::from_secs(2), &mut report).await;
        assert!(result.greeted);
        assert_eq!(result.reached, [false, false]);
        let lines = report.lines.join("\n");
        assert!(
            lines.contains("search    FAILED") && lines.contains("exceeds the limit of 65536"),
            "{lines}"
        );
        assert!(
            lines.contains("B: not checked, the circuit failed above"),
            "{lines}"
        );
    }

    #[test]
    fn a_short_payload_shows_what_it_holds() {
        assert_eq!(format_value(6, 2, &[0, 0, 0]), "no data (3 bytes)");
        assert_eq!(format_value(9, 1, &[0; 8]), "8 bytes of type 9");
    }
}
