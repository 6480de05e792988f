"""Hostile clients for the shim: plain sockets and golden CA/PVA bytes.

Each attack is a function that talks to the shim at ADDR and returns a JSON
report: when the shim closed the offending connection, how long a bystander
waited for its round trips meanwhile, and attack-specific figures. Attacks
run inside the network namespace of the shim (as a subprocess, see
`HostileRun`); the test process watches the shim (alive, RSS) from outside.

  hostile.py run ATTACK ADDR PARAMS_JSON
        run one attack (inside the namespace); the last stdout line is the
        JSON report. A line "ready" is printed first by attacks that run in
        the background (the forger) once they are in place.

  hostile.py demo --attack NAME --shim BIN [--mode sidecar|wrapper]
                  [--params JSON] [-- SHIM_ARGS...]
        build a simulated container with a softIoc and a shim (beside it,
        or wrapping it), run one attack and print the figures: what the
        end-to-end tests check, for any binary, e.g. today's. Needs root.

What the shim parses, and so what these bytes aim at: src/pva/wire.rs,
src/pva/types.rs, src/ca/wire.rs.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time

# --------------------------------------------------------------------------
# Channel Access bytes (big-endian; 16-byte header, 24 with the extension)

CA_VERSION, CA_SEARCH, CA_READ_NOTIFY, CA_CREATE_CHAN = 0, 6, 15, 18
CA_CLIENT_NAME, CA_HOST_NAME, CA_ECHO = 20, 21, 23
CA_MINOR = 13
CA_DONT_REPLY, CA_DO_REPLY = 5, 10
DBR_STRING = 0


def ca_msg(cmd, payload=b"", dtype=0, count=0, p1=0, p2=0) -> bytes:
    """One CA message, payload padded to 8 bytes; extended header when big."""
    payload = payload + b"\0" * (-len(payload) % 8)
    n = len(payload)
    if n >= 0xFFFF or count >= 0xFFFF:
        return struct.pack(">HHHHIIII", cmd, 0xFFFF, dtype, 0, p1, p2, n, count) + payload
    return struct.pack(">HHHHII", cmd, n, dtype, count, p1, p2) + payload


def ca_hello() -> bytes:
    """What libca sends first on a circuit: VERSION, CLIENT_NAME, HOST_NAME."""
    return (
        ca_msg(CA_VERSION, dtype=0, count=CA_MINOR)
        + ca_msg(CA_CLIENT_NAME, b"hostile\0")
        + ca_msg(CA_HOST_NAME, b"localhost\0")
    )


def ca_search(name: bytes, sid: int, reply=CA_DONT_REPLY, pad_to=0) -> bytes:
    body = name + b"\0"
    if pad_to > len(body):
        body += b"\0" * (pad_to - len(body))
    return ca_msg(CA_SEARCH, body, dtype=reply, count=CA_MINOR, p1=sid, p2=sid)


def ca_create_chan(cid: int, name: bytes) -> bytes:
    return ca_msg(CA_CREATE_CHAN, name + b"\0", p1=cid, p2=CA_MINOR)


# --------------------------------------------------------------------------
# PV Access bytes (this client says little-endian: flags without 0x80)

PVA_VALIDATION, PVA_ECHO, PVA_SEARCH, PVA_SEARCH_RESPONSE = 1, 2, 3, 4
PVA_CREATE_CHANNEL, PVA_DESTROY_CHANNEL, PVA_VALIDATED, PVA_GET = 7, 8, 9, 10
INIT = 0x08
DEFINE, REFER = 0xFD, 0xFE
STRUCT, UNION = 0x80, 0x81
INT32, STRING = 0x22, 0x60


def pva_msg(cmd, payload=b"", flags=0) -> bytes:
    return struct.pack("<BBBBI", 0xCA, 2, flags, cmd, len(payload)) + payload


def psize(n: int) -> bytes:
    return bytes([n]) if n < 254 else b"\xfe" + struct.pack("<I", n)


def pstr(s: bytes) -> bytes:
    return psize(len(s)) + s


def u16(n):
    return struct.pack("<H", n)


def u32(n):
    return struct.pack("<I", n)


def client_validation(method=b"anonymous", credentials=b"\xff") -> bytes:
    """CONNECTION_VALIDATION from a client: buffer size, registry size, QoS,
    the chosen method, then the credentials as a typed value (0xFF: none)."""
    return pva_msg(PVA_VALIDATION, u32(0x10000) + u16(0x7FFF) + u16(0) + pstr(method) + credentials)


def pva_search(names, sequence=1, flags=0x81) -> bytes:
    """SEARCH as pvxs sends it over TCP: zero address and port, "tcp"."""
    body = u32(sequence) + bytes([flags, 0, 0, 0]) + b"\0" * 16 + u16(0) + psize(1) + pstr(b"tcp")
    body += u16(len(names))
    for sid, name in names:
        body += u32(sid) + pstr(name)
    return pva_msg(PVA_SEARCH, body)


def pva_create(channels, pad_to=0) -> bytes:
    body = u16(len(channels)) + b"".join(u32(cid) + pstr(name) for cid, name in channels)
    return pva_msg(PVA_CREATE_CHANNEL, body + b"\0" * max(0, pad_to - len(body)))


def get_init(sid: int, ioid: int, request: bytes) -> bytes:
    """GET with the INIT subcommand: sid, ioid, 0x08, pvRequest (type + value)."""
    return pva_msg(PVA_GET, u32(sid) + u32(ioid) + bytes([INIT]) + request)


# --------------------------------------------------------------------------
# Connections


class Closed(Exception):
    pass


class Conn:
    """A TCP connection with a receive buffer; `bind` picks the source address."""

    def __init__(self, addr: str, bind: str | None = None, timeout=5.0):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.socket()
        if bind:
            self.sock.bind((bind, 0))
        self.sock.settimeout(timeout)
        self.sock.connect((host, int(port)))
        self.buf = b""

    def send(self, data: bytes) -> bool:
        """Send all; False when the peer closed the connection meanwhile."""
        try:
            self.sock.settimeout(30)
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError):
            return False

    def _fill(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                raise Closed("reset") from None
            if not chunk:
                raise Closed("eof")
            self.buf += chunk

    def take(self, n: int, deadline: float) -> bytes:
        self._fill(n, deadline)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def wait_closed(self, timeout: float) -> float | None:
        """Seconds until the peer closed the connection (reading and dropping
        whatever comes), or None if it was still open after timeout."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        self.buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(1 << 20):
                    return round(time.monotonic() - t0, 3)
            except socket.timeout:
                return None
            except (ConnectionResetError, OSError):
                return round(time.monotonic() - t0, 3)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class CaConn(Conn):
    def recv(self, timeout=5.0):
        """(command, data type, count, p1, p2, payload) of the next message."""
        deadline = time.monotonic() + timeout
        cmd, size, dtype, count, p1, p2 = struct.unpack(">HHHHII", self.take(16, deadline))
        if size == 0xFFFF:
            size, count = struct.unpack(">II", self.take(8, deadline))
        return cmd, dtype, count, p1, p2, self.take(size, deadline)

    def expect(self, cmd, timeout=5.0, pred=lambda m: True):
        deadline = time.monotonic() + timeout
        while True:
            m = self.recv(max(deadline - time.monotonic(), 0.001))
            if m[0] == cmd and pred(m):
                return m

    def hello(self, timeout=5.0):
        """VERSION, CLIENT_NAME, HOST_NAME; waits for the shim's VERSION."""
        self.send(ca_hello())
        return self.expect(CA_VERSION, timeout)

    def echo(self, timeout=5.0) -> float:
        t0 = time.monotonic()
        self.send(ca_msg(CA_ECHO))
        self.expect(CA_ECHO, timeout)
        return time.monotonic() - t0

    def create(self, cid: int, name: bytes, timeout=10.0) -> int:
        """CREATE_CHAN through the shim; the sid it gives."""
        self.send(ca_create_chan(cid, name))
        return self.expect(CA_CREATE_CHAN, timeout, lambda m: m[3] == cid)[4]


