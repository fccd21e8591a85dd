#!/usr/bin/env python
"""One decode step of the language-model graph alone, ours against ONNX Runtime GenAI's, in one process.

Where tools/bench_decode.py times whole generation loops (ours in Python, GenAI's in C++), this opens every graph in
the project's onnxruntime (1 intra-op and 1 inter-op thread, accuracy level 4 for ours as ``run`` uses it; GenAI's
nodes carry their own) and times ``session.run`` of one decode step with the same synthetic inputs (a ``--past``-long
cache fed as arrays, so both copy it into their present), the graphs taking turns in rotating order. It separates
"the graph is slower" from "the loop around it is slower".

    python tools/bench_llm_step.py --ours /tmp/vlmq-bench-decode/int4_head8g64 /tmp/vlmq-bench-decode/int4_head4 \\
        --genai /tmp/vlmq-bench-decode/genai_int4 --out benchmarks/llm-step.json

An export directory's ORT-flavour graph is its ``llm_ort.onnx`` (bench_decode builds it; built here when missing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def feeds_for(session, past: int, hidden: int, kv_heads: int, head_dim: int) -> dict:
    """Synthetic inputs of one decode step after ``past`` tokens, for either side's input names."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for i in session.get_inputs():
        n = i.name
        if n == "input_ids":
            out[n] = np.array([[1234]], np.int64)
        elif n == "inputs_embeds":
            out[n] = rng.standard_normal((1, 1, hidden), dtype=np.float32)
        elif n == "attention_mask":
            out[n] = np.ones((1, past + 1), np.int64)
        elif n == "position_ids":
            out[n] = np.array([[past]], np.int64)
        elif n == "logits_to_keep":
            out[n] = np.array([1], np.int64)
        elif "past" in n:
            out[n] = rng.standard_normal((1, kv_heads, past, head_dim), dtype=np.float32)
        else:
            raise SystemExit(f"{n}: an input this tool does not know")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", nargs="+", type=Path, required=True, help="export directories")
    ap.add_argument("--genai", type=Path, help="GenAI model folder (its builder's output)")
    ap.add_argument("--past", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--runs", type=int, default=15, help="session runs per timed block")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "llm-step.json")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    from vlmq_export.export.ort_flavour import write_ort_llm
    from vlmq_export.models import load_family
    from vlmq_export.runtime.session import ACCURACY_LEVEL_KEY, DEFAULT_ACCURACY_LEVEL
    from vlmq_export.testing.machine import machine_stamp

    graphs, fam = {}, None
    for d in args.ours:
        fam = load_family(d / "processor", torch_free=True)
        g = d / "llm_ort.onnx"
        if not g.is_file():
            write_ort_llm(d / "llm.onnx", g, fam.text_config)
        manifest = json.loads((d / "manifest.json").read_text())
        graphs[f"ours {d.name} (lm_head {manifest.get('recipe', {}).get('lm_head')})"] = (g, DEFAULT_ACCURACY_LEVEL)
    if args.genai:
        graphs[f"genai {args.genai.name}"] = (args.genai / "model.onnx", None)

    def session(path, level):
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if level is not None:
            so.add_session_config_entry(ACCURACY_LEVEL_KEY, str(level))
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    sessions = {k: session(*v) for k, v in graphs.items()}
    report = {"what": __doc__.splitlines()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine_stamp(), "onnxruntime": ort.__version__, "threads": 1, "rounds": args.rounds,
              "runs_per_block": args.runs, "graphs": {k: str(v[0]) for k, v in graphs.items()}, "ms_per_step": {}}
    names = list(sessions)
    for past in args.past:
        feeds = {k: feeds_for(s, past, fam.hidden_size, fam.num_kv_heads, fam.head_dim) for k, s in sessions.items()}
        for k, s in sessions.items():
            s.run(None, feeds[k])
        times = {k: [] for k in names}
        for r in range(args.rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                for _ in range(args.runs):
                    sessions[k].run(None, feeds[k])
                times[k].append(1000 * (time.perf_counter() - t0) / args.runs)
        ref = statistics.median(times[names[-1]]) if args.genai else None
        block = {k: {"median": round(statistics.median(v), 2), "min": round(min(v), 2), "max": round(max(v), 2),
                     **({"x_genai": round(statistics.median(v) / ref, 3)} if ref else {})} for k, v in times.items()}
        report["ms_per_step"][str(past)] = block
        for k, v in block.items():
            print(f"past {past:5d}  {k:44s} {v}", flush=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
