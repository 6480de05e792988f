"""Shared fixtures for the end-to-end tests, and shim logs on failure."""

import subprocess
from pathlib import Path

import harness
import pytest


@pytest.fixture(scope="session")
def netns_ok():
    """Skip (with the reason) where namespaces and nftables are unavailable."""
    reason = harness.cannot_run_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def shim_bin() -> Path:
    path = harness.shim_binary()
    if not path.is_file():
        pytest.skip(f"nameshim binary not found at {path}: run `cargo build --release` or set NAMESHIM_BIN")
    return path


@pytest.fixture(scope="session")
def shim_help(shim_bin) -> str:
    """The binary's --help text, printed once so logs show which build ran."""
    out = subprocess.run([shim_bin, "--help"], capture_output=True, text=True, timeout=10)
    return out.stdout + out.stderr


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # A failing e2e test is rarely explained by the client side alone: attach
    # each running shim's log (and whether it is still alive) to the report.
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for shim in harness.Shim.live:
        state = "running" if shim.alive() else f"exited with {shim.proc.returncode}"
        report.sections.append((f"nameshim log ({state}, {shim.log})", shim.log_text()))
