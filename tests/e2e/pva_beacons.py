"""Stands in for the many PVA servers on a client's network: sends a beacon
from a new server (fresh GUID, address 10.9.x.y:5075) every PERIOD seconds.

  pva_beacons.py PERIOD [DEST]      (DEST defaults to 127.255.255.255:5076)

A pvxs client treats the first beacon of each server as a reason to hurry
its searches. Runs until killed.
"""

import os
import socket
import struct
import sys
import time


def beacon(n: int) -> bytes:
    ipv4_mapped = b"\x00" * 10 + b"\xff\xff" + bytes([10, 9, (n >> 8) & 255, n & 255])
    body = (
        os.urandom(12)  # GUID: a server never seen before
        + b"\x00"  # flags
        + bytes([n & 255])  # beacon sequence
        + struct.pack("<H", 0)  # change count
        + ipv4_mapped
        + struct.pack("<H", 5075)
        + b"\x03tcp"
        + b"\xff"  # no server status
    )
    # Little-endian application message from a server: flags 0x40.
    return bytes([0xCA, 2, 0x40, 0]) + struct.pack("<I", len(body)) + body


def main():
    period = float(sys.argv[1])
    host, port = (sys.argv[2] if len(sys.argv) > 2 else "127.255.255.255:5076").rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    n = 0
    while True:
        n += 1
        sock.sendto(beacon(n), (host, int(port)))
        time.sleep(period)


if __name__ == "__main__":
    main()
