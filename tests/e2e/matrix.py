"""The container port-mapping matrix: which setups reach CA and PVA servers
in a container, without the shim and through it.

Two kinds of rows:

- The seed cases: the manual podman experiments that the project started
  from (host network, published 5064/5075 with broadcast or unicast search,
  localhost-only maps, same-number and remapped ports, name servers on the
  servers' own ports), each run without the shim against a pvxs softIoc.
  Their outcomes are measured facts, recorded and never required.
- The shim cases: a container published through ONE remapped TCP port that
  leads to nameshim, and nothing else. Each row is a client against one
  server; its "without shim" column is today's practice (each protocol's
  name server published on the server's own port, remapped the same way),
  its "with shim" column must pass.

test_matrix.py drives the measurements; this module holds the case
definitions, runs the clients and renders the Markdown table.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import importlib.metadata
import subprocess
from dataclasses import dataclass
from pathlib import Path

import harness as h

DOC = h.REPO / "docs" / "port-mapping-matrix.md"

SHIM_PORT = 5066  # the shim's port in the container
SHIM_HOST_PORT = 18066  # ... and on the host: remapped
CA_HOST_PORT = 18064  # today's practice: the CA server port, remapped alike
PVA_HOST_PORT = 18075  # ... and the PVA server port

SEED_TIMEOUT = 3.0  # seed rows: one get each, failures expected
BASELINE_TIMEOUT = 3.0  # "without shim" column of the shim rows
SHIM_TIMEOUT = 10.0  # shim rows: must pass, normally within a second
MONITOR_SECONDS = 1.5  # COUNT counts at 10 Hz: about 15 updates
MIN_UPDATES = 5

CLIENT_LABEL = {
    "pyepics": "pyepics (libca)",
    "p4p": "p4p (pvxs)",
    "pvapy": "pvapy (pvAccessCPP)",
}
CLIENT_SCRIPT = {"pyepics": h.CA_CLIENT, "p4p": h.PVA_CLIENT, "pvapy": h.PVAPY_CLIENT}
WHERE_LABEL = {"same": "same namespace", "host": "this host", "remote": "another machine"}


@dataclass
class Cell:
    ok: bool
    text: str


@dataclass(frozen=True)
class Row:
    key: str  # pytest id
    case: str
    protocol: str
    client: str  # CLIENT_LABEL key
    where: str  # WHERE_LABEL key
    server: str = ""  # shim rows: the server's PV prefix
    shim: bool = False


# Where measured cells go: row key -> {"without": Cell, "with": Cell}.
RESULTS: dict[str, dict[str, Cell]] = {}


# --------------------------------------------------------------------------
# The simulated machine: a host, a container and another machine


def _host_dev(host: h.Host, addr: str) -> str:
    line = host.ip("-o", "-4", "addr", "show", "to", f"{addr}/32").split()
    return line[1].split("@")[0]


def _with_broadcast(ns: h.Netns, dev: str, addr: str) -> None:
    # `ip addr add` sets no broadcast address unless asked; podman's bridge
    # and a container's eth0 have one, and broadcast search depends on it.
    ns.ip("addr", "del", f"{addr}/30", "dev", dev)
    ns.ip("addr", "add", f"{addr}/30", "brd", "+", "dev", dev)


class Lab:
    """A host, a container on it, and another machine on the host's network.

    Every link has a broadcast address, like a container bridge and a LAN.
    The other machine reaches only the host (no route into the container
    network, as on a real LAN), so it sees the container through published
    ports alone. The host, like any podman or docker host, sits on the
    container's network itself.
    """

    def __init__(self):
        self.host = h.Host()
        self.ctr = h.Container(self.host)
        self.remote = h.Container(self.host, role="remote")
        for c in (self.ctr, self.remote):
            _with_broadcast(c, "eth0", c.addr)
            _with_broadcast(self.host, _host_dev(self.host, c.host_addr), c.host_addr)
        # Re-adding the addresses dropped the default routes: the container
        # gets its own back, the other machine stays without one.
        self.ctr.ip("route", "replace", "default", "via", self.ctr.host_addr)
        if self.remote.ip("-4", "route", "show", "default").strip():
            self.remote.ip("route", "del", "default")

    def ns(self, where: str) -> h.Netns:
        return {"same": self.ctr, "host": self.host, "remote": self.remote}[where]

    def address(self, where: str) -> str:
        """The host's address as a client at `where` reaches published ports."""
        return self.remote.host_addr if where == "remote" else "127.0.0.1"

    def unpublish_all(self) -> None:
        """Remove every published port (the NAT chains stay, empty)."""
        if "table ip " + h.Host.TABLE in self.host.ruleset():
            self.host.sh(["nft", "flush", "table", "ip", h.Host.TABLE])

    def publish(self, rules) -> None:
        for host_port, ctr_port, proto, host_ip in rules:
            self.ctr.publish(host_port, ctr_port, proto, host_ip)

    def close(self) -> None:
        for ns in (self.remote, self.ctr, self.host):
            ns.close()


