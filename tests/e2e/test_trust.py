"""No client gets more reach through the shim than it has directly.

The shim connects to the IOC's servers from inside the container. Were those
connections to leave from 127.0.0.1, every client through the shim would look
to the IOC like a process on its own host, and access security that trusts
the own host would trust the whole network. These tests run real IOCs whose
access security (ACF) grants WRITE to their own host only, and check that a
remote client through the shim's published port can read but never write,
while a process in the container writing directly still can.

| prefix | IOC                          | servers          | asCheckClientIP | listens on |
|--------|------------------------------|------------------|-----------------|------------|
| ANY1:  | epicscorelibs softIoc        | rsrv + QSRV1     | 1               | wildcard   |
| ANY2:  | pvxslibs softIoc             | rsrv + QSRV2     | 1               | wildcard   |
| LO1:   | epicscorelibs softIoc        | rsrv + QSRV1     | 1               | CA: 127.0.0.1 |
| LO2:   | pvxslibs softIoc             | rsrv + QSRV2     | 1               | PVA: 127.0.0.1 |
| NAMED: | epicscorelibs softIoc        | rsrv + QSRV1     | 0               | wildcard   |
| SHIM:  | pvxslibs softIoc             | rsrv + QSRV2     | 1               | wildcard   |

The ACF: `HAG(own) { localhost }` with WRITE for HAG(own), READ for all.
With asCheckClientIP=1, asLib resolves `localhost` to 127.0.0.1 and rsrv
takes a client's host from its address. QSRV1 and QSRV2 always take the
host from the peer address, whatever asCheckClientIP says. NAMED: trusts
the host name a CA client claims, so its ACF names a claimed host. SHIM:
follows docs/security.md: its ACF grants WRITE to clients through the shim
by naming the shim's source address; a second shim, published on another
port with its own --server-source-addr, stands for the port given to
another network.
"""

import json
import re
import subprocess
from types import SimpleNamespace

import harness as h
import pytest

SHIM_PORT = 5066
PUBLISHED_PORT = 18066
# What the shim's connections to servers leave from by default.
SHIM_SOURCE = "127.0.50.66"
# A second shim, for "another network", with its own source address.
OTHER_SHIM_PORT = 5067
OTHER_PUBLISHED_PORT = 18067
OTHER_SOURCE = "127.0.50.67"
ACF_IOC = h.HERE / "acf_ioc.py"
TRUST_CLIENT = h.HERE / "trust_client.py"

OWN_HOST_ACF = """\
HAG(own) { localhost }
ASG(DEFAULT) {
    RULE(1, READ)
    RULE(1, WRITE) { HAG(own) }
}
"""
# For NAMED: (asCheckClientIP=0): the host name a client claims decides.
CLAIMED_NAME_ACF = """\
HAG(console) { ioc-console }
ASG(DEFAULT) {
    RULE(1, READ)
    RULE(1, WRITE) { HAG(console) }
}
"""
THROUGH_SHIM_ACF = f"""\
HAG(through_shim) {{ {SHIM_SOURCE} }}
ASG(DEFAULT) {{
    RULE(1, READ)
    RULE(1, WRITE) {{ HAG(through_shim) }}
}}
"""
# Only one server per protocol is bound to 127.0.0.1 alone: a unicast
# search to 127.0.0.1 reaches one of the sockets bound there, as for any
# client. So LO1: has its CA server (rsrv) there, LO2: its PVA server (QSRV2).
CA_LOOPBACK_ONLY = {"EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1"}
PVA_LOOPBACK_ONLY = {"EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1"}

# prefix -> (flavour, asCheckClientIP, extra environment, initial VAL)
IOCS = {
    "ANY1:": ("epicscorelibs", 1, {}, 1.0),
    "ANY2:": ("pvxslibs", 1, {}, 2.0),
    "LO1:": ("epicscorelibs", 1, CA_LOOPBACK_ONLY, 3.0),
    "LO2:": ("pvxslibs", 1, PVA_LOOPBACK_ONLY, 4.0),
    "NAMED:": ("epicscorelibs", 0, {}, 5.0),
    "SHIM:": ("pvxslibs", 1, {}, 6.0),
}
ACFS = {"NAMED:": CLAIMED_NAME_ACF, "SHIM:": THROUGH_SHIM_ACF}
OWN_HOST_IOCS = ["ANY1:", "ANY2:", "LO1:", "LO2:"]
QSRV = {"ANY1:": "QSRV1", "ANY2:": "QSRV2", "LO1:": "QSRV1", "LO2:": "QSRV2"}
REMOTE_PUT = 666.0


