"""The IOC plugin (ioc-plugin/): nameshim inside a real softIoc process.

The plugin is built by scripts/build-ioc-plugin (the C registrar linked
with the crate's static library) and loaded into the epicscorelibs softIoc
(rsrv + QSRV1) or the pvxslibs one (rsrv + QSRV2) as an st.cmd would load
it (plugin_ioc.py: dlload, nameshim.dbd, registerRecordDeviceDriver). The
IOC shell then reads commands from the test: `nameshimStart "--listen
0.0.0.0:PORT"`, `nameshimReport`, `dbsr`, `exit`. Clients run on "another
machine" (a namespace on the host's network) and reach the shim through
one published, remapped port, as with `podman run -p`.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import harness as h
import pytest

BUILD = h.REPO / "scripts" / "build-ioc-plugin"
SRC = h.REPO / "ioc-plugin" / "nameshimApp" / "src"
RUNNER = h.HERE / "plugin_ioc.py"
SHIM_PORT = 5066
PUBLISHED_PORT = 18066


@pytest.fixture(scope="module")
def plugin() -> tuple[Path, Path]:
    """(libnameshim.so, the directory of nameshim.dbd), built once."""
    out = subprocess.run([BUILD], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lib = Path(out.stdout.strip().splitlines()[-1])
    return lib, h.REPO / "ioc-plugin" / "dbd"


class PluginIoc(h.SoftIoc):
    """A softIoc with the plugin loaded; its IOC shell reads our commands."""

    def __init__(self, ns, prefix, workdir, plugin, flavour="epicscorelibs", init=0.0, env=None):
        super().__init__(ns, prefix, workdir, flavour, init, env)
        self.lib, self.dbd_dir = plugin
        self.mark = 0

    def argv(self):
        return [h.PYTHON, RUNNER, self.flavour, self.db, self.lib, self.dbd_dir]

    def shell(self, line: str) -> None:
        """Types one line into the IOC shell; expect() then reads what follows."""
        self.mark = self.log.stat().st_size
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, pattern: str, timeout=10.0) -> re.Match:
        return h.wait_for_log(self.log, re.compile(pattern), self.proc, timeout, self.what, self.mark)

    def text(self) -> str:
        return h.tail(self.log, 400)


def start_shim(ioc: PluginIoc, port: int) -> None:
    ioc.shell(f'nameshimStart "--listen 0.0.0.0:{port}"')
    ioc.expect(rf"listening addr=0\.0\.0\.0:{port}")


@pytest.fixture
def site(netns_ok, tmp_path):
    host = h.Host()
    ctr = h.Container(host)
    remote = h.Container(host, role="remote")  # another machine on the host's network
    try:
        yield ctr, remote, f"{remote.host_addr}:{PUBLISHED_PORT}"
    finally:
        for ns in (remote, ctr, host):
            ns.close()


def test_the_epics_build_and_the_script_build_the_same_sources():
    listed = re.findall(r"^nameshim_SRCS \+= (\S+)$", (SRC / "SOURCES.mk").read_text(), re.M)
    assert listed, "SOURCES.mk lists no source"
    assert sorted(listed) == sorted(p.name for p in SRC.glob("*.c")), "every C file is listed, and only those"
    makefile = (SRC / "Makefile").read_text()
    assert "include $(TOP)/nameshimApp/src/SOURCES.mk" in makefile
    assert "_SRCS" not in makefile.replace("SOURCES.mk", ""), "sources are listed in SOURCES.mk only"
    script = BUILD.read_text()
    assert "SOURCES.mk" in script and "nameshim_SYS_LIBS_Linux" in script and "nameshim.map" in script
    assert "nameshim.map" in makefile
    assert re.search(r"^nameshim_SYS_LIBS_Linux \+= ", makefile, re.M)


@pytest.mark.parametrize("flavour", ["epicscorelibs", "pvxslibs"])
def test_plugin_serves_its_iocs_ca_and_pva_through_one_published_port_and_exits_within_a_second(
    site, plugin, tmp_path, flavour
):
    ctr, remote, published = site
    ioc = PluginIoc(ctr, "PLUG:", tmp_path, plugin, flavour, init=42.0).start()
    start_shim(ioc, SHIM_PORT)
    ctr.publish(PUBLISHED_PORT, SHIM_PORT)

    got = h.ca_get(remote, published, ["PLUG:ID", "PLUG:VAL"])
    assert got["PLUG:ID"]["value"] == "PLUG:", got
    assert got["PLUG:VAL"]["value"] == 42.0, got
    put = h.ca_put(remote, published, "PLUG:VAL", 7.5)
    assert put["put_ok"] and put["readback"] == 7.5, put

    got = h.pva_get(remote, published, ["PLUG:VAL", "PLUG:ID"])
    assert got["PLUG:VAL"]["ok"] and got["PLUG:VAL"]["value"] == 7.5, got
    assert got["PLUG:ID"]["value"] == "PLUG:", got
    put = h.pva_put(remote, published, "PLUG:VAL", 9.25)
    assert put["ok"], put
    assert h.ca_get(remote, published, ["PLUG:VAL"])["PLUG:VAL"]["value"] == 9.25

    # A client that stays connected shows in the counts.
    watch = h.CaWatch(remote, published, "PLUG:COUNT")
    try:
        watch.wait_for(lambda ev: ev.get("event") == "value", timeout=10)
        ioc.shell("nameshimReport")
        ioc.expect(rf"nameshim: port {SHIM_PORT}, clients ca 1 pva 0, channels ca 1 pva 0")
        ioc.shell("dbsr")
        ioc.expect(r"Server 'nameshim'\s+nameshim: port")
    finally:
        watch.close()

    asked = time.monotonic()
    ioc.shell("exit")
    code = ioc.proc.wait(timeout=10)
    took = time.monotonic() - asked
    assert code == 0, ioc.text()
    print(f"exit took {took:.3f}s")
    assert took < 1.0, f"exit took {took:.2f}s"
    assert "stopped; every socket closed" in ioc.text()
    left = subprocess.run(["ip", "netns", "pids", ctr.name], capture_output=True, text=True, timeout=10)
    assert left.stdout.split() == [], left


def test_two_iocs_each_with_its_own_shim_serve_every_server_in_the_namespace(site, plugin, tmp_path):
    ctr, remote, _ = site
    a = PluginIoc(ctr, "IOCA:", tmp_path, plugin, "epicscorelibs", init=1.0).start()
    b = PluginIoc(ctr, "IOCB:", tmp_path, plugin, "pvxslibs", init=2.0).start()
    start_shim(a, SHIM_PORT)
    start_shim(b, SHIM_PORT + 2)
    ctr.publish(PUBLISHED_PORT, SHIM_PORT)
    ctr.publish(PUBLISHED_PORT + 2, SHIM_PORT + 2)
    for port in (PUBLISHED_PORT, PUBLISHED_PORT + 2):
        via = f"{remote.host_addr}:{port}"
        got = h.ca_get(remote, via, ["IOCA:VAL", "IOCB:VAL"])
        assert got["IOCA:VAL"]["value"] == 1.0 and got["IOCB:VAL"]["value"] == 2.0, (via, got)
        got = h.pva_get(remote, via, ["IOCA:VAL", "IOCB:VAL"])
        assert got["IOCA:VAL"]["value"] == 1.0 and got["IOCB:VAL"]["value"] == 2.0, (via, got)
    for ioc in (a, b):
        ioc.shell("exit")
        assert ioc.proc.wait(timeout=10) == 0, ioc.text()


@pytest.mark.parametrize(
    "env, serves",
    [
        ({"NAMESHIM_LISTEN": f"127.0.0.1:{SHIM_PORT}"}, True),
        ({"NAMESHIM_LISTEN": f"127.0.0.1:{SHIM_PORT}", "EPICS_IOC_IGNORE_SERVERS": "nameshim"}, False),
    ],
    ids=["NAMESHIM_LISTEN", "ignored"],
)
def test_NAMESHIM_LISTEN_starts_the_shim_when_the_ioc_runs_unless_ignored(site, plugin, tmp_path, env, serves):
    ctr, _, _ = site
    ioc = PluginIoc(ctr, "AUTO:", tmp_path, plugin, env=env).start()
    if serves:
        ioc.expect(rf"listening addr=127\.0\.0\.1:{SHIM_PORT}")
        got = h.ca_get(ctr, f"127.0.0.1:{SHIM_PORT}", ["AUTO:ID"])
        assert got["AUTO:ID"]["value"] == "AUTO:", got
    else:
        ioc.expect(r"dbRegisterServer: Ignoring 'nameshim'")
        ioc.shell(f'nameshimStart "--listen 127.0.0.1:{SHIM_PORT}"')
        ioc.expect(r"nameshim: not started: ignored per EPICS_IOC_IGNORE_SERVERS")
        ioc.shell("nameshimReport")
        ioc.expect(r"nameshim: not running")
        assert "listening addr=" not in ioc.text()
    ioc.shell("exit")
    assert ioc.proc.wait(timeout=10) == 0, ioc.text()


def test_bad_options_and_a_taken_port_leave_the_ioc_running_and_stop_is_prompt(site, plugin, tmp_path):
    ctr, _, _ = site
    ioc = PluginIoc(ctr, "BUSY:", tmp_path, plugin).start()
    ioc.shell('nameshimStart "--no-such-option"')
    ioc.expect(r"unexpected argument '--no-such-option'[\s\S]*nameshim: not started: options refused")
    ioc.shell('nameshimStart "--listen \'0.0.0.0:5066"')
    ioc.expect(r"unterminated single quote[\s\S]*nameshim: not started: options refused")
    # rsrv holds TCP 5064: the shim cannot bind it, says so, and retries.
    ioc.shell('nameshimStart "--listen 0.0.0.0:5064"')
    ioc.expect(r"not serving; the IOC keeps running; retrying every 2s")
    ioc.shell("nameshimReport")
    ioc.expect(r"nameshim: running, port not bound")
    ioc.shell('nameshimStart "--listen 0.0.0.0:5066"')
    ioc.expect(r"nameshim: not started: already running")
    got = h.ca_get(ctr, "127.0.0.1:5064", ["BUSY:ID"])
    assert got["BUSY:ID"]["value"] == "BUSY:", "the IOC still serves"
    asked = time.monotonic()
    ioc.shell("nameshimStop")
    ioc.expect(r"stopped; every socket closed")
    assert time.monotonic() - asked < 1.0
    ioc.shell("nameshimReport")
    ioc.expect(r"nameshim: not running")
    ioc.shell("exit")
    assert ioc.proc.wait(timeout=10) == 0, ioc.text()
