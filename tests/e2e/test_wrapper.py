"""The PID-1 wrapper (`nameshim -- COMMAND`), checked from outside.

Modelled on tini's suite: the shim runs as PID 1 of a new PID namespace
(`unshare --pid --fork --mount-proc`), as in a container, and small helper
children (wrapper_child.py) report what they see: which signals reach them,
who adopts their orphans, whether a zombie is left, what the console gives
them. One test runs the shim outside a PID namespace, where it must be a
child subreaper instead. The last tests wrap a real softIoc and read it
through the shim, then stop it as a runtime would: SIGTERM, then the
3 s grace period of the epics-containers Helm chart.

Every shim runs in a network namespace, never in the machine's own: the
tests of init duties share one with only a loopback and listen on
127.0.0.1 port 0 unless they need a known port; the softIoc gets a
simulated container with a veth.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import harness as h
import pytest

CHILD = h.HERE / "wrapper_child.py"
# --kill-child: a test that gives up on unshare takes the namespace down too.
PID1 = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
FORWARDED = ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH"]
# Kubernetes sends SIGTERM, then SIGKILL once this grace period is over
# (the epics-containers Helm chart sets 3 s).
HELM_GRACE = 3.0


def child(*args) -> list:
    return [h.PYTHON, CHILD, *map(str, args)]


class Wrapper(h.Shim):
    """`nameshim [ARGS] -- COMMAND`, by default as PID 1 of a new PID namespace.

    The command's stdout is read line by line into a queue; the shim's own
    log (stderr) goes to a file that conftest attaches to failures.
    """

    def __init__(self, ns, command, workdir, args=("--listen", "127.0.0.1:0"), env=None, pid1=True, via=()):
        super().__init__(ns, args, workdir, env)
        self.command = [str(c) for c in command]
        self.pid1 = pid1
        self.via = list(via)  # runs the shim, e.g. setsid
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []

    def start(self, stdin=subprocess.PIPE, stdout=subprocess.PIPE) -> "Wrapper":
        argv = [*(PID1 if self.pid1 else []), *self.via, self.binary, *self.args, "--", *self.command]
        with open(self.log, "ab") as log:
            # `ip netns exec` execs in place: the Popen pid is unshare's
            # (or the shim's, without a PID namespace).
            self.proc = subprocess.Popen(
                self.ns.exec_argv(argv),
                env=h.clean_env(self.env),
                stdin=stdin,
                stdout=stdout,
                stderr=log,
                start_new_session=True,
            )
        self.ns.procs.append(self.proc)
        h.Shim.live.append(self)
        self.started = time.monotonic()
        if stdout == subprocess.PIPE:
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def expect(self, pattern: str, timeout=5.0) -> re.Match:
        """The next line of the command's output that matches pattern."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise TimeoutError(f"no line matching {pattern!r} in {timeout}s; seen {self.seen[-10:]}")
            if line is None:
                self.lines.put(None)  # keep reporting the end
                raise RuntimeError(f"output ended before {pattern!r}; seen {self.seen[-10:]}")
            self.seen.append(line)
            m = rx.search(line)
            if m:
                return m

    def expect_lines(self, wanted: set, timeout=5.0) -> None:
        """Every line of `wanted`, in any order (two processes print them)."""
        missing = set(wanted)
        deadline = time.monotonic() + timeout
        while missing:
            line = self.expect(".", timeout=max(deadline - time.monotonic(), 0.001)).string
            missing.discard(line)

    def expect_ready(self, *roles) -> dict:
        """{role: (pid, pgid)} from each role's "ready" line."""
        found = {}
        while len(found) < len(roles):
            m = self.expect(rf"^({'|'.join(roles)}) ready (\d+) (\d+)$")
            found[m.group(1)] = (int(m.group(2)), int(m.group(3)))
        return found

    def drain(self, settle=0.3) -> list[str]:
        """Every line that arrives within `settle` s."""
        out = []
        while True:
            try:
                line = self.lines.get(timeout=settle)
            except queue.Empty:
                return out
            if line is None:
                self.lines.put(None)
                return out
            self.seen.append(line)
            out.append(line)

    @property
    def shim_pid(self) -> int:
        """The shim's pid in our namespace (unshare's only child when PID 1)."""
        if not self.pid1:
            return self.proc.pid
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except FileNotFoundError:
                kids = []
            if kids:
                return int(kids[0])
            time.sleep(0.01)
        raise TimeoutError("unshare has not started the shim")

    def kill(self, sig) -> None:
        os.kill(self.shim_pid, sig)

    def wait(self, timeout=10.0) -> int:
        """The exit code, as the runtime sees it (unshare passes it on)."""
        return self.proc.wait(timeout)

    def wait_log(self, pattern, timeout=5.0) -> re.Match:
        return h.wait_for_log(self.log, re.compile(pattern), self.proc, timeout, "nameshim")

    def stop(self) -> None:
        # unshare ignores SIGTERM; its death takes the shim with it.
        if self.proc:
            h.stop_process(self.proc, signal.SIGKILL)
        if self in h.Shim.live:
            h.Shim.live.remove(self)