class PvaConn(Conn):
    def recv(self, timeout=5.0):
        """(command, flags, payload) of the next message (control: empty)."""
        deadline = time.monotonic() + timeout
        magic, _version, flags, cmd, size = struct.unpack("<BBBBI", self.take(8, deadline))
        if magic != 0xCA:
            raise Closed(f"not PVA: {magic:#x}")
        if flags & 0x80:
            size = struct.unpack(">I", struct.pack("<I", size))[0]
        if flags & 0x01:
            return cmd, flags, b""
        return cmd, flags, self.take(size, deadline)

    def expect(self, cmd, timeout=5.0, pred=lambda m: True):
        deadline = time.monotonic() + timeout
        while True:
            m = self.recv(max(deadline - time.monotonic(), 0.001))
            if not m[1] & 0x01 and m[0] == cmd and pred(m):
                return m

    def greeting(self, timeout=5.0):
        """The server's SET_BYTE_ORDER and CONNECTION_VALIDATION."""
        return self.expect(PVA_VALIDATION, timeout)

    def validate(self, timeout=5.0, validation=None):
        self.greeting(timeout)
        self.send(validation or client_validation())
        return self.expect(PVA_VALIDATED, timeout)

    def echo(self, timeout=5.0) -> float:
        t0 = time.monotonic()
        self.send(pva_msg(PVA_ECHO, b"bystander"))
        self.expect(PVA_ECHO, timeout)
        return time.monotonic() - t0

    def create(self, cid: int, name: bytes, timeout=10.0) -> int:
        """CREATE_CHANNEL through the shim; the sid it gives (status OK)."""
        self.send(pva_create([(cid, name)]))
        _, flags, payload = self.expect(PVA_CREATE_CHANNEL, timeout, lambda m: m[2][:4] == u32(cid))
        _cid, sid = struct.unpack("<II" if not flags & 0x80 else ">II", payload[:8])
        if payload[8:9] != b"\xff":
            raise RuntimeError(f"channel {name!r} not created: {payload.hex()}")
        return sid


