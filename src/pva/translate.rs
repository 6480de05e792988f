//! Introspection type-cache translation for one client connection.
//!
//! pvAccessCPP peers define type-cache keys per connection and per
//! direction, in handshakes, request and response types, and inside variant
//! union values. While a client connection talks to one server, the shim
//! passes every payload through unchanged: the client's keys and the
//! server's keys then live on what is, end to end, one connection. It still
//! reads every message that can define a key, to know both caches.
//!
//! Once the connection spans a second server, keys could collide: server A
//! and server B may both define key 1, and a key the client defined towards
//! A means nothing to B. From then on the shim re-emits every type
//! description it relays in plain form (no key), in both directions. Both
//! pvxs and pvAccessCPP accept plain descriptions anywhere. Messages whose
//! types hold no variant union carry no description in their values and
//! still pass through unchanged.

use super::types::{FieldType, Registry, Walker};
use super::wire::{Command, Message, WireError};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::Arc;

/// Request sub-command bits (pvAccessCPP `QOS_*`).
const INIT: u8 = 0x08;
const DESTROY: u8 = 0x10;
const GET: u8 = 0x40;
const GET_PUT: u8 = 0x80;
/// Operations tracked per client connection, at most.
const MAX_OPS: usize = 65_536;

struct Op {
    command: Command,
    /// From the server's INIT response: the value type (GET, PUT,
    /// MONITOR, ARRAY), or the put and get types (PUT_GET).
    types: Vec<Arc<FieldType>>,
}

impl Op {
    fn walks_values(&self) -> bool {
        self.types.iter().any(|t| t.has_variant())
    }
}

#[derive(Default)]
pub struct Translator {
    /// Re-emit plain descriptions (the connection spans several servers).
    pub active: bool,
    client: Registry,
    servers: HashMap<SocketAddrV4, Registry>,
    ops: HashMap<u32, Op>,
}

impl Translator {
    /// Reads the client's credentials (a type and a value); returns them
    /// with a plain type, for servers that never saw the client's cache.
    pub fn credentials(
        &mut self,
        credentials: &[u8],
        big_endian: bool,
    ) -> Result<Bytes, WireError> {
        let mut out = BytesMut::new();
        let mut w = Walker::new(credentials, big_endian, &mut self.client, Some(&mut out));
        if let Some(t) = w.field_desc() {
            w.value(&t);
        }
        w.copy_rest();
        w.finish()?;
        Ok(out.freeze())
    }

    pub fn forget_server(&mut self, server: SocketAddrV4) {
        self.servers.remove(&server);
    }

    /// A client request (`sid, ioid, subcmd, ...`). Returns a new payload
    /// when the message had to be rewritten.
    pub fn client_message(&mut self, message: &Message) -> Result<Option<Bytes>, WireError> {
        let Ok(command) = message.header.command() else {
            return Ok(None);
        };
        let payload = &message.payload;
        let big_endian = message.header.is_big_endian();
        let mut out = BytesMut::new();
        let active = self.active;
        let mut w = Walker::new(
            payload,
            big_endian,
            &mut self.client,
            active.then_some(&mut out),
        );
        w.copy(4, "sid");
        let ioid = w.u32("ioid");
        match command {
            Command::DestroyRequest => {
                self.ops.remove(&ioid);
                return Ok(None);
            }
            Command::Get
            | Command::Put
            | Command::PutGet
            | Command::Monitor
            | Command::Array
            | Command::Process
            | Command::Rpc => {}
            _ => return Ok(None),
        }
        let subcmd = w.u8("subcommand");
        if subcmd & INIT != 0 {
            // The pvRequest: a type and a value, then anything else as is.
            if let Some(t) = w.field_desc() {
                w.value(&t);
            }
            w.copy_rest();
            w.finish()?;
            if self.ops.len() < MAX_OPS {
                self.ops.insert(
                    ioid,
                    Op {
                        command,
                        types: Vec::new(),
                    },
                );
            }
        } else if command == Command::Rpc {
            if let Some(t) = w.field_desc() {
                w.value(&t);
            }
            w.copy_rest();
            w.finish()?;
        } else {
            let Some(op) = self.ops.get(&ioid) else {
                return Ok(None);
            };
            let put_type = match command {
                Command::Put | Command::PutGet if subcmd & (GET | GET_PUT) == 0 => {
                    op.types.first().cloned()
                }
                _ => None,
            };
            let Some(put_type) = put_type.filter(|_| op.walks_values()) else {
                return Ok(None);
            };
            w.changed_value(&put_type);
            w.copy_rest();
            w.finish()?;
        }
        Ok(active.then(|| out.freeze()))
    }

