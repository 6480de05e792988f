"""Report of the get-latency phase of scripts/bench-pva.

Usage: pva_get_report.py WORK CLK_TCK SHIM_WARN_LINES

Reads what the phase left in WORK: get.txt (one line a client run: round,
source, path, the relay's CPU ticks over the run and the line of
bench/pva_get_latency.cpp), get/<source>.<mode>.<path>.<round> (every timed
get of that run, in ns), get_connect.txt (one line a fresh client process),
get_failed.txt and the load averages. Prints the tables.
"""

import math
import os
import statistics
import sys

PATHS = ["direct", "pipe", "shim", "shim-pva", "pvagw"]
SOURCES = ["pvxs", "pvacpp"]
MODES = {
    "reuse": "one GET operation executed again and again (one request, one reply a get)",
    "new": "a new GET operation a get, as pvget and p4p do (INIT and EXEC: two round trips)",
}
TARGET = 1.2  # docs/performance.md: PVA get latency at most 1.2x direct


def pct(sorted_v, p):
    """Nearest-rank percentile, as in the client."""
    rank = max(1, min(len(sorted_v), math.ceil(p / 100 * len(sorted_v))))
    return sorted_v[rank - 1]


def kv_lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [dict(tok.split("=", 1) for tok in line.split()) for line in f if line.strip()]


def per_round_ratios(rmed, path, base):
    """Ratio of the path's median to the base's, round by round (the paths of
    one round ran back to back, so drift on the machine cancels)."""
    a, b = rmed.get(path, {}), rmed.get(base, {})
    return [a[r] / b[r] for r in a if r in b and b[r] > 0]


def fmt_ratio(x):
    return f"{statistics.median(x):.2f}" if x else "-"


def latency_tables(work, hz, runs):
    verdicts = []
    for mode, what in MODES.items():
        mode_runs = [kv for kv in runs if kv["mode"] == mode]
        if not mode_runs:
            continue
        n_rounds = len({kv["round"] for kv in mode_runs})
        first = mode_runs[0]
        print()
        print(f"PV Access get round trip, {what};")
        print(f"  {n_rounds} rounds x {first['n']} gets (+{first['warmup']} warm-up) per source "
              f"and path, microseconds")
        print(f"{'source':<8}{'path':<10}{'med(rnd)':>10}{'p10':>7}{'p90':>8}{'p99':>8}"
              f"{'min':>7}{'added':>8}{'x direct':>10}{'(rounds)':>12}{'x pipe':>8}"
              f"{'p10 x dir':>11}{'relay CPU/get':>15}")
        for source in SOURCES:
            rmed, res = {}, {}
            for p in PATHS:
                rs = [kv for kv in mode_runs if kv["source"] == source and kv["path"] == p]
                if not rs:
                    continue
                pooled = []
                for kv in rs:
                    name = f"{source}.{mode}.{p}.{kv['round']}"
                    with open(os.path.join(work, "get", name)) as f:
                        v = sorted(int(x) / 1000.0 for x in f)
                    pooled += v
                    rmed.setdefault(p, {})[kv["round"]] = statistics.median(v)
                pooled.sort()
                ticks = sum(int(kv["relay_ticks"]) for kv in rs)
                gets = sum(int(kv["n"]) + int(kv["warmup"]) for kv in rs)
                res[p] = dict(
                    med=statistics.median(rmed[p].values()),
                    p10=pct(pooled, 10),
                    p90=pct(pooled, 90),
                    p99=pct(pooled, 99),
                    min=pooled[0],
                    cpu_us=ticks / hz / gets * 1e6,
                )
            d = res.get("direct")
            for p, x in res.items():
                xd = per_round_ratios(rmed, p, "direct")
                row = (f"{source:<8}{p:<10}{x['med']:>10.1f}{x['p10']:>7.1f}{x['p90']:>8.1f}"
                       f"{x['p99']:>8.1f}{x['min']:>7.1f}")
                row += f"{x['med'] - d['med']:>+8.1f}" if d else f"{'-':>8}"
                rng = f"{min(xd):.2f}-{max(xd):.2f}" if xd and p != "direct" else ""
                row += f"{fmt_ratio(xd):>10}{rng:>12}{fmt_ratio(per_round_ratios(rmed, p, 'pipe')):>8}"
                p10x = x["p10"] / d["p10"] if d else None
                row += f"{p10x:>11.2f}" if p10x else f"{'-':>11}"
                row += f"{x['cpu_us']:>13.1f}us" if p != "direct" else ""
                print(row)
                if p == "shim" and xd:
                    verdicts.append((mode, source, statistics.median(xd), p10x))
            if "pvagw" not in res:
                print(f"  pvagw served no {source} get (see the bench-pva lines above)")
            if "shim" in rmed and "direct" in rmed:
                rounds = sorted(rmed["shim"], key=int)
                print(f"  {source} per-round shim/direct: " + " ".join(
                    f"{rmed['shim'][r] / rmed['direct'][r]:.2f}" for r in rounds
                    if r in rmed["direct"]))
        print("  med(rnd) = median of the per-round medians; added = med(rnd) minus direct's;")
        print("  p10/p90/p99/min over all rounds' gets; x direct, x pipe = median of the per-round")
        print("  ratios of the medians, (rounds) = their range; p10 x dir = p10 / direct's p10, the")
        print("  ratio least moved by other work on the machine; relay CPU/get = the relay's CPU time")
        print("  (all threads) over the runs of that path / the gets made in them, connect included,")
        print("  in 10 ms ticks: a rough figure")
    return verdicts


