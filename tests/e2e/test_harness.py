"""The harness itself, checked against real peers without the shim.

These pin down what the CA tests rely on: NAT publishing as podman does it,
the client helpers, the record databases, cleanup, and the baseline problem
the shim exists for (a plain name server reaches only one server).
"""

import signal
import subprocess
import time
from types import SimpleNamespace

import harness as h
import pytest

DIRECT = "127.0.0.1:5064"  # the softIoc owning TCP 5064 acts as name server


@pytest.fixture(scope="module")
def direct(netns_ok, tmp_path_factory):
    work = tmp_path_factory.mktemp("direct")
    host = h.Host()
    ctr = h.Container(host)
    remote = h.Container(host, role="remote")
    try:
        a = h.SoftIoc(ctr, "DIRA:", work, init=1.0).start()
        b = h.SoftIoc(ctr, "DIRB:", work, init=2.0).start()
        ctr.publish(18064, 5064)
        ctr.publish(18065, 5064, host_ip="127.0.0.1")
        yield SimpleNamespace(host=host, ctr=ctr, remote=remote, a=a, b=b)
    finally:
        for ns in (remote, ctr, host):
            ns.close()


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_plain_name_server_reaches_only_the_server_owning_5064(direct):
    got = h.ca_get(direct.ctr, DIRECT, ["DIRA:ID", "DIRB:ID"], timeout=3)
    assert got["DIRA:ID"]["value"] == "DIRA:"
    assert got["DIRB:ID"] == {"connected": False}


@pytest.mark.parametrize("where", ["host-localhost", "host-veth-address", "other-machine"])
def test_published_port_dnat_reaches_container(direct, where):
    ns, addr = {
        "host-localhost": (direct.host, "127.0.0.1:18064"),
        "host-veth-address": (direct.host, f"{direct.ctr.host_addr}:18064"),
        "other-machine": (direct.remote, f"{direct.remote.host_addr}:18064"),
    }[where]
    got = h.ca_get(ns, addr, ["DIRA:ID"])["DIRA:ID"]
    assert got["value"] == "DIRA:"
    assert got["host"].endswith(":18064"), got


def test_localhost_publish_is_reachable_only_through_localhost(direct):
    # Like `podman run -p 127.0.0.1:18065:5064`.
    assert h.ca_get(direct.host, "127.0.0.1:18065", ["DIRA:ID"])["DIRA:ID"]["value"] == "DIRA:"
    via_veth = h.ca_get(direct.host, f"{direct.ctr.host_addr}:18065", ["DIRA:ID"], timeout=2)
    via_remote = h.ca_get(direct.remote, f"{direct.remote.host_addr}:18065", ["DIRA:ID"], timeout=2)
    assert via_veth == via_remote == {"DIRA:ID": {"connected": False}}


def test_unpublished_port_is_not_reachable_from_host(direct):
    got = h.ca_get(direct.host, f"{direct.ctr.host_addr}:18999", ["DIRA:ID"], timeout=2)
    assert got == {"DIRA:ID": {"connected": False}}


def test_put_get_and_waveform_helpers(direct):
    assert h.ca_put(direct.ctr, DIRECT, "DIRA:VAL", 12.5) == {"connected": True, "put_ok": True, "readback": 12.5}
    assert h.ca_put(direct.ctr, DIRECT, "DIRA:MSG", "abc")["readback"] == "abc"
    wave = [0.25 * i for i in range(h.WAVE_LEN)]
    assert h.ca_put(direct.ctr, DIRECT, "DIRA:WAVE", wave, timeout=20)["readback"] == wave


def test_counter_record_counts_at_10hz(direct):
    values = [u[0] for u in h.ca_monitor(direct.ctr, DIRECT, "DIRA:COUNT", duration=2.0)["updates"]]
    assert 16 <= len(values) <= 24, values
    assert all(b - a == 1 for a, b in zip(values[1:], values[2:])), values


def test_rsrv_name_server_connects_a_client_that_never_polls(direct):
    # rsrv greets first, which makes libca flush its queued search: the
    # baseline for the same test through the shim.
    watch = h.CaWatch(direct.ctr, DIRECT, "DIRA:COUNT", duration=30, poll=False)
    try:
        watch.wait_for(lambda e: e["event"] == "conn" and e["connected"], 5)
        watch.values(2, timeout=5)
    finally:
        watch.close()


def test_garbage_probe_reports_a_close(direct):
    # rsrv drops a connection announcing a huge payload; this checks that
    # tcp_probe notices a close at all, so the shim test can rely on it.
    probe = h.tcp_probe(direct.ctr, DIRECT, h.garbage_payloads()["huge-ca-payload"], timeout=3)
    assert probe["connected"] and probe["closed"], probe


def test_watch_sees_ioc_restart(direct, record_property):
    # Here the restarted IOC is the name server itself, so libca must
    # re-establish the name-server circuit. That usually takes ~9 s but was
    # seen once to exceed 40 s, hence the generous bound; the time is recorded.
    watch = h.CaWatch(direct.ctr, DIRECT, "DIRA:COUNT", duration=120)
    try:
        watch.values(2, timeout=10)
        direct.a.stop()
        watch.wait_for(lambda e: e["event"] == "conn" and not e["connected"], 10)
        direct.a.start()
        t0 = time.monotonic()
        watch.wait_for(lambda e: e["event"] == "conn" and e["connected"], 90)
        record_property("reconnect_seconds", round(time.monotonic() - t0, 2))
        watch.values(2, timeout=5)
    finally:
        watch.close()


def wait_dead(pid, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while h._pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not h._pid_alive(pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_namespaces_and_processes(netns_ok, tmp_path, sig):
    code = (
        "import sys, time, harness as h\n"
        "ctr = h.Container(h.Host())\n"
        f"ioc = h.SoftIoc(ctr, 'SIG:', {str(tmp_path)!r}).start()\n"
        "print(ctr.name, ctr.host.name, ioc.proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [h.PYTHON, "-c", code], cwd=h.HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ctr_name, host_name, pid = child.stdout.readline().split()
        assert ctr_name in namespaces()
        child.send_signal(sig)
        child.wait(20)
    finally:
        if child.poll() is None:
            child.kill()
    listing = namespaces()
    assert ctr_name not in listing and host_name not in listing, listing
    assert wait_dead(int(pid)), "IOC survived its namespace"
    assert child.returncode != 0  # the signal still ends the program


def test_close_is_idempotent_and_complete(netns_ok, tmp_path):
    ctr = h.Container()  # with a private host, closed along with it
    ioc = h.SoftIoc(ctr, "CLS:", tmp_path).start()
    pid = ioc.proc.pid
    ctr.close()
    ctr.close()
    assert wait_dead(pid)
    listing = namespaces()
    assert ctr.name not in listing and ctr.host.name not in listing, listing