def ca_client(addr, bind=None) -> CaConn:
    c = CaConn(addr, bind)
    c.hello()
    return c


def pva_client(addr, bind=None) -> PvaConn:
    c = PvaConn(addr, bind)
    c.validate()
    return c


# --------------------------------------------------------------------------
# The bystander: round trips on an open, working connection


class Bystander(threading.Thread):
    """ECHO round trips every 20 ms on a connection opened before the attack;
    records the longest wait (a round trip still pending at the end counts
    with the time waited so far)."""

    def __init__(self, kind: str, addr: str, bind=None):
        super().__init__(daemon=True)
        self.conn = ca_client(addr, bind) if kind == "ca" else pva_client(addr, bind)
        self.kind = kind
        self.stop = threading.Event()
        self.samples: list[float] = []
        self.pending_since = None
        self.error = None

    def run(self):
        while not self.stop.is_set():
            self.pending_since = time.monotonic()
            try:
                self.samples.append(self.conn.echo(timeout=30))
            except Exception as e:  # the shim died or closed us
                self.error = f"{type(e).__name__}: {e}"
                return
            self.pending_since = None
            time.sleep(0.02)

    def report(self) -> dict:
        self.stop.set()
        pending = self.pending_since
        self.join(0.2)
        stuck = time.monotonic() - pending if (pending and self.is_alive()) else 0.0
        worst = max(self.samples + [stuck]) if (self.samples or stuck) else None
        return {
            "kind": self.kind,
            "round_trips": len(self.samples),
            "max_s": round(worst, 3) if worst is not None else None,
            "error": self.error,
        }


def with_bystander(kind, addr, window, attack) -> dict:
    """Runs attack() while a bystander does round trips for `window` s."""
    by = Bystander(kind, addr)
    by.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    report = attack() or {}
    time.sleep(max(0.0, t0 + window - time.monotonic()))
    report["bystander"] = by.report()
    report["attack_started"] = t0
    return report


# --------------------------------------------------------------------------
# The attacks


