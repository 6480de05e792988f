"""PV Access test client (p4p, i.e. pvxs) driven by the harness.

The harness sets the EPICS_PVA_* environment (name server only). Every
operation of one run uses one p4p Context, so all its channels share one
connection to the name server.

  pva_client.py < OPS_JSON        run a list of operations, print a JSON list
  pva_client.py --watch PV SECONDS
                                  stream JSON-line events until time is up
                                  or stdin closes

Values are plain JSON: a PV's "value" field (a structure becomes a dict of
its fields, a long array a summary, see `summary`), and its other fields
except the standard metadata (alarm, timeStamp, display, control, ...).

Operations:
  {"op": "get", "pvs": [...], "timeout": s}
      -> {pv: {"ok": bool, "value": ..., "fields": {...}, "error": str}}
         (all fetched together)
  {"op": "put", "pv": name, "value": v, "timeout": s}
  {"op": "put", "pv": name, "ramp": [start, step, n], "timeout": s}
      -> {"ok": bool, "error": str}   (put and wait for completion)
         v is the "value" field's value, or a dict of fields; see `typed`
         for lists and dicts. A ramp is a float64 array of n values.
  {"op": "monitor", "pvs": [...], "duration": s, "timeout": s}
      -> {pv: {"connected": bool, "updates": [[value, timestamp], ...],
               "events": [str, ...]}}   (all monitors run at once; events
         are the non-value notifications, starting with p4p's initial
         "Disconnected")
  {"op": "rpc", "pv": name, "args": {"a": x, "b": y}, "timeout": s}
      -> {"ok": bool, "value": {...}, "error": str}
"""

import hashlib
import json
import os
import sys
import threading
import time

import numpy as np
from p4p import Type, Value
from p4p.client.thread import Context, Disconnected

ARRAY_SUMMARY_OVER = 16  # longer arrays are returned as a summary


def summary(array) -> dict:
    """Length, float64 digest and ends of a long array (harness.array_summary)."""
    a = np.ascontiguousarray(np.asarray(array, dtype="<f8"))
    return {
        "len": int(a.size),
        "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
        "head": a[:3].tolist(),
        "tail": a[-3:].tolist(),
    }


def plain(value):
    """JSON form of a p4p Value or field (structures, numpy arrays)."""
    if isinstance(value, Value):
        return {k: plain(value[k]) for k in value.keys()}
    if isinstance(value, np.ndarray):
        if value.size > ARRAY_SUMMARY_OVER:
            return summary(value)
        return value.tolist()
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


METADATA = {"alarm", "timeStamp", "display", "control", "valueAlarm", "descriptor"}


def value_of(v):
    """The "value" field of a PV's structure, in plain form."""
    return plain(v["value"]) if "value" in v.keys() else plain(v)


def other_fields(v) -> dict:
    return {k: plain(v[k]) for k in v.keys() if k != "value" and k not in METADATA}


def error_text(e) -> str:
    return f"{type(e).__name__}: {e}"


def op_get(ctx, spec):
    names = spec["pvs"]
    results = ctx.get(names, timeout=spec.get("timeout", 5.0), throw=False)
    out = {}
    for name, value in zip(names, results):
        if isinstance(value, Exception):
            out[name] = {"ok": False, "error": error_text(value)}
        else:
            out[name] = {"ok": True, "value": value_of(value), "fields": other_fields(value)}
    return out


def typed(v):
    """What p4p should put into a variant union ("any") field for a JSON
    value: a list of numbers becomes a float64 array (p4p would infer
    string[] for a plain list), a dict a structure of doubles, int64s and
    strings."""
    if isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return np.asarray(v, dtype="f8")
    if isinstance(v, dict):
        codes = {float: "d", int: "l", str: "s"}
        return Value(Type([(k, codes[type(x)]) for k, x in v.items()]), v)
    return v


def op_put(ctx, spec):
    if "ramp" in spec:
        start, step, n = spec["ramp"]
        value = start + step * np.arange(int(n), dtype="f8")
    else:
        value = spec["value"]
    if not isinstance(value, dict):
        value = {"value": value}
    value = {k: typed(v) for k, v in value.items()}
    try:
        ctx.put(spec["pv"], value, timeout=spec.get("timeout", 10.0), wait=True)
        return {"ok": True}
    except Exception as e:
        return {"ok": False, "error": error_text(e)}


def op_rpc(ctx, spec):
    args = spec["args"]
    arg = Value(Type([(k, "d") for k in args]), {k: float(v) for k, v in args.items()})
    try:
        return {"ok": True, "value": plain(ctx.rpc(spec["pv"], arg, timeout=spec.get("timeout", 5.0)))}
    except Exception as e:
        return {"ok": False, "error": error_text(e)}


def timestamp(value):
    try:
        return value["timeStamp.secondsPastEpoch"] + value["timeStamp.nanoseconds"] * 1e-9
    except Exception:
        return None


def op_monitor(ctx, spec):
    lock = threading.Lock()
    state = {name: {"connected": False, "updates": [], "events": []} for name in spec["pvs"]}

    def callback(name):
        def on_event(value):
            with lock:
                entry = state[name]
                if isinstance(value, Exception):
                    entry["events"].append(error_text(value))
                else:
                    entry["connected"] = True
                    entry["updates"].append([value_of(value), timestamp(value)])

        return on_event

    subs = [ctx.monitor(name, callback(name), notify_disconnect=True) for name in spec["pvs"]]
    # Every monitor must connect within the timeout; then all run together.
    deadline = time.monotonic() + spec.get("timeout", 5.0)
    while time.monotonic() < deadline:
        with lock:
            if all(s["connected"] for s in state.values()):
                break
        time.sleep(0.02)
    time.sleep(spec["duration"])
    for sub in subs:
        sub.close()
    with lock:
        return {name: dict(entry) for name, entry in state.items()}


OPS = {"get": op_get, "put": op_put, "monitor": op_monitor, "rpc": op_rpc}


def watch(name, duration):
    """Print connection changes and values as JSON lines, for restart tests."""
    lock = threading.Lock()
    connected = [False]

    def emit(event):
        with lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    def on_event(value):
        now = time.time()
        if isinstance(value, Disconnected):
            if connected[0]:
                connected[0] = False
                emit({"event": "conn", "connected": False, "t": now})
            return
        if isinstance(value, Exception):
            emit({"event": "error", "error": error_text(value), "t": now})
            return
        if not connected[0]:
            connected[0] = True
            emit({"event": "conn", "connected": True, "t": now})
        emit({"event": "value", "value": value_of(value), "ts": timestamp(value), "t": now})

    ctx = Context("pva", nt=False)
    sub = ctx.monitor(name, on_event, notify_disconnect=True)
    # The harness closes stdin to stop us early; the deadline bounds the run.
    stopper = threading.Thread(target=sys.stdin.read, daemon=True)
    stopper.start()
    stopper.join(duration)
    sub.close()


def finish():
    sys.stdout.flush()
    os._exit(0)  # p4p's teardown can wait on a dead server: results are out


def main():
    if sys.argv[1:2] == ["--watch"]:
        watch(sys.argv[2], float(sys.argv[3]))
    else:
        # Operations come on stdin, like ca_client.py.
        specs = json.loads(sys.stdin.read())
        ctx = Context("pva", nt=False)
        results = [OPS[spec["op"]](ctx, spec) for spec in specs]
        print(json.dumps(results))
    finish()


if __name__ == "__main__":
    main()
