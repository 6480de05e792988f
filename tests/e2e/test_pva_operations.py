"""PROCESS, ARRAY and PUT_GET from a pvAccessCPP client, through the shim on
a remapped port and directly.

pvxs servers (QSRV2 IOCs, p4p) do not implement ARRAY and PROCESS, and their
PUT_GET is a stub: they never answer the INIT, and a pvAccessCPP client
waits for ever. The shim answers such an INIT with an error after 2 s
(src/pva/unanswered.rs). A pvAccessCPP server (QSRV1 IOCs) answers every
INIT itself, and through the shim must behave exactly as it does directly.

One simulated container holds a pvxslibs softIoc (QSRV2), an epicscorelibs
softIoc (QSRV1, which implements PROCESS but answers ARRAY and PUT_GET with
"Not Implemented"), a pvapy PvaServer (pvAccessCPP and pvDatabase, which
implements all three), and the shim on 0.0.0.0:5066 published on the
host as 18066, run with `--advertise-port 18066` as docs/clients.md says for
pvAccessCPP clients behind a remapped port. The client is
tests/e2e/pvacpp_ops.cpp, compiled once per session against pvAccessCPP
(see the pvacpp_ops fixture for why pvapy's library): on the host it uses EPICS_PVA_NAME_SERVERS=127.0.0.1:18066
only; the direct path runs it in the container with a UDP search on the
container's broadcast address and no name server.
"""

import ipaddress
import json
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import harness as h
import pytest

SHIM_PORT = 5066
PUBLISHED_PORT = 18066
# Each step of the client (connect, INIT, request) gives up after this.
CLIENT_STEP_TIMEOUT = 15.0
# The shim answers after 2 s; a client told within this did not hang.
ERROR_WITHIN = 5.0


