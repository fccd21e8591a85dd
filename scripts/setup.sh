#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it. Pins the CPU torch build that this
# machine carries on disk; elsewhere set VLMQ_TORCH (e.g. VLMQ_TORCH=torch) to choose your own.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "${VLMQ_TORCH:-torch==2.13.0}" -e ".${extras:+[$extras]}" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import vlmq_export, torch, onnxruntime" || { echo "install failed" >&2; exit 1; }
