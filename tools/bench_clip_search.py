#!/usr/bin/env python
"""The clipped-range search (--clip-search, the onnxruntime default) over one weight: whole tensors at once against
cache-sized pieces (calibrators/base.SEARCH_CHUNK), interleaved, the same scales asserted. Writes benchmarks/clip-search.json.

    nice -n 5 python tools/bench_clip_search.py --shapes 4096x4096,576x1536 --repeats 3

``--in-gptq`` times whole GPTQ solves instead (group 64, asymmetric with the clip search weighted by the Hessian's
diagonal: the onnxruntime default on SmolLM2's 576-wide layers, where each group's search covers one small column
block) and writes benchmarks/clip-search-gptq.json::

    nice -n 5 python tools/bench_clip_search.py --in-gptq --shapes 576x576,192x576,1536x576,576x1536 --repeats 4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's package

import torch  # noqa: E402

from vlmq_export.calibrators import base  # noqa: E402


def search(w: torch.Tensor, grid: str, chunk: int):
    """One layer's clip search at 4 bits, group 128: asymmetric (onnxruntime) or symmetric extreme (TensorRT)."""
    base.SEARCH_CHUNK = chunk
    g = w.reshape(-1, 128)
    if grid == "asym":
        return base.group_zero_scales(g, 15, clip=True)
    return base.group_scales(g, 7, clip=True, grid="extreme"), None


def gptq_solve(w: torch.Tensor, x: torch.Tensor, chunk: int):
    """GPTQ on ``w`` with inputs ``x`` [T, in], 4 bits, group 64, asymmetric, clip search (its group scales found
    column block by column block inside the solve)."""
    from vlmq_export.calibrators.base import QuantConfig
    from vlmq_export.calibrators.gptq import GPTQCalibrator

    base.SEARCH_CHUNK = chunk
    cal = GPTQCalibrator(w.clone(), QuantConfig(bits=4, group_size=64, sym=False, clip_search=True))
    cal.add_batch(x)
    r = cal.solve()
    return r.codes, r.scales, r.zeros


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,576x1536", help="out x in features, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--in-gptq", action="store_true", help="time GPTQ solves (group 64, asym + clip) instead")
    ap.add_argument("--tokens", type=int, default=2048, help="--in-gptq: calibration tokens")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="default: benchmarks/clip-search.json (clip-search-gptq.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = str(Path(__file__).resolve().parents[1] / "benchmarks"
                       / ("clip-search-gptq.json" if args.in_gptq else "clip-search.json"))
    pieces = base.SEARCH_CHUNK
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(x) for x in shape.split("x"))
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
        w[:, :: max(1, k // 8)] *= 30  # a few outlier columns, as real layers have
        x = torch.randn(args.tokens, k, generator=torch.Generator().manual_seed(1))
        for grid in (("asym-gptq",) if args.in_gptq else ("asym", "sym-extreme")):
            times = {"whole": [], "pieces": []}
            results = {}
            for _ in range(args.repeats):
                for name, chunk in (("whole", 1 << 40), ("pieces", pieces)):  # interleaved
                    t0 = time.perf_counter()
                    results[name] = gptq_solve(w, x, chunk) if args.in_gptq else search(w, grid, chunk)
                    times[name].append(time.perf_counter() - t0)
            same = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(results["whole"], results["pieces"]))
            row = {"shape": [n, k], "grid": grid, "group": 64 if args.in_gptq else 128, "bits": 4, "same_scales": same,
                   **{f"{m}_s": [round(t, 3) for t in v] for m, v in times.items()},
                   "speedup_median": round(statistics.median(times["whole"]) / statistics.median(times["pieces"]), 2)}
            print(json.dumps(row))
            if not same:
                print("the pieces' scales differ from the whole tensor's", file=sys.stderr)
                return 1
            rows.append(row)
    base.SEARCH_CHUNK = pieces
    doc = {"what": ("whole GPTQ solves (group 64, asym + clip, Hessian-weighted), whole-tensor search against pieces"
                    if args.in_gptq else __doc__.splitlines()[0]), "search_chunk": pieces, "candidates": len(base.CLIP_RANGES),
           "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                       "load_avg": os.getloadavg()},
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
