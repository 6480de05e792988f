"""Soak: many CA and PVA clients subscribe, unsubscribe and reconnect
through one shim for a while, as one IOC restarts every minute; the shim's
memory, descriptors and connections are sampled, and every monitor update
of a counting record is checked for loss and order.

  sudo .venv/bin/python bench/soak.py [--minutes 10] [--churners 3] [--keep]
  (scripts/soak runs this; not part of CI)

Built on tests/e2e/harness.py: one simulated container (a network namespace)
holds a pvxslibs softIoc (PVXS:, rsrv + pvxs) and an epicscorelibs softIoc
(CPP:, rsrv + pvAccessCPP), and the shim (sidecar, 0.0.0.0:5066). Each IOC's
COUNT record counts up by one at 10 Hz. Clients, all in the container with
the shim as their only name server:

  steady    one monitor per protocol and IOC for the whole run (pyepics,
            p4p); each update must be the previous one plus one, within one
            connection of the IOC (an IOC restart starts the count again)
  churners  per protocol, N loops of short client processes: each opens a
            connection, subscribes to one IOC's COUNT for 0.5-2.5 s,
            unsubscribes, subscribes again on the same connection, then
            disconnects; the next process reconnects. Their updates are
            checked the same way, except in a cycle that overlapped a restart
  control   the same steady monitors on the direct path (UDP search on
            the container's broadcast address, no shim): a gap seen there too, at the same IOC
            time, was lost before the shim (the IOC, or a stalled machine)
  restarts  every 60 s one IOC (in turn) is SIGKILLed and started again

Every 5 s the shim's RSS and open descriptors (from /proc) and its client,
channel and server-link counts (from /metrics) are sampled, with the load
average. The summary prints one row per minute and the totals; the exit
code is 1 if an update was lost or out of order through the shim and not
also on the direct path, or the shim died.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import harness as h  # noqa: E402

SHIM_PORT = 5066
IOCS = {"PVXS:": "pvxslibs", "CPP:": "epicscorelibs"}
SAMPLE_EVERY = 5.0
RESTART_EVERY = 60.0


class Continuity:
    """Counts updates, losses and reorderings of a counting record."""

    def __init__(self):
        self.lock = threading.Lock()
        self.updates = 0
        self.lost = 0
        self.reordered = 0
        self.gaps: list = []  # (ioc, ts before, ts after, what)

    def check(self, run, ioc: str, what: str) -> None:
        """`run`: one connection's updates as (value, IOC timestamp), in
        arrival order."""
        with self.lock:
            self.updates += len(run)
            for (a, ta), (b, tb) in zip(run, run[1:]):
                if b == a + 1:
                    continue
                if b > a + 1:
                    self.lost += int(b - a - 1)
                else:
                    self.reordered += 1
                self.gaps.append((ioc, ta, tb, f"{what}: {a:g} -> {b:g}"))


def explained(gap, control: "Continuity") -> bool:
    """A gap the direct-path monitors of the same IOC also show at the same
    IOC time: lost before the shim (the IOC or the machine), not in it."""
    ioc, ta, tb, _ = gap
    return any(c[0] == ioc and c[1] < tb and ta < c[2] for c in control.gaps)


def segments(events) -> list:
    """Splits a watch's events into per-connection (value, ts) lists."""
    out, current = [], []
    for e in events:
        if e["event"] == "conn":
            if current:
                out.append(current)
            current = []
        elif e["event"] == "value":
            current.append((e["value"], e.get("ts") or e["t"]))
    if current:
        out.append(current)
    return out


def metrics(ctr) -> dict:
    try:
        text = ctr.sh(["curl", "-s", "--max-time", "2", f"http://127.0.0.1:{SHIM_PORT}/metrics"], timeout=5)
    except Exception:
        return {}
    got = {}
    for m in re.finditer(r'^(nameshim_\w+)(?:\{\w+="(\w+)"\})? (\d+)$', text, re.M):
        got[(m.group(1), m.group(2))] = int(m.group(3))
    return got


