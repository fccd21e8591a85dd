#!/usr/bin/env bash
# Install, then run the whole pipeline on the built-in default model (no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
vlmq-export "${1:-builtin:tiny-qwen2-vl}" --int4 -o "${2:-out/quickstart}"
