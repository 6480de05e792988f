"""`nameshim check` against real IOCs behind a shim, and its resolver.

One simulated container holds a pvxslibs softIoc (CA + QSRV2, pvxs) and an
epicscorelibs softIoc (CA + QSRV1, pvAccessCPP), and two shims:

| shim port | published as | --advertise-port |
|-----------|--------------|------------------|
| 5066      | 18066        | (none)           |
| 5067      | 18067        | 18067            |

The first shim also has a CA-only port (5068) and a PVA-only port (5069).

`check` runs from another machine on the host's network (the `remote`
namespace), through the published ports, as a user would. The last tests run
the static binary chrooted into an EMPTY root (the binary, etc/hosts and
etc/resolv.conf only) and resolve the shim's host by /etc/hosts and by a real
DNS server (dnsmasq, run inside the test's own namespace only).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import harness as h
import pytest

SHIM_PORT = 5066
PUBLISHED_PORT = 18066
ADVERTISING_PORT = 5067
PUBLISHED_ADV_PORT = 18067
CLOSED_PORT = 18099  # published nowhere
CA_ONLY_PORT = 5068  # --ca-listen of the first shim
PVA_ONLY_PORT = 5069  # --pva-listen of the first shim
STATIC_BIN_DEFAULT = h.REPO / "target" / "x86_64-unknown-linux-gnu" / "release" / "nameshim"
DNS_NAME = "ioc.example.test"
HOSTS_NAME = "ioc-from-hosts.test"


@pytest.fixture(scope="module")
def site(netns_ok, shim_bin, shim_help, tmp_path_factory):
    work = tmp_path_factory.mktemp("check")
    host = h.Host()
    ctr = h.Container(host)
    remote = h.Container(host, role="remote")  # another machine on the host's network
    shims = []
    try:
        env = h.PVA_SERVER_ENV
        # The pvxs IOC first: it takes TCP 5075 and CA 5064.
        h.SoftIoc(ctr, "QSRV2:", work, "pvxslibs", 2.0, env).start()
        h.SoftIoc(ctr, "QSRV1:", work, "epicscorelibs", 1.0, env).start()
        single = ["--ca-listen", f"0.0.0.0:{CA_ONLY_PORT}", "--pva-listen", f"0.0.0.0:{PVA_ONLY_PORT}"]
        for port, extra in ((SHIM_PORT, single), (ADVERTISING_PORT, ["--advertise-port", PUBLISHED_ADV_PORT])):
            shim_dir = work / f"shim-{port}"
            shim_dir.mkdir()
            shim = h.Shim(ctr, ["--listen", f"0.0.0.0:{port}", *extra], shim_dir)
            shims.append(shim)
            shim.start()
        ctr.publish(PUBLISHED_PORT, SHIM_PORT)
        ctr.publish(PUBLISHED_ADV_PORT, ADVERTISING_PORT)
        yield SimpleNamespace(host=host, ctr=ctr, remote=remote, work=work, shims=shims)
    finally:
        for s in shims:
            s.stop()
        for ns in (remote, ctr, host):
            ns.close()


def check(ns, binary, *args, timeout=60) -> subprocess.CompletedProcess:
    """`nameshim check ARGS` inside ns; output kept for the assertions."""
    proc = subprocess.run(
        ns.exec_argv([binary, "check", *map(str, args)]),
        env=h.clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(f"$ nameshim check {' '.join(map(str, args))}\n{proc.stdout}{proc.stderr}exit {proc.returncode}")
    return proc


def step_line(out: str, protocol: str, step: str, status: str, pv: str = "") -> str:
    """The line of one step, e.g. `  CA   get       ok  1.0 ms  QSRV2:VAL = 2`."""
    pattern = rf"^  {re.escape(protocol)}\s+{step}\s+{status}\s+[\d.]+ ms  {re.escape(pv)}.*$"
    m = re.search(pattern, out, re.M)
    assert m, f"no {protocol} {step} {status} line for {pv!r} in:\n{out}"
    return m.group(0)


def test_check_through_remapped_port_reads_every_pv_with_both_protocols(site, shim_bin):
    target = f"{site.remote.host_addr}:{PUBLISHED_PORT}"
    got = check(site.remote, shim_bin, target, "QSRV2:VAL", "QSRV1:ID", "QSRV2:WAVE")
    out = got.stdout
    assert got.returncode == 0, out
    for protocol in ("CA", "PVA"):
        step_line(out, protocol, "connect", "ok", target)
        step_line(out, protocol, "greeting", "ok")
        for pv in ("QSRV2:VAL", "QSRV1:ID", "QSRV2:WAVE"):
            for step in ("search", "create", "get"):
                step_line(out, protocol, step, "ok", pv)
    assert step_line(out, "CA", "get", "ok", "QSRV2:VAL").endswith("QSRV2:VAL = 2")
    assert step_line(out, "CA", "get", "ok", "QSRV1:ID").endswith('QSRV1:ID = "QSRV1:"')
    assert step_line(out, "CA", "create", "ok", "QSRV2:VAL").endswith("DBR_DOUBLE[1], read/write")
    assert step_line(out, "PVA", "get", "ok", "QSRV2:VAL").endswith(
        "QSRV2:VAL epics:nt/NTScalar:1.0 value = 2 (double)"
    )
    assert step_line(out, "PVA", "get", "ok", "QSRV1:ID").endswith(
        'QSRV1:ID epics:nt/NTScalar:1.0 value = "QSRV1:" (string)'
    )
    # The waveform holds no element yet (NORD 0): CA reads the first 16 of
    # its 100000 as zeros, PVA gets an empty array.
    assert step_line(out, "CA", "create", "ok", "QSRV2:WAVE").endswith("DBR_DOUBLE[100000], read/write")
    assert step_line(out, "CA", "get", "ok", "QSRV2:WAVE").endswith(
        "QSRV2:WAVE = [0, 0, 0, 0, 0, ...] (first 16 of 100000 read)"
    )
    assert step_line(out, "PVA", "get", "ok", "QSRV2:WAVE").endswith(
        "QSRV2:WAVE epics:nt/NTScalarArray:1.0 value = [] (0 x double)"
    )
    assert "  QSRV2:VAL: CA ok, PVA ok" in out
    assert f"  export EPICS_CA_NAME_SERVERS={target}" in out
    assert f"  export EPICS_PVA_NAME_SERVERS={target}" in out


def test_check_through_remapped_port_tells_pvaccesscpp_and_phoebus_to_set_advertise_port(site, shim_bin):
    got = check(site.remote, shim_bin, f"{site.remote.host_addr}:{PUBLISHED_PORT}", "QSRV2:VAL")
    out = got.stdout
    assert got.returncode == 0, out
    assert "pvxs (p4p, pvxget, pvxslibs): works" in out
    assert (
        f"pvAccessCPP (pvapy, C++ tools) and Phoebus: FAIL: they dial port {SHIM_PORT}, "
        f"but clients here reach the shim at port {PUBLISHED_PORT}: start the shim with --advertise-port {PUBLISHED_PORT}"
    ) in out
    assert f"  --advertise-port {PUBLISHED_PORT}" in out


def test_check_with_advertise_port_says_every_client_works(site, shim_bin):
    got = check(site.remote, shim_bin, f"{site.remote.host_addr}:{PUBLISHED_ADV_PORT}", "QSRV2:VAL")
    out = got.stdout
    assert got.returncode == 0, out
    assert f"answers name port {PUBLISHED_ADV_PORT}" in out
    assert f"and Phoebus: work (they dial port {PUBLISHED_ADV_PORT}" in out
    assert "FAIL" not in out and "--advertise-port" not in out, out


def test_check_where_the_port_keeps_its_number_says_every_client_works(site, shim_bin):
    got = check(site.ctr, shim_bin, f"127.0.0.1:{SHIM_PORT}", "QSRV1:VAL")
    out = got.stdout
    assert got.returncode == 0, out
    assert f"answers name port 0 (this connection), then port {SHIM_PORT}" in out
    assert f"and Phoebus: work (they dial port {SHIM_PORT}" in out
    assert "FAIL" not in out, out


def test_check_of_a_missing_pv_exits_1_naming_the_failed_step(site, shim_bin):
    target = f"{site.remote.host_addr}:{PUBLISHED_PORT}"
    got = check(site.remote, shim_bin, "--timeout", "2s", target, "QSRV2:VAL", "NO:SUCH:PV")
    out = got.stdout
    assert got.returncode == 1, out
    assert "a search reply for NO:SUCH:PV" in step_line(out, "CA", "search", "FAILED")
    assert "NO:SUCH:PV not found" in step_line(out, "PVA", "search", "FAILED")
    assert not re.search(r"^  (CA|PVA)\s+(create|get)\s+\S+\s+[\d.]+ ms  NO:SUCH:PV", out, re.M), out
    assert "  NO:SUCH:PV: CA NOT REACHED, PVA NOT REACHED" in out
    assert "  QSRV2:VAL: CA ok, PVA ok" in out


def test_check_without_pvs_checks_connect_and_greeting_of_both(site, shim_bin):
    got = check(site.remote, shim_bin, f"{site.remote.host_addr}:{PUBLISHED_PORT}")
    out = got.stdout
    assert got.returncode == 0, out
    for protocol in ("CA", "PVA"):
        step_line(out, protocol, "connect", "ok")
        step_line(out, protocol, "greeting", "ok")
    assert "server VERSION, minor 13" in out
    assert 'validated with "ca"' in out


def test_check_on_single_protocol_ports_names_the_kind_of_port(site, shim_bin):
    got = check(site.ctr, shim_bin, f"127.0.0.1:{PVA_ONLY_PORT}", "QSRV2:VAL")
    out = got.stdout
    assert got.returncode == 0, out
    assert "a PVA-only port (--pva-listen)" in step_line(out, "CA", "greeting", "FAILED")
    step_line(out, "PVA", "get", "ok", "QSRV2:VAL")
    assert f"export EPICS_PVA_NAME_SERVERS=127.0.0.1:{PVA_ONLY_PORT}" in out
    assert "EPICS_CA_NAME_SERVERS" not in out
    got = check(site.ctr, shim_bin, f"127.0.0.1:{CA_ONLY_PORT}", "QSRV2:VAL")
    out = got.stdout
    assert got.returncode == 0, out
    assert "a CA-only port (--ca-listen)" in step_line(out, "PVA", "greeting", "FAILED")
    step_line(out, "CA", "get", "ok", "QSRV2:VAL")
    assert "EPICS_PVA_NAME_SERVERS" not in out
    # With no PV, a protocol that does not greet makes the exit code 1.
    assert check(site.ctr, shim_bin, f"127.0.0.1:{CA_ONLY_PORT}").returncode == 1


def test_check_of_a_closed_port_exits_2_and_says_refused(site, shim_bin):
    got = check(site.remote, shim_bin, f"{site.remote.host_addr}:{CLOSED_PORT}", "QSRV2:VAL")
    out = got.stdout
    assert got.returncode == 2, out
    assert "connection refused: nothing listens on" in step_line(out, "CA", "connect", "FAILED")
    assert "nothing reached" in out


# --------------------------------------------------------------------------
# The static binary in an empty root, resolving the shim's host name


@pytest.fixture(scope="module")
def static_bin() -> Path:
    given = os.environ.get("NAMESHIM_STATIC_BIN")
    path = Path(given or STATIC_BIN_DEFAULT)
    if not path.is_file():
        if given:
            pytest.fail(f"NAMESHIM_STATIC_BIN={given} does not exist")
        pytest.skip(f"static binary not found at {path}: run scripts/build-static or set NAMESHIM_STATIC_BIN")
    return path


def dnsmasq_path() -> str | None:
    return shutil.which("dnsmasq") or next((p for p in ("/usr/sbin/dnsmasq",) if os.access(p, os.X_OK)), None)


@pytest.fixture(scope="module")
def empty_root(site, static_bin):
    """A root holding only the static binary, etc/hosts and etc/resolv.conf,
    and a dnsmasq on the remote machine's address that knows DNS_NAME."""
    dnsmasq = dnsmasq_path()
    if dnsmasq is None:
        pytest.skip("dnsmasq not found (scripts/setup.sh installs the Debian package dnsmasq-base)")
    root = site.work / "root"
    (root / "etc").mkdir(parents=True)
    shutil.copy2(static_bin, root / "nameshim")
    published = site.remote.host_addr  # where the host publishes the shim's ports
    (root / "etc" / "hosts").write_text(f"127.0.0.1 localhost\n{published} {HOSTS_NAME}\n")
    (root / "etc" / "resolv.conf").write_text(f"nameserver {site.remote.addr}\nsearch example.test\n")
    log = site.work / "dnsmasq.log"
    # Inside the remote namespace only, on its own address; no config file,
    # no upstream, no hosts file: it knows DNS_NAME and nothing else.
    proc = h.run_in(
        site.remote,
        [
            dnsmasq, "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            f"--address=/{DNS_NAME}/{published}", f"--listen-address={site.remote.addr}",
            "--bind-interfaces", "--port=53", "--log-queries", "--log-facility=-",
            f"--pid-file={site.work / 'dnsmasq.pid'}", "--user=root", "--group=root",
        ],  # fmt: skip
        log_path=log,
    )
    h.wait_for_log(log, re.compile(r"started, version"), proc, 10, "dnsmasq")
    yield SimpleNamespace(root=root, dns_log=log)
    h.stop_process(proc)


