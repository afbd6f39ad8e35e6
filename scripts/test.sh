#!/usr/bin/env bash
# The one test command, for developers and CI alike:
#   scripts/test.sh [PYTEST ARGS...]     e.g. scripts/test.sh tests/unit -x
# Installs what is missing (scripts/install.sh), lints, checks that the generated protobuf code is
# current, then runs pytest (tests/ by default, from pyproject.toml). Exits with the first failing
# step's code; pytest's exit code is passed through unchanged (5 = no tests collected fails too).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

scripts/install.sh
# install.sh provided ctr and .venv-interop: an interop test that cannot find them fails, not skips.
export RUNTIMED_INTEROP_REQUIRED=1

echo "[test] ruff check"
.venv/bin/ruff check .

echo "[test] proto/generate.py --check"
.venv/bin/python proto/generate.py --check

echo "[test] pytest $*"
exec .venv/bin/python -m pytest -q "$@"