def deep_chain_requests(sid: int, n: int) -> list[bytes]:
    """n GET INITs redefining keys 1 and 2 alternately, each 18 levels deeper
    than the other: struct{u: union{s: int32, d: 16 nested structures ending
    in a reference to the other key}}. The value selects s, so nothing walks
    d; each definition stays within the per-message depth limit (20)."""
    out = []
    for i in range(n):
        key, other = (1, 2) if i % 2 == 0 else (2, 1)
        inner = bytes([REFER]) + u16(other) if i > 0 else bytes([INT32])
        chain = inner
        for _ in range(16):
            chain = bytes([STRUCT]) + pstr(b"") + psize(1) + pstr(b"n") + chain
        union = bytes([UNION]) + pstr(b"") + psize(2) + pstr(b"s") + bytes([INT32]) + pstr(b"d") + chain
        desc = bytes([DEFINE]) + u16(key) + bytes([STRUCT]) + pstr(b"") + psize(1) + pstr(b"u") + union
        value = psize(0) + u32(7)
        out.append(get_init(sid, i + 1, desc + value))
    return out


def attack_type_chain(addr, sid="unknown", pv="", n=4000, window=3.0):
    c = pva_client(addr)
    channel = c.create(1, pv.encode()) if sid == "real" else 0x7FFF0001
    burst = b"".join(deep_chain_requests(channel, n))

    def attack():
        sent = c.send(burst)
        return {"burst_bytes": len(burst), "sent_all": sent, "closed_after": c.wait_closed(window + 5)}

    return with_bystander("pva", addr, window, attack)


def amplifying_credentials(name_len: int, levels=13) -> bytes:
    """A credentials value whose type defines key 0 = struct{<long name>: int32}
    and key k = struct{a: key k-1, b: key k-1}, all as members of a union
    whose selected member is a plain string: the bytes stay small, the type
    written out in full holds 2^(levels+1) copies of the long name."""
    desc = bytes([UNION]) + pstr(b"") + psize(levels + 2) + pstr(b"u") + bytes([STRING])
    desc += pstr(b"h0") + bytes([DEFINE]) + u16(0) + bytes([STRUCT]) + pstr(b"") + psize(1)
    desc += pstr(b"L" * name_len) + bytes([INT32])
    for k in range(1, levels + 1):
        desc += pstr(b"h%d" % k) + bytes([DEFINE]) + u16(k) + bytes([STRUCT]) + pstr(b"") + psize(2)
        desc += pstr(b"a") + bytes([REFER]) + u16(k - 1) + pstr(b"b") + bytes([REFER]) + u16(k - 1)
    return desc + psize(0) + pstr(b"x")


def attack_credentials(addr, conns=3, name_len=2000, hold=3.0, window=3.0):
    validation = client_validation(b"ca", amplifying_credentials(name_len))

    def attack():
        held, outcomes = [], []
        for _ in range(conns):
            c = PvaConn(addr)
            c.greeting()
            c.send(validation)
            try:
                c.expect(PVA_VALIDATED, 10)
                outcomes.append("validated")
            except Closed:
                outcomes.append("closed")
            except socket.timeout:
                outcomes.append("no answer")
            held.append(c)
        t_held = time.monotonic()
        time.sleep(hold)
        closed = [c.wait_closed(0.05) is not None or o == "closed" for c, o in zip(held, outcomes)]
        for c in held:
            c.close()
        return {"message_bytes": len(validation), "outcomes": outcomes, "closed": closed, "held_from": t_held}

    return with_bystander("pva", addr, window, attack)


def attack_cpu(addr, sid="unknown", pv="", n=4000, window=3.0):
    """Key 9 = struct of 250 members, each key 8 = struct of 250 empty
    structures (62,751 nodes, no value bytes); then n 20-byte GET INITs that
    only refer to key 9."""
    c = pva_client(addr)
    channel = c.create(1, pv.encode()) if sid == "real" else 0x7FFF0001
    empty = bytes([STRUCT]) + pstr(b"") + psize(0)
    k8 = bytes([DEFINE]) + u16(8) + bytes([STRUCT]) + pstr(b"") + psize(250) + (pstr(b"") + empty) * 250
    members = pstr(b"") + k8 + (pstr(b"") + bytes([REFER]) + u16(8)) * 249
    k9 = bytes([DEFINE]) + u16(9) + bytes([STRUCT]) + pstr(b"") + psize(250) + members
    define = get_init(channel, 1, k9)
    tiny = b"".join(get_init(channel, 2 + i, bytes([REFER]) + u16(9)) for i in range(n))
    c.send(define)
    time.sleep(0.3)

    def attack():
        sent = c.send(tiny)
        return {"define_bytes": len(define), "burst_bytes": len(tiny), "sent_all": sent,
                "closed_after": c.wait_closed(window)}

    return with_bystander("pva", addr, window, attack)