def check_in_root(site, empty_root, target, *pvs):
    argv = [shutil.which("chroot"), empty_root.root, "/nameshim", "check", "--timeout", "5s", target, *pvs]
    trace = None
    if shutil.which("strace"):
        trace = site.work / f"strace-{target.split(':')[0]}.log"
        argv = [shutil.which("strace"), "-f", "-qq", "-o", trace, "-e", "trace=%file,%network", *argv]
    proc = subprocess.run(site.remote.exec_argv(argv), capture_output=True, text=True, timeout=60, env=h.clean_env())
    print(f"$ nameshim check {target} {' '.join(pvs)}\n{proc.stdout}{proc.stderr}exit {proc.returncode}")
    return proc, (trace.read_text() if trace else None)


@pytest.mark.parametrize(
    "name, by_dns",
    [(HOSTS_NAME, False), (DNS_NAME, True), ("ioc", True)],
    ids=["etc-hosts", "dns", "dns-search-domain"],
)
def test_static_binary_in_empty_root_resolves_the_shim_by_name(site, empty_root, name, by_dns):
    offset = empty_root.dns_log.stat().st_size
    got, trace = check_in_root(site, empty_root, f"{name}:{PUBLISHED_PORT}", "QSRV2:VAL")
    out = got.stdout
    assert got.returncode == 0, out + got.stderr
    assert f"{name} -> {site.remote.host_addr}" in step_line(out, "", "resolve", "ok")
    assert step_line(out, "CA", "get", "ok", "QSRV2:VAL").endswith("QSRV2:VAL = 2")
    assert step_line(out, "PVA", "get", "ok", "QSRV2:VAL").endswith("value = 2 (double)")
    queries = empty_root.dns_log.read_text()[offset:]
    if by_dns:
        assert f"query[A] {DNS_NAME}" in queries, queries
    else:
        assert "query[" not in queries, f"a name from etc/hosts went to DNS:\n{queries}"
    if trace is not None:
        # No NSS: glibc's name service switch is never consulted.
        after_exec = trace.split('execve("/nameshim"', 1)[-1]
        nss = [line for line in after_exec.splitlines() if re.search(r"nsswitch\.conf|libnss_|gai\.conf", line)]
        assert not nss, nss
