"""Faults of real peers around a real shim: servers that hang or refuse,
running out of file descriptors, and the shim killed under live monitors.

One simulated container holds an epicscorelibs softIoc (IOCA:, rsrv +
pvAccessCPP) and a pvxslibs softIoc (PVXS:, rsrv + pvxs). A faulty server
(fake_server.py) answers UDP searches for its own names like a real server
but hangs or refuses on TCP. Clients are pyepics (libca), p4p (pvxs) and
pvapy (pvAccessCPP) configured with the shim as their only name server.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import harness as h
import pytest

HERE = Path(__file__).resolve().parent
FAKE_SERVER = HERE / "fake_server.py"
SHIM_PORT = 5066
LOG_ENV = {"NAMESHIM_LOG": "info"}


class FakeServer(h.Server):
    """fake_server.py in a namespace: answers searches for `names`, then
    hangs (mode "silent") or refuses (mode "refuse") on TCP."""

    ready = re.compile(r"Serving on port (\d+)")

    def __init__(self, ns, mode, workdir, ca_name, pva_name):
        super().__init__(ns, f"FAKE{mode.upper()}:", workdir)
        self.mode, self.ca_name, self.pva_name = mode, ca_name, pva_name
        self.what = f"fake {mode} server"

    def argv(self):
        return [h.PYTHON, FAKE_SERVER, "--mode", self.mode, "--ca", self.ca_name, "--pva", self.pva_name]

    def port(self) -> int:
        return int(self.ready.search(h.tail(self.log, 400)).group(1))

    def accepted(self) -> int:
        return len(re.findall(r"^accepted ", h.tail(self.log, 100000), re.M))


@pytest.fixture(scope="module")
def site(netns_ok, shim_bin, shim_help, tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    ctr = h.Container()
    try:
        iocs = {
            "IOCA:": h.SoftIoc(ctr, "IOCA:", work, "epicscorelibs", init=1.0, env=h.PVA_SERVER_ENV).start(),
            "PVXS:": h.SoftIoc(ctr, "PVXS:", work, "pvxslibs", init=3.0, env=h.PVA_SERVER_ENV).start(),
        }
        yield SimpleNamespace(ctr=ctr, iocs=iocs, work=work)
    finally:
        ctr.close()


def start_shim(site, name, args=(), preexec_fn=None) -> h.Shim:
    work = site.work / name
    work.mkdir(exist_ok=True)
    shim = h.Shim(site.ctr, ["--listen", f"127.0.0.1:{SHIM_PORT}", *args], work, env=LOG_ENV)
    if preexec_fn is None:
        shim.start()
        return shim
    # As Shim.start, with the child's limits set before exec.
    shim.proc = subprocess.Popen(
        site.ctr.exec_argv([shim.binary, *shim.args]),
        env=h.clean_env(shim.env),
        stdin=subprocess.DEVNULL,
        stdout=open(shim.log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=preexec_fn,
    )
    site.ctr.procs.append(shim.proc)
    h.Shim.live.append(shim)
    shim.addr = h.wait_for_log(shim.log, re.compile(r"listening addr=(\S+)"), shim.proc, 20, "nameshim").group(1)
    return shim


def open_to(ns: h.Netns, port: int) -> list:
    """Established TCP connections inside ns to `port`. One the shim has
    closed (FIN-WAIT-2, its peer never closing) is no longer the shim's."""
    return ns.sh(["ss", "-Htn", "state", "established", "dst", f":{port}"]).splitlines()


def ns_of(shim) -> str:
    return shim.local_addr


# --------------------------------------------------------------------------
# A server that answers searches, then hangs or refuses on TCP


@pytest.fixture
def faulty(site, request):
    server = FakeServer(site.ctr, request.param, site.work, "FAULT:CA", "FAULT:PVA").start()
    shim = start_shim(site, f"shim-{request.param}")
    try:
        yield SimpleNamespace(server=server, shim=shim, mode=request.param)
    finally:
        shim.stop()
        server.stop()


def syn_counter(ns: h.Netns, port: int):
    """Counts TCP SYNs sent inside ns to `port` (nftables counter)."""
    ns.sh(
        ["nft", "-f", "-"],
        input=(
            "table ip faults {\n"
            "  chain out { type filter hook output priority 0; policy accept;\n"
            f"    tcp dport {port} tcp flags & (syn | ack) == syn counter\n"
            "  }\n"
            "}\n"
        ),
    )

    def read() -> int:
        m = re.search(r"counter packets (\d+)", ns.sh(["nft", "list", "table", "ip", "faults"]))
        return int(m.group(1)) if m else 0

    def remove():
        ns.sh(["nft", "delete", "table", "ip", "faults"])

    return read, remove