def attack_waiters(addr, proto="ca", conns=1, window=3.0):
    """One name, many channels: 60,000 CA CREATE_CHAN in one burst, or one
    PVA CREATE_CHANNEL carrying 65,535 channels, on each of conns
    connections at once."""
    if proto == "ca":
        flooders = [ca_client(addr) for _ in range(conns)]
        burst = b"".join(ca_create_chan(cid, b"NX:WAIT") for cid in range(1, 60001))
    else:
        flooders = [pva_client(addr) for _ in range(conns)]
        burst = pva_create([(cid, b"NX:WAIT") for cid in range(1, 65536)])

    def attack():
        senders = [threading.Thread(target=c.send, args=(burst,)) for c in flooders]
        for s in senders:
            s.start()
        for s in senders:
            s.join()
        return {"burst_bytes": len(burst), "conns": conns, "closed_after": flooders[0].wait_closed(window)}

    return with_bystander(proto, addr, window, attack)


def attack_pinned(addr, proto="ca", conns=24, size=4 << 20, hold=4.0, window=2.0):
    """conns connections each send one ~4 MiB message naming an unknown
    channel (a padded CA SEARCH, or a padded PVA CREATE_CHANNEL), then idle."""

    def attack():
        held = []
        for i in range(conns):
            name = b"NX:PIN%03d" % i
            if proto == "ca":
                c = ca_client(addr)
                c.send(ca_search(name, i + 1, pad_to=size))
            else:
                c = pva_client(addr)
                c.send(pva_create([(i + 1, name)], pad_to=size))
            held.append(c)
        t_sent = time.monotonic()
        time.sleep(hold)
        closed = [c.wait_closed(0.05) is not None for c in held]
        for c in held:
            c.close()
        return {"sent_at": t_sent, "closed": closed, "message_bytes": size}

    return with_bystander(proto, addr, window, attack)


def attack_big_echo(addr, size=64 << 20, window=3.0):
    """One PVA ECHO of 64 MiB, not read back for a while."""

    def attack():
        c = pva_client(addr)
        t0 = time.monotonic()
        sent = c.send(struct.pack("<BBBBI", 0xCA, 2, 0, PVA_ECHO, size))
        chunk = b"E" * (1 << 20)
        for _ in range(size >> 20):
            if not sent:
                break
            sent = c.send(chunk)
        t_sent = time.monotonic() - t0
        time.sleep(1.0)
        echoed, closed = 0, None
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            c.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                got = c.sock.recv(1 << 20)
            except socket.timeout:
                break
            except OSError:
                got = b""
            if not got:
                closed = round(time.monotonic() - t0, 3)
                break
            echoed += len(got)
        return {"sent_all": sent, "send_s": round(t_sent, 3), "echoed_bytes": echoed, "closed_after": closed}

    return with_bystander("pva", addr, window, attack)


def attack_holders(addr, n=8, first="00", bind=None, by_bind=None, wait=8.0):
    """n connections send `first` (hex) and then nothing; a bystander (from
    by_bind) then connects and says hello: when is it served, and when are
    the holders closed?"""
    holders = []
    for _ in range(n):
        c = Conn(addr, bind)
        c.send(bytes.fromhex(first))
        holders.append(c)
    t0 = time.monotonic()
    time.sleep(0.3)  # past the classification window: the slots are taken
    served = {}

    def bystander():
        try:
            c = CaConn(addr, by_bind, timeout=wait)
            c.send(ca_hello())
            c.expect(CA_VERSION, wait)
            c.echo(timeout=wait)
            served["after"] = round(time.monotonic() - t0, 3)
            served["conn"] = c
        except Exception as e:
            served["error"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=bystander, daemon=True)
    t.start()
    closed = [None] * n
    socks = {c.sock.fileno(): i for i, c in enumerate(holders)}
    deadline = t0 + wait
    while socks and time.monotonic() < deadline:
        ready, _, _ = select.select(list(socks), [], [], max(0.0, deadline - time.monotonic()))
        for fd in ready:
            i = socks[fd]
            try:
                data = holders[i].sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                closed[i] = round(time.monotonic() - t0, 3)
                del socks[fd]
    t.join(max(0.0, deadline - time.monotonic()))
    for c in holders:
        c.close()
    return {"holders_closed_after": closed, "bystander_served_after": served.get("after"),
            "bystander_error": served.get("error")}


