#!/usr/bin/env python
"""The peer side of tools/bench_decode.py: ONNX Runtime GenAI decoding a model its builder made.

Runs in the venv that has ``onnxruntime-genai`` (not the project's), as a server on stdin/stdout so that the
benchmark can interleave its runs with ours: one JSON request per line, one JSON answer per line.

    python tools/genai_decode.py MODEL_DIR --threads 1
    {"prompt": [ids...], "new_tokens": 128}  ->  {"prefill_s": .., "decode_s": .., "tokens": ..}

``decode_s`` covers the ``generate_next_token`` calls after the prompt was appended (``tokens`` of them, each one
sample + one model step), as ours covers its steps. Greedy, no early stop (``min_length``). The thread count goes
into the model's genai_config.json (``session_options.intra_op_num_threads``) before it loads.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def set_threads(model_dir: Path, threads: int) -> None:
    path = model_dir / "genai_config.json"
    cfg = json.loads(path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    path.write_text(json.dumps(cfg, indent=2))


def run(model, og, prompt: list[int], new_tokens: int) -> dict:
    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    t1 = time.perf_counter()
    steps = 0
    while not gen.is_done():
        gen.generate_next_token()
        steps += 1
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import onnxruntime_genai as og

    set_threads(Path(args.model_dir), args.threads)
    model = og.Model(args.model_dir)
    print(json.dumps({"ready": True, "genai": og.__version__}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        print(json.dumps(run(model, og, req["prompt"], req["new_tokens"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
