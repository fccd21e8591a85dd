#!/usr/bin/env python
"""W8A8 on ONNX Runtime CPU (issue 23): the testbed's vision encoder + projector, INT8 Q/DQ against float.

    nice -n 5 python tools/bench_w8a8.py [--workdir DIR] [--out benchmarks/w8a8-ort.json] [--repeats 7]
        [--threads 1,2] [--act-calibrator minmax]

One export of ``builtin:shapes-smolvlm`` with ``--components vision,projector --vision int8 --projector int8
--method gptq --keep-float`` gives both variants from the same model (``float/`` holds the float graphs). Each graph
is opened in ONNX Runtime at its default optimization (ORT_ENABLE_ALL), one session per variant and thread count,
and timed on the same ShapesVQA test image, interleaved: for each repeat both variants run once, the order
alternating. The report keeps the median and spread per graph, the ratio float / int8, the optimized graphs' op
types (what ONNX Runtime fused the Q/DQ into: QLinearMatMul, MatMulInteger, DynamicQuantizeLinear, ...) and how far
the INT8 image embeddings are from the float ones.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "builtin:shapes-smolvlm"
GRAPHS = ("vision_encoder", "projector")
QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeLinear",
             "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearConv", "QAttention", "MatMul", "Gemm",
             "FusedMatMul", "MatMulNBits")


def log(msg: str) -> None:
    print(f"[bench_w8a8 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def export(work: Path, calibrator: str) -> Path:
    from vlmq_export import cli

    out = work / f"int8-{calibrator}"
    if not (out / "manifest.json").is_file():
        log(f"exporting {MODEL} vision + projector INT8 ({calibrator}) to {out}")
        rc = cli.main([MODEL, "--components", "vision,projector", "--vision", "int8", "--projector", "int8",
                       "--method", "gptq", "--act-calibrator", calibrator, "--no-validate", "--keep-float",
                       "--eval-task", "0", "-o", str(out), "--quiet"])
        if rc:
            raise SystemExit(rc)
    return out


def feeds():
    from vlmq_export.data.loader import builtin_samples
    from vlmq_export.models import load_family
    from vlmq_export.sources import resolve_model

    family = load_family(resolve_model(MODEL))
    s = builtin_samples(1, split="test", which="builtin:shapes")[0]
    return family.vision_feeds(family.prepare(s.images, s.prompt, None))


def session(path: Path, threads: int, optimized: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def op_types(path: Path) -> dict:
    import onnx

    ops = collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    return {k: ops[k] for k in QUANT_OPS if ops[k]} | {"nodes": sum(ops.values())}


def run_pair(sessions: dict, vision_feeds: dict) -> dict[str, float]:
    """Seconds of each graph for one variant (vision encoder, then projector on its features)."""
    t0 = time.perf_counter()
    feats = sessions["vision_encoder"].run(["features"], vision_feeds)[0]
    t1 = time.perf_counter()
    emb = sessions["projector"].run(["image_embeds"], {"features": feats})[0]
    t2 = time.perf_counter()
    return {"vision_encoder": t1 - t0, "projector": t2 - t1, "total": t2 - t0, "embeds": emb}


def quality(args) -> int:
    """``--quality``: ShapesVQA test accuracy (Wilson 95 %) of the vision encoder + projector W8A8 against full
    precision, per activation calibrator, with (vlmq) and without (gptq) saliency weighting. Evaluated in torch with
    the weights and activation fake-quantized as the Q/DQ graphs compute them (tests/test_w8a8.py: layer-wise equal
    to 1e-4)."""
    import copy

    import torch

    from vlmq_export.calibrate import Recipe, calibrate
    from vlmq_export.calibrators.activation import activation_fake_quant
    from vlmq_export.data.loader import load_samples
    from vlmq_export.models import load_family
    from vlmq_export.recipe import parse_component_recipe
    from vlmq_export.sources import resolve_model
    from vlmq_export.testbed.evaluate import evaluate_torch

    torch.set_num_threads(2)
    model_dir = resolve_model(MODEL)
    family = load_family(model_dir)
    model = family.load_checked(model_dir)
    calib = load_samples(None, limit=args.n_calib)
    rows = []

    def row(name, res, seconds):
        lo, hi = res["ci95"]
        rows.append({"config": name, "accuracy": res["accuracy"], "ci95": [lo, hi], "correct": res.get("correct"),
                     "n": res.get("n", args.n_eval), "seconds": round(seconds, 1)})
        log(f"{name}: {res['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]")
        write_quality(args, rows)  # after every row: a cut run keeps what it measured

    t0 = time.perf_counter()
    row("full precision", evaluate_torch(family, model, n=args.n_eval), time.perf_counter() - t0)
    comps = {"vision": parse_component_recipe(args.fmt), "projector": parse_component_recipe(args.fmt)}
    for calibrator in args.calibrators.split(","):  # each calibrator with and without saliency, side by side
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            m = copy.deepcopy(model)
            cal = calibrate(family, m, calib, Recipe(method=method, components=comps, act_calibrator=calibrator),
                            device="cpu")
            with activation_fake_quant(m, cal.layers):
                res = evaluate_torch(family, m, n=args.n_eval)
            row(f"{args.fmt} {method} {calibrator}", res, time.perf_counter() - t0)
    log(f"wrote {args.quality_out}")
    return 0


def write_quality(args, rows: list[dict]) -> None:
    lines = [f"# W8A8 quality on the testbed ({MODEL})", "",
             f"Vision encoder + projector `{args.fmt}` (per-channel weights, per-tensor activations), the language "
             f"model full precision; ShapesVQA test split, {args.n_eval} samples, greedy exact match, 95 % Wilson "
             f"intervals; {args.n_calib} built-in calibration samples. `gptq`: tokens unweighted; `vlmq`: weight "
             "calibration and activation ranges token-weighted by the VLMQ saliency. Evaluated in torch with weights "
             "and activations fake-quantized as the Q/DQ graphs compute them. Smoothing (calibrators/smooth.py) is not "
             "wired into the export yet and is not in this table.", "",
             f"Command: `nice -n 5 python tools/bench_w8a8.py --quality --n-eval {args.n_eval} --n-calib {args.n_calib}`",
             "", "| config | accuracy | 95 % interval | Δ vs FP (points) | s |", "|---|---|---|---|---|"]
    fp = rows[0]["accuracy"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['accuracy']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | "
                     f"{100 * (r['accuracy'] - fp):+.1f} | {r['seconds']:.0f} |")
    args.quality_out.write_text("\n".join(lines) + "\n")
    args.quality_out.with_name("w8a8-quality.json").write_text(json.dumps(rows, indent=1) + "\n")


def main(argv=None) -> int:
    import numpy as np
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_w8a8"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "w8a8-ort.json")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--act-calibrator", default="minmax")
    ap.add_argument("--quality", action="store_true", help="the accuracy table instead of the speed benchmark")
    ap.add_argument("--quality-out", type=Path, default=ROOT / "benchmarks" / "quality-w8a8.md")
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--fmt", default="int8")
    ap.add_argument("--methods", default="gptq,vlmq")
    ap.add_argument("--calibrators", default="minmax,percentile,entropy,mse")
    args = ap.parse_args(argv)
    if args.quality:
        return quality(args)
    out = export(args.workdir, args.act_calibrator)
    paths = {"float": {g: out / "float" / f"{g}.onnx" for g in GRAPHS}, "int8": {g: out / f"{g}.onnx" for g in GRAPHS}}
    vf = feeds()
    result = {"model": MODEL, "recipe": f"--components vision,projector --vision int8 --projector int8 --method gptq "
                                        f"--act-calibrator {args.act_calibrator}",
              "onnxruntime": ort.__version__, "cpu": platform.processor() or platform.machine(),
              "repeats": args.repeats, "load_average_at_start": os.getloadavg(), "feeds": {k: list(v.shape) for k, v in vf.items()}, "threads": {}, "fusions": {}}
    for variant, graphs in paths.items():
        opt = args.workdir / "optimized" / variant
        opt.mkdir(parents=True, exist_ok=True)
        result["fusions"][variant] = {g: {"exported": op_types(p), "optimized": op_types(_optimize(p, opt / p.name))}
                                      for g, p in graphs.items()}
    for threads in [int(t) for t in args.threads.split(",")]:
        sessions = {v: {g: session(p, threads) for g, p in graphs.items()} for v, graphs in paths.items()}
        for v in sessions:  # warm up
            for _ in range(2):
                run_pair(sessions[v], vf)
        times = {v: collections.defaultdict(list) for v in sessions}
        emb = {}
        for r in range(args.repeats):
            for v in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
                res = run_pair(sessions[v], vf)
                emb[v] = res.pop("embeds")
                for k, t in res.items():
                    times[v][k].append(t * 1000)
        row = {v: {k: {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts)} for k, ts in d.items()}
               for v, d in times.items()}
        row["float_over_int8"] = {k: row["float"][k]["median_ms"] / row["int8"][k]["median_ms"] for k in times["float"]}
        a, b = emb["float"].astype(np.float64).ravel(), emb["int8"].astype(np.float64).ravel()
        row["int8_vs_float_embeds"] = {"cosine": float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
                                       "max_abs_diff": float(np.abs(a - b).max())}
        result["threads"][str(threads)] = row
        log(f"{threads} thread(s): " + ", ".join(f"{k} float/int8 {v:.2f}x" for k, v in row["float_over_int8"].items()))
    result["load_average_at_end"] = os.getloadavg()  # the machine is shared: the timings are as noisy as this says
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0


def _optimize(path: Path, optimized: Path) -> Path:
    session(path, 1, optimized)
    return optimized


if __name__ == "__main__":
    raise SystemExit(main())
