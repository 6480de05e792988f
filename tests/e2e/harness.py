"""End-to-end harness: simulated containers and real EPICS peers.

A "container" is a network namespace with its own loopback, joined to a
"host" namespace (also created here, never the machine's own network) by a
veth pair. Port publishing is done with nftables DNAT in the host namespace,
the way podman/netavark does it. Servers (softIocs, a caproto server, p4p
and pvapy PVA servers) and clients (pyepics, p4p and pvapy scripts) run
inside those namespaces via `ip netns exec`.

Everything created here is torn down on normal exit, on exceptions and on
SIGINT/SIGTERM/SIGHUP, including every process left in the namespaces.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import os
import queue
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PYTHON = sys.executable
CA_CLIENT = HERE / "ca_client.py"
CAPROTO_SERVER = HERE / "caproto_server.py"
TCP_PROBE = HERE / "tcp_probe.py"
PVA_CLIENT = HERE / "pva_client.py"
PVAPY_CLIENT = HERE / "pvapy_client.py"
P4P_SERVER = HERE / "p4p_server.py"
PVAPY_SERVER = HERE / "pvapy_server.py"
PVA_BEACONS = HERE / "pva_beacons.py"

# Big enough for the 100000-element DOUBLE waveform plus protocol overhead;
# servers and clients must both allow it or libca refuses the transfer.
MAX_ARRAY_BYTES = "2000000"
WAVE_LEN = 100000
# The PVA tests' large array: 1 Mi doubles, 8 MiB, more than one message of
# pvAccessCPP's 16 KiB buffers (it segments) and more than the shim's
# default 4 MiB send queue.
BIG_WAVE_LEN = 1048576

NS_PREFIX = "nshim"
_NS_NAME = re.compile(rf"^{NS_PREFIX}-(\d+)-")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LISTENING = re.compile(r"listening addr=(\S+)")


# --------------------------------------------------------------------------
# Preconditions and cleanup


def cannot_run_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces and nftables need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (scripts/setup.sh installs it)"
    return None


_live_ns: list["Netns"] = []
_handlers_installed = False


def cleanup_all() -> None:
    """Tear down every namespace this process created (idempotent)."""
    while _live_ns:
        _live_ns.pop().close()


def _install_cleanup_hooks() -> None:
    # Namespaces outlive the process unless deleted, so every way out of
    # the process must pass through cleanup_all().
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(cleanup_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _make_handler(signal.getsignal(sig)))


def _make_handler(previous):
    def handler(signum, frame):
        cleanup_all()
        if callable(previous):
            previous(signum, frame)  # e.g. SIGINT -> KeyboardInterrupt
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return handler


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_namespaces() -> None:
    """Delete namespaces left by earlier runs that were killed outright."""
    out = _run(["ip", "netns", "list"]).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NS_NAME.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _kill_ns_pids(name)
            _run(["ip", "netns", "del", name], check=False)


def _run(argv, check=True, input=None, timeout=30) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(map(str, argv))}\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc


def _kill_ns_pids(name: str) -> None:
    # Catches what we did not start ourselves, e.g. caRepeater spawned by libca.
    out = _run(["ip", "netns", "pids", name], check=False).stdout
    for pid in out.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


# --------------------------------------------------------------------------
# Namespaces


class Netns:
    """A network namespace with loopback up; the base of host and container."""

    _seq = itertools.count()

    def __init__(self, role: str):
        _install_cleanup_hooks()
        if not _live_ns:
            sweep_stale_namespaces()
        self.name = f"{NS_PREFIX}-{os.getpid()}-{next(self._seq)}-{role}"
        self.procs: list[subprocess.Popen] = []
        _run(["ip", "netns", "add", self.name])
        _live_ns.append(self)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> str:
        return _run(["ip", "-n", self.name, *args]).stdout

    def exec_argv(self, argv) -> list[str]:
        return ["ip", "netns", "exec", self.name, *map(str, argv)]

    def sh(self, argv, input=None, timeout=30) -> str:
        return _run(self.exec_argv(argv), input=input, timeout=timeout).stdout

    def sysctl(self, key: str, value: str) -> None:
        self.sh(["sysctl", "-q", "-w", f"{key}={value}"])

    def close(self) -> None:
        for proc in self.procs:
            stop_process(proc)
        self.procs.clear()
        _kill_ns_pids(self.name)
        _run(["ip", "netns", "del", self.name], check=False)
        if self in _live_ns:
            _live_ns.remove(self)


class Host(Netns):
    """Stands in for the container host; owns the published-port NAT rules."""

    TABLE = "nameshim_e2e"

    def __init__(self):
        super().__init__("host")
        self._links = itertools.count()
        self._nat_ready = False

    def new_link(self) -> tuple[str, str, str]:
        """(host-side veth name, host address, peer address) of a fresh /30."""
        n = next(self._links)
        base = 4 * n
        net = f"198.18.{base // 256}."
        return f"v{n}", f"{net}{base % 256 + 1}", f"{net}{base % 256 + 2}"

    def _ensure_nat(self) -> None:
        if self._nat_ready:
            return
        # Forwarding serves clients on other hosts (prerouting path);
        # route_localnet lets DNATed 127.0.0.1 traffic leave via the veth.
        self.sysctl("net.ipv4.ip_forward", "1")
        self.sysctl("net.ipv4.conf.all.route_localnet", "1")
        # Numeric priorities (-100 = dstnat, 100 = srcnat): older nft
        # versions reject the names on the output hook.
        t = self.TABLE
        self.sh(
            ["nft", "-f", "-"],
            input=(
                f"table ip {t} {{\n"
                "  chain prerouting { type nat hook prerouting priority -100; policy accept; }\n"
                "  chain output { type nat hook output priority -100; policy accept; }\n"
                "  chain postrouting { type nat hook postrouting priority 100; policy accept; }\n"
                "}\n"
            ),
        )
        self._nat_ready = True

    def publish(self, host_port, dest_ip, dest_port, proto="tcp", host_ip=None) -> None:
        """DNAT host_ip:host_port (all local addresses if None) to dest."""
        self._ensure_nat()
        t = self.TABLE
        match = f"ip daddr {host_ip}" if host_ip else "fib daddr type local"
        dnat = f"{match} {proto} dport {host_port} dnat to {dest_ip}:{dest_port}"
        # Replies to a 127.0.0.1 source cannot be routed back from the
        # container, so localhost-originated flows are masqueraded.
        masq = f"ip saddr 127.0.0.0/8 ip daddr {dest_ip} {proto} dport {dest_port} masquerade"
        self.sh(
            ["nft", "-f", "-"],
            input=(
                f"add rule ip {t} prerouting {dnat}\n"
                f"add rule ip {t} output {dnat}\n"
                f"add rule ip {t} postrouting {masq}\n"
            ),
        )

    def ruleset(self) -> str:
        return self.sh(["nft", "list", "ruleset"])


class Container(Netns):
    """A namespace joined to a Host by a veth pair, default route via the host.

    Without a host argument it gets a private one: a pvAccessCPP server
    (QSRV1 in the epicscorelibs softIoc) aborts at iocInit when the only
    interface is the loopback, as it would never be in a real container.
    Also serves as "another machine" on the host's network, for clients
    that reach published ports from outside (the prerouting path).
    """

    def __init__(self, host: Host | None = None, role: str = "ctr"):
        self._own_host = host is None
        host = host or Host()
        super().__init__(role)
        self.host = host
        self.addr = None  # this namespace's address on the link
        self.host_addr = None  # the host's address on the same link
        self._connect(host)

    def _connect(self, host: Host) -> None:
        hv, self.host_addr, self.addr = host.new_link()
        # Created from inside the host namespace so the machine's own
        # network never sees the pair, not even briefly.
        host.ip("link", "add", hv, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        # With broadcast addresses, as podman, docker and Kubernetes set
        # them: pvAccessCPP servers then bind their search port to the
        # interface and broadcast addresses instead of the wildcard.
        host.ip("addr", "add", f"{self.host_addr}/30", "brd", "+", "dev", hv)
        host.ip("link", "set", hv, "up")
        self.ip("addr", "add", f"{self.addr}/30", "brd", "+", "dev", "eth0")
        self.ip("link", "set", "eth0", "up")
        self.ip("route", "add", "default", "via", self.host_addr)

    def publish(self, host_port, container_port, proto="tcp", host_ip=None) -> None:
        """Like `podman run -p [host_ip:]host_port:container_port[/proto]`."""
        self.host.publish(host_port, self.addr, container_port, proto, host_ip)

    def close(self) -> None:
        super().close()
        if self._own_host:
            self.host.close()


# --------------------------------------------------------------------------
# Processes


def clean_env(extra: dict | None = None) -> dict:
    """The caller's environment without EPICS or shim settings, plus `extra`.

    Inherited EPICS_* (or NAMESHIM_*) variables would change where peers
    search or how the shim runs; every test states its configuration instead.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPICS_", "NAMESHIM_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_in(ns: Netns, argv, env=None, log_path=None, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """Start argv inside ns; output goes to log_path (or is discarded)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            ns.exec_argv(argv),
            env=clean_env(env),
            stdin=stdin,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so a terminal's Ctrl-C reaches only us
        )
    finally:
        if log_path:
            out.close()
    ns.procs.append(proc)
    return proc


def stop_process(proc: subprocess.Popen, sig=signal.SIGTERM, timeout=5.0) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    if proc.stdin:
        try:
            proc.stdin.close()
        except OSError:
            pass


def tail(path, lines=60) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(_ANSI.sub("", text).splitlines()[-lines:])


def _read_from(path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return _ANSI.sub("", f.read().decode(errors="replace"))
    except FileNotFoundError:
        return ""


def wait_for_log(path, pattern: re.Pattern, proc, timeout: float, what: str, offset=0) -> re.Match:
    """Poll a log file (from offset) until pattern matches; fail early if proc exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = _read_from(path, offset)
        m = pattern.search(text)
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before ready:\n{tail(path)}")
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s:\n{tail(path)}")


# --------------------------------------------------------------------------
# Servers


def write_db(path: Path, prefix: str, init: float, big_wave=False) -> Path:
    """A record database whose values tell which server answered.

    ID holds the prefix itself and VAL starts at `init`, distinct per server.
    big_wave adds BIGWAVE, a DOUBLE waveform of BIG_WAVE_LEN elements.
    """
    big = (
        f"""\
record(waveform, "{prefix}BIGWAVE") {{
    field(FTVL, "DOUBLE")
    field(NELM, "{BIG_WAVE_LEN}")
}}
"""
        if big_wave
        else ""
    )
    path.write_text(
        f"""\
record(stringin, "{prefix}ID") {{
    field(VAL, "{prefix}")
}}
record(ao, "{prefix}VAL") {{
    field(VAL, "{init}")
    field(PREC, "3")
    field(PINI, "YES")
}}
record(stringout, "{prefix}MSG") {{
    field(VAL, "hello from {prefix}")
}}
record(calc, "{prefix}COUNT") {{
    field(SCAN, ".1 second")
    field(CALC, "A+1")
    field(INPA, "{prefix}COUNT NPP")
}}
record(waveform, "{prefix}WAVE") {{
    field(FTVL, "DOUBLE")
    field(NELM, "{WAVE_LEN}")
}}
"""
        + big
    )
    return path


SERVER_ENV = {
    "EPICS_CA_MAX_ARRAY_BYTES": MAX_ARRAY_BYTES,
    # Servers must not beacon or search off the namespace by accident.
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CA_ADDR_LIST": "",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.255.255.255",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
}


class Server:
    """Common start/stop/restart for a CA server process in a namespace."""

    ready: re.Pattern  # log line that says the server is serving
    what = "server"

    def __init__(self, ns: Netns, prefix: str, workdir: Path, env=None):
        self.ns = ns
        self.prefix = prefix
        self.workdir = Path(workdir)
        self.env = {**SERVER_ENV, **(env or {})}
        self.log = self.workdir / f"{prefix.strip(':').lower()}.log"
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list:
        raise NotImplementedError

    def start(self, timeout=30.0) -> "Server":
        # A restart appends to the same log: only look at the new part.
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = run_in(self.ns, self.argv(), env=self.env, log_path=self.log, stdin=self._stdin())
        wait_for_log(self.log, self.ready, self.proc, timeout, f"{self.what} {self.prefix}", offset)
        return self

    def _stdin(self):
        return subprocess.DEVNULL

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc:
            stop_process(self.proc, sig)
            if self.proc in self.ns.procs:
                self.ns.procs.remove(self.proc)
            self.proc = None

    def restart(self, timeout=30.0) -> "Server":
        self.stop()
        return self.start(timeout)


class SoftIoc(Server):
    """softIoc from epicscorelibs (rsrv + QSRV1) or pvxslibs (rsrv + QSRV2)."""

    ready = re.compile(r"IOC Running")

    def __init__(self, ns, prefix, workdir, flavour="epicscorelibs", init=0.0, env=None, big_wave=False):
        super().__init__(ns, prefix, workdir, env)
        assert flavour in ("epicscorelibs", "pvxslibs")
        self.flavour = flavour
        self.what = f"{flavour} softIoc"
        self.db = write_db(self.workdir / f"{prefix.strip(':').lower()}.db", prefix, init, big_wave)

    def argv(self):
        return [PYTHON, "-m", f"{self.flavour}.ioc", "-d", self.db]

    def _stdin(self):
        # The IOC reads an interactive Python console from stdin after
        # start-up and exits at EOF: hold a pipe open for its lifetime.
        return subprocess.PIPE


class CaprotoServer(Server):
    """The pure-Python caproto server from caproto_server.py."""

    ready = re.compile(r"Server startup complete")
    what = "caproto server"

    def argv(self):
        return [PYTHON, CAPROTO_SERVER, "--prefix", self.prefix, "--interfaces", "0.0.0.0", "--list-pvs"]

    def tcp_port(self) -> int:
        m = re.search(r"Listening on [\d.]+:(\d+)", tail(self.log, 400))
        return int(m.group(1)) if m else -1


# PVA servers must not beacon off the namespace either, nor to the clients
# that tests run inside the container (the IOCs get this too when a test
# passes it, see test_pva.py). A pvxs client that hears a new server's beacon
# before its name-server connection is validated, i.e. within the shim's
# classification window, spends its one fast search round then and ignores
# the hurry-up of the validation: its first search waits a whole 6 s round.
# Clients outside a container never hear its servers' beacons.
PVA_BEACON_SINK = "127.0.0.1:5099"  # nothing listens there
PVA_BEACONS_NOWHERE = {
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVAS_BEACON_ADDR_LIST": PVA_BEACON_SINK,
}
PVA_SERVER_ENV = {
    **PVA_BEACONS_NOWHERE,
    # The IOCs serve BIGWAVE over CA as well.
    "EPICS_CA_MAX_ARRAY_BYTES": str(8 * BIG_WAVE_LEN + 100000),
}


class PvaScriptServer(Server):
    """A PVA server script (p4p_server.py, pvapy_server.py) in a namespace.

    Serves ID, VAL, COUNT, WAVE (BIG_WAVE_LEN doubles) and VARIANT under its
    prefix; see the scripts. Its stdin stays open for its lifetime.
    """

    ready = re.compile(r"Serving \d+ PVs with prefix \S+ on port (-?\d+)")
    script: Path

    def __init__(self, ns, prefix, workdir, init=0.0, env=None):
        super().__init__(ns, prefix, workdir, {**PVA_SERVER_ENV, **(env or {})})
        self.init = init

    def argv(self):
        return [PYTHON, self.script, "--prefix", self.prefix, "--init", self.init, "--wave-len", BIG_WAVE_LEN]

    def _stdin(self):
        return subprocess.PIPE

    def tcp_port(self) -> int:
        m = self.ready.search(_ANSI.sub("", tail(self.log, 400)))
        return int(m.group(1)) if m else -1


class P4pServer(PvaScriptServer):
    """A p4p server (pvxs); it also serves an RPC channel, RPC."""

    what = "p4p server"
    script = P4P_SERVER


class PvapyServer(PvaScriptServer):
    """A pvapy PvaServer (pvAccessCPP and pvDatabase)."""

    what = "pvapy server"
    script = PVAPY_SERVER


# --------------------------------------------------------------------------
# The shim


def shim_binary() -> Path:
    return Path(os.environ.get("NAMESHIM_BIN", REPO / "target" / "release" / "nameshim"))


class Shim:
    """The nameshim binary running in a namespace; its log is kept for reports."""

    live: list["Shim"] = []  # read by conftest to attach logs to failures

    def __init__(self, ns: Netns, args, workdir: Path, env=None, binary=None):
        self.ns = ns
        self.args = [str(a) for a in args]
        self.binary = Path(binary or shim_binary())
        self.log = Path(workdir) / "nameshim.log"
        self.env = {"NAMESHIM_LOG": "debug", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.addr: str | None = None

    def start(self, timeout=20.0) -> str:
        """Start and return the bound address from the `listening` log line."""
        self.proc = run_in(self.ns, [self.binary, *self.args], env=self.env, log_path=self.log)
        Shim.live.append(self)
        m = wait_for_log(self.log, _LISTENING, self.proc, timeout, "nameshim")
        self.addr = m.group(1)
        return self.addr

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    @property
    def local_addr(self) -> str:
        """Where a client in the same namespace reaches the shim."""
        ip = self.addr.rsplit(":", 1)[0]
        return f"{'127.0.0.1' if ip == '0.0.0.0' else ip}:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self, lines=200) -> str:
        return tail(self.log, lines)

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)
        if self in Shim.live:
            Shim.live.remove(self)


# --------------------------------------------------------------------------
# Clients


def client_env(name_server: str) -> dict:
    """libca configured with the name server only: no UDP search at all."""
    return {
        "EPICS_CA_NAME_SERVERS": name_server,
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_ADDR_LIST": "",
        "EPICS_CA_MAX_ARRAY_BYTES": MAX_ARRAY_BYTES,
    }


def ca_program(ns: Netns, name_server: str, ops: list, timeout=60.0) -> list:
    """Run a list of client operations in one libca context (one process).

    Returns one result dict per operation (see ca_client.py).
    """
    argv = ns.exec_argv([PYTHON, CA_CLIENT])
    proc = subprocess.run(
        argv,
        input=json.dumps(ops),
        env=clean_env(client_env(name_server)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ca_client failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ca_get(ns, name_server, pvs, timeout=5.0, as_string=False) -> dict:
    """{pv: {"connected", "value", "host"}} for every pv, fetched together."""
    return ca_program(ns, name_server, [{"op": "get", "pvs": list(pvs), "timeout": timeout, "as_string": as_string}])[0]


def ca_put(ns, name_server, pv, value, timeout=10.0) -> dict:
    """Put with wait=True, then read back: {"connected", "put_ok", "readback"}."""
    return ca_program(ns, name_server, [{"op": "put", "pv": pv, "value": value, "timeout": timeout}])[0]


def ca_monitor(ns, name_server, pv, duration=3.0, timeout=5.0) -> dict:
    """Collect updates for `duration` s: {"connected", "updates": [[value, ts]]}."""
    op = {"op": "monitor", "pv": pv, "duration": duration, "timeout": timeout}
    return ca_program(ns, name_server, [op], timeout=duration + timeout + 30)[0]


class CaWatch:
    """A long-lived monitor client streaming JSON events; for restart tests.

    poll=False makes a client that never calls into libca after creating
    the channel (see ca_client.watch).

    Events: {"event": "conn", "connected": bool, "t": ...} and
    {"event": "value", "value": ..., "ts": ..., "t": ...}.
    """

    def __init__(self, ns: Netns, name_server: str, pv: str, duration=120.0, poll=True):
        flags = [] if poll else ["--no-poll"]
        self._start(ns, [PYTHON, CA_CLIENT, "--watch", pv, str(duration), *flags], client_env(name_server))

    def _start(self, ns: Netns, argv, env: dict) -> None:
        self.proc = subprocess.Popen(
            ns.exec_argv(argv),
            env=clean_env(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        ns.procs.append(self.proc)
        self.events: list[dict] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self._q.put(json.loads(line))
            except json.JSONDecodeError:
                pass
        self._q.put(None)

    def wait_for(self, pred, timeout: float) -> dict:
        """Next event satisfying pred; every event seen is kept in .events."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching event in {timeout}s; last: {self.events[-5:]}")
            try:
                ev = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if ev is None:
                raise RuntimeError(f"watch client exited: {self.proc.stderr.read()[-2000:]}")
            self.events.append(ev)
            if pred(ev):
                return ev

    def drain(self) -> list[dict]:
        """Every event received so far (kept in .events too), without waiting."""
        got = []
        while True:
            try:
                ev = self._q.get_nowait()
            except queue.Empty:
                return got
            if ev is None:
                self._q.put(None)  # keep reporting the end
                return got
            self.events.append(ev)
            got.append(ev)

    def values(self, n: int, timeout: float) -> list:
        return [self.wait_for(lambda e: e["event"] == "value", timeout)["value"] for _ in range(n)]

    def close(self):
        # Closing stdin lets the client shut libca down cleanly, as a user
        # quitting would; a signal is the fallback.
        try:
            self.proc.stdin.close()
            self.proc.wait(6)
        except (OSError, subprocess.TimeoutExpired):
            pass
        stop_process(self.proc)


def pva_client_env(name_server: str) -> dict:
    """A PVA client configured with the name server only: no UDP search."""
    return {
        "EPICS_PVA_NAME_SERVERS": name_server,
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_ADDR_LIST": "",
    }


def pva_direct_env(addr_list: str) -> dict:
    """A PVA client that searches by UDP only, without any name server."""
    return {"EPICS_PVA_AUTO_ADDR_LIST": "NO", "EPICS_PVA_ADDR_LIST": addr_list}


class ClientHung(RuntimeError):
    """A client process outlived its time limit and was killed."""


def _json_program(ns: Netns, script: Path, env: dict, ops: list, timeout: float) -> list:
    try:
        proc = subprocess.run(
            ns.exec_argv([PYTHON, script]),
            input=json.dumps(ops),
            env=clean_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise ClientHung(f"{script.name} still running after {timeout}s, killed:\n{err[-3000:]}") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"{script.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def client_program(ns: Netns, script: Path, env: dict, ops: list, timeout=60.0) -> list:
    """Run a JSON-driven client (CA_CLIENT, PVA_CLIENT or PVAPY_CLIENT) with
    exactly the EPICS environment given, e.g. a broadcast or unicast search
    instead of a name server; one result dict per operation."""
    return _json_program(ns, script, env, ops, timeout)


def pva_program(ns: Netns, name_server: str, ops: list, timeout=60.0, env=None) -> list:
    """Run operations in one p4p Context (one process, one connection to the
    name server); one result dict per operation (see pva_client.py).

    env replaces the name-server configuration, e.g. pva_direct_env(...).
    """
    return _json_program(ns, PVA_CLIENT, env or pva_client_env(name_server), ops, timeout)


def pva_get(ns, name_server, pvs, timeout=5.0, env=None) -> dict:
    """{pv: {"ok", "value", "fields"} or {"ok": False, "error"}}, fetched together."""
    return pva_program(ns, name_server, [{"op": "get", "pvs": list(pvs), "timeout": timeout}], env=env)[0]


def pva_put(ns, name_server, pv, value, timeout=10.0) -> dict:
    """Put and wait for completion: {"ok"} or {"ok": False, "error"}."""
    return pva_program(ns, name_server, [{"op": "put", "pv": pv, "value": value, "timeout": timeout}])[0]


def pva_monitor(ns, name_server, pvs, duration=3.0, timeout=5.0) -> dict:
    """Monitor every pv at once for `duration` s:
    {pv: {"connected", "updates": [[value, ts]], "events"}}."""
    op = {"op": "monitor", "pvs": list(pvs), "duration": duration, "timeout": timeout}
    return pva_program(ns, name_server, [op], timeout=duration + timeout + 30)[0]


def pvapy_get(ns, name_server, pvs, timeout=5.0, limit=None, env=None) -> dict:
    """Get with pvapy (pvAccessCPP client): {pv: {"ok", "value"} or {"ok": False, "error"}}.

    The PVs are read one after the other; `limit` bounds the whole process
    (ClientHung when exceeded).
    """
    op = {"op": "get", "pvs": list(pvs), "timeout": timeout}
    limit = limit or timeout * len(pvs) + 30
    return _json_program(ns, PVAPY_CLIENT, env or pva_client_env(name_server), [op], limit)[0]


def ramp_summary(start: float, step: float, n: int) -> dict:
    """What pva_client.py reports for the long array it puts as
    {"ramp": [start, step, n]}, computed here."""
    a = (start + step * np.arange(n, dtype="f8")).astype("<f8")
    return {
        "len": n,
        "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
        "head": a[:3].tolist(),
        "tail": a[-3:].tolist(),
    }


class PvaWatch(CaWatch):
    """A long-lived p4p monitor streaming JSON events (see pva_client.watch).

    Events: {"event": "conn", "connected": bool, "t"},
    {"event": "value", "value", "ts", "t"} and {"event": "error", ...}.
    """

    def __init__(self, ns: Netns, name_server: str, pv: str, duration=120.0):
        self._start(ns, [PYTHON, PVA_CLIENT, "--watch", pv, str(duration)], pva_client_env(name_server))


def garbage_payloads() -> dict:
    """Bytes no CA or PVA client would send, for robustness tests."""
    rng = random.Random(5066)  # fixed seed: a failure must be reproducible
    noise = bytearray(rng.randbytes(32))
    if noise[0] in (0x00, 0xCA):  # keep it neither a CA nor a PVA first byte
        noise[0] = 0x47
    version = struct.pack(">HHHHII", 0, 0, 1, 13, 0, 0)
    # Extended header claiming a ~4 GiB payload on a READ_NOTIFY.
    huge = struct.pack(">HHHHII", 15, 0xFFFF, 6, 0, 1, 1) + struct.pack(">II", 0xFFFFFFF0, 1)
    return {"random-bytes": bytes(noise), "huge-ca-payload": version + huge}


def tcp_probe(ns: Netns, addr: str, payload: bytes, timeout=5.0) -> dict:
    """Send raw bytes to addr from inside ns; report how the peer reacted."""
    host, port = addr.rsplit(":", 1)
    argv = ns.exec_argv([PYTHON, TCP_PROBE, host, port, payload.hex(), str(timeout)])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 20)
    if proc.returncode != 0:
        raise RuntimeError(f"tcp_probe failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)
