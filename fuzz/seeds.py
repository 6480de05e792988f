#!/usr/bin/env python3
"""Writes the seed corpus (corpus/<target>/seed-*) from the golden bytes of
the decoders' unit tests (src/ca/wire.rs, src/pva/wire.rs, src/pva/types.rs,
src/pva/translate.rs). Each target's first input byte is its mode byte (see
src/lib.rs). Run again after adding a golden case; the fuzzer adds its own
finds next to these."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# ---- CA (src/ca/wire.rs tests) ----
CREATE_CHAN = bytes([0x00, 0x12, 0x00, 0x08, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0x0D]) + b"TEST:AI\0"
RSRV_UDP_REPLY = bytes([
    0, 0, 0, 0, 0, 0, 0, 0x0D, 0, 0, 0, 0, 0, 0, 0, 0,
    0x00, 0x06, 0x00, 0x08, 0x13, 0xC8, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 3,
    0x00, 0x0D, 0, 0, 0, 0, 0, 0,
])
# libca's greeting: VERSION (priority 0, minor 13), CLIENT_NAME, HOST_NAME.
CA_GREETING = (bytes([0, 0, 0, 0, 0, 0, 0, 13, 0, 0, 0, 0, 0, 0, 0, 0])
               + bytes([0, 20, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]) + b"root\0\0\0\0"
               + bytes([0, 21, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]) + b"host\0\0\0\0")
# Extended header: payload marker 0xFFFF, count 0, then u32 size 16, count 2.
CA_EXTENDED = bytes([0, 1, 0xFF, 0xFF, 0, 6, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2,
                     0, 0, 0, 16, 0, 0, 0, 2]) + bytes(range(16))
# CA_PROTO_ERROR echoing a READ_NOTIFY (sid 9, ioid 4), then a message.
CA_ERROR = (bytes([0, 11, 0, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
            + bytes([0, 15, 0, 0, 0, 6, 0, 1, 0, 0, 0, 9, 0, 0, 0, 4]) + b"bad\0\0\0\0\0")

# ---- PVA (src/pva/wire.rs tests) ----
PVXS_TCP_SEARCH = bytes([
    0xCA, 2, 0x80, 3, 0, 0, 0, 41,
    0x66, 0x69, 0x6E, 0x64, 0x80, 0, 0, 0,
]) + bytes(16) + bytes([0, 0, 1, 3]) + b"tcp" + bytes([0, 1, 0x12, 0x34, 0x56, 0x78, 3]) + b"pv1"
SEGMENTS = (bytes([0xCA, 2, 0x50, 13, 3, 0, 0, 0, 1, 2, 3])
            + bytes([0xCA, 2, 0x41, 2, 0, 0, 0, 0])
            + bytes([0xCA, 2, 0x70, 13, 2, 0, 0, 0, 4, 5])
            + bytes([0xCA, 2, 0x60, 13, 1, 0, 0, 0, 6]))
SERVER_GREETING = (bytes([0xCA, 2, 0x41, 2, 0, 0, 0, 0])
                   + bytes([0xCA, 2, 0x40, 1, 22, 0, 0, 0]) + struct.pack("<IH", 16384, 32767)
                   + bytes([2, 9]) + b"anonymous" + bytes([2]) + b"ca")
SEARCH_RESPONSE = (bytes([0xCA, 2, 0x40, 4, 45, 0, 0, 0]) + b"nameshim\0\0\0\x01"
                   + struct.pack("<I", 7) + bytes(16) + bytes([0, 0, 3]) + b"tcp"
                   + bytes([1, 1, 0, 0x78, 0x56, 0x34, 0x12]))
UDP_SEARCH_RESPONSE = (bytes([0xCA, 2, 0x40, 4, 45, 0, 0, 0]) + b"pvxsguid\0\0\0\x02"
                       + struct.pack("<I", 7) + bytes(10) + bytes([0xFF, 0xFF, 127, 0, 0, 1])
                       + struct.pack("<H", 5075) + bytes([3]) + b"tcp"
                       + bytes([1, 1, 0, 0x78, 0x56, 0x34, 0x12]))
# Client CONNECTION_VALIDATION with pvAccessCPP's cached "ca" credentials.
CREDENTIALS = bytes([0xFD, 1, 0, 0x80, 0, 2, 4]) + b"user" + bytes([0x60, 4]) + b"host" + bytes([0x60, 4]) + b"root" + bytes([6]) + b"laptop"
CLIENT_VALIDATION_PAYLOAD = struct.pack("<IHH", 16384, 32767, 0) + bytes([2]) + b"ca" + CREDENTIALS
CLIENT_VALIDATION = bytes([0xCA, 2, 0x00, 1]) + struct.pack("<I", len(CLIENT_VALIDATION_PAYLOAD)) + CLIENT_VALIDATION_PAYLOAD

# ---- types (src/pva/types.rs tests) ----
STRUCT_ANY = bytes([0x80, 0, 1, 1]) + b"v" + bytes([0x82])
VARIANT_VALUE = bytes([0xFD, 7, 0, 0x80, 0, 1, 1]) + b"x" + bytes([0x43, 1, 2, 3, 4, 5, 6, 7, 8])
NESTED = bytes([0x80, 0, 2, 1]) + b"a" + bytes([0x43, 1]) + b"s" + bytes([0x80, 0, 2, 1]) + b"b" + bytes([0x22, 1]) + b"c" + bytes([0x60])
NESTED_VALUE = bytes([1, 2, 3, 4, 5, 6, 7, 8, 4, 0, 0, 0, 2]) + b"hi"
UNION = bytes([0x81, 0, 1, 1]) + b"a" + bytes([0x22]) + bytes([0, 9, 0, 0, 0])
# NTScalar double with an id, then a value.
NTSCALAR = (bytes([0x80, 21]) + b"epics:nt/NTScalar:1.0" + bytes([2, 5]) + b"value" + bytes([0x43, 5])
            + b"alarm" + bytes([0x80, 0, 1, 8]) + b"severity" + bytes([0x22])) + bytes(8) + bytes([1, 0, 0, 0])
ARRAYS = bytes([0x80, 0, 2, 1]) + b"d" + bytes([0x4B, 1]) + b"s" + bytes([0x68]) + bytes([2]) + bytes(16) + bytes([2, 1]) + b"a" + bytes([1]) + b"b"

# ---- translate (src/pva/translate.rs tests) ----
GET_INIT = bytes([1, 0, 0, 0, 5, 0, 0, 0, 0x08, 0xFD, 2, 0, 0x80, 0, 0, 0xFF, 0])
INIT_RESPONSE = bytes([5, 0, 0, 0, 0x08, 0xFF, 0xFD, 1, 0, 0x80, 0, 1, 1]) + b"v" + bytes([0x82])
GET_DATA = bytes([5, 0, 0, 0, 0, 0xFF, 1, 1, 0xFD, 3, 0, 0x22, 7, 0, 0, 0])
MONITOR_INIT = bytes([1, 0, 0, 0, 6, 0, 0, 0, 0x08, 0x80, 0, 0, 0xFF, 0])
MONITOR_INIT_RESPONSE = bytes([6, 0, 0, 0, 0x08, 0xFF]) + STRUCT_ANY
MONITOR_UPDATE = bytes([6, 0, 0, 0, 0, 1, 1, 0xFE, 3, 0, 5, 0, 0, 0, 0])
PUT_INIT_RESPONSE = bytes([7, 0, 0, 0, 0x08, 0xFF]) + STRUCT_ANY
PUT_DATA = bytes([1, 0, 0, 0, 7, 0, 0, 0, 0, 1, 2, 0x22, 9, 0, 0, 0])


def record(kind, command, payload, flags=0):
    return bytes([kind, command, flags]) + struct.pack("<H", len(payload)) + payload


TRANSLATE_PASSTHROUGH = (record(0, 10, GET_INIT) + record(1, 10, INIT_RESPONSE) + record(1, 10, GET_DATA))
TRANSLATE_ACTIVE = (record(4, 10, GET_INIT) + record(5, 10, INIT_RESPONSE) + record(5, 10, GET_DATA)
                    + record(6, 13, MONITOR_INIT) + record(7, 13, MONITOR_INIT_RESPONSE)
                    + record(7, 13, MONITOR_UPDATE) + record(0xFE, 0, bytes([1, 0, 0, 0])))
TRANSLATE_PUT = (record(4, 11, bytes([1, 0, 0, 0, 7, 0, 0, 0, 0x08, 0x80, 0, 0])) + record(5, 11, PUT_INIT_RESPONSE)
                 + record(4, 11, PUT_DATA) + record(0xFD, 0, CREDENTIALS) + record(0xFF, 0, b""))

SEEDS = {
    "ca_stream": [b"\x00" + CREATE_CHAN, b"\x03" + CA_GREETING, b"\x81" + CA_EXTENDED,
                  b"\x05" + CA_ERROR, b"\x07" + RSRV_UDP_REPLY],
    "ca_search": [RSRV_UDP_REPLY, RSRV_UDP_REPLY + RSRV_UDP_REPLY[16:]],
    "pva_stream": [b"\x00" + PVXS_TCP_SEARCH, b"\x01" + SEGMENTS, b"\x03" + SERVER_GREETING,
                   b"\x02" + CLIENT_VALIDATION, b"\x05" + SEARCH_RESPONSE],
    "pva_search": [UDP_SEARCH_RESPONSE, SEARCH_RESPONSE, PVXS_TCP_SEARCH],
    "pva_types": [b"\x00" + STRUCT_ANY + VARIANT_VALUE, b"\x00" + NESTED + NESTED_VALUE,
                  b"\x04" + NESTED + bytes([1, 0x12]) + NESTED_VALUE[:8] + NESTED_VALUE[12:],
                  b"\x00" + UNION, b"\x02" + CREDENTIALS, b"\x00" + NTSCALAR, b"\x00" + ARRAYS],
    "pva_translate": [TRANSLATE_PASSTHROUGH, TRANSLATE_ACTIVE, TRANSLATE_PUT],
}

for target, seeds in SEEDS.items():
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    for i, seed in enumerate(seeds):
        with open(os.path.join(folder, f"seed-{i}"), "wb") as f:
            f.write(seed)