class AcfIoc(h.SoftIoc):
    """A softIoc that loads an ACF, with asCheckClientIP set, before iocInit."""

    def __init__(self, ns, prefix, workdir, flavour, check_client_ip, acf_text, init, env):
        super().__init__(ns, prefix, workdir, flavour, init, {**h.PVA_SERVER_ENV, **env})
        self.check_client_ip = check_client_ip
        self.acf = self.workdir / f"{prefix.strip(':').lower()}.acf"
        self.acf.write_text(acf_text)

    def argv(self):
        return [h.PYTHON, ACF_IOC, self.flavour, self.acf, self.check_client_ip, "-d", self.db]

    def shell(self, command: str, expect: re.Pattern, timeout=10.0) -> str:
        """Run an iocsh command through the IOC's Python console; return the
        log from there on once `expect` matches it."""
        offset = self.log.stat().st_size
        # C stdio buffers the report: flush it into the log.
        line = f"ioc({command!r}); import ctypes; ctypes.CDLL(None).fflush(None)\n"
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()
        h.wait_for_log(self.log, expect, self.proc, timeout, f"'{command}' in {self.prefix}", offset)
        return h._read_from(self.log, offset)


@pytest.fixture(scope="module")
def site(netns_ok, shim_bin, shim_help, tmp_path_factory):
    work = tmp_path_factory.mktemp("trust")
    host = h.Host()
    ctr = h.Container(host)
    remote = h.Container(host, role="remote")  # another machine on the host's network
    shim = None
    try:
        iocs = {}
        for prefix, (flavour, check_ip, env, init) in IOCS.items():
            acf = ACFS.get(prefix, OWN_HOST_ACF)
            iocs[prefix] = AcfIoc(ctr, prefix, work, flavour, check_ip, acf, init, env).start()
        # A server bound to 127.0.0.1 alone does not hear the loopback
        # broadcast (the loopback has no broadcast flag): search there too.
        search = ["--ca-search-addr", "127.255.255.255,127.0.0.1"]
        search += ["--pva-search-addr", "127.255.255.255,224.0.0.128,127.0.0.1"]
        shim = h.Shim(ctr, ["--listen", f"0.0.0.0:{SHIM_PORT}", *search], work)
        shim.start()
        ctr.publish(PUBLISHED_PORT, SHIM_PORT)
        yield SimpleNamespace(
            ctr=ctr,
            remote=remote,
            iocs=iocs,
            work=work,
            search=search,
            shim=shim,
            through_shim=f"{remote.host_addr}:{PUBLISHED_PORT}",
        )
    finally:
        if shim:
            shim.stop()
        for ns in (remote, ctr, host):
            ns.close()


@pytest.fixture(scope="module")
def other_shim(site):
    """A second shim with its own source address, published on another port:
    the port one would give to another network."""
    work = site.work / "other"
    work.mkdir()
    args = ["--listen", f"0.0.0.0:{OTHER_SHIM_PORT}", "--server-source-addr", OTHER_SOURCE, *site.search]
    shim = h.Shim(site.ctr, args, work)
    shim.start()
    site.ctr.publish(OTHER_PUBLISHED_PORT, OTHER_SHIM_PORT)
    yield f"{site.remote.host_addr}:{OTHER_PUBLISHED_PORT}"
    shim.stop()


def try_write(ns, proto, pv, value, env, claimed_host=None) -> dict:
    """Run trust_client.py in ns; claimed_host runs it in a UTS namespace of
    that host name, which libca sends as the CA client's host name."""
    argv = [h.PYTHON, TRUST_CLIENT, proto, pv, value]
    if claimed_host:
        argv = ["unshare", "--uts", "sh", "-c", f'hostname {claimed_host} && exec "$@"', "sh", *argv]
    proc = subprocess.run(
        ns.exec_argv(argv), env=h.clean_env(env), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class ClaimingCaWatch(h.CaWatch):
    """A CaWatch whose libca claims `host` as its host name."""

    def __init__(self, ns, name_server, pv, host, duration=30.0):
        argv = [h.PYTHON, h.CA_CLIENT, "--watch", pv, str(duration)]
        argv = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *argv]
        self._start(ns, argv, h.client_env(name_server))


