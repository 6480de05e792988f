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
//!
//! Each operation (ioid) keeps the types of its INIT response, to walk its
//! values. An operation ends with DESTROY_REQUEST, a request or response
//! with the DESTROY sub-command bit, a failed INIT, the end of its channel
//! or the loss of its server.

use super::types::{FieldType, Registry, Walker};
use super::wire::{Command, Message, WireError};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddrV4;
use std::sync::Arc;

/// Request sub-command bits (pvAccessCPP `QOS_*`).
const INIT: u8 = 0x08;
const DESTROY: u8 = 0x10;
const GET: u8 = 0x40;
const GET_PUT: u8 = 0x80;
/// Operations tracked per client connection, at most.
const MAX_OPS: usize = 65_536;
/// Credentials larger than this are refused. pvAccessCPP's "ca"
/// credentials (a user and a host name) take well under 1 KiB.
const MAX_CREDENTIAL_BYTES: usize = 4 << 10;

struct Op {
    command: Command,
    /// The channel, by the sid the client uses, and its server.
    sid: u32,
    server: SocketAddrV4,
    /// From the server's INIT response: the value type (GET, PUT,
    /// MONITOR, ARRAY), or the put and get types (PUT_GET).
    types: Vec<Arc<FieldType>>,
    /// The client asked to destroy it: it ends with the server's answer.
    ending: bool,
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
    /// The ioids of each channel's operations, by sid.
    channel_ops: HashMap<u32, HashSet<u32>>,
}

impl Translator {
    /// Reads the client's credentials (a type and a value); returns them
    /// with a plain type, for servers that never saw the client's cache.
    /// They are kept for the session's life, so they must be small and
    /// stand alone: a definition (`0xFD`, as pvAccessCPP sends) is fine,
    /// a reference to a key is refused.
    pub fn credentials(
        &mut self,
        credentials: &[u8],
        big_endian: bool,
    ) -> Result<Bytes, WireError> {
        if credentials.len() > MAX_CREDENTIAL_BYTES {
            return Err(WireError::Limit("the size of credentials (4 KiB)"));
        }
        let mut out = BytesMut::new();
        let mut w = Walker::new(credentials, big_endian, &mut self.client, Some(&mut out))
            .for_client_message()
            .without_references();
        if let Some(t) = w.field_desc() {
            w.value(&t);
        }
        w.copy_rest();
        w.finish()?;
        if out.len() > MAX_CREDENTIAL_BYTES {
            return Err(WireError::Limit("the size of credentials (4 KiB)"));
        }
        Ok(out.freeze())
    }

    pub fn forget_server(&mut self, server: SocketAddrV4) {
        self.servers.remove(&server);
        let ended: Vec<u32> = self
            .ops
            .iter()
            .filter(|(_, op)| op.server == server)
            .map(|(&ioid, _)| ioid)
            .collect();
        for ioid in ended {
            self.end_op(ioid);
        }
    }

    /// The channel the client knows as `sid` is gone, with its operations.
    pub fn forget_channel(&mut self, sid: u32) {
        for ioid in self.channel_ops.remove(&sid).unwrap_or_default() {
            self.ops.remove(&ioid);
        }
    }

    #[cfg(test)]
    fn op_count(&self) -> usize {
        self.ops.len()
    }

    fn start_op(&mut self, ioid: u32, op: Op) {
        self.end_op(ioid);
        if self.ops.len() < MAX_OPS {
            self.channel_ops.entry(op.sid).or_default().insert(ioid);
            self.ops.insert(ioid, op);
        }
    }

    fn end_op(&mut self, ioid: u32) {
        let Some(op) = self.ops.remove(&ioid) else {
            return;
        };
        if let Some(ioids) = self.channel_ops.get_mut(&op.sid) {
            ioids.remove(&ioid);
            if ioids.is_empty() {
                self.channel_ops.remove(&op.sid);
            }
        }
    }