def attack_stall(addr, wait=6.0):
    """A CA client that announces a 1000-byte message and sends 10 bytes of it."""
    c = ca_client(addr)
    c.send(struct.pack(">HHHHII", CA_SEARCH, 1000, CA_DONT_REPLY, CA_MINOR, 1, 1) + b"NX:STALL\0\0")
    return {"closed_after": c.wait_closed(wait)}


def attack_idle(addr, proto="ca", wait=6.0):
    """A client that completes its hello and then says nothing."""
    c = ca_client(addr) if proto == "ca" else pva_client(addr)
    return {"closed_after": c.wait_closed(wait)}


def attack_relay_fill(addr, pv="", clients=5, names=2000, by_bind="127.0.0.2", wait=8.0):
    """clients x names distinct unknown names by CA TCP SEARCH, then another
    client (from by_bind) searches for a real PV."""
    fillers = []
    for c_i in range(clients):
        c = ca_client(addr)
        c.send(b"".join(ca_search(b"NX:FILL:%d:%d" % (c_i, i), i + 1) for i in range(names)))
        fillers.append(c)
    time.sleep(0.5)
    c = ca_client(addr, by_bind)
    t0 = time.monotonic()
    c.send(ca_msg(CA_VERSION, dtype=1, count=CA_MINOR, p1=1) + ca_search(pv.encode(), 4242, CA_DO_REPLY))
    try:
        c.expect(CA_SEARCH, wait, lambda m: m[4] == 4242)
        found = round(time.monotonic() - t0, 3)
    except (socket.timeout, Closed):
        found = None
    for f in fillers:
        f.close()
    return {"found_after": found}


def attack_forge(addr, search_port=0, ids=300, duration=20.0):
    """Answers CA searches for ids 1..ids to the shim's search socket from a
    random port, naming a decoy TCP port; counts connections to the decoy.
    Prints "ready", then forges until stdin closes (or duration)."""
    decoy = socket.socket()
    decoy.bind(("127.0.0.1", 0))
    decoy.listen(64)
    decoy.setblocking(False)
    decoy_port = decoy.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    grams = []
    for start in range(1, ids + 1, 50):
        g = struct.pack(">HHHHII", CA_VERSION, 0, 0, CA_MINOR, 0, 0)
        for i in range(start, min(start + 50, ids + 1)):
            g += struct.pack(">HHHHII", CA_SEARCH, 8, decoy_port, 0, 0xFFFFFFFF, i) + bytes([0, CA_MINOR]) + b"\0" * 6
        grams.append(g)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    sent, accepted = 0, 0
    deadline = time.monotonic() + duration
    while not stop.is_set() and time.monotonic() < deadline:
        for g in grams:
            udp.sendto(g, ("127.0.0.1", search_port))
            sent += 1
        try:
            while True:
                s, _ = decoy.accept()
                accepted += 1
                s.close()
        except BlockingIOError:
            pass
        time.sleep(0.0005)
    return {"datagrams": sent, "decoy_port": decoy_port, "decoy_connections": accepted, "from_port": udp.getsockname()[1]}


def attack_ca_framing(addr, variant="echo", pv="", wait=3.0):
    """A header with payload size 0xFFFF and count 1 is extended in libca
    (tcpiiu.cpp) and rsrv (camessage.c, minor >= 9): 8 more header bytes give
    the real size and count. Sends one such message (size 8 or 0), then a
    plain one, and waits for the plain one's answer."""
    c = ca_client(addr)
    if variant == "echo":
        odd = struct.pack(">HHHHIIII", CA_ECHO, 0xFFFF, 0, 1, 0, 0, 8, 0) + b"\0" * 8
        plain = ca_msg(CA_ECHO)
        want = (CA_ECHO, lambda m: True)
    else:
        sid = c.create(1, pv.encode())
        odd = struct.pack(">HHHHIIII", CA_READ_NOTIFY, 0xFFFF, DBR_STRING, 1, sid, 1, 0, 1)
        plain = ca_msg(CA_READ_NOTIFY, dtype=DBR_STRING, count=1, p1=sid, p2=2)
        want = (CA_READ_NOTIFY, lambda m: m[4] == 2)
    t0 = time.monotonic()
    c.send(odd + plain)
    try:
        m = c.expect(want[0], wait, want[1])
        return {"answered_after": round(time.monotonic() - t0, 3), "answer_payload": m[5][:40].hex(), "closed_after": None}
    except socket.timeout:
        return {"answered_after": None, "closed_after": c.wait_closed(0.1)}
    except Closed:
        return {"answered_after": None, "closed_after": round(time.monotonic() - t0, 3)}


