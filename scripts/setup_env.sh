#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at .venv/ with the pinned versions of
# constraints.txt, and install foundry_padfree into it (editable, with the dev extras).
# Re-running is cheap: nothing is installed when setup.py, constraints.txt, the checkout's path and
# the Python are unchanged. A .venv of another Python, or one without pip (an interrupted or
# failed `python -m venv`), is made again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif command -v python3.11 > /dev/null; then
  PY=python3.11
else
  PY=python3
fi
version="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || {
  echo "setup_env: cannot run $PY; set PYTHON to a Python 3.11 or newer" >&2; exit 1; }
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup_env: $PY is Python $version; the pinned versions (constraints.txt) need Python 3.11 or newer." \
    "Set PYTHON to one, e.g. PYTHON=python3.11 bash scripts/setup_env.sh" >&2
  exit 1
fi
STAMP=.venv/.foundry_padfree-installed
want="$( (cat setup.py constraints.txt; echo "$ROOT $version") | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
have="$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2> /dev/null || true)"
if [ "$have" != "$version" ] || ! .venv/bin/python -m pip --version > /dev/null 2>&1; then
  "$PY" -m venv --clear .venv
fi
# uv resolves llm-foundry's dependency tree in seconds where pip backtracks for many minutes.
.venv/bin/python -m pip install -q "$(grep '^uv==' constraints.txt)"
.venv/bin/uv pip install -q --python .venv/bin/python -c constraints.txt -e ".[dev]"
echo "$want" > "$STAMP"
