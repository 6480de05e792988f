"""The demo is part of the product: `scripts/demo` must run and show CA and
PVA values read through the one remapped port."""

import os
import subprocess

import harness as h


def test_demo_reads_ca_and_pva_values_through_one_remapped_port(netns_ok):
    # scripts/demo runs setup.sh (a no-op once the peers are installed) and
    # cargo build --release (a no-op once built), then the demo itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPICS_", "NAMESHIM_"))}
    proc = subprocess.run(
        [str(h.REPO / "scripts" / "demo")], env=env, capture_output=True, text=True, timeout=600
    )
    out = proc.stdout
    assert proc.returncode == 0, f"demo exited {proc.returncode}:\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    ca = out.split("get with pyepics (libca) through nameshim", 1)[1].split("\n\n", 1)[0]
    for pv in ("IOCA:ID", "PVXS:ID", "CAPR:ID"):
        assert f"{pv}    connected      '{pv[:5]}'" in ca, ca
    for client in ("p4p (pvxs)", "pvapy (pvAccessCPP)"):
        pva = out.split(f"get with {client} through nameshim", 1)[1].split("\n\n", 1)[0]
        for pv in ("IOCA:ID", "PVXS:ID"):
            assert f"{pv}    ok     '{pv[:5]}'" in pva, pva
    check = out.split("nameshim check 127.0.0.1:8066", 1)[1].split("\nresult:", 1)[0]
    assert "(exit 0)" in check, check
    assert "export EPICS_PVA_NAME_SERVERS=127.0.0.1:8066" in check, check
    assert "result: every server reached over CA and PVA through one remapped port" in out
