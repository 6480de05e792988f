//! pvData type descriptions, the introspection type cache, and a value
//! walker that can re-emit a value with every type description in plain form.
//!
//! Type descriptions (pvData `FieldCreate::deserialize`, pvxs `from_wire`):
//! `0xFF` null, `0xFD key desc` define and use cache entry `key` (u16),
//! `0xFE key` use it, otherwise a plain description. pvAccessCPP caches
//! every description that is not a scalar or scalar array, at any depth, and
//! the cache is per connection and per direction. pvxs decodes the cache but
//! never uses it when sending, and both accept plain descriptions, so the
//! shim re-emits plain descriptions when it must translate.
//!
//! Values are serialized without type information, except inside variant
//! unions ("any"), which carry a description before the value. So a value
//! needs walking only if its type holds a variant union somewhere.
//!
//! Invariant: every `FieldType` the walker builds, including those reached
//! through cache references, nests at most `MAX_DEPTH` levels, expands to
//! at most `MAX_TYPE_NODES` fields and `MAX_TYPE_BYTES` bytes in plain form.
//! So every recursion over a type (drop, encode, equality) is at most
//! `MAX_DEPTH` deep, and what a type costs to write is known in O(1)
//! (`FieldType::wire_len`) before it is written.

use super::wire::{Reader, WireError};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::Arc;

/// Levels of nesting below the top of a type (pvxs `maxNestingDepth`,
/// `dataencode.cpp`), counted through cache references too: a reference
/// costs the depth of the type it names.
const MAX_DEPTH: usize = 20;
/// Fields held in one connection direction's cache, at most (counted as
/// expanded, so shared subtrees count once per use).
const MAX_CACHED_FIELDS: usize = 200_000;
/// Plain-form bytes of the types held in one connection direction's cache.
/// Long names make few fields cost many bytes.
const MAX_CACHED_BYTES: usize = 8 << 20;
/// Fields one type description may expand to. Cached types can refer to
/// earlier ones, so a few bytes could otherwise describe a huge tree.
const MAX_TYPE_NODES: usize = 65_536;
/// Bytes one type description may expand to in plain form (type codes, ids,
/// field names): what re-emitting it costs, whatever it took on the wire.
const MAX_TYPE_BYTES: usize = 256 << 10;
/// Work one message may cost, per byte of it, plus a fixed allowance:
/// one unit per value visited, one per byte of every type description read
/// (a reference costs what it expands to), in every mode.
const WORK_PER_BYTE: usize = 64;
/// A re-emitted message may be at most this many times its input, plus the
/// same fixed allowance.
const GROWTH_PER_BYTE: usize = 4;
/// The fixed allowance of a server's message: one type of `MAX_TYPE_BYTES`
/// fits, so any type a server may define it may also refer to.
const SERVER_ALLOWANCE: usize = MAX_TYPE_BYTES;
/// The fixed allowance of a client's message. Clients send small types
/// (pvRequests, "ca" credentials, the types of put values), and a request
/// for a channel reaches a server, so a few bytes must not cost much.
const CLIENT_ALLOWANCE: usize = 16 << 10;

/// Type codes of a field description (pvxs `data.h` `TypeCode::code_t`,
/// pvAccessCPP `pv/pvIntrospect.h`). A scalar code has its top bit clear;
/// `ARRAY_BITS` then say whether and how it is an array.
mod code {
    pub const ARRAY_BITS: u8 = 0x18;
    pub const SCALAR: u8 = 0x00;
    pub const VARIABLE_ARRAY: u8 = 0x08;
    pub const FIXED_ARRAY: u8 = 0x18;
    pub const BOUNDED_ARRAY: u8 = 0x10;
    pub const COMPOUND: u8 = 0x80;
    pub const STRUCT: u8 = 0x80;
    pub const UNION: u8 = 0x81;
    pub const ANY: u8 = 0x82;
    pub const BOUNDED_STRING: u8 = 0x83;
    pub const STRUCT_ARRAY: u8 = 0x88;
    pub const UNION_ARRAY: u8 = 0x89;
    pub const ANY_ARRAY: u8 = 0x8A;
    pub const BOOL: u8 = 0x00;
    pub const STRING: u8 = 0x60;
    /// What may stand in place of a description (pvxs `dataencode.cpp`).
    pub const NULL: u8 = 0xFF;
    pub const DEFINE: u8 = 0xFD;
    pub const REFER: u8 = 0xFE;
}
use code::{DEFINE, NULL, REFER};

/// A type description with what it costs, computed once when it is built.
#[derive(Debug, PartialEq, Eq)]
pub struct FieldType {
    kind: Kind,
    /// Levels of nesting below this node (a scalar or empty structure: 0).
    depth: usize,
    /// Fields it expands to.
    nodes: usize,
    /// Bytes of its plain description.
    wire_len: usize,
    /// Whether a value of this type can hold a type description.
    has_variant: bool,
    /// Bits it takes in a BitSet: structures number their members,
    /// everything else (unions and arrays included) is one bit.
    bits: usize,
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// A scalar: its type code (bool 0x00, integers 0x2X, floats 0x4X, string 0x60).
    Scalar(u8),
    /// A variable-length array of scalars (code | 0x08).
    ScalarArray(u8),
    /// A bounded (code | 0x10) or fixed (code | 0x18) array, with its size.
    SizedArray {
        code: u8,
        fixed: bool,
        size: u32,
    },
    BoundedString(u32),
    Structure {
        id: Bytes,
        fields: Vec<(Bytes, Arc<FieldType>)>,
        /// The BitSet bit of each member, counted from the structure's own.
        offsets: Vec<usize>,
    },
    Union {
        id: Bytes,
        fields: Vec<(Bytes, Arc<FieldType>)>,
    },
    Variant,
    StructureArray(Arc<FieldType>),
    UnionArray(Arc<FieldType>),
    VariantArray,
}