@pytest.fixture(scope="session")
def pvacpp_ops(tmp_path_factory):
    """tests/e2e/pvacpp_ops.cpp built against pvAccessCPP.

    Headers from epicscorelibs, libraries from pvapy: the pvAccessCPP
    library in epicscorelibs 7.0.10.99.0.2 has no name-server support (no
    EPICS_PVA_NAME_SERVERS), the one pvapy ships (7.1.8) has. Both use
    the old C++ string ABI.
    """
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) to build the pvAccessCPP client tests/e2e/pvacpp_ops.cpp")
    import epicscorelibs.path
    import pvaccess

    epics = epicscorelibs.path.base_path
    libs = Path(pvaccess.__file__).parent / "lib" / "linux-x86_64"
    out = tmp_path_factory.mktemp("pvacpp") / "pvacpp_ops"
    argv = [
        cxx, "-std=c++11", "-O2", "-Wall", "-D_GLIBCXX_USE_CXX11_ABI=0", "-pthread",
        f"-I{epics}/include", f"-I{epics}/include/os/Linux", f"-I{epics}/include/compiler/gcc",
        str(h.HERE / "pvacpp_ops.cpp"),
        f"-L{libs}", "-lpvAccess", "-lpvData", "-lCom", f"-Wl,-rpath,{libs}",
        "-o", str(out),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"building pvacpp_ops failed:\n{proc.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def site(netns_ok, shim_bin, shim_help, tmp_path_factory):
    work = tmp_path_factory.mktemp("pva-operations")
    host = h.Host()
    ctr = h.Container(host)
    try:
        env = h.PVA_SERVER_ENV
        # The pvxs IOC first: it takes TCP 5075, the QSRV1 IOC a random port.
        iocs = {
            "QSRV2:": h.SoftIoc(ctr, "QSRV2:", work, "pvxslibs", 2.0, env).start(),
            "QSRV1:": h.SoftIoc(ctr, "QSRV1:", work, "epicscorelibs", 1.0, env).start(),
            "PVAPY:": h.PvapyServer(ctr, "PVAPY:", work, 6.0).start(),
        }
        shim = h.Shim(ctr, ["--listen", f"0.0.0.0:{SHIM_PORT}", "--advertise-port", PUBLISHED_PORT], work)
        shim.start()
        ctr.publish(PUBLISHED_PORT, SHIM_PORT)
        broadcast = ipaddress.ip_network(f"{ctr.addr}/30", strict=False).broadcast_address
        yield SimpleNamespace(host=host, ctr=ctr, iocs=iocs, shim=shim, broadcast=str(broadcast))
    finally:
        for ns in (ctr, host):
            ns.close()


def shim_diag(site) -> str:
    return f"shim {'alive' if site.shim.alive() else 'DEAD'}, log {site.shim.log}"


def run_op(binary, ns, env, pv, op, step_timeout=CLIENT_STEP_TIMEOUT) -> dict:
    """Run pvacpp_ops once; its JSON report plus "wall_s", the whole run."""
    start = time.monotonic()
    try:
        proc = subprocess.run(
            ns.exec_argv([binary, pv, op, step_timeout]),
            env=h.clean_env(env),
            capture_output=True,
            text=True,
            timeout=3 * step_timeout + 20,
        )
    except subprocess.TimeoutExpired:
        raise h.ClientHung(f"pvacpp_ops {pv} {op} still running, killed") from None
    assert proc.returncode == 0 and proc.stdout.strip(), f"pvacpp_ops failed ({proc.returncode}):\n{proc.stderr}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["wall_s"] = round(time.monotonic() - start, 3)
    return report


def through_shim(binary, site, pv, op, **kw) -> dict:
    """From the host, through the remapped published port."""
    return run_op(binary, site.host, h.pva_client_env(f"127.0.0.1:{PUBLISHED_PORT}"), pv, op, **kw)


def direct(binary, site, pv, op, **kw) -> dict:
    """In the container, found by UDP search: no shim on the path."""
    return run_op(binary, site.ctr, h.pva_direct_env(site.broadcast), pv, op, **kw)


def outcome(report) -> dict:
    """What a client sees of an operation, without times."""
    keys = ("connected", "init", "init_message", "done", "done_message", "result")
    return {k: report[k] for k in keys}


# --------------------------------------------------------------------------
# A pvxs IOC (QSRV2): the shim answers what the server never does


@pytest.mark.parametrize("pv, op", [("QSRV2:VAL", "process"), ("QSRV2:WAVE", "array-get"), ("QSRV2:VAL", "putget=4.5")])
def test_pvacpp_operation_a_pvxs_ioc_lacks_gets_an_error_through_the_shim(
    site, pvacpp_ops, pv, op, record_property
):
    got = through_shim(pvacpp_ops, site, pv, op)
    record_property("init_s", got["init_s"])
    assert got["connected"], (got, shim_diag(site))
    assert got["init"] == "error", (got, shim_diag(site))
    assert "does not implement it" in got["init_message"], got
    assert got["init_s"] < ERROR_WITHIN, got


def test_pvacpp_process_on_a_pvxs_ioc_hangs_without_the_shim(site, pvacpp_ops):
    # The baseline the shim's error replaces: directly, the INIT is never
    # answered and the client is left waiting (here until its own 4 s limit).
    got = direct(pvacpp_ops, site, "QSRV2:VAL", "process", step_timeout=4)
    assert got["connected"], got
    assert got["init"] == "timeout", got


# --------------------------------------------------------------------------
# pvAccessCPP servers: whatever they answer is relayed unchanged


@pytest.mark.parametrize(
    "pv, op",
    [
        ("QSRV1:VAL", "process"),
        ("QSRV1:WAVE", "array-get"),
        ("QSRV1:VAL", "putget=3.25"),
        ("PVAPY:VAL", "process"),
        ("PVAPY:WAVE", "array-get"),
        ("PVAPY:WAVE", "array-length"),
        ("PVAPY:VAL", "putget=6.5"),
    ],
)
def test_pvacpp_operation_on_a_pvaccesscpp_server_through_the_shim_is_as_direct(
    site, pvacpp_ops, pv, op, record_property
):
    plain = direct(pvacpp_ops, site, pv, op)
    shimmed = through_shim(pvacpp_ops, site, pv, op)
    record_property("direct", plain)
    record_property("shim", shimmed)
    assert plain["connected"] and plain["init"] != "timeout", plain
    assert outcome(shimmed) == outcome(plain), (shimmed, plain, shim_diag(site))
    # The server answered: the shim's 2 s wait for a lacking server must
    # not delay it.
    assert shimmed["init_s"] < 1.0, shimmed
