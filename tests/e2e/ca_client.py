"""Channel Access test client (pyepics, i.e. libca) driven by the harness.

The harness sets the EPICS_CA_* environment (name server only), so every
channel this process opens shares one libca context and one name-server
circuit.

  ca_client.py < OPS_JSON          run a list of operations, print a JSON list
  ca_client.py --watch PV SECONDS [--no-poll]
                                   stream JSON-line events until time is up
                                   or stdin closes

Operations:
  {"op": "get", "pvs": [...], "timeout": s, "as_string": bool}
      -> {pv: {"connected": bool, "value": ..., "host": "ip:port"}}
  {"op": "put", "pv": name, "value": v, "timeout": s}
      -> {"connected": bool, "put_ok": bool, "readback": ...}
  {"op": "monitor", "pv": name, "duration": s, "timeout": s}
      -> {"connected": bool, "updates": [[value, timestamp], ...]}
"""

import json
import os
import sys
import threading
import time

import epics


def plain(value):
    """Make pyepics values (numpy arrays and scalars) JSON-serialisable."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def open_channels(names, timeout, **kwargs):
    # Create every channel before waiting so their searches go out together.
    pvs = {n: epics.PV(n, auto_monitor=False, connection_timeout=timeout, **kwargs) for n in names}
    deadline = time.monotonic() + timeout
    connected = {}
    for name, pv in pvs.items():
        connected[name] = pv.wait_for_connection(timeout=max(0.01, deadline - time.monotonic()))
    return pvs, connected


def op_get(spec):
    timeout = spec.get("timeout", 5.0)
    pvs, connected = open_channels(spec["pvs"], timeout)
    result = {}
    for name, pv in pvs.items():
        if not connected[name]:
            result[name] = {"connected": False}
            continue
        value = pv.get(timeout=timeout, use_monitor=False, as_string=spec.get("as_string", False))
        result[name] = {"connected": True, "value": plain(value), "host": pv.host}
    return result


def op_put(spec):
    timeout = spec.get("timeout", 10.0)
    pvs, connected = open_channels([spec["pv"]], timeout)
    pv = pvs[spec["pv"]]
    if not connected[spec["pv"]]:
        return {"connected": False}
    status = pv.put(spec["value"], wait=True, timeout=timeout)
    # pyepics returns 1 on completion, -1 on timeout
    readback = pv.get(timeout=timeout, use_monitor=False)
    return {"connected": True, "put_ok": status == 1, "readback": plain(readback)}


def op_monitor(spec):
    updates = []
    lock = threading.Lock()

    def on_value(value=None, timestamp=None, **_):
        with lock:
            updates.append([plain(value), timestamp])

    pv = epics.PV(spec["pv"], auto_monitor=True, callback=on_value)
    if not pv.wait_for_connection(timeout=spec.get("timeout", 5.0)):
        return {"connected": False, "updates": []}
    time.sleep(spec["duration"])
    pv.clear_callbacks()
    with lock:
        return {"connected": True, "updates": list(updates)}


OPS = {"get": op_get, "put": op_put, "monitor": op_monitor}


def watch(name, duration, poll=True):
    """Print connection changes and values as JSON lines, for restart tests.

    With poll, the main thread pends on libca events like camonitor does.
    Without, it only sleeps, as many callback-driven scripts do: libca then
    flushes its queued requests only when the server sends something first
    (or after EPICS_CA_CONN_TMO, when it probes the circuit).
    """
    lock = threading.Lock()

    def emit(event):
        with lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    def on_conn(conn=None, **_):
        emit({"event": "conn", "connected": bool(conn), "t": time.time()})

    def on_value(value=None, timestamp=None, **_):
        emit({"event": "value", "value": plain(value), "ts": timestamp, "t": time.time()})

    # Before the first connection attempt: libca dials the name server when
    # the first channel is created.
    emit({"event": "start", "t": time.time()})
    epics.PV(name, auto_monitor=True, callback=on_value, connection_callback=on_conn)
    # The harness closes stdin to stop us early; the deadline bounds the run.
    stopper = threading.Thread(target=sys.stdin.read, daemon=True)
    stopper.start()
    deadline = time.monotonic() + duration
    while stopper.is_alive() and time.monotonic() < deadline:
        if poll:
            epics.ca.poll(evt=0.05, iot=0.0)
        else:
            time.sleep(0.05)


def finish(timeout=3.0):
    """Close the libca context cleanly, but within a bound, then exit.

    The clean close sends CLEAR_CHANNEL and closes the circuit as a real
    client would; but libca's teardown blocks for ~30 s while its name
    server is unreachable, and the results are already printed by then.
    """
    sys.stdout.flush()
    closer = threading.Thread(target=epics.ca.finalize_libca, daemon=True)
    closer.start()
    closer.join(timeout)
    os._exit(0)


def main():
    if sys.argv[1:2] == ["--watch"]:
        watch(sys.argv[2], float(sys.argv[3]), poll="--no-poll" not in sys.argv)
    else:
        # Operations come on stdin: a large array does not fit in argv.
        results = [OPS[spec["op"]](spec) for spec in json.loads(sys.stdin.read())]
        print(json.dumps(results))
    finish()


if __name__ == "__main__":
    main()