impl FieldType {
    /// Builds a node, summing what its members cost (O(members)).
    fn new(kind: Kind) -> FieldType {
        let leaf = |wire_len: usize, has_variant: bool| (0, 1, wire_len, has_variant, 1);
        let (depth, nodes, wire_len, has_variant, bits) = match &kind {
            Kind::Scalar(_) | Kind::ScalarArray(_) => leaf(1, false),
            Kind::SizedArray { size, .. } | Kind::BoundedString(size) => {
                leaf(1 + size_len(*size as usize), false)
            }
            Kind::Variant | Kind::VariantArray => leaf(1, true),
            Kind::StructureArray(e) | Kind::UnionArray(e) => {
                (1 + e.depth, 1 + e.nodes, 1 + e.wire_len, e.has_variant, 1)
            }
            Kind::Structure { id, fields, .. } | Kind::Union { id, fields } => {
                let mut depth = 0;
                let mut nodes = 1usize;
                let mut wire_len = 1 + string_len(id) + size_len(fields.len());
                let mut has_variant = false;
                let mut bits = 1usize;
                for (name, t) in fields {
                    depth = depth.max(1 + t.depth);
                    nodes = nodes.saturating_add(t.nodes);
                    wire_len = wire_len
                        .saturating_add(string_len(name))
                        .saturating_add(t.wire_len);
                    has_variant |= t.has_variant;
                    bits = bits.saturating_add(t.bits);
                }
                if matches!(kind, Kind::Union { .. }) {
                    bits = 1;
                }
                (depth, nodes, wire_len, has_variant, bits)
            }
        };
        FieldType {
            kind,
            depth,
            nodes,
            wire_len,
            has_variant,
            bits,
        }
    }

    /// Whether a value of this type can hold a type description (O(1)).
    pub fn has_variant(&self) -> bool {
        self.has_variant
    }

    /// Writes the plain description: `wire_len` bytes.
    pub fn encode(&self, big_endian: bool, out: &mut BytesMut) {
        match &self.kind {
            Kind::Scalar(code) => out.put_u8(*code),
            Kind::ScalarArray(scalar) => out.put_u8(scalar | code::VARIABLE_ARRAY),
            Kind::SizedArray {
                code: scalar,
                fixed,
                size,
            } => {
                let bits = if *fixed {
                    code::FIXED_ARRAY
                } else {
                    code::BOUNDED_ARRAY
                };
                out.put_u8(scalar | bits);
                put_size(out, *size as usize, big_endian);
            }
            Kind::BoundedString(size) => {
                out.put_u8(code::BOUNDED_STRING);
                put_size(out, *size as usize, big_endian);
            }
            Kind::Structure { id, fields, .. } | Kind::Union { id, fields } => {
                out.put_u8(if matches!(self.kind, Kind::Structure { .. }) {
                    code::STRUCT
                } else {
                    code::UNION
                });
                put_string(out, id, big_endian);
                put_size(out, fields.len(), big_endian);
                for (name, t) in fields {
                    put_string(out, name, big_endian);
                    t.encode(big_endian, out);
                }
            }
            Kind::Variant => out.put_u8(code::ANY),
            Kind::StructureArray(t) => {
                out.put_u8(code::STRUCT_ARRAY);
                t.encode(big_endian, out);
            }
            Kind::UnionArray(t) => {
                out.put_u8(code::UNION_ARRAY);
                t.encode(big_endian, out);
            }
            Kind::VariantArray => out.put_u8(code::ANY_ARRAY),
        }
    }

    /// The type id of a structure or union (`epics:nt/NTScalar:1.0`).
    pub fn type_id(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Structure { id, .. } | Kind::Union { id, .. } => Some(id),
            _ => None,
        }
    }

    /// A structure's member `name`, with its BitSet bit counted from the
    /// structure's own.
    pub fn member(&self, name: &[u8]) -> Option<(usize, &FieldType)> {
        let Kind::Structure {
            fields, offsets, ..
        } = &self.kind
        else {
            return None;
        };
        let index = fields.iter().position(|(n, _)| n == name)?;
        Some((*offsets.get(index)?, &fields[index].1))
    }

    /// The shape of a value of this type, as a reader of values needs it.
    pub fn shape(&self) -> Shape {
        match &self.kind {
            Kind::Scalar(code) => Shape::Scalar(*code),
            Kind::BoundedString(_) => Shape::Scalar(0x60),
            Kind::ScalarArray(code)
            | Kind::SizedArray {
                code, fixed: false, ..
            } => Shape::Array(*code),
            Kind::SizedArray { fixed: true, .. } => Shape::Other("fixed-size array"),
            Kind::Structure { .. } => Shape::Other("structure"),
            Kind::Union { .. } => Shape::Other("union"),
            Kind::Variant => Shape::Other("any"),
            Kind::StructureArray(_) => Shape::Other("structure array"),
            Kind::UnionArray(_) => Shape::Other("union array"),
            Kind::VariantArray => Shape::Other("any array"),
        }
    }

    /// The field that BitSet bit `bit` names: O(depth x log(members)).
    fn field_at_bit(&self, mut bit: usize) -> Option<&FieldType> {
        let mut t = self;
        loop {
            if bit == 0 {
                return Some(t);
            }
            if bit >= t.bits {
                return None;
            }
            let Kind::Structure {
                fields, offsets, ..
            } = &t.kind
            else {
                return None;
            };
            // offsets[0] is 1 and bit >= 1, so a member starts at or before it.
            let member = offsets
                .partition_point(|&start| start <= bit)
                .checked_sub(1)?;
            bit -= offsets[member];
            t = &fields.get(member)?.1;
        }
    }
}

/// Bytes `put_size` writes for `n`.
fn size_len(n: usize) -> usize {
    if n < 254 {
        1
    } else {
        5
    }
}

fn string_len(s: &[u8]) -> usize {
    size_len(s.len()).saturating_add(s.len())
}

/// Sizes come from the wire (u32) or from lengths bounded by a message.
pub fn put_size(out: &mut BytesMut, n: usize, big_endian: bool) {
    if n < 254 {
        out.put_u8(n as u8);
    } else {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        out.put_u8(0xFE);
        if big_endian {
            out.put_u32(n)
        } else {
            out.put_u32_le(n)
        }
    }
}

fn put_string(out: &mut BytesMut, s: &[u8], big_endian: bool) {
    put_size(out, s.len(), big_endian);
    out.put_slice(s);
}

/// One sender's type cache on one connection.
#[derive(Default)]
pub struct Registry {
    entries: HashMap<u16, Arc<FieldType>>,
    /// Fields and plain bytes of all entries, as expanded.
    fields: usize,
    bytes: usize,
}

impl Registry {
    fn define(&mut self, key: u16, t: Arc<FieldType>) -> Result<(), WireError> {
        let (old_fields, old_bytes) = self
            .entries
            .get(&key)
            .map_or((0, 0), |old| (old.nodes, old.wire_len));
        let fields = self.fields - old_fields + t.nodes;
        let bytes = self.bytes - old_bytes + t.wire_len;
        if fields > MAX_CACHED_FIELDS || bytes > MAX_CACHED_BYTES {
            return Err(WireError::Limit("the size of one type cache"));
        }
        self.fields = fields;
        self.bytes = bytes;
        self.entries.insert(key, t);
        Ok(())
    }
}