def ca_through_shim(site) -> dict:
    return h.client_env(site.through_shim)


def pva_through_shim(site) -> dict:
    return h.pva_client_env(site.through_shim)


# Direct clients in the container search where the shim does: the loopback
# broadcast address, the PVA group on the loopback (QSRV1 on the wildcard
# hears only that one there), and 127.0.0.1 (servers bound to it alone).
CA_DIRECT = {"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": "127.255.255.255 127.0.0.1"}
PVA_DIRECT = h.pva_direct_env("127.255.255.255 224.0.0.128,1@127.0.0.1 127.0.0.1")


def refused(result: dict, before: float) -> bool:
    return result["connected"] and not result["put_ok"] and result["before"] == before and result["after"] == before


@pytest.mark.parametrize("prefix", OWN_HOST_IOCS)
def test_remote_ca_client_through_shim_reads_but_cannot_write(site, prefix):
    pv = f"{prefix}VAL"
    got = try_write(site.remote, "ca", pv, REMOTE_PUT, ca_through_shim(site))
    before = got.get("before")
    assert got["connected"], got
    assert not got["write_access"], f"rsrv granted WRITE to a remote client through the shim: {got}"
    assert refused(got, before), got


@pytest.mark.parametrize("prefix", OWN_HOST_IOCS)
def test_remote_pva_client_through_shim_reads_but_cannot_write(site, prefix):
    pv = f"{prefix}VAL"
    got = try_write(site.remote, "pva", pv, REMOTE_PUT, pva_through_shim(site))
    assert got["connected"], got
    assert refused(got, got["before"]), f"{QSRV[prefix]} let a remote client write through the shim: {got}"
    assert "not permitted" in got["put_error"].lower(), got


@pytest.mark.parametrize("prefix", OWN_HOST_IOCS)
def test_ca_client_in_the_container_still_writes_directly(site, prefix):
    # The control: the ACF really grants WRITE to the IOC's own host, so the
    # refusals above come from the address the IOC sees, not a broken ACF.
    value = 10.0 + OWN_HOST_IOCS.index(prefix)
    got = try_write(site.ctr, "ca", f"{prefix}VAL", value, CA_DIRECT)
    assert got["connected"] and got["write_access"] and got["put_ok"], got
    assert got["after"] == value, got


@pytest.mark.parametrize("prefix", OWN_HOST_IOCS)
def test_pva_client_in_the_container_still_writes_directly(site, prefix):
    value = 20.0 + OWN_HOST_IOCS.index(prefix)
    got = try_write(site.ctr, "pva", f"{prefix}VAL", value, PVA_DIRECT)
    assert got["connected"] and got["put_ok"], got
    assert got["after"] == value, got


@pytest.mark.parametrize("prefix", ["ANY1:", "LO1:"])
def test_rsrv_sees_the_shim_source_address_as_the_client_host(site, prefix):
    # `casr 2` lists each client circuit as "TCP client at ADDR:PORT 'HOST'".
    # With asCheckClientIP=1 HOST is the peer address, which ACF rules see.
    ioc = site.iocs[prefix]
    watch = h.CaWatch(site.remote, site.through_shim, f"{prefix}COUNT", duration=30)
    try:
        watch.values(1, timeout=10)
        report = ioc.shell("casr 2", re.compile(r"TCP client at .*\n"))
    finally:
        watch.close()
    clients = re.findall(r"TCP client at ([\d.]+):\d+ '([^']*)'", report)
    assert clients, report
    assert all(addr == SHIM_SOURCE and host == SHIM_SOURCE for addr, host in clients), report