# --------------------------------------------------------------------------
# Clients


def search_env(protocol: str, mode: str, target: str = "", port: int | None = None) -> dict:
    """Client environment that uses exactly one way of finding servers.

    broadcast: the automatic address list (interface broadcasts) only;
    unicast: EPICS_*_ADDR_LIST=target only; name server: target only.
    port sets EPICS_CA_SERVER_PORT (CA only).
    """
    p = "EPICS_CA" if protocol == "CA" else "EPICS_PVA"
    env = {f"{p}_AUTO_ADDR_LIST": "NO", f"{p}_ADDR_LIST": ""}
    if mode == "broadcast":
        env[f"{p}_AUTO_ADDR_LIST"] = "YES"
    elif mode == "unicast":
        env[f"{p}_ADDR_LIST"] = target
    elif mode == "name server":
        env[f"{p}_NAME_SERVERS"] = target
    else:
        raise ValueError(mode)
    if port:
        env["EPICS_CA_SERVER_PORT"] = str(port)
    return env


def run_client(ns: h.Netns, client: str, env: dict, ops: list, budget: float):
    """One client process running ops; its result list, or the exception."""
    try:
        return h.client_program(ns, CLIENT_SCRIPT[client], env, ops, budget)
    except Exception as e:  # a crash or a hang is an outcome too
        return e


