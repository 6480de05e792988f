"""A pvapy PvaServer (pvAccessCPP, pvDatabase) whose values tell which server answered.

  pvapy_server.py --prefix PVAPY: [--init 6.0] [--wave-len N]

PVs, each named prefix + name:
  ID       NTScalar string holding the prefix
  VAL      NTScalar double starting at --init, writable
  COUNT    NTScalar int, counts up at 10 Hz
  WAVE     NTScalarArray of doubles (--wave-len zeros), writable
  VARIANT  structure {value: any, server: string}: a variant union starting
           as the prefix string, writable with a value of any type

Prints "Serving ... on port N" once every record is added, and serves until
SIGTERM or until stdin closes.
"""

import argparse
import os
import signal
import subprocess
import sys
import threading

import pvaccess as pva

SCALAR_ID = "epics:nt/NTScalar:1.0"
ARRAY_ID = "epics:nt/NTScalarArray:1.0"


def scalar(kind, value):
    return pva.PvObject({"value": kind}, {"value": value}, SCALAR_ID)


def tcp_port() -> int:
    """The TCP port this process listens on (random when 5075 was taken)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
    pid = f"pid={os.getpid()},"
    ports = [line.split()[3].rsplit(":", 1)[1] for line in out.splitlines() if pid in line]
    return int(ports[0]) if ports else -1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="PVAPY:")
    parser.add_argument("--init", type=float, default=6.0)
    parser.add_argument("--wave-len", type=int, default=1048576)
    args = parser.parse_args()
    prefix = args.prefix

    variant = pva.PvObject({"value": (), "server": pva.STRING}, "nameshim:variant:1.0")
    variant["value"] = pva.PvObject({"value": pva.STRING}, {"value": prefix})
    variant["server"] = prefix
    records = {
        "ID": scalar(pva.STRING, prefix),
        "VAL": scalar(pva.DOUBLE, args.init),
        "COUNT": scalar(pva.INT, 0),
        "WAVE": pva.PvObject({"value": [pva.DOUBLE]}, {"value": [0.0] * args.wave_len}, ARRAY_ID),
        "VARIANT": variant,
    }

    server = pva.PvaServer()
    for name, obj in records.items():
        server.addRecord(prefix + name, obj)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    print(f"Serving {len(records)} PVs with prefix {prefix} on port {tcp_port()}", flush=True)
    n = 0
    while not stop.wait(0.1):
        n += 1
        server.update(prefix + "COUNT", scalar(pva.INT, n))
    server.stop()


if __name__ == "__main__":
    main()