def connect_table(runs):
    if not runs:
        return
    n = max(sum(1 for kv in runs if kv["source"] == s and kv["path"] == "direct") for s in SOURCES)
    print()
    print(f"Short-lived client (fresh process: context, connect, one get, exit), median of {n} "
          f"runs per source and path, interleaved, microseconds")
    print(f"{'source':<8}{'path':<10}{'connect':>10}{'1st get':>10}{'conn+get':>10}{'process':>10}"
          f"{'x direct':>10}")
    for source in SOURCES:
        base = None
        for p in PATHS:
            rs = [kv for kv in runs if kv["source"] == source and kv["path"] == p]
            if not rs:
                continue
            wall = []
            for kv in rs:
                t0, t1 = (float(x) for x in kv["wall_s"].split(","))
                wall.append((t1 - t0) * 1e6)
            tot = statistics.median(float(kv["total_us"]) for kv in rs)
            if p == "direct":
                base = tot
            print(f"{source:<8}{p:<10}"
                  f"{statistics.median(float(kv['connect_us']) for kv in rs):>10.0f}"
                  f"{statistics.median(float(kv['first_get_us']) for kv in rs):>10.0f}"
                  f"{tot:>10.0f}{statistics.median(wall):>10.0f}"
                  + (f"{tot / base:>10.2f}" if base else f"{'-':>10}"))
    print("  connect = context creation to the end of the GET's INIT (search, TCP connection,")
    print("  validation, channel, operation); conn+get = connect + the first get; process = wall")
    print("  time of the whole process incl. exec, library load and exit. The shim's shared port")
    print("  first waits --classify-window (200 ms) for a CA client to speak; shim-pva is its")
    print("  PVA-only port (--pva-listen), which greets at once")


def main():
    work, hz, shim_warn = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    verdicts = latency_tables(work, hz, kv_lines(os.path.join(work, "get.txt")))
    connect_table(kv_lines(os.path.join(work, "get_connect.txt")))
    print()
    for mode, source, x, p10x in verdicts:
        print(f"target: PVA get latency at most {TARGET}x direct, shim, {source} source, "
              f"mode={mode}: {x:.2f} (p10 {p10x:.2f}), {'ok' if x <= TARGET else 'MISS'}")
    for kv in kv_lines(os.path.join(work, "get_failed.txt")):
        print(f"failed get run: {kv['source']} over {kv['path']}, {kv['what'].replace('_', ' ')}")
    print(f"nameshim log lines with error/warn/panic during the get phase: {shim_warn}")
    for name, when in [("get_load_start.txt", "start"), ("get_load_end.txt", "end")]:
        with open(os.path.join(work, name)) as f:
            print(f"load average at the {when} of the get phase: " + f.read().split("=")[1].strip())


if __name__ == "__main__":
    main()