def run_all(jobs: dict) -> dict:
    """Run {name: (ns, client, env, ops, budget)} concurrently."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        futures = {name: pool.submit(run_client, *job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def _error_text(e: Exception) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    first, last = lines[0][:80], lines[-1][:80]
    return f"client error: {first}" + (f" ... {last}" if last != first else "")


def _pva_error(error: str, timeout: float) -> str:
    """A p4p or pvapy error, short: timeouts are the usual one."""
    if "Timeout" in error or "timed out" in error:
        return f"timeout ({timeout:g} s)"
    return error.splitlines()[0][:100] if error else "error"


# --------------------------------------------------------------------------
# The seed cases: no shim, one pvxs softIoc, one get per client


SEED_PREFIX = "SEED:"


def _p(host_port, ctr_port, proto="tcp", host_ip=None):
    return (host_port, ctr_port, proto, host_ip)


def podman_options(rules) -> str:
    """The `podman run -p` options that publish these rules."""
    opts = []
    for host_port, ctr_port, proto, host_ip in rules:
        ip = f"{host_ip}:" if host_ip else ""
        opts.append(f"-p {ip}{host_port}:{ctr_port}" + ("/udp" if proto == "udp" else ""))
    return " ".join(opts)


@dataclass(frozen=True)
class SeedCase:
    key: str
    protocol: str
    publish: tuple = ()  # (host_port, container_port, proto, host_ip); none = host network
    mode: str = "broadcast"  # how clients search, see search_env
    wheres: tuple = ("host", "remote")  # where clients run
    note: str = ""
    server_port: int | None = None  # EPICS_CA_SERVER_PORT of the IOC (CA)
    client_port: int | None = None  # EPICS_CA_SERVER_PORT of the clients (CA)
    ns_port: int | None = None  # name server port on the host

    @property
    def title(self) -> str:
        parts = [f"`{podman_options(self.publish)}`" if self.publish else "host network"]
        if self.note:
            parts.append(self.note)
        parts.append(f"name server on port {self.ns_port}" if self.mode == "name server" else self.mode)
        return ", ".join(parts)

    def clients(self) -> tuple:
        return ("pyepics",) if self.protocol == "CA" else ("p4p", "pvapy")

    def rows(self) -> list[Row]:
        return [
            Row(f"{self.key}-{where}-{client}", self.title, self.protocol, client, where)
            for where in self.wheres
            for client in self.clients()
        ]


LO = "127.0.0.1"
SAME, HOST = ("same",), ("host",)
CA_5064 = (_p(5064, 5064), _p(5064, 5064, "udp"))
CA_LO_5064 = (_p(5064, 5064, "tcp", LO), _p(5064, 5064, "udp", LO))
PORT_8064 = "IOC and client on port 8064"
CLIENT_8064 = "client on port 8064"
PVA_5075 = (_p(5075, 5075), _p(5075, 5075, "udp"))
PVA_5076 = (_p(5075, 5075), _p(5076, 5076, "udp"))
SEARCH_PORT = "UDP on 5076, the PVA search port"

# Every case of the seed's two scripts, plus two with PVA's search port.
SEED_CASES = [
    SeedCase("ca-host-network", "CA", wheres=SAME),
    SeedCase("ca-5064-udp-bcast", "CA", CA_5064),
    SeedCase("ca-5064-tcp-bcast", "CA", CA_5064[:1]),
    SeedCase("ca-5064-udp-unicast", "CA", CA_5064, "unicast"),
    SeedCase("ca-5064-tcp-unicast", "CA", CA_5064[:1], "unicast"),
    SeedCase("ca-lo-5064-udp-bcast", "CA", CA_LO_5064, wheres=HOST),
    SeedCase("ca-lo-5064-udp-unicast", "CA", CA_LO_5064, "unicast", HOST),
    SeedCase(
        "ca-8064-udp-bcast", "CA", (_p(8064, 8064), _p(8064, 8064, "udp")),
        note=PORT_8064, server_port=8064, client_port=8064,
    ),
    SeedCase(
        "ca-lo-8064-udp-unicast", "CA", (_p(8064, 8064, "tcp", LO), _p(8064, 8064, "udp", LO)), "unicast", HOST,
        note=PORT_8064, server_port=8064, client_port=8064,
    ),
    SeedCase(
        "ca-8064to5064-udp-bcast", "CA", (_p(8064, 5064), _p(8064, 5064, "udp")),
        note=CLIENT_8064, client_port=8064,
    ),
    SeedCase(
        "ca-lo-8064to5064-udp-unicast", "CA", (_p(8064, 5064, "tcp", LO), _p(8064, 5064, "udp", LO)), "unicast", HOST,
        note=CLIENT_8064, client_port=8064,
    ),
    SeedCase("ca-lo-5064-name-server", "CA", (_p(5064, 5064, "tcp", LO),), "name server", HOST, ns_port=5064),
    SeedCase("ca-lo-8064to5064-name-server", "CA", (_p(8064, 5064, "tcp", LO),), "name server", HOST, ns_port=8064),
    SeedCase("pva-host-network", "PVA", wheres=SAME),
    SeedCase("pva-5075-udp5075-bcast", "PVA", PVA_5075),
    SeedCase("pva-5075-udp5075-unicast", "PVA", PVA_5075, "unicast"),
    SeedCase("pva-5075-udp5076-bcast", "PVA", PVA_5076, note=SEARCH_PORT),
    SeedCase("pva-5075-udp5076-unicast", "PVA", PVA_5076, "unicast", note=SEARCH_PORT),
    SeedCase("pva-5075-name-server", "PVA", PVA_5075[:1], "name server", ns_port=5075),
    SeedCase("pva-8075to5075-name-server", "PVA", (_p(8075, 5075),), "name server", ns_port=8075),
]
SEED_ROWS = [row for case in SEED_CASES for row in case.rows()]


class SeedLab(Lab):
    """The lab with one pvxs softIoc (CA and QSRV2), as in the seed's image."""

    def __init__(self, workdir: Path):
        super().__init__()
        self.ioc = h.SoftIoc(self.ctr, SEED_PREFIX, workdir, "pvxslibs", env=h.PVA_SERVER_ENV)
        self.ioc.start()

    def set_server_port(self, port: int | None) -> None:
        want = str(port) if port else None
        if self.ioc.env.get("EPICS_CA_SERVER_PORT") == want:
            return
        if want:
            self.ioc.env["EPICS_CA_SERVER_PORT"] = want
        else:
            self.ioc.env.pop("EPICS_CA_SERVER_PORT", None)
        self.ioc.restart()