@pytest.fixture(scope="module")
def ns(netns_ok, shim_bin):
    ns = h.Netns("wrap")
    yield ns
    ns.close()


@pytest.fixture
def wrap(ns, tmp_path):
    """Builds Wrappers in the module's namespace and stops what is left."""
    made = []

    def make(command, **kw) -> Wrapper:
        w = Wrapper(ns, command, tmp_path, **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()
        if w.proc in ns.procs:
            ns.procs.remove(w.proc)


# --------------------------------------------------------------------------
# Reaping


def test_orphaned_grandchildren_leave_no_zombie_as_pid_1(wrap):
    w = wrap(child("orphans", 100)).start()
    report = json.loads(w.expect(r"^\{", timeout=20).string)
    assert report["reported"] == 100, report
    # The kernel gave every orphan to PID 1, the shim, which reaped them all.
    assert report["parent"] == 1 and report["adopters"] == [1], report
    assert report["remaining"] == [], f"not reaped: {report['states']}"
    assert w.wait() == 0


def test_subreaper_adopts_and_reaps_orphans_when_not_pid_1(wrap):
    w = wrap(child("orphans", 50), pid1=False).start()
    report = json.loads(w.expect(r"^\{", timeout=20).string)
    assert report["parent"] == w.shim_pid != 1, report
    # Without the subreaper flag the orphans would go to the real init.
    assert report["adopters"] == [w.shim_pid], report
    assert report["remaining"] == [], f"not reaped: {report['states']}"
    assert w.wait() == 0
    assert "child subreaper" in w.log_text()


# --------------------------------------------------------------------------
# Signals


def test_each_forwarded_signal_reaches_the_command(wrap):
    w = wrap(child("signals", "--exit-on-term")).start()
    w.expect_ready("child")
    # SIGTERM last: the child exits on it.
    for name in [s for s in FORWARDED if s != "SIGTERM"] + ["SIGTERM"]:
        w.kill(getattr(signal, name))
        w.expect(f"child got {name}$")
    assert w.wait() == 0
    assert not [line for line in w.drain() if "got" in line]


def test_signal_group_reaches_the_commands_children(wrap):
    w = wrap(child("signals", "--grandchild", "--exit-on-term"), env={"NAMESHIM_SIGNAL_GROUP": "1"}).start()
    ready = w.expect_ready("child", "grandchild")
    # The shim gave the command a process group of its own, which its
    # children share: pid == pgid for the child, the same pgid for both.
    child_pid, child_pgid = ready["child"]
    assert child_pid == child_pgid == ready["grandchild"][1], ready
    w.kill(signal.SIGUSR1)
    w.expect_lines({"child got SIGUSR1", "grandchild got SIGUSR1"})
    w.kill(signal.SIGTERM)
    w.expect_lines({"child got SIGTERM", "grandchild got SIGTERM"})
    assert w.wait() == 0


def test_without_signal_group_only_the_command_is_signalled(wrap):
    w = wrap(child("signals", "--grandchild", "--exit-on-term")).start()
    w.expect_ready("child", "grandchild")
    w.kill(signal.SIGUSR1)
    w.expect("^child got SIGUSR1$")
    assert not [line for line in w.drain(0.5) if "grandchild got" in line]
    w.kill(signal.SIGTERM)
    assert w.wait() == 0


def test_command_that_ignores_sigterm_is_killed_after_the_grace_period(wrap):
    w = wrap(child("signals"), args=("--listen", "127.0.0.1:0", "--grace", "1s")).start()
    w.expect_ready("child")
    t0 = time.monotonic()
    w.kill(signal.SIGTERM)
    w.expect("child got SIGTERM")
    assert w.wait(timeout=5) == 128 + signal.SIGKILL
    assert 0.9 <= time.monotonic() - t0 < 2.5
    assert "sending SIGKILL" in w.log_text()


# --------------------------------------------------------------------------
# Exit codes


@pytest.mark.parametrize(
    "args, code",
    [
        (["exit", 0], 0),
        (["exit", 3], 3),
        (["exit", 255], 255),
        (["kill", "SIGTERM"], 128 + signal.SIGTERM),
        (["kill", "SIGUSR1"], 128 + signal.SIGUSR1),
        (["kill", "SIGKILL"], 128 + signal.SIGKILL),
    ],
    ids=["exit-0", "exit-3", "exit-255", "killed-by-SIGTERM", "killed-by-SIGUSR1", "killed-by-SIGKILL"],
)
def test_shim_exits_with_the_commands_code(wrap, args, code):
    w = wrap(child(*args)).start()
    assert w.wait() == code
    assert f"code={code}" in w.log_text()


def test_the_shim_raises_its_open_file_limit_and_the_command_keeps_its_own(wrap):
    # Started with a soft limit of 256 (hard 4096): the shim serves clients
    # with the hard limit, the command gets the 256 it was started with.
    command = ["sh", "-c", "echo command $(ulimit -Sn); grep 'Max open files' /proc/1/limits; sleep 30"]
    w = wrap(command, via=["prlimit", "--nofile=256:4096", "--"]).start()
    assert w.expect(r"^command ").string == "command 256"
    assert w.expect(r"^Max open files").string.split()[3:5] == ["4096", "4096"], "the shim, PID 1"
    assert "raised the open-file limit" in w.log_text()


def test_command_not_found_exits_127(wrap, tmp_path):
    w = wrap([tmp_path / "no-such-ioc"]).start()
    assert w.wait() == 127
    assert "cannot start the command" in w.log_text()


def test_command_not_executable_exits_126(wrap, tmp_path):
    script = tmp_path / "start.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    w = wrap([script]).start()
    assert w.wait() == 126


# --------------------------------------------------------------------------
# Input and the console


def test_piped_commands_reach_the_command_and_answers_come_back(wrap):
    w = wrap(child("console")).start()
    w.expect("tty=False")
    w.proc.stdin.write(b"help\ndbl\n")
    w.proc.stdin.flush()
    w.expect("echo: help$")
    w.expect("echo: dbl$")
    w.proc.stdin.write(b"exit\n")
    w.proc.stdin.close()
    assert w.wait() == 0


def test_console_on_a_terminal_is_the_commands_foreground(wrap):
    # As `podman run -it` gives it: the shim, PID 1, leads a session whose
    # controlling terminal is a pty (setsid --ctty takes it, as runc does).
    master, slave = os.openpty()
    w = wrap(child("console"), via=["setsid", "--ctty"])
    try:
        w.start(stdin=slave, stdout=slave)
    finally:
        os.close(slave)
    screen = _PtyReader(master)
    try:
        # No SIGTTIN stop: the command reads the console it is given.
        screen.expect("tty=True foreground=True own_group=True")
        screen.expect("epics> ")
        os.write(master, b"dbl\n")
        screen.expect("echo: dbl")
        # Ctrl-C reaches the command from the terminal; the shim, not in
        # the foreground group, neither gets it nor forwards a second one.
        os.write(master, b"\x03")
        screen.expect("got SIGINT")
        time.sleep(0.3)
        os.write(master, b"exit\n")
        assert w.wait() == 0
        assert screen.text().count("got SIGINT") == 1, screen.text()
        # Two SIGINTs this close would merge into one; the shim's log says
        # whether it forwarded one too.
        assert "signal=SIGINT" not in w.log_text()
    finally:
        screen.close()


class _PtyReader:
    """Collects what the command writes to the pty's master side."""

    def __init__(self, fd):
        self.fd = fd
        self.buf = b""
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO once the last slave fd is closed
                return
            if not data:
                return
            with self.lock:
                self.buf += data

    def text(self) -> str:
        with self.lock:
            return self.buf.decode(errors="replace")

    def expect(self, needle: str, timeout=5.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{needle!r} not on the console: {self.text()[-500:]!r}")
            time.sleep(0.02)

    def close(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


# --------------------------------------------------------------------------
# The port beside the command


def test_busy_port_never_stops_the_command_and_is_taken_when_free(wrap, ns):
    holder = subprocess.Popen(
        ns.exec_argv(
            [
                h.PYTHON,
                "-c",
                "import socket,sys\n"
                "s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen()\n"
                "print(s.getsockname()[1], flush=True); sys.stdin.read()",
            ]
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    ns.procs.append(holder)
    port = int(holder.stdout.readline())
    w = wrap(child("console"), args=("--listen", f"127.0.0.1:{port}")).start()
    w.wait_log(rf"cannot listen on 127\.0\.0\.1:{port}")
    # The command runs and answers while the shim cannot serve.
    w.proc.stdin.write(b"dbl\n")
    w.proc.stdin.flush()
    w.expect("echo: dbl$")
    holder.stdin.close()
    holder.wait(5)
    # Retried every 2 s: the port is served soon after it is free.
    w.wait_log(rf"listening addr=127\.0\.0\.1:{port}", timeout=5)
    w.wait_log(rf"EPICS_CA_NAME_SERVERS=<host>:{port} EPICS_PVA_NAME_SERVERS=<host>:{port}")
    w.proc.stdin.write(b"exit\n")
    w.proc.stdin.close()
    assert w.wait() == 0


# --------------------------------------------------------------------------
# A real IOC under the wrapper

SHIM_PORT = 5066
PVA_GET = """\
import sys
from p4p.client.thread import Context
ctx = Context("pva")
try:
    print(ctx.get(sys.argv[1], timeout=5.0))
finally:
    ctx.close()
"""


@pytest.fixture
def wrapped_ioc(netns_ok, shim_bin, tmp_path):
    # A veth, not only the loopback: QSRV1 in this softIoc aborts without one.
    ctr = h.Container()
    db = h.write_db(tmp_path / "wrap.db", "WRAP:", 42.0)
    w = Wrapper(
        ctr,
        [h.PYTHON, "-m", "epicscorelibs.ioc", "-d", db],
        tmp_path,
        args=("--listen", f"127.0.0.1:{SHIM_PORT}"),
        env=h.SERVER_ENV,
    )
    try:
        # The IOC's Python console exits at EOF: stdin stays an open pipe.
        w.start()
        # The IOC's stderr is the shim's: both end up in the shim log.
        w.wait_log("IOC Running", timeout=30)
        w.wait_log("EPICS_CA_NAME_SERVERS=")
        yield ctr, w
    finally:
        w.stop()
        ctr.close()


def test_real_ioc_answers_ca_through_the_shim_and_stops_within_the_helm_grace(wrapped_ioc):
    ctr, w = wrapped_ioc
    assert f"EPICS_CA_NAME_SERVERS=<host>:{SHIM_PORT} EPICS_PVA_NAME_SERVERS=<host>:{SHIM_PORT}" in w.log_text()
    got = h.ca_get(ctr, f"127.0.0.1:{SHIM_PORT}", ["WRAP:ID", "WRAP:VAL"])
    assert got["WRAP:ID"]["value"] == "WRAP:", got
    assert got["WRAP:VAL"]["value"] == 42.0, got
    assert got["WRAP:ID"]["host"].endswith(f":{SHIM_PORT}"), got
    t0 = time.monotonic()
    w.kill(signal.SIGTERM)
    code = w.wait(timeout=HELM_GRACE + 2)
    elapsed = time.monotonic() - t0
    assert elapsed < HELM_GRACE, f"took {elapsed:.2f}s"
    # The IOC dies of the SIGTERM it was forwarded; the shim says so.
    assert code == 128 + signal.SIGTERM, w.log_text()
    assert f"code={code}" in w.log_text()
    # Nothing survives in the container (no caRepeater or other orphan).
    left = subprocess.run(["ip", "netns", "pids", ctr.name], capture_output=True, text=True, timeout=10)
    assert left.stdout.split() == [], left


def test_real_ioc_answers_pva_through_the_shim(wrapped_ioc):
    ctr, w = wrapped_ioc
    env = {
        "EPICS_PVA_NAME_SERVERS": f"127.0.0.1:{SHIM_PORT}",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_ADDR_LIST": "",
    }
    out = subprocess.run(
        ctr.exec_argv([h.PYTHON, "-c", PVA_GET, "WRAP:VAL"]),
        env=h.clean_env(env),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "42" in out.stdout, out.stdout
    assert "not supported" not in w.log_text()
