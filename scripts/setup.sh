#!/usr/bin/env bash
# Set up normsurgeon in ./.venv (idempotent). Sourced by scripts/example.sh and scripts/test.sh.
# torch: reuses an installed torch (the package accepts torch>=2.2); installs exactly torch==2.13.0
# when none is importable, because any other requirement makes pip fetch several GB of CUDA wheels.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "· creating .venv" >&2
  "$PY" -m venv --system-site-packages .venv
fi
VPY="$ROOT/.venv/bin/python"
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "· installing torch==2.13.0 (CPU)" >&2
  "$VPY" -m pip install -q "torch==2.13.0"
fi
STAMP=".venv/.normsurgeon-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "· installing normsurgeon and its dependencies" >&2
  "$VPY" -m pip install -q -e ".[dev]"
  touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