def _fail(why: str) -> Cell:
    return Cell(False, f"**fail** ({why})")


def _seed_target(lab: Lab, case: SeedCase, where: str) -> str:
    addr = lab.address(where)
    return f"{addr}:{case.ns_port}" if case.mode == "name server" else addr


def _seed_cell(lab: Lab, client: str, result) -> Cell:
    pv = f"{SEED_PREFIX}ID"
    if isinstance(result, Exception):
        return _fail(_error_text(result))
    got = result[0][pv]
    if client == "pyepics":
        if not got["connected"]:
            return _fail(f"no channel in {SEED_TIMEOUT:g} s")
        if got["value"] != SEED_PREFIX:
            return _fail(f"wrong value {got['value']!r}")
        circuit = got.get("host", "").replace("localhost:", "127.0.0.1:")
        note = " (the container's own address)" if circuit.startswith(lab.ctr.addr + ":") else ""
        return Cell(True, f"pass, circuit to {circuit}{note}")
    if not got["ok"]:
        return _fail(_pva_error(got.get("error", ""), SEED_TIMEOUT))
    if got["value"] != SEED_PREFIX:
        return _fail(f"wrong value {got['value']!r}")
    return Cell(True, "pass")


def measure_seed(lab: SeedLab, case: SeedCase) -> dict[str, Cell]:
    """Configure the case, run its clients at once; {row key: Cell}."""
    lab.unpublish_all()
    lab.set_server_port(case.server_port)
    lab.publish(case.publish)
    ops = [{"op": "get", "pvs": [f"{SEED_PREFIX}ID"], "timeout": SEED_TIMEOUT}]
    jobs = {}
    for row in case.rows():
        env = search_env(case.protocol, case.mode, _seed_target(lab, case, row.where), case.client_port)
        jobs[row.key] = (lab.ns(row.where), row.client, env, ops, SEED_TIMEOUT + 40)
    results = run_all(jobs)
    lab.unpublish_all()
    cells = {row.key: _seed_cell(lab, row.client, results[row.key]) for row in case.rows()}
    for key, cell in cells.items():
        RESULTS[key] = {"without": cell}
    return cells


# --------------------------------------------------------------------------
# The shim cases: one remapped published TCP port, nothing else


@dataclass(frozen=True)
class Server:
    prefix: str
    label: str
    kind: str  # "pvxslibs", "epicscorelibs", "caproto", "pvapy"
    ca: bool
    pva: bool
    init: float


PVXS = Server("PVXS:", "pvxs softIoc", "pvxslibs", True, True, 1.0)
QSRV1 = Server("QSRV1:", "QSRV1 softIoc", "epicscorelibs", True, True, 2.0)
CAPR = Server("CAPR:", "caproto server", "caproto", True, False, 4.0)
PVAPY = Server("PVAPY:", "pvapy server", "pvapy", False, True, 6.0)

# What each site's container holds, in start order: the first server takes
# TCP 5064 and 5075, the later ones fall back to random ports.
SITES = {
    "pvxs": [PVXS],
    "qsrv1": [QSRV1],
    "busy": [PVXS, QSRV1, CAPR, PVAPY],
}