def test_rsrv_without_client_ip_check_sees_the_host_name_the_client_claims(site):
    # asCheckClientIP=0: rsrv trusts the host name the client claims, and the
    # shim passes it on unchanged, so the client gets what it would get
    # directly: here the ACF trusts the claimed name "ioc-console".
    ioc = site.iocs["NAMED:"]
    env = ca_through_shim(site)
    other = try_write(site.remote, "ca", "NAMED:VAL", REMOTE_PUT, env, claimed_host="other-machine")
    assert other["connected"] and not other["write_access"], other
    assert refused(other, other["before"]), other
    watch = ClaimingCaWatch(site.remote, site.through_shim, "NAMED:COUNT", "ioc-console")
    try:
        watch.values(1, timeout=10)
        report = ioc.shell("casr 2", re.compile(r"TCP client at .*\n"))
    finally:
        watch.close()
    assert re.search(rf"TCP client at {re.escape(SHIM_SOURCE)}:\d+ 'ioc-console'", report), report
    claimed = try_write(site.remote, "ca", "NAMED:VAL", 55.0, env, claimed_host="ioc-console")
    assert claimed["write_access"] and claimed["put_ok"] and claimed["after"] == 55.0, claimed


def test_qsrv1_sees_the_shim_source_address_as_the_client_host(site):
    # `pvasr 5` lists each channel as "NAME : RO|RW user@host": the host
    # QSRV1 hands to access security is the peer address. The host name a
    # "ca" client sends in its credentials is only kept aside ("aux").
    watch = h.PvaWatch(site.remote, site.through_shim, "ANY1:COUNT", duration=30)
    try:
        watch.values(1, timeout=10)
        report = site.iocs["ANY1:"].shell("pvasr 5", re.compile(r"ANY1:COUNT\s*: .*\n"))
    finally:
        watch.close()
    seen = re.findall(r"ANY1:COUNT\s*: (R[OW]) [^@\s]*@([\d.]+)", report)
    assert seen and all(access == "RO" and host == SHIM_SOURCE for access, host in seen), report


def test_qsrv2_sees_the_shim_source_address_as_the_client_host(site):
    # `pvxsr 5` lists each connection as "Peer[ADDR]:PORT"; QSRV2 hands the
    # peer address, without port, to access security as the host.
    watch = h.PvaWatch(site.remote, site.through_shim, "ANY2:COUNT", duration=30)
    try:
        watch.values(1, timeout=10)
        report = site.iocs["ANY2:"].shell("pvxsr 5", re.compile(r"Peer\[.*\n"))
    finally:
        watch.close()
    peers = re.findall(r"Peer\[(?:::ffff:)?([\d.]+)\]", report)
    assert peers and all(peer == SHIM_SOURCE for peer in peers), report


def test_acf_naming_the_shim_source_address_grants_clients_through_the_shim(site):
    # The recipe of docs/security.md: HAG(through_shim) { 127.0.50.66 }.
    ca = try_write(site.remote, "ca", "SHIM:VAL", 31.0, ca_through_shim(site))
    assert ca["write_access"] and ca["put_ok"] and ca["after"] == 31.0, ca
    pva = try_write(site.remote, "pva", "SHIM:VAL", 32.0, pva_through_shim(site))
    assert pva["put_ok"] and pva["after"] == 32.0, pva


def test_a_shim_with_another_source_address_is_not_granted_the_first_ones_rules(site, other_shim):
    # One shim per network, each with its own --server-source-addr: the IOC
    # tells them apart. This one (127.0.50.67) is not in the ACF.
    local = try_write(site.ctr, "ca", "SHIM:VAL", 33.0, CA_DIRECT)
    assert not local["write_access"], "a process in the container is not in HAG(through_shim)"
    ca = try_write(site.remote, "ca", "SHIM:VAL", REMOTE_PUT, h.client_env(other_shim))
    assert ca["connected"] and not ca["write_access"] and refused(ca, ca["before"]), ca
    pva = try_write(site.remote, "pva", "SHIM:VAL", REMOTE_PUT, h.pva_client_env(other_shim))
    assert refused(pva, pva["before"]), pva
    watch = h.CaWatch(site.remote, other_shim, "SHIM:COUNT", duration=30)
    try:
        watch.values(1, timeout=10)
        report = site.iocs["SHIM:"].shell("casr 2", re.compile(r"TCP client at .*\n"))
    finally:
        watch.close()
    assert re.search(rf"TCP client at {re.escape(OTHER_SOURCE)}:\d+ '{re.escape(OTHER_SOURCE)}'", report), report
