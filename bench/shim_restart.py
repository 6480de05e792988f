"""How long monitors take to resume after the shim itself is killed and
started again on the same port, per client library.

  sudo .venv/bin/python bench/shim_restart.py [--restarts N] [--keep]

Built on tests/e2e/harness.py: one simulated container (a network
namespace) holds two IOCs and the shim (sidecar mode, 0.0.0.0:5066):

  PVXS:  pvxslibs softIoc: CA (rsrv) and PVA (QSRV2, pvxs)
  CPP:   epicscorelibs softIoc: CA (rsrv) and PVA (QSRV1, pvAccessCPP)

Each IOC's COUNT record counts at 10 Hz. Monitors, one process each, in
the container, with the shim as their only name server (no UDP search):

  libca        pyepics auto_monitor (ca_client.py --watch)
  pvxs         p4p Context.monitor (pva_client.py --watch)
  pvAccessCPP  pvapy Channel.monitor (pvapy_client.py --watch)

Each restart SIGKILLs the shim (a crash: no goodbye to anyone), waits
until every monitor reported the loss, starts the shim again and takes
the moment its "listening" line appears as the restart. The figure is, per
monitor, the time from that moment to its first update. Each restart
comes after a random pause (seeded), so it does not fall at one fixed
phase of the clients' own retry timers.
"""

from __future__ import annotations

import argparse
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
IOCS = {"PVXS:": "pvxslibs", "CPP:": "epicscorelibs"}
CLIENTS = {
    "libca": (h.CA_CLIENT, h.client_env),
    "pvxs": (h.PVA_CLIENT, h.pva_client_env),
    "pvAccessCPP": (h.PVAPY_CLIENT, h.pva_client_env),
}
RESUME_LIMIT = 90.0
DISCONNECT_LIMIT = 30.0


class Watch(h.CaWatch):
    """A JSON-event monitor process (`--watch` of a client script)."""

    def __init__(self, ns, script, pv, env):
        self._start(ns, [h.PYTHON, script, "--watch", pv, "3600"], env)

    def next_event(self, pred, timeout):
        try:
            return self.wait_for(pred, timeout)
        except TimeoutError:
            return None