@dataclass(frozen=True)
class ShimCase:
    key: str
    title: str
    site: str
    where: str  # where the clients run
    host_ip: str | None = None  # publish on this host address only

    @property
    def servers(self) -> list[Server]:
        return SITES[self.site]

    def rows(self) -> list[Row]:
        publish = podman_options([_p(SHIM_HOST_PORT, SHIM_PORT, "tcp", self.host_ip)])
        title = f"{self.title}, `{publish}`, {WHERE_LABEL[self.where]}"
        rows = []
        for client, protocol, want in (("pyepics", "CA", "ca"), ("p4p", "PVA", "pva"), ("pvapy", "PVA", "pva")):
            for s in self.servers:
                if getattr(s, want):
                    case = f"{title}: {s.label}" if len(self.servers) > 1 else title
                    key = f"{self.key}-{client}-{s.prefix.strip(':')}"
                    rows.append(Row(key, case, protocol, client, self.where, s.prefix, True))
        return rows


SHIM_CASES = [
    ShimCase("pvxs", "pvxs softIoc", "pvxs", "remote"),
    ShimCase("qsrv1", "QSRV1 (pvAccessCPP) softIoc", "qsrv1", "remote"),
    ShimCase("busy", "busy container", "busy", "remote"),
    ShimCase("busy-localhost", "busy container, localhost-only", "busy", "host", host_ip="127.0.0.1"),
]
SHIM_ROWS = [row for case in SHIM_CASES for row in case.rows()]
ALL_ROWS = SEED_ROWS + SHIM_ROWS


class _SmallPvapyServer(h.PvapyServer):
    """The pvapy server with a short WAVE: the matrix never reads it, and a
    million-element array only slows the start on a busy machine."""

    def argv(self):
        return [h.PYTHON, self.script, "--prefix", self.prefix, "--init", self.init, "--wave-len", 16]


class ShimSite(Lab):
    """A lab whose container holds a site's servers and the shim."""

    def __init__(self, name: str, workdir: Path):
        super().__init__()
        self.name = name
        self.servers = {}
        for s in SITES[name]:
            if s.kind in ("pvxslibs", "epicscorelibs"):
                server = h.SoftIoc(self.ctr, s.prefix, workdir, s.kind, s.init, h.PVA_SERVER_ENV)
            elif s.kind == "caproto":
                server = h.CaprotoServer(self.ctr, s.prefix, workdir)
            else:
                server = _SmallPvapyServer(self.ctr, s.prefix, workdir, s.init)
            self.servers[s.prefix] = server.start()
        # The advertised port is the published host port: pvAccessCPP
        # clients open a new connection to the port a search response names.
        args = ["--listen", f"0.0.0.0:{SHIM_PORT}", "--advertise-port", SHIM_HOST_PORT]
        self.shim = h.Shim(self.ctr, args, workdir)
        self.shim.start()

    def close(self) -> None:
        self.shim.stop()
        super().close()


def _prefixes(case: ShimCase, client: str) -> list[str]:
    want = "ca" if client == "pyepics" else "pva"
    return [s.prefix for s in case.servers if getattr(s, want)]


def _get_ops(prefixes: list[str], timeout: float) -> list:
    return [{"op": "get", "pvs": [f"{p}ID" for p in prefixes], "timeout": timeout}]


def _put_monitor_ops(client: str, values: dict, timeout: float) -> list:
    """Put VAL then read it back, and monitor COUNT, for each prefix."""
    puts = [{"op": "put", "pv": f"{p}VAL", "value": v, "timeout": timeout} for p, v in values.items()]
    if client == "pyepics":  # op_put reads back itself; one monitor per op
        mons = [{"op": "monitor", "pv": f"{p}COUNT", "duration": MONITOR_SECONDS, "timeout": timeout} for p in values]
        return [*puts, *mons]
    readback = {"op": "get", "pvs": [f"{p}VAL" for p in values], "timeout": timeout}
    mon = {"op": "monitor", "pvs": [f"{p}COUNT" for p in values], "duration": MONITOR_SECONDS, "timeout": timeout}
    return [*puts, readback, mon]


