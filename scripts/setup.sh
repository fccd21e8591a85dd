#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it with the extras named in $1 (comma-separated;
# default "quantize"). The base install is the runtime (run, serve, lint, build, inspect: what a Jetson needs);
# the quantize extra adds torch and transformers for exporting: `bash scripts/setup.sh ""` installs the runtime
# alone. With quantize, pins the CPU torch build that this machine carries on disk; elsewhere set VLMQ_TORCH
# (e.g. VLMQ_TORCH=torch) to choose your own.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1-quantize}"
torch=""
check="import vlmq_export, onnxruntime, tokenizers"
case ",$extras," in
  *,quantize,*) torch="${VLMQ_TORCH:-torch==2.13.0}"; check="$check, torch, transformers" ;;
esac
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q ${torch:+"$torch"} -e ".${extras:+[$extras]}" 2>&1 | grep -v "^WARNING: Location" || true
python -c "$check" || { echo "install failed" >&2; exit 1; }