class Site:
    """The container, its IOCs and a shim that can be killed and restarted."""

    def __init__(self, work: Path, shim_log="info"):
        self.work = work
        self.ctr = h.Container()
        self.iocs = {
            p: h.SoftIoc(self.ctr, p, work, flavour, 1.0, h.PVA_SERVER_ENV).start() for p, flavour in IOCS.items()
        }
        self.shim_log = shim_log
        self.starts = 0
        self.shim = None
        self.start_shim()

    @property
    def name_server(self) -> str:
        return f"127.0.0.1:{SHIM_PORT}"

    def start_shim(self) -> float:
        """Starts the shim; the wall-clock time its listening line appeared."""
        self.starts += 1
        work = self.work / f"shim-{self.starts}"
        work.mkdir()
        self.shim = h.Shim(self.ctr, ["--listen", f"0.0.0.0:{SHIM_PORT}"], work, env={"NAMESHIM_LOG": self.shim_log})
        self.shim.proc = h.run_in(self.ctr, [self.shim.binary, *self.shim.args], env=self.shim.env, log_path=self.shim.log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "listening addr=" in h._read_from(self.shim.log, 0):
                self.shim.addr = f"0.0.0.0:{SHIM_PORT}"
                h.Shim.live.append(self.shim)
                return time.time()
            if self.shim.proc.poll() is not None:
                raise RuntimeError(f"nameshim exited:\n{h.tail(self.shim.log)}")
            time.sleep(0.005)
        raise TimeoutError(f"nameshim not listening:\n{h.tail(self.shim.log)}")

    def kill_shim(self) -> float:
        t = time.time()
        self.shim.proc.send_signal(signal.SIGKILL)
        self.shim.proc.wait(10)
        if self.shim in h.Shim.live:
            h.Shim.live.remove(self.shim)
        return t

    def watches(self) -> dict:
        """(client, ioc) -> Watch on that IOC's COUNT, each with a first update."""
        out = {}
        for client, (script, env) in CLIENTS.items():
            for prefix in self.iocs:
                out[(client, prefix)] = Watch(self.ctr, script, f"{prefix}COUNT", env(self.name_server))
        for key, w in out.items():
            if w.next_event(lambda e: e["event"] == "value", 30) is None:
                raise RuntimeError(f"monitor {key} got no update; shim log:\n{self.shim.log_text(40)}")
        return out

    def close(self):
        self.ctr.close()


def restart_once(site: Site, watches: dict) -> tuple[dict, dict]:
    """Kills and restarts the shim; per monitor, (seconds from kill to its
    disconnect event, seconds from the restart to its first update)."""
    for w in watches.values():
        w.drain()
    t_kill = site.kill_shim()
    lost = {}
    for k, w in watches.items():
        ev = w.next_event(lambda e: e["event"] == "conn" and not e["connected"], DISCONNECT_LIMIT)
        lost[k] = None if ev is None else ev["t"] - t_kill
    t_ready = site.start_shim()
    resumed = {}
    for k, w in watches.items():
        # An update stamped after the restart came through the new shim.
        ev = w.next_event(lambda e: e["event"] == "value" and e["t"] > t_ready, RESUME_LIMIT)
        resumed[k] = None if ev is None else ev["t"] - t_ready
    return lost, resumed


def fmt(x):
    return "   -  " if x is None else f"{x:6.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--restarts", type=int, default=3, help="shim restarts (default 3)")
    ap.add_argument("--seed", type=int, default=5066, help="seed of the pauses between restarts")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = ap.parse_args()
    reason = h.cannot_run_reason()
    if reason:
        sys.exit(f"shim_restart: {reason}")
    work = Path(tempfile.mkdtemp(prefix="nameshim-shim-restart."))
    site = Site(work)
    try:
        watches = site.watches()
        version = subprocess.run([str(site.shim.binary), "--version"], capture_output=True, text=True).stdout.strip()
        print("nameshim: monitors resuming after the shim is SIGKILLed and restarted on the same port")
        print(f"  machine: {os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}, "
              f"load avg {' '.join(open('/proc/loadavg').read().split()[:3])}")
        print(f"  shim:    {version}, sidecar on 0.0.0.0:{SHIM_PORT}; IOCs PVXS: (pvxs) and CPP: (pvAccessCPP), COUNT at 10 Hz")
        print(f"  {args.restarts} restarts after a random pause of 2-12 s (seed {args.seed})")
        sys.stdout.flush()
        rng = random.Random(args.seed)
        lost = {k: [] for k in watches}
        resumed = {k: [] for k in watches}
        for n in range(args.restarts):
            time.sleep(rng.uniform(2.0, 12.0))
            l, r = restart_once(site, watches)
            for k in watches:
                lost[k].append(l[k])
                resumed[k].append(r[k])
            print(f"  restart {n + 1}: " + ", ".join(f"{c} {p} {fmt(r[(c, p)]).strip()}" for c, p in watches))
            sys.stdout.flush()
        print()
        print("Time from the restarted shim's listening line to each monitor's first update (s)")
        print(f"{'client':<13}{'IOC':<7}{'median':>8}{'max':>8}{'missing':>9}{'loss seen':>11}")
        for k in watches:
            got = [x for x in resumed[k] if x is not None]
            seen = [x for x in lost[k] if x is not None]
            print(f"{k[0]:<13}{k[1]:<7}{fmt(statistics.median(got) if got else None):>8}"
                  f"{fmt(max(got) if got else None):>8}{len(resumed[k]) - len(got):>9}"
                  f"{fmt(statistics.median(seen) if seen else None):>11}")
    finally:
        for w in locals().get("watches", {}).values():
            w.close()
        site.close()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