def _budget(ops: list, timeout: float) -> float:
    return 30 + sum(timeout + op.get("duration", 0) + 2 for op in ops)


def _updates_ok(updates: list) -> str | None:
    values = [u[0] for u in updates]
    if len(values) < MIN_UPDATES:
        return f"{len(values)} updates in {MONITOR_SECONDS:g} s"
    if any(b <= a for a, b in zip(values, values[1:])):
        return f"updates out of order: {values}"
    return None


def _get_check(client: str, prefix: str, result, timeout: float, published_port) -> str | None:
    if isinstance(result, Exception):
        return _error_text(result)
    got = result[0][f"{prefix}ID"]
    if client == "pyepics":
        if not got["connected"]:
            return f"no channel in {timeout:g} s"
        if published_port and not got["host"].endswith(f":{published_port}"):
            return f"circuit to {got['host']}, not the published port"
    elif not got["ok"]:
        return _pva_error(got.get("error", ""), timeout)
    if got["value"] != prefix:
        return f"wrong value {got['value']!r}"
    return None


def _put_monitor_checks(client: str, prefix: str, ops: list, result, timeout: float) -> dict:
    if isinstance(result, Exception):
        return {"put": _error_text(result), "monitor": _error_text(result)}
    nochan = f"no channel in {timeout:g} s"
    i_put = next(i for i, o in enumerate(ops) if o["op"] == "put" and o["pv"] == f"{prefix}VAL")
    want = ops[i_put]["value"]
    put = result[i_put]
    if client == "pyepics":
        if not put["connected"]:
            put_why = nochan
        elif not put["put_ok"] or put["readback"] != want:
            put_why = f"put_ok={put['put_ok']}, read back {put['readback']!r} for {want!r}"
        else:
            put_why = None
        i_mon = next(i for i, o in enumerate(ops) if o["op"] == "monitor" and o["pv"] == f"{prefix}COUNT")
        mon = result[i_mon]
    else:
        readback = result[-2][f"{prefix}VAL"]
        if not put["ok"]:
            put_why = _pva_error(put.get("error", ""), timeout)
        elif not readback["ok"] or readback["value"] != want:
            put_why = f"read back {readback.get('value', readback.get('error'))!r} for {want!r}"
        else:
            put_why = None
        mon = result[-1][f"{prefix}COUNT"]
    if not mon["connected"]:
        return {"put": put_why, "monitor": nochan if client == "pyepics" else f"no update in {timeout:g} s"}
    return {"put": put_why, "monitor": _updates_ok(mon["updates"])}


NOT_TRIED = "not tried"


def _cell(checks: dict[str, str | None]) -> Cell:
    failed = {op: why for op, why in checks.items() if why}
    if not failed:
        return Cell(True, "pass" if len(checks) == 1 else f"pass ({', '.join(checks)})")
    by_reason: dict[str, list[str]] = {}
    for op, why in failed.items():
        by_reason.setdefault(why, []).append(op)
    parts = [f"{', '.join(ops)}: {why}" for why, ops in by_reason.items() if why != NOT_TRIED]
    passed = [op for op in checks if op not in failed]
    if passed:
        parts.append(f"{', '.join(passed)}: ok")
    if NOT_TRIED in by_reason:
        parts.append(f"{', '.join(by_reason[NOT_TRIED])}: not tried")
    return _fail("; ".join(parts))


