"""A faulty CA + PVA server for fault tests: it answers UDP searches for
its names like a real server, but its TCP side misbehaves.

  python fake_server.py --mode silent|refuse --ca NAME --pva NAME

- silent: a TCP listener that accepts every connection and never sends a
  byte (nor reads one), as a hung server would;
- refuse: the answers name a TCP port that is bound but not listening, so
  every connection attempt is refused (RST).

Search answers follow rsrv (`cast_server.c`: VERSION + SEARCH reply with the
TCP port in the data type and 0xFFFFFFFF as "the sender's address") and
pvxs (`server.cpp`: SEARCH_RESPONSE to the reply address in the payload).
Prints "Serving on port P" once ready; one line per accepted connection.
"""

import argparse
import select
import socket
import struct
import sys

CA_PORT = 5064
PVA_PORT = 5076


def udp_socket(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Shared with the real servers of the namespace, as softIocs share it.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    return s


def ca_answers(datagram: bytes, names: set, port: int) -> bytes:
    """rsrv's answer to a search datagram: VERSION, then one SEARCH reply
    per name it holds (nothing when it holds none)."""
    out = b""
    rest = datagram
    while len(rest) >= 16:
        cmd, size, dtype, count, p1, p2 = struct.unpack(">HHHHII", rest[:16])
        payload, rest = rest[16 : 16 + size], rest[16 + size :]
        if cmd == 6 and payload.split(b"\0")[0].decode(errors="replace") in names:
            out += struct.pack(">HHHHII", 6, 8, port, 0, 0xFFFFFFFF, p2) + struct.pack(">H6x", 13)
    if out:
        out = struct.pack(">HHHHII", 0, 0, 0, 13, 0, 0) + out
    return out


def pva_answer(datagram: bytes, names: set, port: int):
    """(reply address, SEARCH_RESPONSE) for a search holding our names."""
    if len(datagram) < 8 or datagram[0] != 0xCA or datagram[3] != 3:
        return None
    e = ">" if datagram[2] & 0x80 else "<"
    p = datagram[8:]
    try:
        seq = struct.unpack(e + "I", p[0:4])[0]
        addr = socket.inet_ntoa(p[20:24])
        reply_port = struct.unpack(e + "H", p[24:26])[0]
        i = 26
        nproto = p[i]
        i += 1
        for _ in range(nproto):
            i += 1 + p[i]
        count = struct.unpack(e + "H", p[i : i + 2])[0]
        i += 2
        ids = []
        for _ in range(count):
            sid = struct.unpack(e + "I", p[i : i + 4])[0]
            n = p[i + 4]
            name = p[i + 5 : i + 5 + n].decode(errors="replace")
            i += 5 + n
            if name in names:
                ids.append(sid)
    except (IndexError, struct.error):
        return None
    if not ids:
        return None
    body = b"fakeserver\0\1" + struct.pack("<I", seq)
    body += bytes(10) + b"\xff\xff" + socket.inet_aton("127.0.0.1") + struct.pack("<H", port)
    body += b"\x03tcp" + b"\x01" + struct.pack("<H", len(ids)) + b"".join(struct.pack("<I", i) for i in ids)
    return (addr, reply_port), b"\xca\x02\x40\x04" + struct.pack("<I", len(body)) + body


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["silent", "refuse"], required=True)
    ap.add_argument("--ca", action="append", default=[])
    ap.add_argument("--pva", action="append", default=[])
    args = ap.parse_args()

    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", 0))
    if args.mode == "silent":
        tcp.listen(64)
    port = tcp.getsockname()[1]
    ca, pva = udp_socket(CA_PORT), udp_socket(PVA_PORT)
    held = []
    print(f"Serving on port {port} ({args.mode})", flush=True)
    watched = [ca, pva] + ([tcp] if args.mode == "silent" else [])
    while True:
        ready, _, _ = select.select(watched, [], [])
        for s in ready:
            if s is tcp:
                conn, peer = tcp.accept()
                held.append(conn)  # held open, never read nor written
                print(f"accepted {peer[0]}:{peer[1]} (holding {len(held)})", flush=True)
            elif s is ca:
                data, src = ca.recvfrom(65536)
                answer = ca_answers(data, set(args.ca), port)
                if answer:
                    ca.sendto(answer, src)
            else:
                data, src = pva.recvfrom(65536)
                reply = pva_answer(data, set(args.pva), port)
                if reply:
                    dest, answer = reply
                    if dest[1] == 0 or dest[0] == "0.0.0.0":
                        dest = src
                    pva.sendto(answer, dest)


if __name__ == "__main__":
    sys.exit(main())
