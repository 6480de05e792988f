"""The release artefacts: the static binary and the FROM scratch image.

The static binary (scripts/build-static) must need nothing from the file
system it runs on: no loader, no shared library, no NSS module. The image is
built from the repository's Containerfile with buildah (no registry, no base
image), exported as an OCI archive, and its root file system unpacked from
the OCI layout (index.json -> manifest -> layers). The image's own
ENTRYPOINT + CMD then run chrooted into that root, which holds nothing but
the binary and the two files every container runtime adds (/etc/hosts,
/etc/resolv.conf), inside a simulated container beside a real softIoc, and
must serve a CA get (pyepics) and a PVA get (p4p) of it.

The binary is found through NAMESHIM_STATIC_BIN (scripts/test builds it and
sets it), else at the path scripts/build-static prints.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import harness as h
import pytest

STATIC_BIN_DEFAULT = h.REPO / "target" / "x86_64-unknown-linux-gnu" / "release" / "nameshim"
# Where the Containerfile's COPY takes the binary from, relative to the context.
CONTEXT_BIN = Path("target/x86_64-unknown-linux-gnu/release/nameshim")
MAX_BINARY_BYTES = 4 << 20
IMAGE_PORT = 5066
VERSION = tomllib.loads((h.REPO / "Cargo.toml").read_text())["package"]["version"]
# Files a name lookup would open: glibc's NSS configuration and modules,
# the resolver's configuration, and the files NSS reads.
NAME_SERVICE_FILES = re.compile(r"nsswitch\.conf|/etc/hosts|resolv\.conf|host\.conf|gai\.conf|libnss_|/etc/services")


@pytest.fixture(scope="session")
def static_bin() -> Path:
    given = os.environ.get("NAMESHIM_STATIC_BIN")
    path = Path(given or STATIC_BIN_DEFAULT)
    if not path.is_file():
        if given:  # the test command said where it is: missing is a failure
            pytest.fail(f"NAMESHIM_STATIC_BIN={given} does not exist")
        pytest.skip(f"static binary not found at {path}: run scripts/build-static or set NAMESHIM_STATIC_BIN")
    return path


def git_head() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", h.REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except FileNotFoundError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# --------------------------------------------------------------------------
# The static binary


def test_static_binary_is_static_stripped_and_at_most_4_mib(static_bin):
    size = static_bin.stat().st_size
    assert size <= MAX_BINARY_BYTES, f"{size} bytes"
    if shutil.which("file"):
        kind = subprocess.run(["file", "-b", static_bin], capture_output=True, text=True).stdout
        assert "statically linked" in kind or "static-pie linked" in kind, kind
        assert "not stripped" not in kind and "stripped" in kind, kind
    headers = subprocess.run(["readelf", "-lW", static_bin], capture_output=True, text=True).stdout
    dynamic = subprocess.run(["readelf", "-dW", static_bin], capture_output=True, text=True).stdout
    sections = subprocess.run(["readelf", "-SW", static_bin], capture_output=True, text=True).stdout
    assert "INTERP" not in headers, "asks for a dynamic loader"
    assert "(NEEDED)" not in dynamic, dynamic
    assert ".symtab" not in sections, "not stripped"


def test_version_prints_package_version_and_git_commit(static_bin):
    out = subprocess.run([static_bin, "--version"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    m = re.fullmatch(r"nameshim (\S+) \(([0-9a-f]{7,}|unknown)\)\n", out.stdout)
    assert m, out.stdout
    assert m.group(1) == VERSION
    head = git_head()
    if head:  # built from this work tree (scripts/test builds before testing)
        assert m.group(2) == head, f"built from {m.group(2)}, HEAD is {head}"


# Every option that takes an address, with a host name where the address goes.
HOST_NAME_ARGS = [
    ["--listen", "localhost:5066"],
    ["--ca-listen", "localhost:5067"],
    ["--pva-listen", "localhost:5068"],
    ["--ca-search-addr", "localhost"],
    ["--pva-search-addr", "localhost:5076"],
    ["--server-source-addr", "localhost"],
]


@pytest.mark.parametrize("args", HOST_NAME_ARGS, ids=[a[0] for a in HOST_NAME_ARGS])
def test_address_options_refuse_host_names(static_bin, args):
    # Numeric only, by design: a static glibc binary cannot load the NSS
    # modules a name lookup needs (docs/install.md). The option must be
    # refused while parsing, before anything is bound or resolved.
    out = subprocess.run([static_bin, *args], capture_output=True, text=True, timeout=10)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "invalid value 'localhost" in out.stderr and args[0] in out.stderr, out.stderr


# --------------------------------------------------------------------------
# The image


def buildah_missing_reason() -> str | None:
    if shutil.which("buildah"):
        return None
    if os.geteuid() != 0:
        return "buildah not found and not root (scripts/setup.sh installs it as root)"
    pytest.fail("buildah not found: run scripts/setup.sh, which installs it")


class Buildah:
    """buildah with private storage (vfs, no daemon, no registry) under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.argv = ["buildah", "--storage-driver", "vfs", "--root", root / "storage", "--runroot", root / "run"]

    def __call__(self, *args, timeout=60) -> str:
        proc = subprocess.run(
            [*map(str, self.argv), *map(str, args)], capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"buildah {' '.join(map(str, args))} failed:\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def remove_storage(self) -> None:
        subprocess.run([*map(str, self.argv), "rmi", "--all", "--force"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def read_blob(archive: tarfile.TarFile, descriptor: dict) -> bytes:
    algorithm, digest = descriptor["digest"].split(":", 1)
    data = archive.extractfile(f"blobs/{algorithm}/{digest}").read()
    assert hashlib.new(algorithm, data).hexdigest() == digest, f"blob {digest} corrupt"
    return data


def unpack_oci_archive(path: Path, rootfs: Path) -> tuple[dict, dict]:
    """Unpack the only image of an OCI archive into rootfs.

    index.json names the manifest; the manifest names the config and the
    layers, unpacked in order. Returns (manifest, config).
    """
    with tarfile.open(path) as archive:
        index = json.load(archive.extractfile("index.json"))
        assert len(index["manifests"]) == 1, index
        manifest = json.loads(read_blob(archive, index["manifests"][0]))
        config = json.loads(read_blob(archive, manifest["config"]))
        rootfs.mkdir()
        for layer in manifest["layers"]:
            # Plain or gzip tar, told apart by tarfile itself.
            with tarfile.open(fileobj=io.BytesIO(read_blob(archive, layer))) as tar:
                # Whiteouts (deletions) only appear in a layer over another.
                assert not any(Path(m.name).name.startswith(".wh.") for m in tar), "whiteout in layer"
                tar.extractall(rootfs, filter="tar")
    return manifest, config


def files_under(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


@pytest.fixture(scope="module")
def image(static_bin, tmp_path_factory):
    """The Containerfile built with buildah, exported and unpacked."""
    reason = buildah_missing_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("image")
    # A context holding only the binary, where the Containerfile expects it:
    # the repository's own target/ may be large, and NAMESHIM_STATIC_BIN may
    # point anywhere.
    context = work / "context"
    (context / CONTEXT_BIN).parent.mkdir(parents=True)
    shutil.copy2(static_bin, context / CONTEXT_BIN)
    buildah = Buildah(work / "buildah")
    tag = f"localhost/nameshim-e2e:{os.getpid()}"
    archive = work / "nameshim-oci.tar"
    try:
        t0 = time.monotonic()
        buildah(
            "bud", "--isolation", "chroot", "--pull=never", "-f", h.REPO / "Containerfile",
            "--build-arg", f"VERSION={VERSION}", "-t", tag, context,
        )  # fmt: skip
        build_seconds = time.monotonic() - t0
        buildah("push", tag, f"oci-archive:{archive}:nameshim:{VERSION}")
    finally:
        buildah.remove_storage()
    rootfs = work / "rootfs"
    manifest, config = unpack_oci_archive(archive, rootfs)
    print(f"image: built in {build_seconds:.1f} s, archive {archive.stat().st_size} bytes")
    return SimpleNamespace(
        manifest=manifest, config=config, rootfs=rootfs, archive=archive, build_seconds=build_seconds, work=work
    )


def test_image_holds_only_the_static_binary(image, static_bin):
    assert len(image.manifest["layers"]) == 1, image.manifest
    assert files_under(image.rootfs) == {"nameshim"}
    binary = image.rootfs / "nameshim"
    assert binary.read_bytes() == static_bin.read_bytes()
    assert os.access(binary, os.X_OK)
    # Far below the binary limit: one compressed layer and two small blobs.
    assert image.archive.stat().st_size <= MAX_BINARY_BYTES


def test_image_serves_port_5066_by_default_with_oci_labels(image):
    config = image.config["config"]
    assert image.config["architecture"] == "amd64" and image.config["os"] == "linux"
    assert config["Entrypoint"] == ["/nameshim"]
    assert config["Cmd"] == ["--listen", f"0.0.0.0:{IMAGE_PORT}"]
    assert set(config["ExposedPorts"]) == {f"{IMAGE_PORT}/tcp"}
    labels = config["Labels"]
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.licenses"] == "MIT OR Apache-2.0"


@pytest.fixture(scope="module")
def served(netns_ok, image, tmp_path_factory):
    """The image's ENTRYPOINT + CMD, chrooted into its unpacked root, in a
    simulated container beside a pvxs softIoc (CA and PVA). When strace is
    present the shim runs under it, recording file and network calls."""
    work = tmp_path_factory.mktemp("served")
    # The image's root plus what a container runtime adds to it, and nothing
    # else. The name server is unreachable: a lookup would show, not hang.
    root = work / "root"
    shutil.copytree(image.rootfs, root, symlinks=True)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (root / "etc" / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    command = [*image.config["config"]["Entrypoint"], *image.config["config"]["Cmd"]]
    argv = [shutil.which("chroot"), root, *command]
    trace = work / "strace.log" if shutil.which("strace") else None
    if trace:
        argv = [shutil.which("strace"), "-f", "-qq", "-o", trace, "-e", "trace=%file,%network", *argv]
    ctr = h.Container()
    shim = None
    try:
        ioc = h.SoftIoc(ctr, "IMG:", work, "pvxslibs", init=4.5, env=h.PVA_SERVER_ENV).start()
        shim = h.Shim(ctr, argv[1:], work, binary=argv[0])
        shim.start()
        yield SimpleNamespace(ctr=ctr, ioc=ioc, shim=shim, ns=shim.local_addr, trace=trace)
    finally:
        if shim:
            shim.stop()
        ctr.close()  # also ends the shim if strace left it running


def test_image_in_empty_root_serves_ca_get_of_ioc_beside_it(served):
    assert served.shim.addr == f"0.0.0.0:{IMAGE_PORT}"
    got = h.ca_get(served.ctr, served.ns, ["IMG:ID", "IMG:VAL"])
    assert got["IMG:ID"]["connected"], served.shim.log_text()
    assert got["IMG:ID"]["value"] == "IMG:"
    assert got["IMG:VAL"]["value"] == 4.5
    assert got["IMG:ID"]["host"].endswith(f":{IMAGE_PORT}"), got


def test_image_in_empty_root_serves_pva_get_of_ioc_beside_it(served):
    got = h.pva_get(served.ctr, served.ns, ["IMG:ID", "IMG:VAL"])
    assert got["IMG:ID"]["ok"], (got, served.shim.log_text())
    assert got["IMG:ID"]["value"] == "IMG:"
    assert got["IMG:VAL"]["value"] == 4.5


def test_served_binary_opens_no_name_service_file(served):
    # Runs after the gets above (file order), so the trace covers serving.
    if served.trace is None:
        pytest.skip("strace not found (scripts/setup.sh installs it)")
    text = served.trace.read_text()
    after_exec = text.split('execve("/nameshim"', 1)
    assert len(after_exec) == 2, "the trace does not show the shim starting"
    shim_calls = after_exec[1]
    assert re.search(rf"bind\(\d+, \{{sa_family=AF_INET, sin_port=htons\({IMAGE_PORT}\)", shim_calls), (
        "the trace does not cover the shim's network calls"
    )
    looked_up = [line for line in shim_calls.splitlines() if NAME_SERVICE_FILES.search(line)]
    assert not looked_up, looked_up
    dns = [line for line in shim_calls.splitlines() if "htons(53)" in line]
    assert not dns, dns
