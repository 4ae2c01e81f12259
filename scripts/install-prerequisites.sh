#!/usr/bin/env bash
# Installs what building chatgate's proxy and running `cargo test --all-features` need,
# on Debian/Ubuntu with Rust and git already there (README.md, Prerequisites).
#
#   scripts/install-prerequisites.sh           install (apt as root; the rest as you)
#   scripts/install-prerequisites.sh --check   list what is missing, install nothing
#
# As root: apt-get installs the system packages. Without root: the script installs
# what needs no root (the JS SDK into tests/sdk, pip's stream-chat, pip's cmake) and
# prints the one apt-get command left to run. Exit status 0 means everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

check_only=false
if [[ "${1:-}" == "--check" ]]; then
    check_only=true
fi

have() { command -v "$1" >/dev/null 2>&1; }
python_has_stream_chat() { have python3 && python3 -c 'import stream_chat' >/dev/null 2>&1; }
js_sdk_installed() { [[ -d tests/sdk/node_modules/stream-chat ]]; }
# The JS SDK (stream-chat 9) needs Node 18 or newer; older distributions ship older ones
# (Ubuntu 22.04's apt nodejs is 12), which pass `have node` and then fail the SDK tests.
node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
node_too_old() { have node && (( $(node_major) < 18 )); }
openssl_headers() {
    if have pkg-config; then pkg-config --exists openssl; else [[ -f /usr/include/openssl/ssl.h ]]; fi
}

# What is missing, as Debian package names (one list, one apt-get command).
missing_apt() {
    local packages=()
    # A C toolchain: rustup brings none, yet cargo links with `cc` and Pingora's C
    # dependencies (zlib-ng through cmake's Makefiles, OpenSSL's bindings) compile C.
    # build-essential, not gcc alone: with --no-install-recommends gcc comes without
    # libc6-dev and cannot link.
    { have cc && have make && [[ -f /usr/include/stdio.h ]]; } || packages+=(build-essential)
    # Pingora's openssl dependency is vendored: OpenSSL is built from source by a perl
    # Configure and make (git on Debian brings perl; a bare system may not have it).
    have perl || packages+=(perl)
    have cmake || packages+=(cmake)
    # pkg-config and libssl-dev: for OPENSSL_NO_VENDOR=1 builds against the system's.
    have pkg-config || packages+=(pkg-config)
    openssl_headers || packages+=(libssl-dev)
    have openssl || packages+=(openssl)
    have redis-server || packages+=(redis-server)
    have redis-sentinel || packages+=(redis-sentinel)
    have redis-cli || packages+=(redis-tools)
    { have node && have npm; } || packages+=(nodejs npm)
    have python3 || packages+=(python3)
    { have pip || have pip3 || { have python3 && python3 -m pip --version >/dev/null 2>&1; }; } \
        || packages+=(python3-pip)
    echo "${packages[@]:-}"
}

pip_install() {
    # Debian 12+ and Ubuntu 23.04+ mark the system Python as externally managed
    # (PEP 668); a user install of one package next to it is what the tests need.
    python3 -m pip install --user -q "$@" 2>/dev/null \
        || python3 -m pip install --user -q --break-system-packages "$@" 2>/dev/null \
        || python3 -m pip install -q "$@"
}

report() {
    local apt_missing sdk_missing=()
    apt_missing="$(missing_apt)"
    js_sdk_installed || sdk_missing+=("JS SDK: (cd tests/sdk && npm ci)")
    python_has_stream_chat || sdk_missing+=("Python SDK: pip install stream-chat")
    node_too_old && sdk_missing+=("Node.js 18 or newer (this one is $(node --version)): Debian 12's nodejs, or NodeSource's packages")
    if [[ -z "$apt_missing" && ${#sdk_missing[@]} -eq 0 ]]; then
        echo "chatgate prerequisites: all present"
        return 0
    fi
    echo "chatgate prerequisites missing:" >&2
    [[ -n "$apt_missing" ]] && echo "  system packages: $apt_missing" >&2
    if ! have cmake && [[ -x "$HOME/.local/bin/cmake" ]]; then
        echo "  (pip's cmake is in ~/.local/bin, which is not on PATH: export PATH=\"\$HOME/.local/bin:\$PATH\")" >&2
    fi
    for line in "${sdk_missing[@]}"; do echo "  $line" >&2; done
    if [[ "$(id -u)" -eq 0 ]]; then
        echo "Run: scripts/install-prerequisites.sh" >&2
    elif [[ "$apt_missing" == "cmake" ]]; then
        echo "Run: pip install cmake && scripts/install-prerequisites.sh" >&2
    elif [[ -n "$apt_missing" ]]; then
        echo "Run: sudo apt-get install -y $apt_missing && scripts/install-prerequisites.sh" >&2
    else
        echo "Run: scripts/install-prerequisites.sh" >&2
    fi
    return 1
}

if $check_only; then
    report
    exit $?
fi

apt_missing="$(missing_apt)"
if [[ -n "$apt_missing" ]]; then
    if [[ "$(id -u)" -eq 0 ]] && have apt-get; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086
        apt-get install -y -qq --no-install-recommends $apt_missing >/dev/null
    elif ! have cmake && have python3; then
        # cmake is on PyPI; the rest of the list needs root.
        pip_install cmake || true
    fi
fi

if have npm && ! js_sdk_installed; then
    # A failure is listed by `report` below with what to run, not ended on here.
    (cd tests/sdk && npm ci --no-audit --no-fund --silent) || true
fi
if have python3 && ! python_has_stream_chat; then
    pip_install stream-chat || true
fi

report
