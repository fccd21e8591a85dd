#!/usr/bin/env python
"""The clipped-range search (--clip-search, the onnxruntime default) over one weight: whole tensors at once against
cache-sized pieces (calibrators/base.SEARCH_CHUNK), interleaved, the same scales asserted. Writes benchmarks/clip-search.json.

    nice -n 5 python tools/bench_clip_search.py --shapes 4096x4096,576x1536 --repeats 3
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,576x1536", help="out x in features, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "benchmarks" / "clip-search.json"))
    args = ap.parse_args(argv)
    pieces = base.SEARCH_CHUNK
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(x) for x in shape.split("x"))
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
        w[:, :: max(1, k // 8)] *= 30  # a few outlier columns, as real layers have
        for grid in ("asym", "sym-extreme"):
            times = {"whole": [], "pieces": []}
            results = {}
            for _ in range(args.repeats):
                for name, chunk in (("whole", 1 << 40), ("pieces", pieces)):  # interleaved
                    t0 = time.perf_counter()
                    results[name] = search(w, grid, chunk)
                    times[name].append(time.perf_counter() - t0)
            same = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(results["whole"], results["pieces"]))
            row = {"shape": [n, k], "grid": grid, "group": 128, "bits": 4, "same_scales": same,
                   **{f"{m}_s": [round(t, 3) for t in v] for m, v in times.items()},
                   "speedup_median": round(statistics.median(times["whole"]) / statistics.median(times["pieces"]), 2)}
            print(json.dumps(row))
            if not same:
                print("the pieces' scales differ from the whole tensor's", file=sys.stderr)
                return 1
            rows.append(row)
    base.SEARCH_CHUNK = pieces
    doc = {"what": __doc__.splitlines()[0], "search_chunk": pieces, "candidates": len(base.CLIP_RANGES),
           "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                       "load_avg": os.getloadavg()},
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
