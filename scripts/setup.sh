#!/usr/bin/env bash
# Prepare this machine for the test suite: system tools for the simulated
# containers (network namespaces + nftables) and a Python venv holding the
# real EPICS peers the end-to-end tests talk to. Safe to run repeatedly.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"

# Pinned peers: the e2e results are only comparable across runs with the
# exact same client and server implementations.
pins=(
    epicscorelibs==7.0.10.99.0.2
    pvxslibs==1.5.3
    p4p==4.3.0
    pvapy==5.6.0
    pyepics==3.5.10
    caproto==1.3.0
    pytest==9.2.0
    numpy==2.3.5
    # Validates docs/kubernetes against the Kubernetes schemas it ships
    # (offline); brings PyYAML for the Helm values files.
    kubernetes-validate==1.37.0
)

# Install the system tools only when one is missing, so repeated runs do not
# touch the package index (one apt-get update for all of them): namespace and
# NAT tools; buildah (builds the FROM scratch image without a daemon or a
# registry), file and strace for the release-artefact tests; curl scrapes
# /metrics and /healthz as probes and Prometheus would; dnsmasq answers
# DNS for the resolver test; g++ builds the pvAccessCPP test client; gcc
# builds the IOC plugin's C half.
install_system_tools() {
    local missing=()
    command -v nft >/dev/null 2>&1 || missing+=(nftables)
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    command -v buildah >/dev/null 2>&1 || missing+=(buildah)
    command -v file >/dev/null 2>&1 || missing+=(file)
    command -v strace >/dev/null 2>&1 || missing+=(strace)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    # A real DNS server for the `nameshim check` resolver test, run only
    # inside a test's own network namespace. dnsmasq-base is the program
    # alone: the dnsmasq package would also install (and may start) a
    # system service on the machine's own interfaces.
    command -v dnsmasq >/dev/null 2>&1 || [[ -x /usr/sbin/dnsmasq ]] || missing+=(dnsmasq-base)
    # The pvAccessCPP client of tests/e2e/test_pva_operations.py is C++,
    # compiled by the test itself.
    command -v g++ >/dev/null 2>&1 || missing+=(g++)
    # scripts/build-ioc-plugin compiles the IOC plugin's C half with cc.
    command -v cc >/dev/null 2>&1 || missing+=(gcc)
    if ((${#missing[@]} == 0)); then
        return
    fi
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: missing ${missing[*]} and not root; namespace and image tests will skip" >&2
        return
    fi
    echo "setup: installing ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

# Create the venv and install the pins, skipping pip when the stamp file
# records the same pin list as already installed.
install_python_peers() {
    local stamp="$venv/.pins-installed"
    local want
    want="$(printf '%s\n' "${pins[@]}")"
    if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "setup: python peers up to date"
        return
    fi
    if [[ ! -x "$venv/bin/python" ]]; then
        python3 -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install --disable-pip-version-check -q "${pins[@]}"
    printf '%s\n' "$want" >"$stamp"
}

# Keep build and venv output out of version control; any of the usual
# spellings (.venv, .venv/, /.venv, /.venv/) counts as already ignored.
ensure_gitignore() {
    local gi="$repo/.gitignore" name
    touch "$gi"
    for name in .venv target dist; do
        grep -qxE "/?${name//./\\.}/?" "$gi" || echo "$name/" >>"$gi"
    done
}

# cargo-fuzz drives libFuzzer on the stable toolchain (scripts/fuzz, with
# the sanitizer off); pinned like the Python peers.
install_cargo_fuzz() {
    local want="cargo-fuzz 0.13.2"
    if [[ "$(cargo fuzz --version 2>/dev/null)" == "$want" ]]; then
        return
    fi
    echo "setup: installing $want"
    cargo install --locked --version 0.13.2 cargo-fuzz
}

install_system_tools
install_cargo_fuzz
install_python_peers
ensure_gitignore
