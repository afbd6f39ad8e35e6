#!/usr/bin/env bash
# Installs everything runtimed and its tests need on Debian 12 (run as root, or with sudo):
#   1. the Debian packages below (apt-get; skipped entirely when all are installed),
#   2. the project virtualenv .venv with `pip install -e '.[test]'`,
#   3. a separate virtualenv .venv-interop with the PyPI `containerd` client for tests/interop.
# Idempotent; a re-run with nothing to do takes about a second.
# Environment: PYTHON (default python3) is the interpreter the venvs are built from;
# FORCE=1 reinstalls the venvs' packages even when their stamps say they are current.
set -euo pipefail

# --- Debian packages (one place; keep a comment per package) -----------------------------------
APT_PACKAGES=(
    containerd       # its `ctr` client drives tests/interop; its daemon is used only by bench/
    runc             # the OCI runtime our shim execs
    busybox-static   # test fixtures build their images from this static busybox
    docker-registry  # local OCI registry on 127.0.0.1 for pull/push tests
    iproute2         # `ip`/`ss`: network namespaces, checking listeners
    util-linux       # mount, unshare, nsenter, losetup
    e2fsprogs        # mkfs.ext4 for block-device snapshot backends
    zstd             # zstd-compressed layers
    tar              # GNU tar for building and inspecting layer tarballs
    # Later (all are in Debian 12 main; checked with apt-cache policy):
    # runsc          # gVisor runtime: in bookworm main as 0.0~20221219.0-2+b3 (a Dec 2022 snapshot)
    # qemu-system-x86          # micro-VM runtime
    # linux-image-cloud-amd64  # guest kernel for the micro-VM runtime
    # erofs-utils              # mkfs.erofs for EROFS snapshots (bookworm has 1.5)
)

# The interop venv: the PyPI `containerd` package's old-style stubs only work with protobuf 3.20
# (pure-python wheel on py3.11), and introspection_pb2 needs googleapis-common-protos (undeclared).
# See /work/shared/reference/containerd-api.md section 7.
INTEROP_REQUIREMENTS=(containerd==1.5.3 protobuf==3.20.3 grpcio googleapis-common-protos)

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
PYTHON=${PYTHON:-python3}
FORCE=${FORCE:-0}

step() { printf '[install] %s\n' "$*"; }

# Runs a command with its output in a log that is shown only when the command fails (pip is
# chatty: build-backend warnings, notes about this machine's local indexes).
LOG=$(mktemp "${TMPDIR:-/tmp}/runtimed-install.XXXXXX")
trap 'rm -f "$LOG"' EXIT
quiet() {
    if ! "$@" >"$LOG" 2>&1; then
        cat "$LOG" >&2
        printf '[install] FAILED: %s\n' "$*" >&2
        exit 1
    fi
}

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

# --- 1. Debian packages -------------------------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
    step "apt: all ${#APT_PACKAGES[@]} packages already installed"
else
    step "apt: installing ${missing[*]}"
    # Keep maintainer scripts from starting services (containerd's systemd unit, docker-registry's
    # init script): tests start their own daemons on temp sockets and a registry on a free port.
    # Only install our policy-rc.d when there is none, and remove only ours.
    policy=/usr/sbin/policy-rc.d
    our_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# Temporary, from runtimed scripts/install.sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod 0755 "$policy"
        our_policy=1
        trap '"${SUDO[@]}" rm -f "$policy" "$LOG"' EXIT
    fi
    apt=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o Dpkg::Use-Pty=0)
    quiet "${apt[@]}" update
    quiet "${apt[@]}" install -y --no-install-recommends "${missing[@]}"
    if [ "$our_policy" -eq 1 ]; then
        "${SUDO[@]}" rm -f "$policy"
        trap 'rm -f "$LOG"' EXIT
    fi
    # Belt and braces on systemd machines: the packages enable their units; make sure no system
    # containerd (on /run/containerd) or registry (on :5000) is left running or starts at boot.
    if [ -d /run/systemd/system ]; then  # booted with systemd (what sd_booted() checks)
        for unit in containerd.service docker-registry.service; do
            "${SUDO[@]}" systemctl disable --now "$unit" >/dev/null 2>&1 || true
        done
        step "apt: disabled and stopped the containerd and docker-registry system services"
    fi
fi
if [ -S /run/containerd/containerd.sock ]; then
    step "warning: a containerd daemon is listening on /run/containerd/containerd.sock (not started by this script)"
fi

# --- helpers for the virtualenvs ----------------------------------------------------------------
# A venv is reused while its python runs and its stamp (a hash of what was installed into it, and
# of the interpreter's version) is unchanged.
py_version=$("$PYTHON" -c 'import sys; print(sys.version)')

ensure_venv() {  # ensure_venv DIR
    local dir=$1
    if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c '' 2>/dev/null; then
        return 0
    fi
    rm -rf "$dir"
    quiet "$PYTHON" -m venv "$dir"
    quiet "$dir/bin/python" -m pip install --upgrade pip
}

stamp_of() {  # stamp_of STRING...: a hash of the interpreter version and the arguments
    printf '%s\n' "$py_version" "$@" | sha256sum | cut -d' ' -f1
}

stamp_current() {  # stamp_current DIR STAMP
    [ "$FORCE" != 1 ] && [ -f "$1/.install-stamp" ] && [ "$(cat "$1/.install-stamp")" = "$2" ]
}

# --- 2. project venv ----------------------------------------------------------------------------
VENV=.venv
stamp=$(stamp_of "$(cat pyproject.toml)")
ensure_venv "$VENV"
if stamp_current "$VENV" "$stamp"; then
    step "$VENV: up to date"
else
    step "$VENV: pip install -e '.[test]'"
    rm -f "$VENV/.install-stamp"
    quiet "$VENV/bin/python" -m pip install -e '.[test]'
    echo "$stamp" >"$VENV/.install-stamp"
fi

# --- 3. interop venv ----------------------------------------------------------------------------
IVENV=.venv-interop
istamp=$(stamp_of "${INTEROP_REQUIREMENTS[@]}")
ensure_venv "$IVENV"
if stamp_current "$IVENV" "$istamp"; then
    step "$IVENV: up to date"
else
    step "$IVENV: pip install ${INTEROP_REQUIREMENTS[*]}"
    rm -f "$IVENV/.install-stamp"
    quiet "$IVENV/bin/python" -m pip install "${INTEROP_REQUIREMENTS[@]}"
    # protobuf 3.20.3 has no cp311 wheel, so pip takes the pure-python one and no
    # PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION setting is needed; fail loudly if that ever changes.
    "$IVENV/bin/python" - <<'PY'
from google.protobuf.internal import api_implementation
import containerd.services.version.v1.version_pb2_grpc  # noqa: F401
import containerd.services.namespaces.v1.namespace_pb2 as ns

impl = api_implementation.Type()
assert impl == "python", f"protobuf implementation is {impl!r}, expected the pure-python one"
msg = ns.Namespace(name="probe", labels={"k": "v"})  # map fields work only with protobuf 3.20
assert dict(msg.labels) == {"k": "v"}
PY
    echo "$istamp" >"$IVENV/.install-stamp"
fi

step "done"
