#!/usr/bin/env bash
# Installs everything artifactfs needs on a fresh Debian machine: the FUSE packages and the programs
# the tests drive, a virtualenv in .venv, and the package itself (editable, with dev tools).
# Idempotent and non-interactive.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for p in fuse3 libfuse3-dev pkg-config gcc attr acl rsync sqlite3 git tar util-linux procps psmisc \
         python3-wheel-whl python3-setuptools-whl; do
    dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# allow_other mounts by non-root users need this line; root mounts do not, but the tests run both.
if [ -f /etc/fuse.conf ] && ! grep -q '^user_allow_other' /etc/fuse.conf && [ "$(id -u)" -eq 0 ]; then
    echo user_allow_other >> /etc/fuse.conf
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.artifactfs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
