#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the whole test suite, lint and type checks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check src tests scripts
.venv/bin/mypy
exec .venv/bin/pytest -q "$@"
