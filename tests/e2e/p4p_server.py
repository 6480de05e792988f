"""A p4p (pvxs) PV Access server whose values tell which server answered.

  p4p_server.py --prefix P4P: [--init 5.0] [--wave-len N]

PVs, each named prefix + name:
  ID       NTScalar string holding the prefix
  VAL      NTScalar double starting at --init, writable
  COUNT    NTScalar int, counts up at 10 Hz
  WAVE     NTScalarArray of doubles (--wave-len zeros), writable
  VARIANT  structure {value: any, server: string}: a variant union starting
           as the prefix string, writable with a value of any type
  RPC      RPC: an argument {a: double, b: double} returns
           {server: prefix, sum: a + b}

Prints "Serving ... on port N" once every PV is open, and serves until
SIGTERM or until stdin closes.
"""

import argparse
import signal
import sys
import threading

from p4p import Type, Value
from p4p.nt import NTScalar
from p4p.server import Server
from p4p.server.thread import SharedPV

VARIANT_T = Type([("value", "v"), ("server", "s")], id="nameshim:variant:1.0")
RPC_RESULT_T = Type([("server", "s"), ("sum", "d")])


def writable(pv: SharedPV) -> SharedPV:
    @pv.put
    def on_put(pv, op):
        pv.post(op.value())
        op.done()

    return pv


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="P4P:")
    parser.add_argument("--init", type=float, default=5.0)
    parser.add_argument("--wave-len", type=int, default=1048576)
    args = parser.parse_args()
    prefix = args.prefix

    rpc_pv = SharedPV(nt=NTScalar("s"), initial=prefix)

    @rpc_pv.rpc
    def on_rpc(pv, op):
        arg = op.value()
        op.done(Value(RPC_RESULT_T, {"server": prefix, "sum": float(arg["a"]) + float(arg["b"])}))

    count = SharedPV(nt=NTScalar("i"), initial=0)
    pvs = {
        "ID": SharedPV(nt=NTScalar("s"), initial=prefix),
        "VAL": writable(SharedPV(nt=NTScalar("d"), initial=args.init)),
        "COUNT": count,
        "WAVE": writable(SharedPV(nt=NTScalar("ad"), initial=[0.0] * args.wave_len)),
        "VARIANT": writable(SharedPV(initial=Value(VARIANT_T, {"value": prefix, "server": prefix}))),
        "RPC": rpc_pv,
    }

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # The harness keeps stdin open for our lifetime; EOF means "stop".
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    with Server(providers=[{prefix + name: pv for name, pv in pvs.items()}]) as server:
        port = server.conf()["EPICS_PVAS_SERVER_PORT"]
        print(f"Serving {len(pvs)} PVs with prefix {prefix} on port {port}", flush=True)
        n = 0
        while not stop.wait(0.1):
            n += 1
            count.post(n)


if __name__ == "__main__":
    main()
