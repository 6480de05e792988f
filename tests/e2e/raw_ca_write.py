"""A CA client, written from the protocol by hand, that writes a channel
whatever access rights the server announced (libca refuses such a put
itself, so it never reaches the server).

  raw_ca_write.py HOST PORT PV VALUE

Prints one JSON line: the access rights the server announced, the status of
a WRITE_NOTIFY (p1 of its answer), and the status of a plain WRITE (p2 of
the CA_PROTO_ERROR it drew, if any, within 2 s).
"""

import json
import socket
import struct
import sys

from slow_ca_client import MINOR, Reader, message

VERSION, ERROR, SEARCH, CREATE_CHAN, CLIENT_NAME, HOST_NAME = 0, 11, 6, 18, 20, 21
WRITE, WRITE_NOTIFY, ACCESS_RIGHTS = 4, 19, 22
DBR_DOUBLE, DONT_REPLY = 6, 5


def main():
    host, port, pv, value = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
    sock = socket.create_connection((host, port), timeout=10)
    reader = Reader(sock)
    sock.sendall(message(VERSION, count=MINOR) + message(CLIENT_NAME, b"raw\0") + message(HOST_NAME, b"raw\0"))
    reader.until(VERSION)
    sock.sendall(message(SEARCH, pv + b"\0", DONT_REPLY, MINOR, 1, 1))
    reader.until(SEARCH)
    sock.sendall(message(CREATE_CHAN, pv + b"\0", p1=1, p2=MINOR))
    rights = None
    while True:
        cmd, _, _, p1, p2, _ = reader.message()
        if cmd == ACCESS_RIGHTS:
            rights = p2
        if cmd == CREATE_CHAN:
            sid = p2
            break
    payload = struct.pack(">d", value)
    sock.sendall(message(WRITE_NOTIFY, payload, DBR_DOUBLE, 1, sid, 77))
    notify = reader.until(WRITE_NOTIFY)
    sock.sendall(message(WRITE, payload, DBR_DOUBLE, 1, sid, 78))
    error = None
    sock.settimeout(2.0)
    try:
        error = reader.until(ERROR)
    except (socket.timeout, EOFError):
        pass
    print(json.dumps({
        "access_rights": rights,
        "write_notify_status": notify[3],
        "write_notify_ioid": notify[4],
        "write_error_status": error[4] if error else None,
        "write_error_cid": error[3] if error else None,
    }))


if __name__ == "__main__":
    main()