def attack_destroy(addr, pv="", wait=3.0):
    """CREATE_CHANNEL then DESTROY_CHANNEL (sid, cid): is the server's
    confirmation passed on?"""
    c = pva_client(addr)
    sid = c.create(5, pv.encode())
    t0 = time.monotonic()
    c.send(pva_msg(PVA_DESTROY_CHANNEL, u32(sid) + u32(5)))
    try:
        _, flags, payload = c.expect(PVA_DESTROY_CHANNEL, wait)
        got = struct.unpack(">II" if flags & 0x80 else "<II", payload[:8])
        return {"sid": sid, "confirmed_after": round(time.monotonic() - t0, 3), "confirmed": list(got)}
    except (socket.timeout, Closed) as e:
        return {"sid": sid, "confirmed_after": None, "error": type(e).__name__}


def attack_must_reply(addr, wait=3.0):
    """A must-reply SEARCH (flags 0x81) for an unknown name over TCP."""
    c = pva_client(addr)
    t0 = time.monotonic()
    c.send(pva_search([(99, b"NX:NOSUCH")], sequence=7))
    try:
        _, flags, payload = c.expect(PVA_SEARCH_RESPONSE, wait)
        elapsed = round(time.monotonic() - t0, 3)
        # guid 12, seq 4, addr 16, port 2, "tcp" 4, found 1, count 2, ids
        found = payload[38]
        count = struct.unpack("<H" if not flags & 0x80 else ">H", payload[39:41])[0]
        ids = [struct.unpack("<I" if not flags & 0x80 else ">I", payload[41 + 4 * i:45 + 4 * i])[0] for i in range(count)]
        return {"answered_after": elapsed, "found": found, "ids": ids}
    except (socket.timeout, Closed) as e:
        return {"answered_after": None, "error": type(e).__name__}


ATTACKS = {
    "type-chain": attack_type_chain,
    "credentials": attack_credentials,
    "cpu": attack_cpu,
    "waiters": attack_waiters,
    "holders": attack_holders,
    "stall": attack_stall,
    "idle": attack_idle,
    "pinned": attack_pinned,
    "relay-fill": attack_relay_fill,
    "big-echo": attack_big_echo,
    "forge": attack_forge,
    "ca-framing": attack_ca_framing,
    "destroy": attack_destroy,
    "must-reply": attack_must_reply,
}

# The attacks by the numbers of test_hostile.py's sections, for `demo --attack N`.
NUMBERED = {
    "1": "type-chain", "2": "credentials", "3": "cpu", "4": "waiters", "5": "holders",
    "6": "pinned", "7": "relay-fill", "8": "big-echo", "9": "forge", "10": "ca-framing",
    "11": "destroy", "12": "must-reply",
}


# --------------------------------------------------------------------------
# From outside the namespace: run an attack, watch the shim