/// Reads values and descriptions from one message, tracking the sender's
/// cache, and (when `out` is set) writes them again with plain descriptions.
pub struct Walker<'a, 'o> {
    pub r: Reader<'a>,
    out: Option<&'o mut BytesMut>,
    big_endian: bool,
    registry: &'o mut Registry,
    error: Option<WireError>,
    work_left: usize,
    /// How long `out` may grow: a small multiple of the input.
    out_limit: usize,
    /// Whether `0xFE` references are accepted (not in credentials).
    references: bool,
}

impl<'a, 'o> Walker<'a, 'o> {
    pub fn new(
        payload: &'a [u8],
        big_endian: bool,
        registry: &'o mut Registry,
        out: Option<&'o mut BytesMut>,
    ) -> Self {
        let mut walker = Walker {
            r: Reader::new(payload, big_endian),
            out,
            big_endian,
            registry,
            error: None,
            work_left: 0,
            out_limit: 0,
            references: true,
        };
        walker.set_allowance(SERVER_ALLOWANCE);
        walker
    }

    /// For a client's message: a smaller fixed allowance.
    pub fn for_client_message(mut self) -> Self {
        self.set_allowance(CLIENT_ALLOWANCE);
        self
    }

    fn set_allowance(&mut self, allowance: usize) {
        let input = self.r.remaining().len();
        self.work_left = input
            .saturating_mul(WORK_PER_BYTE)
            .saturating_add(allowance);
        let written = self.out.as_ref().map_or(0, |o| o.len());
        self.out_limit = input
            .saturating_mul(GROWTH_PER_BYTE)
            .saturating_add(allowance)
            .saturating_add(written);
    }

    /// Refuses `0xFE` references: for a description that must stand alone.
    pub fn without_references(mut self) -> Self {
        self.references = false;
        self
    }

    /// Takes `units` from the message's work allowance; false when spent.
    fn spend(&mut self, units: usize) -> bool {
        match self.work_left.checked_sub(units) {
            Some(left) => {
                self.work_left = left;
                true
            }
            None => {
                self.fail(WireError::Limit("the work one message may cost"));
                false
            }
        }
    }