    /// A client request (`sid, ioid, subcmd, ...`) for a channel on
    /// `server`. Returns a new payload when the message had to be rewritten.
    pub fn client_message(
        &mut self,
        server: SocketAddrV4,
        message: &Message,
    ) -> Result<Option<Bytes>, WireError> {
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
        )
        .for_client_message();
        let sid = w.u32("sid");
        let ioid = w.u32("ioid");
        match command {
            Command::DestroyRequest => {
                self.end_op(ioid);
                return Ok(None);
            }
            command if command.is_operation() => {}
            _ => return Ok(None),
        }
        let subcmd = w.u8("subcommand");
        if subcmd & INIT != 0 {
            // The pvRequest: a type and a value, then anything else as is.
            typed_value(&mut w);
            w.finish()?;
            let op = Op {
                command,
                sid,
                server,
                types: Vec::new(),
                ending: false,
            };
            self.start_op(ioid, op);
        } else if command == Command::Rpc {
            typed_value(&mut w);
            w.finish()?;
        } else if let Some(put_type) = put_value_type(&self.ops, ioid, command, subcmd) {
            w.changed_value(&put_type);
            w.copy_rest();
            w.finish()?;
        } else {
            w.finish()?;
            out.clear();
        }
        if subcmd & DESTROY != 0 {
            self.client_destroys(ioid, command);
        }
        if !active || out.is_empty() {
            return Ok(None);
        }
        Ok(Some(out.freeze()))
    }

    /// A request with the DESTROY bit: a monitor ends now (no answer
    /// follows), any other operation with the server's answer, whose value
    /// may still need its types.
    fn client_destroys(&mut self, ioid: u32, command: Command) {
        if command == Command::Monitor {
            self.end_op(ioid);
        } else if let Some(op) = self.ops.get_mut(&ioid) {
            op.ending = true;
        }
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
            // status, then the channel's type if it succeeded.
            if w.status() {
                w.field_desc();
            }
            w.copy_rest();
            w.finish()?;
            return Ok(active.then(|| out.freeze()));
        }
        if !command.is_operation() {
            return Ok(None);
        }
        // Only this server's operations: a server cannot touch another's.
        let op = self
            .ops
            .get(&ioid)
            .filter(|op| op.server == server && op.command == command);
        let subcmd = w.u8("subcommand");
        if subcmd & INIT != 0 {
            let types = init_answer_types(&mut w, command)?;
            if op.is_some() {
                match (self.ops.get_mut(&ioid), types) {
                    (Some(op), Some(types)) if subcmd & DESTROY == 0 => {
                        // Kept only to walk values that can hold type
                        // descriptions: an NTScalar's tree costs kilobytes,
                        // and a client may hold many thousands of monitors.
                        if types.iter().any(|t| t.has_variant()) {
                            op.types = types;
                        }
                    }
                    _ => self.end_op(ioid),
                }
            }
            return Ok(active.then(|| out.freeze()));
        }
        let ends = op.is_some_and(|op| op.ending) || subcmd & DESTROY != 0;
        let known = op.is_some();
        let value_types = op.filter(|op| op.walks_values()).map(|op| op.types.clone());
        let walked = data_answer(&mut w, command, subcmd, value_types)?;
        if ends && known {
            self.end_op(ioid);
        }
        Ok((walked && active).then(|| out.freeze()))
    }
}

impl Translator {
    /// For a server's data answer (not INIT, not RPC, not GET_FIELD) from
    /// its ioid and sub-command alone: true if its value need not be read
    /// and it passes unchanged, after the bookkeeping `server_message`
    /// does (an ending operation is forgotten). False if the value must be
    /// read: its type can hold type descriptions.
    pub fn passes_unread(
        &mut self,
        server: SocketAddrV4,
        command: Command,
        ioid: u32,
        subcmd: u8,
    ) -> bool {
        if command == Command::Rpc || !command.is_operation() || subcmd & INIT != 0 {
            return false;
        }
        let op = self
            .ops
            .get(&ioid)
            .filter(|op| op.server == server && op.command == command);
        if op.is_some_and(|op| op.walks_values()) {
            return false;
        }
        let ends = op.is_some_and(|op| op.ending) || subcmd & DESTROY != 0;
        if ends && op.is_some() {
            self.end_op(ioid);
        }
        true
    }
}

/// The rest of a server's answer after INIT: an RPC's typed value, or the
/// value of an operation whose `value_types` can hold type descriptions.
/// Says whether the answer was walked (and so copied).
fn data_answer(
    w: &mut Walker,
    command: Command,
    subcmd: u8,
    value_types: Option<Vec<Arc<FieldType>>>,
) -> Result<bool, WireError> {
    if command == Command::Rpc {
        if w.status() {
            typed_value(w);
        } else {
            w.copy_rest();
        }
    } else {
        let Some(types) = value_types else {
            return Ok(false);
        };
        server_value(w, command, subcmd, &types);
        w.copy_rest();
    }
    w.finish()?;
    Ok(true)
}