def read_status(pid: int) -> dict:
    """VmRSS and VmHWM of pid in KiB ({} once it is gone)."""
    try:
        text = open(f"/proc/{pid}/status").read()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return {k: int(v) for k, v in re.findall(r"(VmRSS|VmHWM):\s+(\d+) kB", text)}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of pid so far."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssWatch(threading.Thread):
    """Samples a process's RSS every 20 ms: (monotonic time, KiB)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.baseline = read_status(pid).get("VmRSS", 0)
        self.cpu0 = cpu_seconds(pid)
        self.samples: list[tuple[float, int]] = []
        self.halt = threading.Event()
        self.start()

    def run(self):
        while not self.halt.is_set():
            rss = read_status(self.pid).get("VmRSS")
            if rss is None:
                return
            self.samples.append((time.monotonic(), rss))
            time.sleep(0.02)

    def stop(self) -> "RssWatch":
        self.halt.set()
        self.join(1)
        self.hwm = read_status(self.pid).get("VmHWM")
        cpu = cpu_seconds(self.pid)
        self.cpu_s = round(cpu - self.cpu0, 2) if cpu is not None and self.cpu0 is not None else None
        return self

    def peak(self, since=0.0) -> int:
        return max([kib for t, kib in self.samples if t >= since] or [self.baseline])

    def growth_mib(self, since=0.0) -> float:
        return round((self.peak(since) - self.baseline) / 1024, 1)

    def figures(self) -> str:
        return f"RSS baseline {self.baseline} KiB, peak {self.peak()} KiB (+{self.growth_mib()} MiB), VmHWM {self.hwm} KiB"


class HostileRun:
    """One attack in a subprocess inside ns (`ip netns exec`)."""

    def __init__(self, ns, attack: str, addr: str, params: dict | None = None, timeout=120.0):
        import harness as h

        argv = ns.exec_argv([h.PYTHON, os.path.abspath(__file__), "run", attack, addr, json.dumps(params or {})])
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,  # the forger runs until it closes
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=h.clean_env(),
            start_new_session=True,
        )
        ns.procs.append(self.proc)
        self.timeout = timeout
        self.attack = attack

    def wait_ready(self, timeout=10.0) -> None:
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{self.attack}: not ready: {line!r} {self.proc.stderr.read()[-2000:]}")

    def result(self) -> dict:
        if self.proc.stdin and self.proc.stdin.closed:
            self.proc.stdin = None
        try:
            out, err = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if self.proc.returncode != 0 or not lines:
            return {"crashed_client": True, "stderr": err[-3000:], "returncode": self.proc.returncode}
        return json.loads(lines[-1])


def run_attack(target, attack: str, params: dict | None = None, timeout=120.0) -> dict:
    """Runs an attack on a target (see test_hostile's Sidecar and Wrapped),
    watching the shim's RSS; the report gains "rss" and "shim_alive"."""
    pid = target.pid()
    watch = RssWatch(pid)
    report = HostileRun(target.ns, attack, target.addr, params, timeout).result()
    time.sleep(0.2)
    watch.stop()
    report["rss"] = {
        "baseline_kib": watch.baseline,
        "peak_kib": watch.peak(),
        "growth_mib": watch.growth_mib(),
        "hwm_kib": watch.hwm,
        "figures": watch.figures(),
    }
    report["shim_cpu_s"] = watch.cpu_s
    report["_watch"] = watch
    report["shim_alive"] = target.alive()
    return report


def main(argv):
    if argv[:1] == ["run"]:
        attack, addr, params = argv[1], argv[2], json.loads(argv[3])
        print(json.dumps(ATTACKS[attack](addr, **params)), flush=True)
        os._exit(0)
    if argv[:1] == ["demo"]:
        import argparse

        p = argparse.ArgumentParser(prog="hostile.py demo")
        p.add_argument("--attack", required=True, help="number (1-12) or name: " + ", ".join(ATTACKS))
        p.add_argument("--shim", required=True, help="the nameshim binary")
        p.add_argument("--mode", choices=["sidecar", "wrapper"], default="sidecar")
        p.add_argument("--params", default="{}", help="attack parameters (JSON)")
        p.add_argument("shim_args", nargs="*", help="extra shim options (after --)")
        a = p.parse_args(argv[1:])
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import tempfile

        import test_hostile as t

        name = NUMBERED.get(a.attack, a.attack)
        with tempfile.TemporaryDirectory() as work:
            with t.open_target(a.mode, a.shim, a.shim_args, work) as target:
                params = t.default_params(name, target)
                params.update(json.loads(a.params))
                if name == "forge":
                    report = t.forge_and_get(target, params)
                else:
                    report = run_attack(target, name, params)
                report.pop("_watch", None)
                report["ioc_serving"] = t.ioc_serving(target)
                report["shim_exit"] = target.exit_code()
                print(json.dumps(report, indent=1))
                print("---- shim log tail ----")
                print(target.log_text(25))
        return
    print(__doc__)
    sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
