"""Holds many CA client connections open to a shim, on command.

  python fd_hog.py HOST PORT

Reads commands from stdin, one per line, and answers each with one JSON
line on stdout:
  open N    opens N connections, each sending libca's VERSION, and reports
            how each fared within 2 s: "served" (the server's VERSION came
            back), "closed" (EOF or reset) or "waiting" (nothing yet);
  close N   closes the N oldest served connections;
  count     how many are held.
At EOF it closes everything and exits.
"""

import json
import socket
import struct
import sys
import time

VERSION = struct.pack(">HHHHII", 0, 0, 0, 13, 0, 0)


def fate(sock: socket.socket, until: float) -> str:
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return "waiting"
        sock.settimeout(left)
        try:
            data = sock.recv(16)
        except socket.timeout:
            return "waiting"
        except OSError:
            return "closed"
        if not data:
            return "closed"
        if data[:2] == b"\x00\x00":
            return "served"


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    held: list[socket.socket] = []
    for line in sys.stdin:
        cmd, *arg = line.split()
        n = int(arg[0]) if arg else 0
        if cmd == "open":
            fresh = []
            for _ in range(n):
                s = socket.create_connection((host, port), timeout=2)
                s.sendall(VERSION)
                fresh.append(s)
            until = time.monotonic() + 2.0
            fates = [fate(s, until) for s in fresh]
            for s, f in zip(fresh, fates):
                if f == "served":
                    held.append(s)
                else:
                    s.close()
            print(json.dumps({f: fates.count(f) for f in ("served", "closed", "waiting")}), flush=True)
        elif cmd == "close":
            for s in held[:n]:
                s.close()
            del held[:n]
            print(json.dumps({"held": len(held)}), flush=True)
        elif cmd == "count":
            print(json.dumps({"held": len(held)}), flush=True)
    for s in held:
        s.close()


if __name__ == "__main__":
    main()
