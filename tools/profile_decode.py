#!/usr/bin/env python
"""Where a decode step's time goes, ours against ONNX Runtime GenAI's, from ONNX Runtime's own profiler.

Decodes ``--steps`` tokens after a 64-token prompt at 1 thread with profiling on, in our runtime (``OnnxVLM`` over an
export directory whose ORT-flavour llm graph is ``llm_ort.onnx``, as tools/bench_decode.py builds them) and in GenAI
(a copy of its model folder with ``enable_profiling`` in its session options, run by ``--peer-python``), and reports
per decode step: wall time, the llm session's ``model_run`` time, the kernels' time per op type, the lm_head's
kernel, and what is left outside the kernels. Profiling slows both sides; compare the parts, not the totals with
bench_decode's.

    python tools/profile_decode.py --ours /tmp/vlmq-bench-decode/int4_head8g64 \\
        --genai /tmp/vlmq-bench-decode/genai_int4 --out benchmarks/decode-profile.json
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GENAI_SCRIPT = """
import sys, time, numpy as np, onnxruntime_genai as og
m = og.Model(sys.argv[1]); steps = int(sys.argv[2])
p = og.GeneratorParams(m); p.set_search_options(max_length=64 + steps + 1, do_sample=False)
g = og.Generator(m, p); g.append_tokens(np.arange(1000, 1064, dtype=np.int32)[None])
t = time.perf_counter()
for _ in range(steps):
    g.generate_next_token()
print((time.perf_counter() - t) / steps)
"""


def summarize(profile: str) -> dict:
    """Per decode step (every model_run after the first, the prefill): model_run ms, kernel ms per op type."""
    ev = json.loads(Path(profile).read_text())
    runs = sorted((e for e in ev if e.get("name") == "model_run"), key=lambda e: e["ts"])
    t0 = runs[1]["ts"]
    n = len(runs) - 1
    nodes = [e for e in ev if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0]
    ops = collections.defaultdict(float)
    for e in nodes:
        ops[e["args"]["op_name"]] += e["dur"]
    last = _last_matmul(nodes)
    head = sum(e["dur"] for e in nodes if "lm_head" in e["name"] or e["name"] == last)
    kernels = sum(ops.values())
    run_ms = sum(r["dur"] for r in runs[1:]) / n / 1000
    return {"decode_runs": n, "model_run_ms": round(run_ms, 3), "kernels_ms": round(kernels / n / 1000, 3),
            "outside_kernels_ms": round(run_ms - kernels / n / 1000, 3), "lm_head_ms": round(head / n / 1000, 3),
            "ops_ms": {k: round(v / n / 1000, 3) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])}}


def _last_matmul(nodes) -> str | None:
    """Our graphs name the lm_head's MatMul by number: it is the last MatMulNBits of a step."""
    mm = [e for e in nodes if e["args"]["op_name"] == "MatMulNBits"]
    return max(mm, key=lambda e: e["ts"])["name"] if mm else None


def profile_ours(out: Path, steps: int, tmp: Path) -> dict:
    os.environ["VLMQ_ORT_THREADS"] = "1"
    import numpy as np
    import onnxruntime as ort

    from vlmq_export.models import Prepared
    from vlmq_export.runtime import session as S
    from vlmq_export.runtime.generate import OnnxVLM

    base = S.ort.SessionOptions

    class Profiled(ort.SessionOptions):
        def __init__(self):
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = str(tmp / "ours")

    S.ort.SessionOptions = Profiled
    try:
        graphs = {g: out / f"{g}.onnx" for g in ("vision_encoder", "projector", "embed_tokens")}
        graphs["llm"] = out / "llm_ort.onnx"
        vlm = OnnxVLM(out, graphs=graphs)
        llm = vlm.runner("llm")
        vlm.runner("embed_tokens")
    finally:
        S.ort.SessionOptions = base
    ids = np.arange(1000, 1064)[None]
    p = Prepared(input_ids=ids, image_mask=np.zeros_like(ids, bool), position_ids=np.arange(64)[None])
    res = vlm.generate_prepared(p, max_new_tokens=steps + 1, stop=False)
    path = llm.session.end_profiling()
    vlm.close()
    return {"wall_ms_per_step": round(1000 * res.decode_s / steps, 3), **summarize(path)}


def profile_genai(model_dir: Path, peer_python: str, steps: int, tmp: Path) -> dict:
    copy = tmp / "genai"
    shutil.copytree(model_dir, copy)
    cfg_path = copy / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["enable_profiling"] = str(tmp / "genai")
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=2))
    res = subprocess.run([peer_python, "-c", GENAI_SCRIPT, str(copy), str(steps)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    wall = float(res.stdout.strip().splitlines()[-1])
    path = sorted(glob.glob(str(tmp / "genai_*.json")))[-1]
    return {"wall_ms_per_step": round(1000 * wall, 3), **summarize(path)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", required=True, type=Path, help="export directory with llm_ort.onnx")
    ap.add_argument("--genai", type=Path, help="GenAI model folder (its builder's output)")
    ap.add_argument("--peer-python", default="/tmp/genai-venv/bin/python")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "decode-profile.json")
    args = ap.parse_args(argv)
    from vlmq_export.testing.machine import machine_stamp

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        report = {"what": __doc__.splitlines()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "machine": machine_stamp(), "steps": args.steps, "threads": 1,
                  "ours": {"dir": str(args.ours), **profile_ours(args.ours, args.steps, tmp)}}
        if args.genai:
            report["genai"] = {"dir": str(args.genai), **profile_genai(args.genai, args.peer_python, args.steps, tmp)}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
