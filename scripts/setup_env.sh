#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at .venv/ with the pinned versions of
# constraints.txt, and install foundry_padfree into it (editable, with the dev extras).
# Re-running is cheap: nothing is installed when setup.py and constraints.txt are unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
STAMP=.venv/.foundry_padfree-installed
want="$(cat setup.py constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# uv resolves llm-foundry's dependency tree in seconds where pip backtracks for many minutes.
.venv/bin/python -m pip install -q "$(grep '^uv==' constraints.txt)"
.venv/bin/uv pip install -q --python .venv/bin/python -c constraints.txt -e ".[dev]"
echo "$want" > "$STAMP"
