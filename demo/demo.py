"""nameshim demo: IOCs in a simulated container, read through ONE remapped port.

The "container" is a network namespace joined to a "host" namespace by a veth
pair, with the port published by nftables DNAT as podman does it
(-p 127.0.0.1:8066:5066, TCP only). Inside it run an epicscorelibs softIoc
(CA and QSRV1, the pvAccessCPP server), a pvxslibs softIoc (CA and QSRV2,
the pvxs server) and a caproto server (CA only), all sharing UDP 5064, and
nameshim on port 5066, told the published port (--advertise-port 8066).

Through that one published port, clients on the host with only the name
server set (no UDP search):
- a libca client (pyepics, EPICS_CA_NAME_SERVERS=127.0.0.1:8066) gets,
  puts and monitors PVs of all three servers;
- a pvxs client (p4p) and a pvAccessCPP client (pvapy), with
  EPICS_PVA_NAME_SERVERS=127.0.0.1:8066, get PVs of both PVA servers.
For contrast, the IOC's own CA port published the usual way
(-p 127.0.0.1:8064:5064) reaches only the server that owns TCP 5064.
Last, `nameshim check` diagnoses the published port from the client side.
"""

import subprocess
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
        print(("  " + row).rstrip())


def main() -> int:
    reason = h.cannot_run_reason()
    if reason:
        print(f"demo cannot run: {reason}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="nameshim-demo-"))
    host = h.Host()
    ctr = h.Container(host)
    try:
        print("starting a simulated container with three CA servers, two of them also PVA servers ...")
        h.SoftIoc(ctr, "IOCA:", work, "epicscorelibs", init=1.0).start()
        h.SoftIoc(ctr, "PVXS:", work, "pvxslibs", init=3.0).start()
        h.CaprotoServer(ctr, "CAPR:", work).start()
        # --advertise-port: pvAccessCPP clients (pvapy) dial the port named
        # in the search answer, which must be the published one (docs/clients.md).
        shim = h.Shim(ctr, ["--listen", f"0.0.0.0:{SHIM_PORT}", "--advertise-port", str(SHIM_HOST_PORT)],
                      work, env={"NAMESHIM_LOG": "info"})
        shim.start()
        ctr.publish(SHIM_HOST_PORT, SHIM_PORT, host_ip="127.0.0.1")
        ctr.publish(IOC_HOST_PORT, 5064, host_ip="127.0.0.1")
        print(f"published: host 127.0.0.1:{SHIM_HOST_PORT} -> container {SHIM_PORT} (nameshim), "
              f"host 127.0.0.1:{IOC_HOST_PORT} -> container 5064 (first IOC), TCP only")

        via_shim = f"127.0.0.1:{SHIM_HOST_PORT}"
        pvs = ["IOCA:ID", "PVXS:ID", "CAPR:ID"]
        got = h.ca_get(host, via_shim, pvs)
        show(f"get with pyepics (libca) through nameshim (EPICS_CA_NAME_SERVERS={via_shim}):",
             [f"{pv:10} {'connected' if r['connected'] else 'NOT CONNECTED':14} {r['value']!r:12} via {r['host']}"
              for pv, r in got.items()])

        put = h.ca_put(host, via_shim, "PVXS:VAL", 42.5)
        show("put PVXS:VAL 42.5 with pyepics through nameshim:",
             [f"put {'ok' if put['put_ok'] else 'FAILED'}, read back {put['readback']}"])

        mon = h.ca_monitor(host, via_shim, "IOCA:COUNT", duration=2.0)
        values = [v for v, _ in mon["updates"]]
        show("monitor IOCA:COUNT (a 10 Hz counter) for 2 s with pyepics through nameshim:",
             [f"{len(values)} updates: {values[:6]} ... {values[-3:]}"])

        pva_pvs = ["IOCA:ID", "PVXS:ID"]
        got = h.pva_get(host, via_shim, pva_pvs)
        show(f"get with p4p (pvxs) through nameshim (EPICS_PVA_NAME_SERVERS={via_shim}):",
             [f"{pv:10} {'ok' if r['ok'] else 'FAILED':6} {r.get('value', r.get('error'))!r}"
              for pv, r in got.items()])
        pva_ok = all(r["ok"] for r in got.values())

        got = h.pvapy_get(host, via_shim, pva_pvs)
        show(f"get with pvapy (pvAccessCPP) through nameshim (EPICS_PVA_NAME_SERVERS={via_shim}):",
             [f"{pv:10} {'ok' if r['ok'] else 'FAILED':6} {r.get('value', r.get('error'))!r}"
              for pv, r in got.items()])
        pva_ok = pva_ok and all(r["ok"] for r in got.values())

        put = h.pva_put(host, via_shim, "IOCA:VAL", 7.25)
        after = h.pva_get(host, via_shim, ["IOCA:VAL"])["IOCA:VAL"]
        show("put IOCA:VAL 7.25 with p4p through nameshim:",
             [f"put {'ok' if put['ok'] else 'FAILED'}, read back {after.get('value')}"])
        pva_ok = pva_ok and put["ok"] and after.get("value") == 7.25

        direct = f"127.0.0.1:{IOC_HOST_PORT}"
        got = h.ca_get(host, direct, pvs, timeout=3.0)
        show(f"for contrast, get with pyepics and the IOC's own port as name server (EPICS_CA_NAME_SERVERS={direct}):",
             [f"{pv:10} {'connected' if r['connected'] else 'not connected':14}" for pv, r in got.items()])
        ca_ok = all(r["connected"] for r in h.ca_get(host, via_shim, pvs).values())

        # The client-side diagnosis a user runs when a PV does not show up.
        check = subprocess.run(host.exec_argv([h.shim_binary(), "check", via_shim, *pvs]),
                               capture_output=True, text=True, timeout=120)
        show(f"nameshim check {via_shim} {' '.join(pvs)} (exit {check.returncode}):",
             (check.stdout + check.stderr).rstrip().splitlines())
        ok = ca_ok and pva_ok and check.returncode == 0
        print("\nresult:", "every server reached over CA and PVA through one remapped port" if ok else
              f"FAILED (CA {'ok' if ca_ok else 'failed'}, PVA {'ok' if pva_ok else 'failed'})")
        return 0 if ok else 1
    finally:
        ctr.close()
        host.close()


if __name__ == "__main__":
    sys.exit(main())
