"""A client that stops reading must not make the shim buffer without limit.

A softIoc posts a 200000-element DOUBLE waveform (1.6 MB) at 10 Hz, so a relay
that buffered everything for a stalled client would grow by about 16 MB a
second. The shim's outbox towards a client is bounded (--queue-bytes), so it
stops reading the server circuit instead, and TCP flow control reaches the IOC,
which drops intermediate updates for that client as it does for any slow one.
"""

import json
import re
import subprocess
import time

import harness as h
import pytest

WAVE_LEN = 200_000
STALL_SECONDS = 10
QUEUE_BYTES = 4 << 20


class FastWaveIoc(h.SoftIoc):
    def __init__(self, ns, workdir):
        super().__init__(ns, "FLOW:", workdir, env={"EPICS_CA_MAX_ARRAY_BYTES": str(WAVE_LEN * 8 + 1024)})
        self.db.write_text(
            f"""\
record(waveform, "FLOW:WAVE") {{
    field(FTVL, "DOUBLE")
    field(NELM, "{WAVE_LEN}")
    field(NORD, "{WAVE_LEN}")
    field(SCAN, ".1 second")
}}
record(calc, "FLOW:COUNT") {{
    field(SCAN, ".1 second")
    field(CALC, "A+1")
    field(INPA, "FLOW:COUNT NPP")
}}
"""
        )


def rss_kib(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


@pytest.fixture(scope="module")
def flow(netns_ok, shim_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("flow")
    ctr = h.Container()
    try:
        ioc = FastWaveIoc(ctr, work).start()
        shim = h.Shim(ctr, ["--listen", "127.0.0.1:5066", "--queue-bytes", str(QUEUE_BYTES)], work)
        shim.start()
        yield ctr, ioc, shim, work
    finally:
        ctr.close()


def test_stalled_client_keeps_shim_memory_bounded_and_others_flowing(flow):
    ctr, ioc, shim, work = flow
    slow = subprocess.Popen(
        ctr.exec_argv([h.PYTHON, h.HERE / "slow_ca_client.py", "127.0.0.1", "5066", "FLOW:WAVE", str(WAVE_LEN), str(STALL_SECONDS)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        first = json.loads(slow.stdout.readline() or "{}")
        assert first.get("subscribed"), f"slow client could not subscribe: {first}"
        assert first["first_len"] >= WAVE_LEN * 8
        before = rss_kib(shim.proc.pid)
        # A well-behaved client on another connection keeps getting updates.
        watch = h.CaWatch(ctr, shim.local_addr, "FLOW:COUNT", duration=STALL_SECONDS + 5)
        try:
            values = watch.values(40, timeout=STALL_SECONDS + 2)
        finally:
            watch.close()
        peak = max(before, rss_kib(shim.proc.pid))
        after = json.loads(slow.stdout.readline() or "{}")
        slow.wait(timeout=10)
    finally:
        if slow.poll() is None:
            slow.kill()
    growth_mib = (peak - before) / 1024
    print(f"shim RSS {before} KiB before the stall, {peak} KiB during it (+{growth_mib:.1f} MiB); "
          f"unbounded buffering would add about {16 * STALL_SECONDS} MiB")
    assert growth_mib < 16, f"shim grew by {growth_mib:.1f} MiB while a client stalled"
    assert len(values) >= 40 and values == list(range(int(values[0]), int(values[0]) + len(values))), values
    # The stalled client was throttled, not dropped: it reads updates again.
    assert after.get("updates_after_stall", 0) >= 1, after
    assert shim.alive()


FLUSH_QUEUE_BYTES = 16 << 20


@pytest.fixture
def flushing(netns_ok, shim_bin, tmp_path):
    ctr = h.Container()
    try:
        FastWaveIoc(ctr, tmp_path).start()
        shim = h.Shim(ctr, ["--listen", "127.0.0.1:5067", "--queue-bytes", str(FLUSH_QUEUE_BYTES)], tmp_path)
        shim.start()
        yield ctr, shim
    finally:
        ctr.close()


def test_sigterm_writes_what_is_queued_for_clients_before_exit(flushing):
    """A sidecar stopped by SIGTERM first writes what it had queued for its
    clients (for up to a second), so a client that was behind still gets it.
    The client here stalls until its queue in the shim holds about 16 MiB;
    the kernel's socket buffers hold at most a few MiB more, which are all a
    shim that exits at once would deliver."""
    ctr, shim = flushing
    stall = 3.0
    slow = subprocess.Popen(
        ctr.exec_argv([h.PYTHON, h.HERE / "slow_ca_client.py", "127.0.0.1", "5067", "FLOW:WAVE", str(WAVE_LEN), str(stall)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        first = json.loads(slow.stdout.readline() or "{}")
        assert first.get("subscribed"), f"slow client could not subscribe: {first}"
        # Let the queue fill while the client does not read, then stop the
        # shim just before the client reads again.
        time.sleep(stall - 0.5)
        shim.proc.send_signal(15)
        after = json.loads(slow.stdout.readline() or "{}")
        slow.wait(timeout=10)
        shim.proc.wait(timeout=5)
    finally:
        if slow.poll() is None:
            slow.kill()
    received_mib = after.get("bytes_after_stall", 0) / (1 << 20)
    print(f"after SIGTERM the stalled client received {received_mib:.1f} MiB "
          f"(queue {FLUSH_QUEUE_BYTES >> 20} MiB); shim exit code {shim.proc.returncode}")
    assert shim.proc.returncode == 0, shim.log_text(20)
    assert received_mib > 10, f"only {received_mib:.1f} MiB reached the client after SIGTERM"
