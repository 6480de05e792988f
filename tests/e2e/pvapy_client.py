"""PV Access test client on pvAccessCPP (pvapy) driven by the harness.

  pvapy_client.py < OPS_JSON      run a list of operations, print a JSON list
  pvapy_client.py --watch PV SECONDS
                                  print connection changes and values as JSON
                                  lines (like pva_client.py --watch), until
                                  stdin closes or SECONDS pass

The harness sets EPICS_PVA_NAME_SERVERS (and no UDP search). pvAccessCPP
reads its configuration from the environment when it looks a setting up,
so the variables must be set before the first Channel searches, not
necessarily before import.

Operations:
  {"op": "get", "pvs": [...], "timeout": s}
  {"op": "putget", "pv": name, "value": v, "times": n, "timeout": s}
      -> {pv: {"ok": bool, "value": ..., "error": str}}
     (value is the structure's "value" field; long arrays are summarised
      like pva_client.summary)
"""

import hashlib
import json
import os
import sys

import numpy as np
import pvaccess as pva

ARRAY_SUMMARY_OVER = 16


def summary(array) -> dict:
    a = np.ascontiguousarray(np.asarray(array, dtype="<f8"))
    return {
        "len": int(a.size),
        "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
        "head": a[:3].tolist(),
        "tail": a[-3:].tolist(),
    }


def plain(value):
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > ARRAY_SUMMARY_OVER:
        return summary(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def op_get(spec):
    timeout = spec.get("timeout", 5.0)
    # Create every channel first so their searches can go out together.
    channels = {name: pva.Channel(name, pva.PVA) for name in spec["pvs"]}
    out = {}
    for name, channel in channels.items():
        channel.setTimeout(timeout)
        try:
            out[name] = {"ok": True, "value": plain(channel.get("field()").toDict()["value"])}
        except Exception as e:  # pvaccess raises PvaException on timeout
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return out


def op_putget(spec):
    """Put-get the same value `times` times on one channel:
    [{"ok", "error", "elapsed"}] per attempt."""
    import time

    channel = pva.Channel(spec["pv"], pva.PVA)
    channel.setTimeout(spec.get("timeout", 5.0))
    out = []
    for _ in range(spec.get("times", 1)):
        start = time.monotonic()
        try:
            channel.putGetDouble(float(spec["value"]))
            out.append({"ok": True, "elapsed": time.monotonic() - start})
        except Exception as e:
            out.append({"ok": False, "error": f"{type(e).__name__}: {e}", "elapsed": time.monotonic() - start})
    return out


OPS = {"get": op_get, "putget": op_putget}


def watch(name, duration):
    """Connection changes and monitor updates as JSON lines, for restart
    tests: {"event": "conn", "connected", "t"}, {"event": "value", "value", "t"}."""
    import threading
    import time

    lock = threading.Lock()

    def emit(event):
        with lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    def on_connection(connected):
        emit({"event": "conn", "connected": bool(connected), "t": time.time()})

    def on_update(pv):
        emit({"event": "value", "value": plain(pv["value"]), "t": time.time()})

    channel = pva.Channel(name)
    channel.setConnectionCallback(on_connection)
    channel.monitor(on_update, "field(value)")
    emit({"event": "start", "t": time.time()})
    stopper = threading.Thread(target=sys.stdin.read, daemon=True)
    stopper.start()
    stopper.join(duration)
    sys.stdout.flush()
    os._exit(0)


def main():
    if sys.argv[1:2] == ["--watch"]:
        watch(sys.argv[2], float(sys.argv[3]))
    specs = json.loads(sys.stdin.read())
    print(json.dumps([OPS[spec["op"]](spec) for spec in specs]))
    sys.stdout.flush()
    os._exit(0)  # pvAccessCPP's teardown may wait on lost connections


if __name__ == "__main__":
    main()
