"""Tries to write a PV and reports what the server allowed, as JSON.

  trust_client.py ca PV VALUE     libca (pyepics)
  trust_client.py pva PV VALUE    pvxs (p4p)

Prints {"connected", "before", "write_access" (CA only), "put_ok",
"put_error", "after"}. The environment says where to search (the harness
sets a name server, or a direct address list).
"""

import json
import os
import sys


def ca(name, value):
    import epics

    pv = epics.PV(name, auto_monitor=False, connection_timeout=5.0)
    if not pv.wait_for_connection(timeout=5.0):
        return {"connected": False}
    out = {"connected": True, "host": pv.host, "before": pv.get(timeout=5.0, use_monitor=False)}
    out["write_access"] = bool(pv.write_access)
    try:
        # pyepics returns 1 once the server confirms the write.
        out["put_ok"] = pv.put(value, wait=True, timeout=5.0) == 1
        out["put_error"] = None
    except Exception as e:  # libca refuses a put without write access
        out["put_ok"] = False
        out["put_error"] = f"{type(e).__name__}: {e}"
    out["after"] = pv.get(timeout=5.0, use_monitor=False)
    return out


def pva(name, value):
    from p4p.client.thread import Context

    ctx = Context("pva", nt=False)
    try:
        before = ctx.get(name, timeout=5.0)
    except Exception as e:
        return {"connected": False, "error": f"{type(e).__name__}: {e}"}
    out = {"connected": True, "before": before["value"]}
    try:
        ctx.put(name, {"value": value}, timeout=5.0, wait=True)
        out["put_ok"] = True
        out["put_error"] = None
    except Exception as e:  # the server's "Put not permitted"
        out["put_ok"] = False
        out["put_error"] = f"{type(e).__name__}: {e}"
    out["after"] = ctx.get(name, timeout=5.0)["value"]
    return out


def main():
    proto, name, value = sys.argv[1], sys.argv[2], float(sys.argv[3])
    result = (ca if proto == "ca" else pva)(name, value)
    print(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # skip client teardown: the result is out


if __name__ == "__main__":
    main()
