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

``--loop N`` also decodes N greedy tokens after a 64-token prompt with each graph in one Python loop, the same for
all (IO binding, the KV cache in place: each layer's past and present bound to one buffer, as the runtime's SharedKV
and GenAI do), taking turns: what each graph costs per step in a loop, with no difference between the loops.
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


def interleaved(names: list[str], rounds: int, timed, has_genai: bool) -> dict:
    """``timed(name)`` -> ms, called for every name each round, the order rotating; {name: median, min, max and the
    ratio to GenAI's median (the last name) where GenAI ran}."""
    times = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(timed(k))
    ref = statistics.median(times[names[-1]]) if has_genai else None
    return {k: {"median": round(statistics.median(v), 2), "min": round(min(v), 2), "max": round(max(v), 2),
                **({"x_genai": round(statistics.median(v) / ref, 3)} if ref else {})} for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", nargs="+", type=Path, required=True, help="export directories")
    ap.add_argument("--genai", type=Path, help="GenAI model folder (its builder's output)")
    ap.add_argument("--past", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--runs", type=int, default=15, help="session runs per timed block")
    ap.add_argument("--loop", type=int, default=0, metavar="N",
                    help="also decode N tokens per graph in one shared Python loop (IO binding, KV cache in place)")
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

        def one_step(k, feeds=feeds):
            t0 = time.perf_counter()
            for _ in range(args.runs):
                sessions[k].run(None, feeds[k])
            return 1000 * (time.perf_counter() - t0) / args.runs

        block = interleaved(names, args.rounds, one_step, bool(args.genai))
        report["ms_per_step"][str(past)] = block
        for k, v in block.items():
            print(f"past {past:5d}  {k:44s} {v}", flush=True)
    if args.loop:
        embed = session(args.ours[0] / "embed_tokens.onnx", None)
        loops = {k: Loop(sessions[k], embed, fam, genai=k.startswith("genai")) for k in names}
        prompt = list(range(1000, 1064))
        for lp in loops.values():
            lp.decode(prompt, 8)
        report["loop"] = {"new_tokens": args.loop, "prompt_tokens": len(prompt), "ms_per_step": interleaved(
            names, args.rounds, lambda k: loops[k].decode(prompt, args.loop), bool(args.genai))}
        for k, v in report["loop"]["ms_per_step"].items():
            print(f"loop {args.loop:4d}  {k:44s} {v}", flush=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


class Loop:
    """Greedy decoding of one llm graph in Python with IO binding and the KV cache in place (each layer's past and
    present bound to one buffer of the final length). Ours takes ``inputs_embeds`` (from embed_tokens.onnx),
    ``position_ids`` and ``logits_to_keep``; GenAI's takes ``input_ids``."""

    def __init__(self, session, embed, fam, genai: bool):
        self.s, self.embed, self.fam, self.genai = session, embed, fam, genai
        self.inputs = {i.name for i in session.get_inputs()}

    def decode(self, prompt: list[int], steps: int) -> float:
        """Milliseconds per decode step (the prefill not counted)."""
        import numpy as np
        import onnxruntime as ort

        f = self.fam
        binding = self.s.io_binding()
        keep = []
        for i in range(f.num_layers):
            for kind in ("key", "value"):
                buf = ort.OrtValue.ortvalue_from_numpy(
                    np.zeros((1, f.num_kv_heads, len(prompt) + steps + 1, f.head_dim), np.float32))
                keep.append(buf)
                if self.genai:
                    binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                    binding.bind_ortvalue_output(f"present.{i}.{kind}", buf)
                else:
                    binding.bind_ortvalue_input(f"past_{kind}_{i}", buf)
                    binding.bind_ortvalue_output(f"present_{kind}_{i}", buf)

        def step(ids, start):
            feeds = {"attention_mask": np.ones((1, start + ids.shape[1]), np.int64)}
            if self.genai:
                feeds["input_ids"] = ids
            else:
                feeds["inputs_embeds"] = self.embed.run(None, {"input_ids": ids})[0]
                feeds["position_ids"] = np.arange(start, start + ids.shape[1], dtype=np.int64)[None]
                if "logits_to_keep" in self.inputs:
                    feeds["logits_to_keep"] = np.array([1], np.int64)
            for k, v in feeds.items():
                binding.bind_cpu_input(k, np.ascontiguousarray(v))
            binding.bind_output("logits", "cpu")
            self.s.run_with_iobinding(binding)
            # the C++ binding's list, as the runtime reads it (the Python wrapper wraps all 61 bound outputs)
            return getattr(binding, "_iobinding", binding).get_outputs()[0].numpy()

        logits = step(np.array([prompt], np.int64), 0)
        t0 = time.perf_counter()
        for k in range(steps):
            logits = step(np.array([[int(np.argmax(logits[0, -1]))]], np.int64), len(prompt) + k)
        return 1000 * (time.perf_counter() - t0) / steps


if __name__ == "__main__":
    sys.exit(main())
