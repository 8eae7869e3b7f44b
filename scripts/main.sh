#!/usr/bin/env bash
# The main job: padding-free training through LLM-Foundry on an embedded corpus, offline, on CPU.
# Sets up .venv/ first if needed. Extra arguments go to `python -m foundry_padfree.demo`
# (e.g. `--run-dir /tmp/demo max_duration=30ba`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec .venv/bin/python -m foundry_padfree.demo "$@"