@pytest.mark.parametrize("faulty", ["silent", "refuse"], indirect=True)
def test_a_faulty_server_fails_its_channels_only(site, faulty):
    read_syns, remove_counter = syn_counter(site.ctr, faulty.server.port())
    ns = ns_of(faulty.shim)
    # A monitor on a real IOC runs through the same shim the whole time.
    watch = h.CaWatch(site.ctr, ns, "IOCA:COUNT", duration=60)
    try:
        watch.wait_for(lambda e: e["event"] == "value", 10)
        t0 = time.monotonic()
        ca_fault, ca_real = h.ca_program(
            site.ctr,
            ns,
            [
                {"op": "get", "pvs": ["FAULT:CA"], "timeout": 5},
                {"op": "get", "pvs": ["IOCA:ID", "PVXS:ID"], "timeout": 5},
            ],
        )
        pva_fault = h.pva_get(site.ctr, ns, ["FAULT:PVA"], timeout=5)["FAULT:PVA"]
        pva_real = h.pva_get(site.ctr, ns, ["PVXS:ID", "IOCA:ID"], timeout=5)
        pvapy_fault = h.pvapy_get(site.ctr, ns, ["FAULT:PVA"], timeout=5, limit=40)["FAULT:PVA"]
        elapsed = time.monotonic() - t0
        # Clients get a plain failure within their own timeout...
        assert ca_fault == {"FAULT:CA": {"connected": False}}, ca_fault
        assert not pva_fault["ok"], pva_fault
        assert not pvapy_fault["ok"], pvapy_fault
        # ... and everything else keeps working through the same shim.
        assert ca_real["IOCA:ID"]["value"] == "IOCA:" and ca_real["PVXS:ID"]["value"] == "PVXS:", ca_real
        assert pva_real["PVXS:ID"]["ok"] and pva_real["PVXS:ID"]["value"] == "PVXS:", pva_real
        assert pva_real["IOCA:ID"]["ok"] and pva_real["IOCA:ID"]["value"] == "IOCA:", pva_real
        before = len([e for e in watch.drain() if e["event"] == "value"])
        time.sleep(1.0)
        after = [e["value"] for e in watch.drain() if e["event"] == "value"]
        assert len(after) >= 5, f"the bystander monitor stalled ({before} then {after})"
        values = [e["value"] for e in watch.events if e["event"] == "value"]
        assert all(b - a == 1 for a, b in zip(values, values[1:])), values
        assert faulty.shim.alive()
        # No tight retry loop: connection attempts follow the clients'
        # own retries, a few per second at most.
        syns = read_syns()
        assert syns <= 4 * elapsed + 10, (syns, elapsed)
        print(f"{faulty.mode}: {syns} connection attempts in {elapsed:.1f} s")
        # Nothing is left open towards the faulty server once its clients
        # have gone.
        port = faulty.server.port()
        deadline = time.monotonic() + 10
        while open_to(site.ctr, port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not open_to(site.ctr, port), site.ctr.sh(["ss", "-tn"])
        # The shim says what went wrong, naming the server.
        log = faulty.shim.log_text(2000)
        if faulty.mode == "silent":
            assert re.search(rf"did not answer channel creations.*127\.0\.0\.1:{port}", log), log
        else:
            assert re.search(rf"server (circuit|connection) closed.*127\.0\.0\.1:{port}.*connect failed", log), log
    finally:
        watch.close()
        remove_counter()


# --------------------------------------------------------------------------
# Out of file descriptors

FD_HOG = HERE / "fd_hog.py"
FD_LIMIT = 64


class Hog:
    """fd_hog.py in a namespace: holds CA connections to the shim."""

    def __init__(self, ns, addr):
        host, port = addr.rsplit(":", 1)
        self.proc = subprocess.Popen(
            ns.exec_argv([h.PYTHON, FD_HOG, host, port]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=h.clean_env(),
        )
        ns.procs.append(self.proc)

    def do(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def lines_matching(path, pattern: str, offset: int) -> list:
    return re.findall(pattern, h._read_from(path, offset))


def test_out_of_file_descriptors_refuses_new_clients_keeps_old_ones_and_recovers(site):
    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

    shim = start_shim(site, "shim-fds", preexec_fn=low_fd_limit)
    ns = shim.local_addr
    ca_watch = h.CaWatch(site.ctr, ns, "IOCA:COUNT", duration=120)
    pva_watch = h.PvaWatch(site.ctr, ns, "PVXS:COUNT", duration=120)
    hog = Hog(site.ctr, ns)
    try:
        ca_watch.wait_for(lambda e: e["event"] == "value", 10)
        pva_watch.wait_for(lambda e: e["event"] == "value", 10)
        # Fill the table: some are served, the rest must be refused (closed
        # at once), not left hanging in the listen backlog.
        offset = shim.log.stat().st_size
        full = hog.do(f"open {FD_LIMIT + 16}")
        assert full["served"] < FD_LIMIT + 16, full
        assert full["closed"] > 0 and full["waiting"] == 0, (full, fd_count(shim.proc.pid))
        # While full, every newcomer is refused, and the log says why at a
        # bounded rate (one warning per 10 s), not once per attempt.
        for _ in range(3):
            more = hog.do("open 10")
            assert more == {"served": 0, "closed": 10, "waiting": 0}, more
        time.sleep(1)
        warnings = lines_matching(shim.log, r"(?m)^.*(?:WARN|ERROR) nameshim::relay.*$", offset)
        assert len(warnings) == 1, warnings
        assert any("file descriptors" in w for w in warnings), warnings
        assert shim.alive()
        # The clients that were there keep their updates, in order.
        ca_watch.drain()
        pva_watch.drain()
        time.sleep(1.5)
        for watch in (ca_watch, pva_watch):
            got = [e["value"] for e in watch.drain() if e["event"] == "value"]
            assert len(got) >= 8, (got, watch.events[-5:])
            assert all(b - a == 1 for a, b in zip(got, got[1:])), got
        # Descriptors come back: a newcomer is served again, and real
        # clients get and monitor through the shim.
        hog.do("close 10")
        time.sleep(0.3)
        again = hog.do("open 1")
        assert again == {"served": 1, "closed": 0, "waiting": 0}, again
        assert lines_matching(shim.log, r"file descriptors available again", offset), shim.log_text(20)
        hog.do("close 1000")
        time.sleep(0.3)
        assert h.ca_get(site.ctr, ns, ["IOCA:ID"])["IOCA:ID"]["value"] == "IOCA:"
        assert h.pva_get(site.ctr, ns, ["PVXS:ID"])["PVXS:ID"]["value"] == "PVXS:"
        print(f"fds: first burst {full}, shim holds {fd_count(shim.proc.pid)} fds after recovery")
    finally:
        hog.proc.stdin.close()
        hog.proc.wait(10)
        ca_watch.close()
        pva_watch.close()
        shim.stop()


# --------------------------------------------------------------------------
# The shim killed under live monitors

# Generous bounds over the client libraries' own retry timers (measured
# with bench/shim_restart.py: libca ~7 s, pvxs ~10 s, pvAccessCPP ~15 s).
RESUME_BOUND_S = {"libca": 40.0, "pvxs": 30.0, "pvAccessCPP": 45.0}


def test_clients_resume_by_themselves_after_the_shim_is_killed_and_restarted(site, record_property):
    shim = start_shim(site, "shim-before-kill")
    ns = shim.local_addr
    watches = {
        "libca": h.CaWatch(site.ctr, ns, "IOCA:COUNT", duration=180),
        "pvxs": h.PvaWatch(site.ctr, ns, "PVXS:COUNT", duration=180),
    }
    pvapy = h.CaWatch.__new__(h.CaWatch)
    pvapy._start(site.ctr, [h.PYTHON, h.PVAPY_CLIENT, "--watch", "IOCA:COUNT", "180"], h.pva_client_env(ns))
    watches["pvAccessCPP"] = pvapy
    restarted = None
    try:
        before = {c: w.wait_for(lambda e: e["event"] == "value", 20)["value"] for c, w in watches.items()}
        shim.proc.send_signal(signal.SIGKILL)
        shim.proc.wait(10)
        h.Shim.live.remove(shim)
        for c, w in watches.items():
            w.wait_for(lambda e: e["event"] == "conn" and not e["connected"], 30)
        restarted = start_shim(site, "shim-after-kill")
        t_ready = time.time()
        for client, w in watches.items():
            ev = w.wait_for(lambda e: e["event"] == "value" and e["t"] > t_ready, RESUME_BOUND_S[client] + 5)
            took = ev["t"] - t_ready
            record_property(f"{client}_resumed_s", round(took, 2))
            print(f"{client}: first update {took:.2f} s after the restart")
            assert took < RESUME_BOUND_S[client], (client, took)
            # The same record, still counting: not a stale or foreign value.
            assert ev["value"] > before[client], (client, before[client], ev)
    finally:
        for w in watches.values():
            w.close()
        if restarted:
            restarted.stop()
