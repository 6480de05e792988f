"""A CA client, written from the protocol by hand, that subscribes to a large
array and then stops reading its socket for a while.

  slow_ca_client.py HOST PORT PV COUNT STALL_SECONDS

libca cannot be told to stop reading, so this client speaks the wire protocol
itself (epics-base caProto.h). It prints one JSON line when subscribed, stalls,
then reads again and prints a JSON line with what it received.
"""

import json
import socket
import struct
import sys
import time

VERSION, EVENT_ADD, SEARCH, CREATE_CHAN, CLIENT_NAME, HOST_NAME = 0, 1, 6, 18, 20, 21
DBR_DOUBLE, DONT_REPLY, MINOR = 6, 5, 13
DBE_VALUE_ALARM = 5


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 8)


def message(cmd, payload=b"", dtype=0, count=0, p1=0, p2=0) -> bytes:
    payload = pad(payload)
    if len(payload) >= 0xFFFF or count >= 0xFFFF:
        return struct.pack(">HHHHIIII", cmd, 0xFFFF, dtype, 0, p1, p2, len(payload), count) + payload
    return struct.pack(">HHHHII", cmd, len(payload), dtype, count, p1, p2) + payload


class Reader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def take(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def message(self):
        cmd, size, dtype, count, p1, p2 = struct.unpack(">HHHHII", self.take(16))
        if size == 0xFFFF and count == 0:
            size, count = struct.unpack(">II", self.take(8))
        return cmd, dtype, count, p1, p2, self.take(size)

    def until(self, cmd):
        while True:
            m = self.message()
            if m[0] == cmd:
                return m


def main():
    host, port, pv, count, stall = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), int(sys.argv[4]), float(sys.argv[5])
    sock = socket.create_connection((host, port), timeout=10)
    # A small receive buffer, so the stall is felt quickly upstream.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    reader = Reader(sock)
    sock.sendall(
        message(VERSION, dtype=0, count=MINOR)
        + message(CLIENT_NAME, b"slowclient\0")
        + message(HOST_NAME, b"slowhost\0")
    )
    reader.until(VERSION)
    sock.sendall(message(VERSION, count=MINOR) + message(SEARCH, pv + b"\0", DONT_REPLY, MINOR, 1, 1))
    reader.until(SEARCH)
    sock.sendall(message(CREATE_CHAN, pv + b"\0", p1=1, p2=MINOR))
    sid = reader.until(CREATE_CHAN)[4]
    subscription = struct.pack(">fffHxx", 0.0, 0.0, 0.0, DBE_VALUE_ALARM)
    sock.sendall(message(EVENT_ADD, subscription, DBR_DOUBLE, count, sid, 7))
    first = reader.until(EVENT_ADD)
    print(json.dumps({"subscribed": True, "first_len": len(first[5])}), flush=True)

    time.sleep(stall)

    updates, nbytes, deadline = 0, 0, time.monotonic() + 3.0
    sock.settimeout(1.0)
    try:
        while time.monotonic() < deadline:
            m = reader.message()
            if m[0] == EVENT_ADD:
                updates += 1
                nbytes += len(m[5])
    except (socket.timeout, EOFError):
        pass
    print(json.dumps({"updates_after_stall": updates, "bytes_after_stall": nbytes}), flush=True)


if __name__ == "__main__":
    main()