    pub fn finish(&self) -> Result<(), WireError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        self.r.finish()
    }

    fn fail(&mut self, e: WireError) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    fn failed(&self) -> bool {
        self.error.is_some() || self.r.finish().is_err()
    }

    /// Copies `n` bytes unchanged.
    pub fn copy(&mut self, n: usize, what: &'static str) {
        let bytes = self.r.bytes(n, what);
        if let Some(out) = self.out.as_deref_mut() {
            out.put_slice(bytes);
        }
    }

    /// Copies the rest of the payload unchanged.
    pub fn copy_rest(&mut self) {
        let rest = self.r.remaining();
        self.copy(rest.len(), "rest");
    }

    pub fn u8(&mut self, what: &'static str) -> u8 {
        let v = self.r.u8(what);
        if let Some(out) = self.out.as_deref_mut() {
            out.put_u8(v);
        }
        v
    }

    pub fn u32(&mut self, what: &'static str) -> u32 {
        let v = self.r.u32(what);
        if let Some(out) = self.out.as_deref_mut() {
            if self.big_endian {
                out.put_u32(v)
            } else {
                out.put_u32_le(v)
            }
        }
        v
    }

    /// A Size, copied in the same form.
    pub fn size(&mut self, what: &'static str) -> Option<u32> {
        let v = self.r.size(what);
        if let Some(out) = self.out.as_deref_mut() {
            match v {
                None => out.put_u8(0xFF),
                Some(n) => put_size(out, n as usize, self.big_endian),
            }
        }
        v
    }

    fn string(&mut self, what: &'static str) -> Bytes {
        let s = Bytes::copy_from_slice(self.r.string(what));
        if let Some(out) = self.out.as_deref_mut() {
            put_string(out, &s, self.big_endian);
        }
        s
    }

    /// A Status; true if it says OK or warning (a payload follows).
    pub fn status(&mut self) -> bool {
        let kind = self.u8("status");
        if kind == 0xFF {
            return true;
        }
        self.string("status message");
        self.string("status stack");
        kind <= 1
    }

    /// A type description; written back in plain form. `None` is null.
    /// Costs the bytes it expands to, in every mode: a reference is cheap
    /// to read but not to write or to walk.
    pub fn field_desc(&mut self) -> Option<Arc<FieldType>> {
        let t = self.read_desc(0);
        if self.failed() {
            return None;
        }
        let len = t.as_ref().map_or(1, |t| t.wire_len);
        if !self.spend(len) {
            return None;
        }
        let out_limit = self.out_limit;
        if let Some(out) = self.out.as_deref_mut() {
            if out.len().saturating_add(len) > out_limit {
                self.fail(WireError::Limit("the size of a translated message"));
                return None;
            }
            match &t {
                Some(t) => t.encode(self.big_endian, out),
                None => out.put_u8(NULL),
            }
        }
        t
    }

    /// A description at nesting `level` (0 at the top of a description).
    fn read_desc(&mut self, level: usize) -> Option<Arc<FieldType>> {
        if level > MAX_DEPTH {
            self.fail(WireError::Limit("type nesting depth"));
            return None;
        }
        if self.failed() {
            return None;
        }
        let t = match self.r.u8("type code") {
            NULL => return None,
            DEFINE => {
                // A plain description must follow: a definition of a
                // definition would nest without adding a level.
                let key = self.r.u16("cache key");
                let code = self.r.u8("type code");
                if matches!(code, NULL | DEFINE | REFER) {
                    self.fail(WireError::Malformed(
                        "a type cache definition that holds no plain type",
                    ));
                    return None;
                }
                let t = Arc::new(self.read_type(code, level)?);
                if let Err(e) = self.registry.define(key, t.clone()) {
                    self.fail(e);
                    return None;
                }
                t
            }
            REFER => {
                let key = self.r.u16("cache key");
                if !self.references {
                    self.fail(WireError::Limit("a type cache reference in credentials"));
                    return None;
                }
                match self.registry.entries.get(&key) {
                    Some(t) => t.clone(),
                    None => {
                        self.fail(WireError::UndefinedCacheKey(key));
                        return None;
                    }
                }
            }
            code => Arc::new(self.read_type(code, level)?),
        };
        // A reference brings a whole tree at once: it must fit below
        // `level` as a plain description would.
        if level + t.depth > MAX_DEPTH {
            self.fail(WireError::Limit("type nesting depth"));
            return None;
        }
        Some(t)
    }

    fn read_type(&mut self, type_code: u8, level: usize) -> Option<FieldType> {
        if type_code & code::COMPOUND == 0 {
            return self.read_scalar_type(type_code);
        }
        let kind = match type_code {
            code::STRUCT | code::UNION => self.read_members(type_code, level)?,
            code::ANY => Kind::Variant,
            code::BOUNDED_STRING => Kind::BoundedString(self.r.size("string bound").unwrap_or(0)),
            code::STRUCT_ARRAY | code::UNION_ARRAY => {
                let element = self.read_desc(level + 1)?;
                self.within_type_limits(element.nodes + 1, element.wire_len + 1)?;
                if type_code == code::STRUCT_ARRAY {
                    Kind::StructureArray(element)
                } else {
                    Kind::UnionArray(element)
                }
            }
            code::ANY_ARRAY => Kind::VariantArray,
            _ => {
                self.fail(WireError::UnknownTypeCode(type_code));
                return None;
            }
        };
        Some(FieldType::new(kind))
    }

    /// A scalar or an array of scalars.
    fn read_scalar_type(&mut self, type_code: u8) -> Option<FieldType> {
        let scalar = type_code & !code::ARRAY_BITS;
        if scalar_width(scalar).is_none() {
            self.fail(WireError::UnknownTypeCode(type_code));
            return None;
        }
        let kind = match type_code & code::ARRAY_BITS {
            code::SCALAR => Kind::Scalar(scalar),
            code::VARIABLE_ARRAY => Kind::ScalarArray(scalar),
            bits => Kind::SizedArray {
                code: scalar,
                fixed: bits == code::FIXED_ARRAY,
                size: self.r.size("array bound").unwrap_or(0),
            },
        };
        Some(FieldType::new(kind))
    }

    /// The id and members of a structure or union.
    fn read_members(&mut self, type_code: u8, level: usize) -> Option<Kind> {
        let id = Bytes::copy_from_slice(self.r.string("type id"));
        let count = self.r.size("field count").unwrap_or(0) as usize;
        let mut fields = Vec::new();
        // Running totals refuse a huge structure before it is built.
        let mut nodes = 1usize;
        let mut bytes = 1 + string_len(&id) + size_len(count);
        for _ in 0..count {
            if self.failed() {
                return None;
            }
            let name = Bytes::copy_from_slice(self.r.string("field name"));
            let Some(t) = self.read_desc(level + 1) else {
                self.fail(WireError::Malformed("a structure member without a type"));
                return None;
            };
            nodes = nodes.saturating_add(t.nodes);
            bytes = bytes
                .saturating_add(string_len(&name))
                .saturating_add(t.wire_len);
            self.within_type_limits(nodes, bytes)?;
            fields.push((name, t));
        }
        if type_code != code::STRUCT {
            return Some(Kind::Union { id, fields });
        }
        let mut offsets = Vec::with_capacity(fields.len());
        let mut next = 1usize;
        for (_, t) in &fields {
            offsets.push(next);
            next = next.saturating_add(t.bits);
        }
        Some(Kind::Structure {
            id,
            fields,
            offsets,
        })
    }

    fn within_type_limits(&mut self, nodes: usize, bytes: usize) -> Option<()> {
        if nodes > MAX_TYPE_NODES {
            self.fail(WireError::Limit("the number of fields of one type"));
            return None;
        }
        if bytes > MAX_TYPE_BYTES {
            self.fail(WireError::Limit("the size of one type"));
            return None;
        }
        Some(())
    }

    /// A whole value of type `t`.
    pub fn value(&mut self, t: &FieldType) {
        self.value_at(t, 0)
    }

    fn value_at(&mut self, t: &FieldType, depth: usize) {
        if depth > MAX_DEPTH {
            self.fail(WireError::Limit("value nesting depth"));
            return;
        }
        if self.failed() || !self.spend(1) {
            return;
        }
        match &t.kind {
            Kind::Scalar(code) => self.scalar(*code),
            Kind::BoundedString(_) => self.scalar(code::STRING),
            Kind::ScalarArray(code)
            | Kind::SizedArray {
                code, fixed: false, ..
            } => {
                let n = self.size("array length").unwrap_or(0);
                self.scalars(*code, n);
            }
            Kind::SizedArray {
                code,
                fixed: true,
                size,
            } => self.scalars(*code, *size),
            Kind::Structure { fields, .. } => {
                for (_, member) in fields {
                    self.value_at(member, depth + 1);
                }
            }
            Kind::Union { fields, .. } => self.union_value(fields, depth),
            Kind::Variant => {
                if let Some(inner) = self.field_desc() {
                    self.value_at(&inner, depth + 1);
                }
            }
            Kind::StructureArray(element) | Kind::UnionArray(element) => {
                self.element_values(depth, false, |walker, depth| {
                    walker.value_at(element, depth)
                })
            }
            // Each element of a variant array is charged, present or not:
            // each may bring a type description.
            Kind::VariantArray => self.element_values(depth, true, |walker, depth| {
                if let Some(inner) = walker.field_desc() {
                    walker.value_at(&inner, depth);
                }
            }),
        }
    }

    /// A union's selector, then the value of the member it selects.
    fn union_value(&mut self, members: &[(Bytes, Arc<FieldType>)], depth: usize) {
        let Some(selector) = self.size("union selector") else {
            return;
        };
        match members.get(selector as usize) {
            Some((_, member)) => self.value_at(member, depth + 1),
            None => self.fail(WireError::NoSuchUnionMember {
                selector: u64::from(selector),
                members: members.len(),
            }),
        }
    }

    /// An array of structures, unions or variants: a length, then each
    /// element after a byte that says whether it is present.
    fn element_values(
        &mut self,
        depth: usize,
        charge_each: bool,
        mut element: impl FnMut(&mut Self, usize),
    ) {
        let n = self.size("array length").unwrap_or(0);
        for _ in 0..n {
            if self.failed() || (charge_each && !self.spend(1)) {
                return;
            }
            if self.u8("element present") != 0 {
                element(self, depth + 1);
            }
        }
    }

    fn scalar(&mut self, code: u8) {
        match scalar_width(code) {
            Some(0) => {
                let len = self.size("string length").unwrap_or(0);
                self.copy(len as usize, "string");
            }
            Some(width) => self.copy(width, "scalar"),
            None => self.fail(WireError::UnknownTypeCode(code)),
        }
    }

    fn scalars(&mut self, code: u8, n: u32) {
        match scalar_width(code) {
            Some(0) => {
                for _ in 0..n {
                    if self.failed() {
                        return;
                    }
                    self.scalar(code);
                }
            }
            Some(width) => match (n as usize).checked_mul(width) {
                Some(bytes) => self.copy(bytes, "array"),
                None => self.fail(WireError::Limit("an array longer than memory can hold")),
            },
            None => self.fail(WireError::UnknownTypeCode(code)),
        }
    }

    /// A BitSet, copied; returns its set bits below `limit` (bits past
    /// the type's fields mean nothing and are ignored, as pvxs does).
    pub fn bitset(&mut self, limit: usize) -> Vec<usize> {
        let n = self.size("bitset length").unwrap_or(0) as usize;
        let bytes = self.r.bytes(n, "bitset");
        if let Some(out) = self.out.as_deref_mut() {
            out.put_slice(bytes);
        }
        // Whole 64-bit words in message order, then the last bytes LSB first.
        let mut bits = Vec::new();
        let mut words = bytes.chunks_exact(8);
        for (w, chunk) in words.by_ref().enumerate() {
            let chunk: [u8; 8] = chunk.try_into().unwrap_or([0; 8]);
            let word = if self.big_endian {
                u64::from_be_bytes(chunk)
            } else {
                u64::from_le_bytes(chunk)
            };
            bits.extend((0..64).filter(|b| word & (1 << b) != 0).map(|b| w * 64 + b));
            if bits.last().is_some_and(|&b| b >= limit) {
                break;
            }
        }
        let tail_start = bytes.len() - words.remainder().len();
        for (i, byte) in words.remainder().iter().enumerate() {
            let base = (tail_start + i) * 8;
            bits.extend((0..8).filter(|b| byte & (1 << b) != 0).map(|b| base + b));
        }
        bits.retain(|&b| b < limit);
        bits
    }

    /// A BitSet and the partial value it selects, for a value of type `t`.
    pub fn changed_value(&mut self, t: &FieldType) {
        let bits = self.bitset(t.bits);
        self.partial_value(t, &bits);
    }

    /// A partial value: the fields whose bits are set, in bit order
    /// (pvData `PVStructure::serialize` with a BitSet).
    pub fn partial_value(&mut self, t: &FieldType, bits: &[usize]) {
        let mut next_free = 0;
        for &bit in bits {
            if bit < next_free {
                continue; // inside a field already written whole
            }
            let Some(field) = t.field_at_bit(bit) else {
                break;
            };
            self.value(field);
            if self.failed() {
                return;
            }
            next_free = bit + field.bits;
        }
    }

    /// A BitSet and the partial value it selects, as [`Walker::changed_value`],
    /// returning the bytes of the field at BitSet bit `target` if sent.
    pub fn changed_value_field(&mut self, t: &FieldType, target: usize) -> Option<&'a [u8]> {
        let bits = self.bitset(t.bits);
        self.partial_value_field(t, &bits, target)
    }

    /// Walks a partial value as [`Walker::partial_value`] does, and returns
    /// the bytes of the field at BitSet bit `target` if the message holds it
    /// (alone, or inside a structure sent whole).
    pub fn partial_value_field(
        &mut self,
        t: &FieldType,
        bits: &[usize],
        target: usize,
    ) -> Option<&'a [u8]> {
        let mut next_free = 0;
        let mut found = None;
        for &bit in bits {
            if bit < next_free {
                continue;
            }
            let field = t.field_at_bit(bit)?;
            if (bit..bit.saturating_add(field.bits)).contains(&target) {
                found = self.field_within(field, bit, target);
            } else {
                self.value(field);
            }
            if self.failed() {
                return None;
            }
            next_free = bit + field.bits;
        }
        found
    }

    /// Walks a whole value of `t` (at BitSet bit `at`), keeping the bytes
    /// of the field at bit `target`. The recursion follows the type, whose
    /// depth is bounded.
    fn field_within(&mut self, t: &FieldType, at: usize, target: usize) -> Option<&'a [u8]> {
        if at == target {
            let before = self.r.remaining();
            self.value(t);
            let taken = before.len() - self.r.remaining().len();
            return (!self.failed()).then(|| &before[..taken]);
        }
        let Kind::Structure {
            fields, offsets, ..
        } = &t.kind
        else {
            self.value(t);
            return None;
        };
        let mut found = None;
        for ((_, member), offset) in fields.iter().zip(offsets) {
            let start = at + offset;
            if (start..start.saturating_add(member.bits)).contains(&target) {
                found = self.field_within(member, start, target);
            } else {
                self.value(member);
            }
            if self.failed() {
                return None;
            }
        }
        found
    }
}