def _run_phase(lab: ShimSite, case: ShimCase, ca_target: str, pva_target: str, timeout: float, base: float, port):
    """Two rounds of clients, each round one process per client, at once:
    gets of every server, then put and monitor on the servers a get
    reached (a server no get reached has nothing to put to)."""
    ns = lab.ns(case.where)
    env = {
        "pyepics": search_env("CA", "name server", ca_target),
        "p4p": search_env("PVA", "name server", pva_target),
        "pvapy": search_env("PVA", "name server", pva_target),
    }
    clients = [c for c in ("pyepics", "p4p", "pvapy") if _prefixes(case, c)]
    gets = {c: _get_ops(_prefixes(case, c), timeout) for c in clients}
    got = run_all({c: (ns, c, env[c], ops, _budget(ops, timeout)) for c, ops in gets.items()})
    checks = {
        (c, p): {"get": _get_check(c, p, got[c], timeout, port)}
        for c in clients
        for p in _prefixes(case, c)
    }
    second = {}
    for c in ("pyepics", "p4p"):
        if c not in clients:
            continue
        reached = [p for p in _prefixes(case, c) if checks[(c, p)]["get"] is None]
        values = {p: base + i + 0.25 for i, p in enumerate(_prefixes(case, c)) if p in reached}
        if values:
            second[c] = _put_monitor_ops(c, values, timeout)
        for p in _prefixes(case, c):
            if p not in reached:
                checks[(c, p)].update(put=NOT_TRIED, monitor=NOT_TRIED)
    done = run_all({c: (ns, c, env[c], ops, _budget(ops, timeout)) for c, ops in second.items()})
    for c, ops in second.items():
        for p in _prefixes(case, c):
            if checks[(c, p)]["get"] is None:
                checks[(c, p)].update(_put_monitor_checks(c, p, ops, done[c], timeout))
    return {row.key: _cell(checks[(row.client, row.server)]) for row in case.rows()}


def measure_shim_case(lab: ShimSite, case: ShimCase, phase_base: float) -> None:
    """Both columns of the case's rows, into RESULTS.

    Without the shim: the CA and PVA server ports published remapped
    (18064 -> 5064, 18075 -> 5075), clients' name servers pointed at them.
    With the shim: only 18066 -> 5066 published.
    """
    addr = lab.address(case.where)
    lab.unpublish_all()
    lab.publish([_p(CA_HOST_PORT, 5064, "tcp", case.host_ip), _p(PVA_HOST_PORT, 5075, "tcp", case.host_ip)])
    without = _run_phase(
        lab, case, f"{addr}:{CA_HOST_PORT}", f"{addr}:{PVA_HOST_PORT}", BASELINE_TIMEOUT, phase_base, None
    )
    lab.unpublish_all()
    lab.publish([_p(SHIM_HOST_PORT, SHIM_PORT, "tcp", case.host_ip)])
    target = f"{addr}:{SHIM_HOST_PORT}"
    with_shim = _run_phase(lab, case, target, target, SHIM_TIMEOUT, phase_base + 50, SHIM_HOST_PORT)
    lab.unpublish_all()
    for row in case.rows():
        RESULTS[row.key] = {"without": without[row.key], "with": with_shim[row.key]}