/// The type of the value a PUT or PUT_GET of `ops` carries, when that value
/// must be walked (it can hold type descriptions).
fn put_value_type(
    ops: &HashMap<u32, Op>,
    ioid: u32,
    command: Command,
    subcmd: u8,
) -> Option<Arc<FieldType>> {
    let op = ops.get(&ioid)?;
    let puts = matches!(command, Command::Put | Command::PutGet);
    if puts && subcmd & (GET | GET_PUT) == 0 && op.walks_values() {
        op.types.first().cloned()
    } else {
        None
    }
}

/// The rest of a server's INIT answer (`status, type...`): the types of the
/// operation's values, none when the status is an error.
fn init_answer_types(
    w: &mut Walker,
    command: Command,
) -> Result<Option<Vec<Arc<FieldType>>>, WireError> {
    let ok = w.status();
    let mut types = Vec::new();
    if ok {
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
    Ok(ok.then_some(types))
}

/// A type description and a value of it, then the rest as is. The value is
/// walked only when it can hold descriptions (O(1) to know).
fn typed_value(w: &mut Walker) {
    if let Some(t) = w.field_desc() {
        if t.has_variant() {
            w.value(&t);
        }
    }
    w.copy_rest();
}

/// The value part of a server's (non-INIT) answer, for an operation whose
/// `types` hold a variant union.
fn server_value(w: &mut Walker, command: Command, subcmd: u8, types: &[Arc<FieldType>]) {
    let value_type = match command {
        Command::Monitor if subcmd & DESTROY != 0 => None,
        Command::Monitor => types.first(),
        _ => {
            if !w.status() {
                None
            } else {
                match command {
                    Command::Get => types.first(),
                    Command::Put if subcmd & GET != 0 => types.first(),
                    Command::PutGet if subcmd & GET_PUT != 0 => types.first(),
                    Command::PutGet => types.get(1),
                    Command::Array if subcmd & GET != 0 => {
                        // A whole array value, not a partial one.
                        if let Some(t) = types.first() {
                            w.value(t);
                        }
                        None
                    }
                    _ => None,
                }
            }
        }
    };
    if let Some(t) = value_type {
        if !w.r.is_empty() {
            w.changed_value(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pva::wire::Direction;
    use crate::pva::wire::{Header, Writer};

    fn server() -> SocketAddrV4 {
        "127.0.0.1:5075".parse().unwrap()
    }

    fn msg(command: Command, direction: Direction, payload: &[u8]) -> Message {
        Message {
            header: Header::new(command, direction, false, payload.len() as u32),
            payload: Bytes::copy_from_slice(payload),
        }
    }

    // GET INIT from a pvAccessCPP client: sid, ioid 5, INIT, pvRequest
    // "field()" as a cached empty structure definition.
    const GET_INIT: [u8; 17] = [
        1, 0, 0, 0, 5, 0, 0, 0, 0x08, 0xFD, 2, 0, 0x80, 0, 0, 0xFF, 0,
    ];

    // Operations are tracked per client connection up to MAX_OPS; beyond
    // that they are relayed untracked, and nothing grows further.
    #[test]
    fn operations_tracked_per_connection_are_bounded() {
        let mut t = Translator::default();
        let mut init = GET_INIT;
        for ioid in 0..(MAX_OPS as u32 + 1000) {
            init[4..8].copy_from_slice(&ioid.to_le_bytes());
            t.client_message(server(), &msg(Command::Get, Direction::FromClient, &init))
                .unwrap();
        }
        assert_eq!(t.ops.len(), MAX_OPS);
        // Ending one makes room for another.
        t.end_op(0);
        init[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        t.client_message(server(), &msg(Command::Get, Direction::FromClient, &init))
            .unwrap();
        assert!(t.ops.contains_key(&u32::MAX));
        assert_eq!(t.ops.len(), MAX_OPS);
    }

    #[test]
    fn passthrough_tracks_without_rewriting() {
        let mut t = Translator::default();
        assert_eq!(
            t.client_message(
                server(),
                &msg(Command::Get, Direction::FromClient, &GET_INIT)
            )
            .unwrap(),
            None
        );
        // The server's INIT response defines key 1 = {any v}.
        let init = [
            5, 0, 0, 0, 0x08, 0xFF, 0xFD, 1, 0, 0x80, 0, 1, 1, b'v', 0x82,
        ];
        assert_eq!(
            t.server_message(server(), &msg(Command::Get, Direction::FromServer, &init))
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
            .client_message(
                server(),
                &msg(Command::Get, Direction::FromClient, &GET_INIT),
            )
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
            .server_message(server(), &msg(Command::Get, Direction::FromServer, &init))
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
            .server_message(
                server(),
                &data.into_message(Command::Get, Direction::FromServer),
            )
            .unwrap()
            .unwrap();
        assert_eq!(&out[..], &[5, 0, 0, 0, 0, 0xFF, 1, 1, 0x22, 7, 0, 0, 0]);
    }

    #[test]
    fn each_server_has_its_own_cache() {
        let mut t = Translator::default();
        let other: SocketAddrV4 = "127.0.0.1:40000".parse().unwrap();
        t.client_message(
            server(),
            &msg(Command::Get, Direction::FromClient, &GET_INIT),
        )
        .unwrap();
        let init = [5, 0, 0, 0, 0x08, 0xFF, 0xFD, 1, 0, 0x80, 0, 0];
        t.server_message(server(), &msg(Command::Get, Direction::FromServer, &init))
            .unwrap();
        // Key 1 was defined by the first server only.
        let refer = [6, 0, 0, 0, 0x08, 0xFF, 0xFE, 1, 0];
        assert!(t
            .server_message(other, &msg(Command::Get, Direction::FromServer, &refer))
            .is_err());
        assert!(t
            .server_message(server(), &msg(Command::Get, Direction::FromServer, &refer))
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

    #[test]
    fn credentials_over_4_kib_are_refused() {
        let mut t = Translator::default();
        let mut credentials = vec![0x80, 0, 1, 4, b'u', b's', b'e', b'r', 0x60, 0xFE];
        credentials.extend_from_slice(&5000u32.to_le_bytes());
        credentials.extend_from_slice(&[b'x'; 5000]);
        assert_eq!(
            t.credentials(&credentials, false).map(|plain| plain.len()),
            Err(WireError::Limit("the size of credentials (4 KiB)"))
        );
    }

    // ~800 bytes whose nested definitions and references double a long
    // field name 15 times: kept for the session, they came to 16 MiB.
    #[test]
    fn credentials_with_cache_references_are_refused() {
        fn doubling(key: u8) -> Vec<u8> {
            if key == 1 {
                let mut desc = vec![0xFD, 1, 0, 0x80, 0, 1, 250];
                desc.extend_from_slice(&[b'n'; 250]);
                desc.push(0x22);
                return desc;
            }
            let mut desc = vec![0xFD, key, 0, 0x80, 0, 2, 1, b'a'];
            desc.extend(doubling(key - 1));
            desc.extend_from_slice(&[1, b'b', 0xFE, key - 1, 0]);
            desc
        }
        let mut t = Translator::default();
        let credentials = doubling(15);
        assert!(credentials.len() < 1000);
        assert!(matches!(
            t.credentials(&credentials, false),
            Err(WireError::Limit(_))
        ));
        // Even a small one: credentials stand alone.
        let small = [
            0xFD, 1, 0, 0x80, 0, 2, 1, b'a', 0xFD, 2, 0, 0x80, 0, 0, 1, b'b', 0xFE, 2, 0,
        ];
        assert_eq!(
            t.credentials(&small, false),
            Err(WireError::Limit("a type cache reference in credentials"))
        );
    }

    // The server's INIT response: {any v}, so values are walked.
    const INIT_ANY: [u8; 12] = [5, 0, 0, 0, 0x08, 0xFF, 0x80, 0, 1, 1, b'v', 0x82];

    fn translator_with_get_op() -> Translator {
        let mut t = Translator {
            active: true,
            ..Translator::default()
        };
        t.client_message(
            server(),
            &msg(Command::Get, Direction::FromClient, &GET_INIT),
        )
        .unwrap();
        t.server_message(
            server(),
            &msg(Command::Get, Direction::FromServer, &INIT_ANY),
        )
        .unwrap();
        assert_eq!(t.op_count(), 1);
        t
    }

    #[test]
    fn destroy_bit_ends_an_operation_after_the_servers_answer() {
        let mut t = translator_with_get_op();
        // GET with DESTROY: the answer still needs the op's type.
        t.client_message(
            server(),
            &msg(
                Command::Get,
                Direction::FromClient,
                &[1, 0, 0, 0, 5, 0, 0, 0, 0x50],
            ),
        )
        .unwrap();
        assert_eq!(t.op_count(), 1);
        let answer = [5, 0, 0, 0, 0x50, 0xFF, 1, 1, 0xFD, 3, 0, 0x22, 7, 0, 0, 0];
        let out = t
            .server_message(server(), &msg(Command::Get, Direction::FromServer, &answer))
            .unwrap()
            .unwrap();
        assert_eq!(&out[..], &[5, 0, 0, 0, 0x50, 0xFF, 1, 1, 0x22, 7, 0, 0, 0]);
        assert_eq!(t.op_count(), 0);
    }

    #[test]
    fn monitor_destroy_bit_ends_the_operation_at_once() {
        let mut t = Translator::default();
        let mut init = GET_INIT;
        init[4] = 6;
        t.client_message(
            server(),
            &msg(Command::Monitor, Direction::FromClient, &init),
        )
        .unwrap();
        assert_eq!(t.op_count(), 1);
        t.client_message(
            server(),
            &msg(
                Command::Monitor,
                Direction::FromClient,
                &[1, 0, 0, 0, 6, 0, 0, 0, 0x10],
            ),
        )
        .unwrap();
        assert_eq!(t.op_count(), 0);
    }

    #[test]
    fn failed_init_ends_the_operation() {
        let mut t = Translator::default();
        t.client_message(
            server(),
            &msg(Command::Get, Direction::FromClient, &GET_INIT),
        )
        .unwrap();
        let failed = [5, 0, 0, 0, 0x08, 2, 1, b'x', 0];
        t.server_message(server(), &msg(Command::Get, Direction::FromServer, &failed))
            .unwrap();
        assert_eq!(t.op_count(), 0);
    }

    #[test]
    fn operations_end_with_their_channel_or_server() {
        let other: SocketAddrV4 = "127.0.0.1:40000".parse().unwrap();
        let mut t = Translator::default();
        let mut on_sid_2 = GET_INIT;
        on_sid_2[0] = 2;
        on_sid_2[4] = 6;
        let mut on_other = GET_INIT;
        on_other[0] = 3;
        on_other[4] = 7;
        t.client_message(
            server(),
            &msg(Command::Get, Direction::FromClient, &GET_INIT),
        )
        .unwrap();
        t.client_message(
            server(),
            &msg(Command::Get, Direction::FromClient, &on_sid_2),
        )
        .unwrap();
        t.client_message(other, &msg(Command::Get, Direction::FromClient, &on_other))
            .unwrap();
        assert_eq!(t.op_count(), 3);
        t.forget_channel(1);
        assert_eq!(t.op_count(), 2);
        t.forget_server(other);
        assert_eq!(t.op_count(), 1);
        t.forget_channel(2);
        assert_eq!(t.op_count(), 0);
    }

    // A monitor of a plain value (no variant union) is never walked, so
    // its type tree is not kept: thousands of monitors would hold
    // thousands of trees.
    #[test]
    fn only_types_that_hold_a_variant_union_are_kept() {
        const INIT_DOUBLE: [u8; 12] = [5, 0, 0, 0, 0x08, 0xFF, 0x80, 0, 1, 1, b'v', 0x43];
        for (answer, kept) in [(INIT_DOUBLE, false), (INIT_ANY, true)] {
            let mut t = Translator::default();
            t.client_message(
                server(),
                &msg(Command::Get, Direction::FromClient, &GET_INIT),
            )
            .unwrap();
            t.server_message(server(), &msg(Command::Get, Direction::FromServer, &answer))
                .unwrap();
            assert_eq!(!t.ops[&5].types.is_empty(), kept);
            assert_eq!(t.ops[&5].walks_values(), kept);
        }
    }

    #[test]
    fn a_server_cannot_set_the_types_of_another_servers_operation() {
        let other: SocketAddrV4 = "127.0.0.1:40000".parse().unwrap();
        let mut t = Translator::default();
        t.client_message(
            server(),
            &msg(Command::Get, Direction::FromClient, &GET_INIT),
        )
        .unwrap();
        t.server_message(other, &msg(Command::Get, Direction::FromServer, &INIT_ANY))
            .unwrap();
        assert!(!t.ops[&5].walks_values());
    }

    /// Figures for the limits above (not a pass/fail test):
    /// `cargo test --release measure_hostile_inputs -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn measure_hostile_inputs() {
        use std::time::Instant;
        // Credentials: key k = {a: <key k-1>, b, c, d: key k-1}, key 1 =
        // {<1000-byte name> {}}; 1,175 bytes that used to expand to 16.6 MB.
        fn fourfold(key: u8) -> Vec<u8> {
            if key == 1 {
                let mut desc = vec![0xFD, 1, 0, 0x80, 0, 1, 0xFE, 0xE8, 3, 0, 0];
                desc.extend_from_slice(&[b'n'; 1000]);
                desc.extend_from_slice(&[0x80, 0, 0]);
                return desc;
            }
            let mut desc = vec![0xFD, key, 0, 0x80, 0, 4, 1, b'a'];
            desc.extend(fourfold(key - 1));
            for name in [b'b', b'c', b'd'] {
                desc.extend_from_slice(&[1, name, 0xFE, key - 1, 0]);
            }
            desc
        }
        let credentials = fourfold(8);
        let start = Instant::now();
        let result = Translator::default().credentials(&credentials, false);
        println!(
            "credentials of {} bytes: {:?} in {:?}",
            credentials.len(),
            result.map(|b| b.len()),
            start.elapsed()
        );
        // The alternating-keys attack, as GET INITs, until the first refusal.
        let mut t = Translator::default();
        let start = Instant::now();
        let first = [1, 0, 0, 0, 5, 0, 0, 0, 0x08, 0xFD, 2, 0, 0x22, 0, 0, 0, 0];
        t.client_message(server(), &msg(Command::Get, Direction::FromClient, &first))
            .unwrap();
        let mut sent = 8 + first.len();
        for round in 0..3_600u32 {
            let (define, refer) = if round % 2 == 0 { (1, 2) } else { (2, 1) };
            let mut payload = vec![1, 0, 0, 0, 5, 0, 0, 0, 0x08];
            payload.extend_from_slice(&[0x81, 0, 1, 1, b'm', 0xFD, define, 0]);
            for _ in 0..18 {
                payload.extend_from_slice(&[0x80, 0, 1, 1, b'n']);
            }
            payload.extend_from_slice(&[0xFE, refer, 0, 0xFF]);
            sent += 8 + payload.len();
            if let Err(e) = t.client_message(
                server(),
                &msg(Command::Get, Direction::FromClient, &payload),
            ) {
                println!(
                    "alternating keys: refused at message {} ({sent} bytes, {:?}): {e}",
                    round + 1,
                    start.elapsed()
                );
                break;
            }
        }
        // A 21-byte GET INIT naming a cached 65,520-field union.
        let mut t = Translator {
            active: true,
            ..Translator::default()
        };
        let mut define = vec![1, 0, 0, 0, 1, 0, 0, 0, 0x08, 0xFD, 1, 0, 0x81, 0, 0xFE];
        define.extend_from_slice(&65_519u32.to_le_bytes());
        for _ in 0..65_519 {
            define.extend_from_slice(&[0, 0x22]);
        }
        define.push(0xFF);
        t.client_message(server(), &msg(Command::Get, Direction::FromClient, &define))
            .unwrap();
        let refer = [9, 0, 0, 0, 2, 0, 0, 0, 0x08, 0xFE, 1, 0, 0xFF];
        let start = Instant::now();
        let mut result = Ok(None);
        for _ in 0..1000 {
            result = t.client_message(server(), &msg(Command::Get, Direction::FromClient, &refer));
        }
        println!(
            "GET INIT of 21 bytes naming 65,520 fields: {:?} in {:?} each",
            result.map(|b| b.map(|b| b.len())),
            start.elapsed() / 1000
        );
    }
}