    /// A server message (`ioid, subcmd, status, ...` or GET_FIELD's
    /// `ioid, status, type`). Returns a new payload when rewritten.
    pub fn server_message(
        &mut self,
        server: SocketAddrV4,
        message: &Message,
    ) -> Result<Option<Bytes>, WireError> {
        let Ok(command) = message.header.command() else {
            return Ok(None);
        };
        let payload = &message.payload;
        let big_endian = message.header.is_big_endian();
        let active = self.active;
        let mut out = BytesMut::new();
        let registry = self.servers.entry(server).or_default();
        let mut w = Walker::new(payload, big_endian, registry, active.then_some(&mut out));
        let ioid = w.u32("ioid");
        if command == Command::GetField {
            if w.status() {
                w.field_desc();
            }
            w.copy_rest();
            w.finish()?;
            return Ok(active.then(|| out.freeze()));
        }
        if !matches!(
            command,
            Command::Get
                | Command::Put
                | Command::PutGet
                | Command::Monitor
                | Command::Array
                | Command::Process
                | Command::Rpc
        ) {
            return Ok(None);
        }
        let subcmd = w.u8("subcommand");
        if subcmd & INIT != 0 {
            let mut types = Vec::new();
            if w.status() {
                let count = match command {
                    Command::Get | Command::Put | Command::Monitor | Command::Array => 1,
                    Command::PutGet => 2,
                    _ => 0,
                };
                for _ in 0..count {
                    if let Some(t) = w.field_desc() {
                        types.push(t);
                    }
                }
            }
            w.copy_rest();
            w.finish()?;
            if let Some(op) = self.ops.get_mut(&ioid) {
                op.types = types;
            }
            return Ok(active.then(|| out.freeze()));
        }
        if command == Command::Rpc {
            if w.status() {
                if let Some(t) = w.field_desc() {
                    w.value(&t);
                }
            }
            w.copy_rest();
            w.finish()?;
            return Ok(active.then(|| out.freeze()));
        }
        let Some(op) = self.ops.get(&ioid) else {
            return Ok(None);
        };
        if !op.walks_values() || op.command != command {
            return Ok(None);
        }
        let value_type = match command {
            Command::Monitor if subcmd & DESTROY != 0 => None,
            Command::Monitor => op.types.first(),
            _ => {
                if !w.status() {
                    None
                } else {
                    match command {
                        Command::Get => op.types.first(),
                        Command::Put if subcmd & GET != 0 => op.types.first(),
                        Command::PutGet if subcmd & GET_PUT != 0 => op.types.first(),
                        Command::PutGet => op.types.get(1),
                        Command::Array if subcmd & GET != 0 => {
                            // A whole array value, not a partial one.
                            if let Some(t) = op.types.first().cloned() {
                                w.value(&t);
                            }
                            None
                        }
                        _ => None,
                    }
                }
            }
        };
        if let Some(t) = value_type.cloned() {
            if !w.r.is_empty() {
                w.changed_value(&t);
            }
        }
        w.copy_rest();
        w.finish()?;
        Ok(active.then(|| out.freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pva::wire::{Header, Writer};

    fn server() -> SocketAddrV4 {
        "127.0.0.1:5075".parse().unwrap()
    }

    fn msg(command: Command, from_server: bool, payload: &[u8]) -> Message {
        Message {
            header: Header::new(command, from_server, false, payload.len() as u32),
            payload: Bytes::copy_from_slice(payload),
        }
    }

    // GET INIT from a pvAccessCPP client: sid, ioid 5, INIT, pvRequest
    // "field()" as a cached empty structure definition.
    const GET_INIT: [u8; 17] = [
        1, 0, 0, 0, 5, 0, 0, 0, 0x08, 0xFD, 2, 0, 0x80, 0, 0, 0xFF, 0,
    ];

    #[test]
    fn passthrough_tracks_without_rewriting() {
        let mut t = Translator::default();
        assert_eq!(
            t.client_message(&msg(Command::Get, false, &GET_INIT))
                .unwrap(),
            None
        );
        // The server's INIT response defines key 1 = {any v}.
        let init = [
            5, 0, 0, 0, 0x08, 0xFF, 0xFD, 1, 0, 0x80, 0, 1, 1, b'v', 0x82,
        ];
        assert_eq!(
            t.server_message(server(), &msg(Command::Get, true, &init))
                .unwrap(),
            None
        );
        assert!(t.ops[&5].walks_values());
    }

    #[test]
    fn active_mode_rewrites_requests_and_variant_values_plain() {
        let mut t = Translator {
            active: true,
            ..Translator::default()
        };
        let out = t
            .client_message(&msg(Command::Get, false, &GET_INIT))
            .unwrap()
            .unwrap();
        assert_eq!(
            &out[..],
            &[1, 0, 0, 0, 5, 0, 0, 0, 0x08, 0x80, 0, 0, 0xFF, 0]
        );
        let init = [
            5, 0, 0, 0, 0x08, 0xFF, 0xFD, 1, 0, 0x80, 0, 1, 1, b'v', 0x82,
        ];
        let out = t
            .server_message(server(), &msg(Command::Get, true, &init))
            .unwrap()
            .unwrap();
        assert_eq!(
            &out[..],
            &[5, 0, 0, 0, 0x08, 0xFF, 0x80, 0, 1, 1, b'v', 0x82]
        );
        // GET data: status OK, bitset {0}, the variant holds cached int 7.
        let mut data = Writer::new(false);
        data.u32(5)
            .u8(0)
            .u8(0xFF)
            .bytes(&[1, 1])
            .bytes(&[0xFD, 3, 0, 0x22, 7, 0, 0, 0]);
        let out = t
            .server_message(server(), &data.into_message(Command::Get, true))
            .unwrap()
            .unwrap();
        assert_eq!(&out[..], &[5, 0, 0, 0, 0, 0xFF, 1, 1, 0x22, 7, 0, 0, 0]);
    }

    #[test]
    fn each_server_has_its_own_cache() {
        let mut t = Translator::default();
        let other: SocketAddrV4 = "127.0.0.1:40000".parse().unwrap();
        t.client_message(&msg(Command::Get, false, &GET_INIT))
            .unwrap();
        let init = [5, 0, 0, 0, 0x08, 0xFF, 0xFD, 1, 0, 0x80, 0, 0];
        t.server_message(server(), &msg(Command::Get, true, &init))
            .unwrap();
        // Key 1 was defined by the first server only.
        let refer = [6, 0, 0, 0, 0x08, 0xFF, 0xFE, 1, 0];
        assert!(t
            .server_message(other, &msg(Command::Get, true, &refer))
            .is_err());
        assert!(t
            .server_message(server(), &msg(Command::Get, true, &refer))
            .is_ok());
    }

    #[test]
    fn credentials_come_out_plain() {
        let mut t = Translator::default();
        let cached = [
            0xFD, 1, 0, 0x80, 0, 1, 4, b'u', b's', b'e', b'r', 0x60, 2, b'm', b'e',
        ];
        let plain = t.credentials(&cached, false).unwrap();
        assert_eq!(&plain[..], &cached[3..]);
        assert_eq!(&t.credentials(&[0xFF], false).unwrap()[..], &[0xFF]);
    }
}