# --------------------------------------------------------------------------
# The table


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _shim_version() -> str:
    try:
        out = subprocess.run([h.shim_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
        commit = subprocess.run(
            ["git", "-C", h.REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        return "nameshim ?"
    return out.strip() + (f" (commit {commit})" if commit else "")


def complete() -> bool:
    return all(r.key in RESULTS and (not r.shim or "with" in RESULTS[r.key]) for r in ALL_ROWS)


def _esc(text: str) -> str:
    return text.replace("|", "\\|")


def table() -> str:
    lines = ["| Case | Protocol | Client | Without shim | With shim |", "|---|---|---|---|---|"]
    for r in ALL_ROWS:
        res = RESULTS.get(r.key, {})
        without = res.get("without")
        with_ = res.get("with")
        client = CLIENT_LABEL[r.client] + ("" if r.shim else f", {WHERE_LABEL[r.where]}")
        lines.append(
            f"| {_esc(r.case)} | {r.protocol} | {client} "
            f"| {_esc(without.text) if without else 'not run'} "
            f"| {(_esc(with_.text) if with_ else 'not run') if r.shim else '—'} |"
        )
    return "\n".join(lines)


def _count(column: str, rows) -> tuple[int, int]:
    cells = [RESULTS[r.key][column] for r in rows if r.key in RESULTS and column in RESULTS[r.key]]
    return sum(c.ok for c in cells), len(cells)


def summary() -> str:
    w_ok, w_n = _count("with", SHIM_ROWS)
    b_ok, b_n = _count("without", SHIM_ROWS)
    s_ok, s_n = _count("without", SEED_ROWS)
    return (
        f"Through the shim: {w_ok} of {w_n} rows pass. "
        f"The same rows without it (today's practice): {b_ok} of {b_n}. "
        f"Seed cases without the shim: {s_ok} of {s_n}."
    )


def document(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    peers = ", ".join(
        f"{d} {_version(d)}" for d in ("epicscorelibs", "pvxslibs", "p4p", "pvapy", "pyepics", "caproto")
    )
    return f"""\
# Port-mapping matrix

Which container port mappings let Channel Access and PV Access clients reach
the servers in a container, without nameshim and through it. This file is
written by every full run of `tests/e2e/test_matrix.py`; do not edit it by
hand.

- Run: {now:%Y-%m-%d %H:%M} UTC, {_shim_version()}.
- Peers: {peers}.
- Reproduce, as root on Debian or Ubuntu: `scripts/test`, or after
  `scripts/setup.sh`:
  `cargo build --release && .venv/bin/python -m pytest tests/e2e/test_matrix.py -v -p no:cacheprovider`.

## Setup

No container engine: the container is a network namespace joined to a
"host" namespace by a veth pair, with a default route via the host, as
podman and docker (rootful) attach a container to their bridge. `-p`
options are nftables DNAT rules in the host namespace, matching the host's
local addresses (or only 127.0.0.1 for `-p 127.0.0.1:...`), with
connections from the host's loopback masqueraded on the way in. "Another
machine" is a third namespace on its own link to the host, with no route
into the container network, so it reaches the container only through
published ports. Every link has a broadcast address. All addresses are in
198.18.0.0/15; the container is 198.18.0.2.

Each client uses exactly one way of finding servers: *broadcast* is the
automatic address list only (`EPICS_CA_AUTO_ADDR_LIST=YES` or its PVA
twin), *unicast* is `EPICS_CA_ADDR_LIST` / `EPICS_PVA_ADDR_LIST` pointing at
the host (127.0.0.1 on the host, the host's address elsewhere) with the
automatic list off, *name server* is `EPICS_CA_NAME_SERVERS` /
`EPICS_PVA_NAME_SERVERS` only.

**Seed cases** (no shim): one pvxs softIoc (rsrv and QSRV2, like the seed's
image), one get of a PV per client, {SEED_TIMEOUT:g} s timeout. For libca
the cell names the address its TCP circuit went to. Two cases the seed
does not have publish UDP 5076, the port PVA searches go to (the seed
publishes 5075/udp).

**Shim cases**: the shim listens on {SHIM_PORT} in the container, started with
`--advertise-port {SHIM_HOST_PORT}`; the host publishes ONLY
`-p {SHIM_HOST_PORT}:{SHIM_PORT}` (TCP), or `-p 127.0.0.1:{SHIM_HOST_PORT}:{SHIM_PORT}` for the
localhost case; clients set only the name server to that port. Each row
checks one server with one client: get (the server's ID PV holds its
prefix), put then read back, and a monitor of a 10 Hz counter (at least
{MIN_UPDATES} updates in {MONITOR_SECONDS:g} s, in order); put and monitor are tried
only where the get found the server. pvapy checks get only. The busy
container holds a pvxs softIoc, a QSRV1 softIoc, a caproto server and a
pvapy server, started in that order: the first takes TCP 5064 and 5075, the
others take random ports. *Without shim* for these rows is today's practice
with the same remapping: `-p {CA_HOST_PORT}:5064 -p {PVA_HOST_PORT}:5075` (TCP) and the
clients' name server pointed at those ports.

## Result

{summary()}

{table()}
"""


def write_document() -> Path:
    DOC.write_text(document())
    return DOC