/// What a value of a type looks like on the wire, for readers of values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One scalar of this type code (strings included: 0x60).
    Scalar(u8),
    /// A Size, then that many scalars of this code.
    Array(u8),
    /// Anything else, named.
    Other(&'static str),
}

/// Bytes of one scalar; 0 for strings; None for an unknown code.
fn scalar_width(code: u8) -> Option<usize> {
    match code {
        // bool, int8, uint8
        code::BOOL | 0x20 | 0x24 => Some(1),
        // int16, uint16
        0x21 | 0x25 => Some(2),
        // int32, uint32, float
        0x22 | 0x26 | 0x42 => Some(4),
        // int64, uint64, double
        0x23 | 0x27 | 0x43 => Some(8),
        code::STRING => Some(0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // pvAccessCPP's "ca" credentials: FD key 1 + {string user, string host},
    // then the values (pvAccessCPP security.cpp, via its type cache).
    const CREDENTIALS: [u8; 30] = [
        0xFD, 1, 0, 0x80, 0, 2, 4, b'u', b's', b'e', b'r', 0x60, 4, b'h', b'o', b's', b't',
        0x60, //
        4, b'r', b'o', b'o', b't', 6, b'l', b'a', b'p', b't', b'o', b'p',
    ];

    // One cache, per connection and direction, holds at most
    // MAX_CACHED_FIELDS fields and MAX_CACHED_BYTES bytes; a definition
    // beyond that is refused.
    #[test]
    fn one_type_cache_is_bounded() {
        let mut registry = Registry::default();
        // A structure of 1000 int fields: 1001 nodes.
        let fields: Vec<(Bytes, Arc<FieldType>)> = (0..1000)
            .map(|i| {
                let name = Bytes::from(format!("f{i}"));
                (name, Arc::new(FieldType::new(Kind::Scalar(0x22))))
            })
            .collect();
        let offsets = (1..=1000).collect();
        let big = Arc::new(FieldType::new(Kind::Structure {
            id: Bytes::new(),
            fields,
            offsets,
        }));
        let mut defined = 0;
        let refused = (0..=u16::MAX).find(|&key| registry.define(key, big.clone()).is_err());
        for key in 0..=u16::MAX {
            if registry.entries.contains_key(&key) {
                defined += 1;
            }
        }
        assert!(refused.is_some(), "the cache never filled");
        assert!(registry.fields <= MAX_CACHED_FIELDS && registry.bytes <= MAX_CACHED_BYTES);
        assert_eq!(defined, MAX_CACHED_FIELDS / big.nodes);
    }

    #[test]
    fn cached_credentials_are_reemitted_plain_and_remembered() {
        let mut registry = Registry::default();
        let mut out = BytesMut::new();
        let mut w = Walker::new(&CREDENTIALS, false, &mut registry, Some(&mut out));
        let t = w.field_desc().unwrap();
        w.value(&t);
        w.finish().unwrap();
        assert_eq!(&out[..], &CREDENTIALS[3..], "same bytes without FD 01 00");
        // A later reference to key 1 resolves to the same type.
        let mut out = BytesMut::new();
        let mut w = Walker::new(&[0xFE, 1, 0], false, &mut registry, Some(&mut out));
        assert_eq!(w.field_desc(), Some(t));
        assert_eq!(out[0], 0x80);
    }

    #[test]
    fn unknown_cache_key_is_an_error_that_names_the_key() {
        let mut registry = Registry::default();
        let mut w = Walker::new(&[0xFE, 9, 0], false, &mut registry, None);
        assert_eq!(w.field_desc(), None);
        assert_eq!(w.finish(), Err(WireError::UndefinedCacheKey(9)));
    }

    #[test]
    fn an_unknown_type_code_is_named() {
        for code in [0x8B, 0x05] {
            let mut registry = Registry::default();
            let desc = [code];
            let mut w = Walker::new(&desc, false, &mut registry, None);
            assert_eq!(w.field_desc(), None);
            assert_eq!(w.finish(), Err(WireError::UnknownTypeCode(code)));
        }
    }

    #[test]
    fn a_union_value_selecting_no_member_says_so() {
        // union {int a} (0x81, empty id, one member), then selector 3.
        let desc = [0x81, 0, 1, 1, b'a', 0x22];
        let mut registry = Registry::default();
        let mut w = Walker::new(&desc, false, &mut registry, None);
        let t = w.field_desc().unwrap();
        let mut w = Walker::new(&[3], false, &mut registry, None);
        w.value(&t);
        assert_eq!(
            w.finish(),
            Err(WireError::NoSuchUnionMember {
                selector: 3,
                members: 1
            })
        );
    }

    // A structure {any v} whose value is a variant holding a cached
    // structure {double x}: the inner type must come out plain.
    #[test]
    fn variant_inside_value_is_translated() {
        let desc = [0x80, 0, 1, 1, b'v', 0x82];
        let value = [
            0xFD, 7, 0, 0x80, 0, 1, 1, b'x', 0x43, 1, 2, 3, 4, 5, 6, 7, 8,
        ];
        let mut registry = Registry::default();
        let mut w = Walker::new(&desc, false, &mut registry, None);
        let t = w.field_desc().unwrap();
        assert!(t.has_variant());
        let mut out = BytesMut::new();
        let mut w = Walker::new(&value, false, &mut registry, Some(&mut out));
        w.value(&t);
        w.finish().unwrap();
        assert_eq!(&out[..], &value[3..]);
        assert!(registry.entries.contains_key(&7));
    }

    #[test]
    fn partial_value_walks_only_set_fields() {
        // {double a, {int b, string c} s}: bits 0 top, 1 a, 2 s, 3 b, 4 c.
        let desc = [
            0x80, 0, 2, 1, b'a', 0x43, 1, b's', 0x80, 0, 2, 1, b'b', 0x22, 1, b'c', 0x60,
        ];
        let mut registry = Registry::default();
        let mut w = Walker::new(&desc, false, &mut registry, None);
        let t = w.field_desc().unwrap();
        // bits {1, 4}: a (8 bytes) then c (string "hi")
        let data = [1, 2, 3, 4, 5, 6, 7, 8, 2, b'h', b'i'];
        let mut out = BytesMut::new();
        let mut w = Walker::new(&data, false, &mut registry, Some(&mut out));
        w.partial_value(&t, &[1, 4]);
        w.finish().unwrap();
        assert!(w.r.is_empty());
        assert_eq!(&out[..], &data[..]);
        // bit 2 (the whole sub-structure) covers 3 and 4
        let data = [9, 0, 0, 0, 1, b'z'];
        let mut w = Walker::new(&data, false, &mut registry, None);
        w.partial_value(&t, &[2, 3, 4]);
        w.finish().unwrap();
        assert!(w.r.is_empty());
    }

    #[test]
    fn a_field_is_found_alone_or_inside_a_structure_sent_whole() {
        // epics:nt/NTScalar-like {double value, {int b, string c} s}:
        // bits 0 top, 1 value, 2 s, 3 b, 4 c.
        let desc = [
            0x80, 1, b'T', 2, 5, b'v', b'a', b'l', b'u', b'e', 0x43, 1, b's', 0x80, 0, 2, 1, b'b',
            0x22, 1, b'c', 0x60,
        ];
        let mut registry = Registry::default();
        let mut w = Walker::new(&desc, false, &mut registry, None);
        let t = w.field_desc().unwrap();
        assert_eq!(t.type_id(), Some(&b"T"[..]));
        let (bit, value) = t.member(b"value").unwrap();
        assert_eq!((bit, value.shape()), (1, Shape::Scalar(0x43)));
        assert_eq!(
            t.member(b"s").map(|(bit, m)| (bit, m.shape())),
            Some((2, Shape::Other("structure")))
        );
        assert!(t.member(b"nope").is_none());
        let double = 2.5f64.to_le_bytes();
        // Bitset {0}: the whole structure, value first.
        let mut whole = vec![1, 0x01];
        whole.extend_from_slice(&double);
        whole.extend_from_slice(&[7, 0, 0, 0, 2, b'h', b'i']);
        let mut w = Walker::new(&whole, false, &mut registry, None);
        assert_eq!(w.changed_value_field(&t, 1), Some(&double[..]));
        w.finish().unwrap();
        assert!(w.r.is_empty());
        // Bitset {1, 4}: the value, then c alone.
        let mut parts = vec![1, 0x12];
        parts.extend_from_slice(&double);
        parts.extend_from_slice(&[2, b'h', b'i']);
        let mut w = Walker::new(&parts, false, &mut registry, None);
        assert_eq!(w.changed_value_field(&t, 1), Some(&double[..]));
        // Bitset {4}: no value in the message.
        let mut w = Walker::new(&[1, 0x10, 2, b'h', b'i'], false, &mut registry, None);
        assert_eq!(w.changed_value_field(&t, 1), None);
        w.finish().unwrap();
        // Cut short: no bytes, and an error.
        let mut w = Walker::new(&whole[..5], false, &mut registry, None);
        assert_eq!(w.changed_value_field(&t, 1), None);
        assert!(w.finish().is_err());
    }

    #[test]
    fn bitset_words_and_tail_bytes() {
        let mut registry = Registry::default();
        // 9 bytes: one LE word with bit 0 and bit 63, then a byte with bit 64+1
        let data = [9, 1, 0, 0, 0, 0, 0, 0, 0x80, 0x02];
        let mut w = Walker::new(&data, false, &mut registry, None);
        assert_eq!(w.bitset(1000), vec![0, 63, 65]);
        let mut w = Walker::new(&data, false, &mut registry, None);
        assert_eq!(w.bitset(64), vec![0, 63]);
    }

    #[test]
    fn truncated_bitset_is_an_error_not_a_panic() {
        let mut registry = Registry::default();
        let mut w = Walker::new(&[0x08], false, &mut registry, None);
        assert_eq!(w.bitset(10), Vec::<usize>::new());
        assert!(w.finish().is_err());
    }

    // Each cached type holds two references to the previous one: a few
    // bytes describing a tree of 2^k fields.
    #[test]
    fn doubling_cache_references_are_refused() {
        let mut desc = vec![0xFD, 1, 0, 0x80, 0, 1, 1, b'x', 0x22];
        for key in 2u8..24 {
            desc.extend_from_slice(&[
                0xFD,
                key,
                0,
                0x80,
                0,
                2,
                1,
                b'a',
                0xFE,
                key - 1,
                0,
                1,
                b'b',
                0xFE,
                key - 1,
                0,
            ]);
        }
        let mut registry = Registry::default();
        let mut out = BytesMut::new();
        let mut w = Walker::new(&desc, false, &mut registry, Some(&mut out));
        for _ in 0..23 {
            if w.field_desc().is_none() {
                break;
            }
        }
        assert!(w.finish().is_err(), "a type of 2^23 fields must be refused");
        assert!(
            out.len() < 1 << 20,
            "output stays small: {} bytes",
            out.len()
        );
    }

    #[test]
    fn runaway_nesting_is_refused() {
        let mut desc = Vec::new();
        for _ in 0..40 {
            desc.extend_from_slice(&[0x80, 0, 1, 1, b'n']);
        }
        desc.push(0x22);
        let mut registry = Registry::default();
        let mut w = Walker::new(&desc, false, &mut registry, None);
        w.field_desc();
        assert!(w.finish().is_err());
    }

    /// A pvRequest-style description that hides a definition of `define`
    /// in an (unselected) union member: `levels` nested structures around a
    /// reference to `refer`. Alternating the two keys nests each cached type
    /// `levels` deeper than the other, at no depth cost per message.
    fn hidden_nesting(define: u8, refer: u8, levels: usize) -> Vec<u8> {
        let mut desc = vec![0x81, 0, 1, 1, b'm', 0xFD, define, 0];
        for _ in 0..levels {
            desc.extend_from_slice(&[0x80, 0, 1, 1, b'n']);
        }
        desc.extend_from_slice(&[0xFE, refer, 0]);
        desc
    }

    fn read_one(registry: &mut Registry, desc: &[u8]) -> Result<(), WireError> {
        let mut w = Walker::new(desc, false, registry, None);
        w.field_desc();
        w.finish()
    }

    // The remote crash: each message passes the per-description depth
    // check, but the cached types nest 18 levels deeper each time, until
    // dropping one overflows the stack. Only the first fits now.
    #[test]
    fn alternating_cache_keys_cannot_nest_past_the_depth_limit() {
        let mut registry = Registry::default();
        read_one(&mut registry, &[0xFD, 2, 0, 0x22]).unwrap();
        let mut accepted = 0;
        for round in 0..10 {
            let (define, refer) = if round % 2 == 0 { (1, 2) } else { (2, 1) };
            match read_one(&mut registry, &hidden_nesting(define, refer, 18)) {
                Ok(()) => accepted += 1,
                Err(e) => {
                    assert_eq!(e, WireError::Limit("type nesting depth"));
                    break;
                }
            }
        }
        assert_eq!(accepted, 1, "a second round would nest 37 levels");
    }

    // The whole attack (3,600 messages, ~450 KB) never leaves a type
    // deeper than the limit in the cache, and costs little to refuse.
    #[test]
    fn full_alternating_attack_leaves_every_cached_type_within_the_depth_limit() {
        let mut registry = Registry::default();
        read_one(&mut registry, &[0xFD, 2, 0, 0x22]).unwrap();
        let mut refused = 0;
        for round in 0..3_600 {
            let (define, refer) = if round % 2 == 0 { (1, 2) } else { (2, 1) };
            if read_one(&mut registry, &hidden_nesting(define, refer, 18)).is_err() {
                refused += 1;
            }
            assert!(registry.entries.values().all(|t| t.depth <= MAX_DEPTH));
        }
        // Each refused definition keeps the key's old type, so every other
        // round (redefining key 1 around the int of key 2) still fits.
        assert_eq!(refused, 1_800);
    }

    // A reference placed `level` deep costs the depth of the type it names.
    #[test]
    fn a_reference_costs_the_depth_of_its_type() {
        let mut deep = vec![0xFD, 1, 0];
        for _ in 0..15 {
            deep.extend_from_slice(&[0x80, 0, 1, 1, b'n']);
        }
        deep.push(0x22);
        let mut registry = Registry::default();
        read_one(&mut registry, &deep).unwrap();
        let wrapped = |levels: usize| {
            let mut desc = Vec::new();
            for _ in 0..levels {
                desc.extend_from_slice(&[0x80, 0, 1, 1, b'w']);
            }
            desc.extend_from_slice(&[0xFE, 1, 0]);
            desc
        };
        assert!(read_one(&mut registry, &wrapped(5)).is_ok(), "20 levels");
        assert_eq!(
            read_one(&mut registry, &wrapped(6)),
            Err(WireError::Limit("type nesting depth")),
            "21 levels"
        );
    }

    /// Key 1 = {<200-byte name> int}; key k = {a: key k-1, b: key k-1}:
    /// 16 bytes per key, each doubling the plain form.
    fn doubling_long_names(key: u8) -> Vec<u8> {
        if key == 1 {
            let mut desc = vec![0xFD, 1, 0, 0x80, 0, 1, 200];
            desc.extend_from_slice(&[b'n'; 200]);
            desc.push(0x22);
            return desc;
        }
        vec![
            0xFD,
            key,
            0,
            0x80,
            0,
            2,
            1,
            b'a',
            0xFE,
            key - 1,
            0,
            1,
            b'b',
            0xFE,
            key - 1,
            0,
        ]
    }

    // Few fields (2^14 leaves, under the field limit) with long names: the
    // old limit counted fields, so 3 bytes referring to key 15 came out as
    // 3.3 MB. Each message, translated, stays within its growth limit.
    #[test]
    fn long_field_names_cannot_amplify_the_output() {
        let mut registry = Registry::default();
        let mut refused = Vec::new();
        let messages = (1..=15).map(doubling_long_names).chain([vec![0xFE, 15, 0]]);
        for desc in messages {
            let mut out = BytesMut::new();
            let mut w = Walker::new(&desc, false, &mut registry, Some(&mut out));
            w.field_desc();
            if let Err(e) = w.finish() {
                refused.push(e);
            }
            assert!(
                out.len() <= desc.len() * GROWTH_PER_BYTE + SERVER_ALLOWANCE,
                "{} bytes out of {}",
                out.len(),
                desc.len()
            );
        }
        assert_eq!(refused[0], WireError::Limit("the size of one type"));
    }

    /// Key 1: a structure of 1000 empty structures with 250-byte names
    /// (about 254 KB plain, 1001 fields); then a variant array whose
    /// `count` elements each refer to it (4 bytes each).
    fn references_in_a_variant_array(count: u8) -> (Vec<u8>, Vec<u8>) {
        let mut define = vec![0xFD, 1, 0, 0x80, 0, 0xFE];
        define.extend_from_slice(&1000u32.to_le_bytes());
        for _ in 0..1000 {
            define.push(250);
            define.extend_from_slice(&[b'f'; 250]);
            define.extend_from_slice(&[0x80, 0, 0]);
        }
        let mut value = vec![count];
        for _ in 0..count {
            value.extend_from_slice(&[1, 0xFE, 1, 0]);
        }
        (define, value)
    }

    // In passthrough nothing is written, but a reference still costs what
    // it expands to: the same message must not be fine one way and
    // refused the other.
    #[test]
    fn referenced_types_cost_work_in_passthrough_too() {
        let (define, value) = references_in_a_variant_array(20);
        let mut registry = Registry::default();
        read_one(&mut registry, &define).unwrap();
        let mut w = Walker::new(&[0x8A], false, &mut registry, None);
        let t = w.field_desc().unwrap();
        let mut w = Walker::new(&value, false, &mut registry, None);
        w.value(&t);
        assert_eq!(
            w.finish(),
            Err(WireError::Limit("the work one message may cost"))
        );
        // One reference fits.
        let (_, value) = references_in_a_variant_array(1);
        let mut w = Walker::new(&value, false, &mut registry, None);
        w.value(&t);
        assert!(w.finish().is_ok());
    }

    #[test]
    fn a_types_summary_matches_its_plain_form() {
        // {double a, {int b, any c} s, union{string x} u, struct[] {int y} l}
        let desc = [
            0x80, 1, b'T', 4, //
            1, b'a', 0x43, //
            1, b's', 0x80, 0, 2, 1, b'b', 0x22, 1, b'c', 0x82, //
            1, b'u', 0x81, 0, 1, 1, b'x', 0x60, //
            1, b'l', 0x88, 0x80, 0, 1, 1, b'y', 0x22,
        ];
        let mut registry = Registry::default();
        let mut w = Walker::new(&desc, false, &mut registry, None);
        let t = w.field_desc().unwrap();
        w.finish().unwrap();
        let mut plain = BytesMut::new();
        t.encode(false, &mut plain);
        assert_eq!(&plain[..], &desc[..]);
        assert_eq!(t.wire_len, desc.len());
        assert_eq!((t.depth, t.nodes, t.bits), (3, 10, 7));
        assert!(t.has_variant);
        // bits: 0 top, 1 a, 2 s, 3 b, 4 c, 5 u, 6 l
        let names = |bit| t.field_at_bit(bit).map(|f| f.bits);
        assert_eq!(names(2), Some(3));
        assert_eq!(t.field_at_bit(4).map(|f| f.has_variant), Some(true));
        assert_eq!(t.field_at_bit(6).map(|f| f.depth), Some(2));
        assert!(t.field_at_bit(7).is_none());
    }

    // A flat union of 65,519 ints (131 KB plain) is a type a server may
    // use; a 13-byte client request naming it would have cost 131 KB and
    // ~0.6 ms to re-emit.
    #[test]
    fn a_client_message_may_grow_less_than_a_servers() {
        let mut define = vec![0xFD, 1, 0, 0x81, 0, 0xFE];
        define.extend_from_slice(&65_519u32.to_le_bytes());
        for _ in 0..65_519 {
            define.extend_from_slice(&[0, 0x22]);
        }
        let refer = [0xFE, 1, 0];
        for from_client in [false, true] {
            let mut registry = Registry::default();
            read_one(&mut registry, &define).unwrap();
            let mut out = BytesMut::new();
            let mut w = Walker::new(&refer, false, &mut registry, Some(&mut out));
            if from_client {
                w = w.for_client_message();
            }
            w.field_desc();
            let result = w.finish();
            if from_client {
                assert_eq!(
                    result,
                    Err(WireError::Limit("the work one message may cost"))
                );
                assert!(out.is_empty());
            } else {
                assert_eq!((result, out.len()), (Ok(()), 131_045));
            }
        }
    }

    // Definitions do not add a nesting level, so one must hold a plain
    // type: a run of definitions would otherwise recurse once per 3 bytes.
    #[test]
    fn a_definition_must_hold_a_plain_type() {
        let mut desc = Vec::new();
        for _ in 0..100_000 {
            desc.extend_from_slice(&[0xFD, 1, 0]);
        }
        desc.push(0x22);
        let mut registry = Registry::default();
        assert!(read_one(&mut registry, &desc).is_err());
        assert!(read_one(&mut registry, &[0xFD, 1, 0, 0xFE, 1, 0]).is_err());
        assert!(read_one(&mut registry, &[0xFD, 1, 0, 0x22]).is_ok());
    }
}