def proc_sample(pid: int) -> tuple:
    rss = 0
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="duration (default 10)")
    ap.add_argument("--churners", type=int, default=3, help="churning client loops per protocol (default 3)")
    ap.add_argument("--seed", type=int, default=5066)
    ap.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = ap.parse_args()
    reason = h.cannot_run_reason()
    if reason:
        sys.exit(f"soak: {reason}")
    work = Path(tempfile.mkdtemp(prefix="nameshim-soak."))
    ctr = h.Container()
    stop = threading.Event()
    threads = []
    watches = {}
    direct = {}
    try:
        iocs = {p: h.SoftIoc(ctr, p, work, f, 0.0, h.PVA_SERVER_ENV).start() for p, f in IOCS.items()}
        shim = h.Shim(ctr, ["--listen", f"0.0.0.0:{SHIM_PORT}"], work, env={"NAMESHIM_LOG": "info"})
        shim.start()
        ns = shim.local_addr
        duration = args.minutes * 60
        steady = Continuity()
        churn = Continuity()
        control = Continuity()
        cycles = {"CA": 0, "PVA": 0}
        errors: list = []
        restarts: list = []  # (t_kill, t_ready)
        for prefix in iocs:
            watches[("CA", prefix)] = h.CaWatch(ctr, ns, f"{prefix}COUNT", duration=duration + 120)
            watches[("PVA", prefix)] = h.PvaWatch(ctr, ns, f"{prefix}COUNT", duration=duration + 120)
        # The control: the same monitors on the direct path (UDP search
        # in the container, no shim), to tell a loss in the shim from one
        # before it (an IOC or a machine that stalls).
        # (The container's broadcast address, as bench/ioc_restart.py.)
        broadcast = str(ipaddress.ip_network(f"{ctr.addr}/30", strict=False).broadcast_address)
        direct_env = {
            "CA": {"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": broadcast},
            "PVA": h.pva_direct_env(broadcast),
        }
        scripts = {"CA": h.CA_CLIENT, "PVA": h.PVA_CLIENT}
        for prefix in iocs:
            for proto in ("CA", "PVA"):
                w = h.CaWatch.__new__(h.CaWatch)
                w._start(ctr, [h.PYTHON, scripts[proto], "--watch", f"{prefix}COUNT", str(duration + 120)],
                         direct_env[proto])
                direct[(proto, prefix)] = w
        for w in [*watches.values(), *direct.values()]:
            w.wait_for(lambda e: e["event"] == "value", 30)

        def churner(proto: str, seed: int):
            rng = random.Random(seed)
            while not stop.is_set():
                prefix = rng.choice(list(iocs))
                pv = f"{prefix}COUNT"
                d1, d2 = rng.uniform(0.5, 2.5), rng.uniform(0.5, 2.5)
                t0 = time.time()
                try:
                    if proto == "CA":
                        ops = [{"op": "monitor", "pv": pv, "duration": d, "timeout": 5} for d in (d1, d2)]
                        results = h.ca_program(ctr, ns, ops, timeout=60)
                        runs = [[tuple(u[:2]) for u in r["updates"]] for r in results if r.get("connected")]
                    else:
                        ops = [{"op": "monitor", "pvs": [pv], "duration": d, "timeout": 5} for d in (d1, d2)]
                        results = h.pva_program(ctr, ns, ops, timeout=60)
                        runs = [[tuple(u[:2]) for u in r[pv]["updates"]] for r in results if r[pv].get("connected")]
                except Exception as e:  # noqa: BLE001 - reported in the summary
                    errors.append(f"{proto} churner: {str(e)[:200]}")
                    time.sleep(1)
                    continue
                t1 = time.time()
                overlapped = any(k - 1 <= t1 and t0 <= r + 5 for k, r in list(restarts))
                if not overlapped:
                    for run in runs:
                        churn.check(run, prefix, f"{proto} churn {pv}")
                    if len(runs) < 2:
                        errors.append(f"{proto} churn {pv}: {2 - len(runs)} subscription(s) never connected")
                cycles[proto] += 1

        for proto in ("CA", "PVA"):
            for i in range(args.churners):
                t = threading.Thread(target=churner, args=(proto, args.seed + 100 * i + len(proto)), daemon=True)
                t.start()
                threads.append(t)

        samples = []  # (t, rss kB, fds, metrics)
        t_start = time.monotonic()
        next_restart = t_start + RESTART_EVERY
        order = list(iocs)
        n_restart = 0
        print(f"soak: {args.minutes:g} min, {args.churners} churners per protocol, one IOC restart per minute", flush=True)
        while time.monotonic() - t_start < duration:
            if not shim.alive():
                errors.append("the shim died")
                break
            rss, fds = proc_sample(shim.proc.pid)
            load = float(open("/proc/loadavg").read().split()[0])
            samples.append((time.monotonic() - t_start, rss, fds, metrics(ctr), dict(cycles), load))
            if time.monotonic() >= next_restart:
                ioc = iocs[order[n_restart % len(order)]]
                n_restart += 1
                t_kill = time.time()
                ioc.stop(signal.SIGKILL)
                ioc.start()
                restarts.append((t_kill, time.time()))
                next_restart += RESTART_EVERY
            time.sleep(SAMPLE_EVERY)
        stop.set()
        for t in threads:
            t.join(90)
        for key, w in watches.items():
            w.drain()
            for run in segments(w.events):
                steady.check(run, key[1], f"{key[0]} steady {key[1]}")
        for key, w in direct.items():
            w.drain()
            for run in segments(w.events):
                control.check(run, key[1], f"{key[0]} direct {key[1]}")
        # Every steady monitor must have come back after the last restart.
        last_ready = restarts[-1][1] if restarts else 0
        for key, w in watches.items():
            if not any(e["event"] == "value" and e["t"] > last_ready for e in w.events):
                errors.append(f"steady {key} got no update after the last restart")
        alive = shim.alive()
        rss_end, fds_end = proc_sample(shim.proc.pid) if alive else (0, 0)

        def m(sample, name, label=None):
            return sample[3].get((name, label), 0)

        print()
        print(f"{'minute':>6}{'RSS MiB':>9}{'fds':>6}{'CA cl':>7}{'PVA cl':>7}{'CA ch':>7}{'PVA ch':>7}"
              f"{'links':>7}{'accepted Σ':>11}{'cycles Σ':>9}{'load':>6}")
        for minute in range(int(args.minutes + 0.999)):
            rows = [s for s in samples if minute * 60 <= s[0] < (minute + 1) * 60]
            if not rows:
                continue
            s = rows[-1]
            links = sum(m(s, "nameshim_server_links_opened_total", p) - m(s, "nameshim_server_links_lost_total", p)
                        for p in ("ca", "pva"))
            accepted = sum(m(s, "nameshim_clients_accepted_total", p) for p in ("ca", "pva"))
            print(f"{minute + 1:>6}{max(r[1] for r in rows) / 1024:>9.1f}{max(r[2] for r in rows):>6}"
                  f"{max(m(r, 'nameshim_clients', 'ca') for r in rows):>7}"
                  f"{max(m(r, 'nameshim_clients', 'pva') for r in rows):>7}"
                  f"{max(m(r, 'nameshim_channels', 'ca') for r in rows):>7}"
                  f"{max(m(r, 'nameshim_channels', 'pva') for r in rows):>7}"
                  f"{links:>7}{accepted:>11}{sum(s[4].values()):>9}{max(r[5] for r in rows):>6.1f}")
        rss = [s[1] for s in samples]
        fds = [s[2] for s in samples]
        print()
        print(f"shim RSS MiB: first {rss[0] / 1024:.1f}, median {statistics.median(rss) / 1024:.1f}, "
              f"max {max(rss) / 1024:.1f}, end {rss_end / 1024:.1f}")
        print(f"shim fds: first {fds[0]}, median {statistics.median(fds):.0f}, max {max(fds)}, end {fds_end}")
        print(f"IOC restarts: {len(restarts)}; churn cycles: CA {cycles['CA']}, PVA {cycles['PVA']} "
              f"(each: connect, subscribe, unsubscribe, subscribe, disconnect)")
        unexplained = [g for g in steady.gaps + churn.gaps if not explained(g, control)]
        print(f"steady monitors: {steady.updates} updates, {steady.lost} lost, {steady.reordered} out of order")
        print(f"churn monitors:  {churn.updates} updates, {churn.lost} lost, {churn.reordered} out of order")
        print(f"direct path (control, no shim): {control.updates} updates, {control.lost} lost, "
              f"{control.reordered} out of order")
        print(f"gaps through the shim: {len(steady.gaps) + len(churn.gaps)}, of which not also seen on the "
              f"direct path: {len(unexplained)}")
        for ioc, ta, tb, what in (steady.gaps + churn.gaps + control.gaps)[:12]:
            when = time.strftime("%H:%M:%S", time.gmtime(ta))
            print(f"  {when}Z {what}{'' if explained((ioc, ta, tb, what), control) else '  (shim path only)'}")
        print(f"shim: {'alive' if alive else 'DEAD'}; errors: {len(errors)}")
        for e in errors[:10]:
            print(f"  {e}")
        bad = unexplained or not alive
        return 1 if bad else 0
    finally:
        stop.set()
        for w in [*watches.values(), *direct.values()]:
            w.close()
        ctr.close()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
