#!/usr/bin/env bash
# Run the test suite (CPU). Sets up .venv/ first if needed. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
.venv/bin/ruff check foundry_padfree scripts tests setup.py
exec .venv/bin/python -m pytest -q "$@"
