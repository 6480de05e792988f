"""How long CA and PVA monitors take to resume after an IOC restart, through
nameshim and on the direct path, side by side in one run.

Run by scripts/bench-restart (as root; see there for the options). Built on
tests/e2e/harness.py: one simulated container (a network namespace with a
veth link to a simulated host) holds two IOCs and nameshim,

  PVXS:  pvxslibs softIoc: CA (rsrv) and PVA (QSRV2, pvxs); started first,
         so it owns TCP 5064 and 5075 and takes them again on restart
  CPP:   epicscorelibs softIoc: CA (rsrv) and PVA (QSRV1, pvAccessCPP), on
         random TCP ports, new ones after each restart

and the shim on 0.0.0.0:5066, published on the host as 18066 (nftables DNAT,
as podman does). Each IOC's COUNT record counts up at 10 Hz. Eight monitors
watch them, one process each:

  CA   pyepics with auto_monitor, pending on libca like camonitor
  PVA  p4p (pvxs client), Context.monitor
  shim path:   the client on the host, EPICS_CA_NAME_SERVERS /
               EPICS_PVA_NAME_SERVERS = 127.0.0.1:18066, no UDP search
  direct path: the client in the container's namespace, UDP search on the
               container's broadcast address, no name server: what a client
               on the IOC's host sees with host networking. Both IOCs
               beacon there (CA and PVA), so these clients hear a restarted
               IOC's beacons, as they would on the IOC's own network.

Each restart kills one IOC (SIGKILL, a crash), waits until its monitors
report the disconnect, starts it again, and takes the moment its
"IOC Running" line appears (iocInit done: both servers listen) as the
restart. The IOCs are restarted in turn, N times each. The figure is, per
monitor, the time from that restart to the first update from the new
process.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import harness as h  # noqa: E402

SHIM_PORT = 5066
PUBLISHED_PORT = 18066
IOCS = {"PVXS:": "pvxslibs", "CPP:": "epicscorelibs"}
IOC_LABEL = {"PVXS:": "pvxs IOC (QSRV2)", "CPP:": "base IOC (QSRV1)"}
# A monitor that has not resumed by then is reported as such.
RESUME_LIMIT = 60.0
DISCONNECT_LIMIT = 15.0


class Watch(h.CaWatch):
    """A JSON-event monitor process (ca_client.py or pva_client.py --watch)."""

    def __init__(self, ns, script, pv, env, label):
        self.label = label
        self._start(ns, [h.PYTHON, script, "--watch", pv, "3600"], env)

    def next_event(self, pred, timeout):
        try:
            return self.wait_for(pred, timeout)
        except TimeoutError:
            return None


def start_ioc(ioc: h.SoftIoc) -> float:
    """Start the IOC; the wall-clock time its "IOC Running" line appeared.

    Polls the log every 5 ms (the harness polls every 50 ms), so the ready
    moment is late by at most that.
    """
    offset = ioc.log.stat().st_size if ioc.log.exists() else 0
    ioc.proc = h.run_in(ioc.ns, ioc.argv(), env=ioc.env, log_path=ioc.log, stdin=ioc._stdin())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ioc.ready.search(h._read_from(ioc.log, offset)):
            return time.time()
        if ioc.proc.poll() is not None:
            raise RuntimeError(f"{ioc.prefix} exited:\n{h.tail(ioc.log)}")
        time.sleep(0.005)
    raise TimeoutError(f"{ioc.prefix} not ready:\n{h.tail(ioc.log)}")


def kill_ioc(ioc: h.SoftIoc) -> float:
    t = time.time()
    ioc.proc.send_signal(signal.SIGKILL)
    ioc.proc.wait(10)
    if ioc.proc in ioc.ns.procs:
        ioc.ns.procs.remove(ioc.proc)
    ioc.proc = None
    return t


def fmt(x):
    return "   -  " if x is None else f"{x:6.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--restarts", type=int, default=3, help="restarts of each IOC (default 3)")
    ap.add_argument("--seed", type=int, default=5066, help="seed of the pauses between restarts (default 5066)")
    ap.add_argument("--shim-log", default="info", help="nameshim log level (default info)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = ap.parse_args()

    reason = h.cannot_run_reason()
    if reason:
        sys.exit(f"bench-restart: {reason}")
    work = Path(tempfile.mkdtemp(prefix="nameshim-bench-restart."))
    t_begin = time.monotonic()
    host = h.Host()
    ctr = h.Container(host)
    broadcast = str(ipaddress.ip_network(f"{ctr.addr}/30", strict=False).broadcast_address)
    # Beacons on the container's network, where the direct clients are.
    ioc_env = {
        **h.PVA_SERVER_ENV,
        "EPICS_CAS_BEACON_ADDR_LIST": broadcast,
        "EPICS_PVAS_BEACON_ADDR_LIST": broadcast,
    }
    iocs = {p: h.SoftIoc(ctr, p, work, flavour, 1.0, ioc_env) for p, flavour in IOCS.items()}
    for ioc in iocs.values():  # in order: the pvxs IOC takes 5064 and 5075
        start_ioc(ioc)
    shim = h.Shim(ctr, ["--listen", f"0.0.0.0:{SHIM_PORT}"], work, env={"NAMESHIM_LOG": args.shim_log})
    shim.start()
    ctr.publish(PUBLISHED_PORT, SHIM_PORT)
    name_server = f"127.0.0.1:{PUBLISHED_PORT}"

    ca_direct = {
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_ADDR_LIST": broadcast,
        "EPICS_CA_MAX_ARRAY_BYTES": h.MAX_ARRAY_BYTES,
    }
    paths = {
        "shim": (host, h.client_env(name_server), h.pva_client_env(name_server)),
        "direct": (ctr, ca_direct, h.pva_direct_env(broadcast)),
    }
    watches = {}  # (protocol, prefix, path) -> Watch
    for prefix in iocs:
        for path, (ns, ca_env, pva_env) in paths.items():
            watches[("CA", prefix, path)] = Watch(ns, h.CA_CLIENT, f"{prefix}COUNT", ca_env, "CA")
            watches[("PVA", prefix, path)] = Watch(ns, h.PVA_CLIENT, f"{prefix}COUNT", pva_env, "PVA")
    for key, w in watches.items():
        if w.next_event(lambda e: e["event"] == "value", 30) is None:
            sys.exit(f"bench-restart: monitor {key} got no update; shim log:\n{shim.log_text(40)}")

    print("nameshim: CA and PVA monitors resuming after an IOC restart, shim vs direct path")
    print(f"  machine: {os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}, "
          f"Linux {platform.release()}, load avg {' '.join(open('/proc/loadavg').read().split()[:3])}")
    version = subprocess.run([str(shim.binary), "--version"], capture_output=True, text=True).stdout.strip()
    print(f"  shim:    {version} (log {args.shim_log}), 0.0.0.0:{SHIM_PORT} in the container, "
          f"published as host port {PUBLISHED_PORT}")
    print("  IOCs:    PVXS: pvxslibs softIoc (rsrv + QSRV2), CPP: epicscorelibs softIoc (rsrv + QSRV1); "
          "COUNT at 10 Hz")
    print("  clients: CA = pyepics auto_monitor polling libca, PVA = p4p monitor; one process each")
    print(f"  paths:   shim = on the host via {name_server}; direct = in the container, "
          f"UDP search on {broadcast}")
    print(f"  {args.restarts} restarts of each IOC, in turn, after a random pause of 1-11 s (seed {args.seed}):")
    print("  SIGKILL, then start again once its monitors saw the loss")
    sys.stdout.flush()

    rng = random.Random(args.seed)
    resume = {k: [] for k in watches}  # seconds from IOC ready to first update
    lost = {k: [] for k in watches}  # seconds from kill to the disconnect event
    starts = []  # seconds from spawn to "IOC Running"
    for n in range(args.restarts):
        for prefix, ioc in iocs.items():
            mine = {k: w for k, w in watches.items() if k[1] == prefix}
            # A random pause, so the kills do not fall at a fixed phase of
            # the clients' free-running timers (libca's 10 s disconnect
            # governor): a steady rhythm would lock every restart to one
            # point of that period.
            time.sleep(rng.uniform(1.0, 11.0))
            for w in mine.values():
                w.drain()
            t_kill = kill_ioc(ioc)
            for k, w in mine.items():
                ev = w.next_event(lambda e: e["event"] == "conn" and not e["connected"], DISCONNECT_LIMIT)
                lost[k].append(None if ev is None else ev["t"] - t_kill)
            t_spawn = time.time()
            t_ready = start_ioc(ioc)
            starts.append(t_ready - t_spawn)
            for k, w in mine.items():
                # Only the new process can send an update after the kill.
                ev = w.next_event(lambda e: e["event"] == "value" and e["t"] > t_kill, RESUME_LIMIT)
                resume[k].append(None if ev is None else ev["t"] - t_ready)
            got = ", ".join(
                f"{k[0]} {k[2]} {fmt(resume[k][-1]).strip()}" for k in sorted(mine)
            )
            print(f"  restart {n + 1} of {prefix:<6} ready {starts[-1]:.2f} s after spawn; resumed (s): {got}")
            sys.stdout.flush()

    print()
    print("Time from the restarted IOC's \"IOC Running\" to the monitor's first update (s)")
    print(f"{'client':<8}{'IOC':<20}{'path':<8}{'median':>8}{'max':>8}{'lost':>8}"
          f"{'shim-direct median':>20}{'max':>8}")
    for proto in ("CA", "PVA"):
        for prefix in iocs:
            for path in ("direct", "shim"):
                k = (proto, prefix, path)
                got = [x for x in resume[k] if x is not None]
                missing = len(resume[k]) - len(got)
                med = statistics.median(got) if got else None
                mx = max(got) if got else None
                lo = [x for x in lost[k] if x is not None]
                row = (f"{proto:<8}{IOC_LABEL[prefix]:<20}{path:<8}{fmt(med):>8}{fmt(mx):>8}"
                       f"{fmt(statistics.median(lo)) if lo else '   -  ':>8}")
                if path == "shim":
                    d = [s - dd for s, dd in zip(resume[k], resume[(proto, prefix, "direct")])
                         if s is not None and dd is not None]
                    row += f"{fmt(statistics.median(d)) if d else '   -  ':>20}{fmt(max(d)) if d else '   -  ':>8}"
                if missing:
                    row += f"  ({missing} of {len(resume[k])} did not resume within {RESUME_LIMIT:.0f} s)"
                print(row)
    print("  lost = median time from the kill to the client's disconnect event; shim-direct = per")
    print("  restart, the shim path's time minus the direct path's for the same restart (median, max)")
    print(f"  IOC start, spawn to \"IOC Running\": median {statistics.median(starts):.2f} s, "
          f"max {max(starts):.2f} s")
    text = shim.log.read_text(errors="replace")
    warns = [h._ANSI.sub("", line) for line in text.splitlines() if " WARN " in line or " ERROR " in line]
    print(f"  nameshim still running: {'yes' if shim.alive() else 'NO'}; "
          f"log lines at WARN or ERROR: {len(warns)}")
    for line in warns[:5]:
        print(f"    {line[:300]}")
    print(f"  whole run: {time.monotonic() - t_begin:.0f} s")

    for w in watches.values():
        w.close()
    shim.stop()
    h.cleanup_all()
    if args.keep:
        print(f"  logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
