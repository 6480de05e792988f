"""Health and metrics over HTTP on the shim's one shared port.

One simulated container holds a pvxslibs softIoc (serving CA and PVA) and
the shim on 0.0.0.0:5066, published as host port 18166 (TCP only). A CA get
and a PVA get go through the shim; then curl (as a Kubernetes probe or a
Prometheus scrape would) reads /healthz and /metrics through the same
published port, and the counters must show the gets.
"""

import json
import re
import subprocess
from types import SimpleNamespace

import harness as h
import pytest

SHIM_PORT = 5066
PUBLISHED_PORT = 18166
PV = "OBS:ID"


@pytest.fixture(scope="module")
def site(netns_ok, shim_bin, shim_help, tmp_path_factory):
    work = tmp_path_factory.mktemp("http")
    host = h.Host()
    ctr = h.Container(host)
    try:
        ioc = h.SoftIoc(ctr, "OBS:", work, "pvxslibs", 7.0, h.PVA_SERVER_ENV).start()
        shim = h.Shim(ctr, ["--listen", f"0.0.0.0:{SHIM_PORT}"], work)
        shim.start()
        ctr.publish(PUBLISHED_PORT, SHIM_PORT)
        yield SimpleNamespace(host=host, ctr=ctr, ioc=ioc, shim=shim, work=work)
    finally:
        for ns in (ctr, host):
            ns.close()


def curl(ns, url, *flags) -> subprocess.CompletedProcess:
    """curl inside ns: status code on the last line of stdout after the body."""
    argv = ns.exec_argv(["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}", *flags, url])
    return subprocess.run(argv, capture_output=True, text=True, timeout=15)


def body_and_status(result) -> tuple[str, int]:
    body, _, status = result.stdout.rpartition("\n")
    return body, int(status)


def samples(text: str) -> dict:
    """{'name{labels}': value} for every sample line of a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def published_url(site, path) -> str:
    return f"http://{site.ctr.host_addr}:{PUBLISHED_PORT}{path}"


def test_healthz_is_ok_through_the_published_port(site):
    body, status = body_and_status(curl(site.host, published_url(site, "/healthz")))
    assert (status, body) == (200, "ok\n")


def test_healthz_answers_http_1_0_and_head(site):
    body, status = body_and_status(curl(site.ctr, f"http://127.0.0.1:{SHIM_PORT}/healthz", "--http1.0"))
    assert (status, body) == (200, "ok\n")
    result = curl(site.ctr, f"http://127.0.0.1:{SHIM_PORT}/healthz", "-I")
    assert result.stdout.startswith("HTTP/1.1 200 OK"), result.stdout


def test_unknown_path_is_404_and_post_is_405(site):
    _, status = body_and_status(curl(site.host, published_url(site, "/")))
    assert status == 404
    _, status = body_and_status(curl(site.host, published_url(site, "/metrics"), "-X", "POST", "-d", "x"))
    assert status == 405


def test_metrics_reflect_a_ca_get_and_a_pva_get(site):
    name_server = f"127.0.0.1:{SHIM_PORT}"
    ca = h.ca_get(site.ctr, name_server, [PV])[PV]
    assert ca["connected"] and ca["value"] == "OBS:", ca
    pva = h.pva_get(site.ctr, name_server, [PV])[PV]
    assert pva["ok"] and pva["value"] == "OBS:", pva

    result = curl(site.host, published_url(site, "/metrics"), "-D", "-")
    page, status = body_and_status(result)
    assert status == 200
    # text=True turns the header lines' CRLF into LF.
    head, _, text = page.partition("\n\n")
    assert "Content-Type: text/plain; version=0.0.4" in head, head
    for name in re.findall(r"^# TYPE (\S+) ", text, re.M):
        assert f"# HELP {name} " in text, name
    got = samples(text)
    for proto in ("ca", "pva"):
        assert got.get(f'nameshim_clients_accepted_total{{protocol="{proto}"}}', -1) >= 1, text
        assert got.get(f'nameshim_searches_sent_total{{protocol="{proto}"}}', -1) >= 1, text
        assert got.get(f'nameshim_searches_found_total{{protocol="{proto}"}}', -1) >= 1, text
        assert got.get(f'nameshim_server_links_opened_total{{protocol="{proto}"}}', -1) >= 1, text
    assert got.get("nameshim_client_received_bytes_total", -1) > 0, text
    assert got.get("nameshim_client_sent_bytes_total", -1) > 0, text
    # Both clients have gone: no client and no channel is left counted.
    for proto in ("ca", "pva"):
        assert got.get(f'nameshim_clients{{protocol="{proto}"}}', -1) == 0, text
        assert got.get(f'nameshim_channels{{protocol="{proto}"}}', -1) == 0, text


def test_metrics_count_a_client_and_its_channel_while_it_holds_them(site):
    watch = h.CaWatch(site.ctr, f"127.0.0.1:{SHIM_PORT}", PV, duration=30)
    try:
        watch.wait_for(lambda e: e["event"] == "conn" and e["connected"], 10)
        got = samples(body_and_status(curl(site.host, published_url(site, "/metrics")))[0])
        assert got.get('nameshim_clients{protocol="ca"}', -1) == 1, got
        assert got.get('nameshim_channels{protocol="ca"}', -1) == 1, got
    finally:
        watch.close()


def test_no_http_closes_requests_and_json_logs_are_one_object_per_line(site):
    # A second shim in the same pod: HTTP off, JSON logs, CA still served.
    log = site.work / "nameshim-json.log"
    proc = h.run_in(
        site.ctr,
        [h.shim_binary(), "--listen", "127.0.0.1:5099", "--no-http", "--log-format", "json"],
        env={"NAMESHIM_LOG": "debug"},
        log_path=log,
    )
    try:
        h.wait_for_log(log, re.compile(r'"message":"listening"'), proc, 20, "nameshim --log-format json")
        result = curl(site.ctr, "http://127.0.0.1:5099/healthz")
        assert result.returncode != 0 and result.stdout.endswith("000"), result  # no HTTP answer
        ca = h.ca_get(site.ctr, "127.0.0.1:5099", [PV])[PV]
        assert ca["connected"], ca
    finally:
        h.stop_process(proc)
    lines = log.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    listening = next(e for e in events if e["message"] == "listening")
    assert listening["protocols"] == "ca,pva", listening
    assert {"timestamp", "level", "target"} <= listening.keys()
    assert any(e["message"] == "closing connection: neither CA nor PVA" for e in events), lines
