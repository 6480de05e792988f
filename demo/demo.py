"""nameshim demo: IOCs in a simulated container, read through ONE remapped port.

The "container" is a network namespace joined to a "host" namespace by a veth
pair, with the port published by nftables DNAT as podman does it
(-p 127.0.0.1:8066:5066, TCP only). Inside it run an epicscorelibs softIoc,
a pvxslibs softIoc and a caproto server, all sharing UDP 5064, and nameshim
on port 5066. A libca client (pyepics) on the host, with only
EPICS_CA_NAME_SERVERS=127.0.0.1:8066 set, gets, puts and monitors PVs of all
three servers. For contrast, the IOC's own port published the usual way
(-p 127.0.0.1:8064:5064) reaches only the server that owns TCP 5064.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

import harness as h  # noqa: E402

SHIM_PORT, SHIM_HOST_PORT = 5066, 8066
IOC_HOST_PORT = 8064


def show(title, rows):
    print(f"\n{title}")
    for row in rows:
        print("  " + row)


def main() -> int:
    reason = h.cannot_run_reason()
    if reason:
        print(f"demo cannot run: {reason}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="nameshim-demo-"))
    host = h.Host()
    ctr = h.Container(host)
    try:
        print("starting a simulated container with three CA servers ...")
        h.SoftIoc(ctr, "IOCA:", work, "epicscorelibs", init=1.0).start()
        h.SoftIoc(ctr, "PVXS:", work, "pvxslibs", init=3.0).start()
        h.CaprotoServer(ctr, "CAPR:", work).start()
        shim = h.Shim(ctr, ["--listen", f"0.0.0.0:{SHIM_PORT}"], work, env={"NAMESHIM_LOG": "info"})
        shim.start()
        ctr.publish(SHIM_HOST_PORT, SHIM_PORT, host_ip="127.0.0.1")
        ctr.publish(IOC_HOST_PORT, 5064, host_ip="127.0.0.1")
        print(f"published: host 127.0.0.1:{SHIM_HOST_PORT} -> container {SHIM_PORT} (nameshim), "
              f"host 127.0.0.1:{IOC_HOST_PORT} -> container 5064 (first IOC), TCP only")

        via_shim = f"127.0.0.1:{SHIM_HOST_PORT}"
        pvs = ["IOCA:ID", "PVXS:ID", "CAPR:ID"]
        got = h.ca_get(host, via_shim, pvs)
        show(f"caget through nameshim (EPICS_CA_NAME_SERVERS={via_shim}):",
             [f"{pv:10} {'connected' if r['connected'] else 'NOT CONNECTED':14} {r['value']!r:12} via {r['host']}"
              for pv, r in got.items()])

        put = h.ca_put(host, via_shim, "PVXS:VAL", 42.5)
        show("caput PVXS:VAL 42.5 through nameshim:",
             [f"put {'ok' if put['put_ok'] else 'FAILED'}, read back {put['readback']}"])

        mon = h.ca_monitor(host, via_shim, "IOCA:COUNT", duration=2.0)
        values = [v for v, _ in mon["updates"]]
        show("camonitor IOCA:COUNT (a 10 Hz counter) for 2 s through nameshim:",
             [f"{len(values)} updates: {values[:6]} ... {values[-3:]}"])

        direct = f"127.0.0.1:{IOC_HOST_PORT}"
        got = h.ca_get(host, direct, pvs, timeout=3.0)
        show(f"for contrast, caget with the IOC's own port as name server (EPICS_CA_NAME_SERVERS={direct}):",
             [f"{pv:10} {'connected' if r['connected'] else 'not connected':14}" for pv, r in got.items()])
        ok = all(r["connected"] for r in h.ca_get(host, via_shim, pvs).values())
        print("\nresult:", "every server reached through one remapped port" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        ctr.close()
        host.close()


if __name__ == "__main__":
    sys.exit(main())
