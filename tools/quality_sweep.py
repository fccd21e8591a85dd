#!/usr/bin/env python
"""Quality sweep on the task-trained testbed: methods x bits x components, measured by task accuracy.

For every (scope, method, bits) the full-precision testbed is copied, calibrated with the pipeline's own
``calibrate`` on the built-in ShapesVQA calibration samples (group 128; the pipeline's fallback block where
a width is not a multiple of 128), and measured in torch with the fake-quantized weights (the exported
Q/DQ ONNX reproduces these to ~1e-5, which the pipeline's validation checks on every export):

* ShapesVQA exact-match accuracy on the held-out test split, overall and per question type;
* perplexity of the language model on ``vlmq_export/assets/english.txt`` and on the held-out English text
  (27k tokens, ``vlmq_export/assets/HELDOUT.md``; about 1 min per row on 2 cores, ``--no-heldout`` skips it),
  each with a 95 % per-window bootstrap interval;
* image-feature cosine, prompt-logits cosine and top-1 agreement against full precision on validation
  prompts (``validation_samples``);
* calibration wall time.

Scopes: ``llm`` (decoder Linears only), ``llm+head`` (decoder and lm_head) and ``all`` (vision encoder +
projector + decoder, same bits).
Writes ``OUT.json`` and ``OUT.md`` stamped with the commit measured. Every method's accuracy is also compared with
GPTQ's at the same scope and bits, and with full precision, sample by sample: the difference with a 95 % paired
bootstrap interval (``testbed.paired_difference``).

A method may carry saliency options (``calibrators.saliency.SaliencyConfig``): ``vlmq:exponent=2:site=linear`` is
VLMQ with g = |dL/dy|^2 measured at each Linear's own output.

Resumable: each finished row goes to ``OUT.rows.jsonl`` under a key of everything that determines it (the testbed's
stamp, the calibration and evaluation settings, the scope, method and bits); a rerun with the same settings reads
those rows back instead of measuring them again, so a sweep killed after hours continues where it stopped.

    python tools/quality_sweep.py [--model builtin:shapes-smolvlm] [--methods rtn,gptq,vlmq]
                                  [--bits 4,3,2] [--scopes llm,all] [--n-eval 200] [--n-calib 32]
                                  [--calib-text 0] [--sink-weight 1] [--no-act-order] [--no-heldout]
                                  [--out benchmarks/quality]

    nohup nice -n 19 python tools/quality_sweep.py --methods rtn,gptq,gptaq,mbq,vlmq --bits 4,3,2 \
        --scopes llm,all --no-act-order --out benchmarks/quality > /tmp/sweep.log 2>&1 &   # (rerun: resumes)
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SCOPES = {"llm": ("llm",), "llm+head": ("llm", "lm_head"), "all": ("vision", "projector", "llm")}


def measure(family, model, ref_outputs, val, heldout: bool, n_eval: int, layout: str = "free",
            teacher_forced: bool = False) -> dict:
    from vlmq_export.testbed import evaluate_torch, evaluate_torch_teacher_forced
    from vlmq_export.validate.compare import compare, torch_outputs
    from vlmq_export.validate.perplexity import lm_perplexity

    acc = (evaluate_torch_teacher_forced if teacher_forced else evaluate_torch)(family, model, n=n_eval, layout=layout)
    row = {**{k: acc[k] for k in ("accuracy", "ci95", "per_qtype", "per_qtype_ci95", "correct", "n", "n_per_qtype",
                                  "outcomes")},
           "n_eval": acc["n"],
           **lm_perplexity(model, family.tokenizer, heldout)}
    if ref_outputs is not None:
        c = compare(ref_outputs, torch_outputs(family, model, val))
        row.update({k: c.get(k) for k in ("image_features_cosine", "logits_cosine", "top1_agreement")})
    return row


def parse_method(spec: str):
    """``"vlmq:exponent=2:site=linear"`` -> ("vlmq", {"exponent": 2.0, "site": "linear"}) (numbers as floats)."""
    name, *opts = spec.split(":")
    out = {}
    for o in opts:
        k, sep, v = o.partition("=")
        if not sep:
            raise SystemExit(f"method option {o!r} in {spec!r}: expected name=value")
        try:
            out[k] = float(v)
        except ValueError:
            out[k] = v
    return name, out


class RowCache:
    """Finished rows in ``OUT.rows.jsonl``, keyed by everything that determines them (see the module doc)."""

    def __init__(self, path: Path, common: dict):
        self.path, self.common, self.rows = path, common, {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                self.rows[rec["key"]] = rec["row"]

    def key(self, **what) -> str:
        return hashlib.sha256(json.dumps({**self.common, **what}, sort_keys=True).encode()).hexdigest()[:24]

    def get(self, **what):
        return self.rows.get(self.key(**what))

    def put(self, row: dict, **what) -> None:
        k = self.key(**what)
        self.rows[k] = row
        with self.path.open("a") as fh:
            fh.write(json.dumps({"key": k, "what": what, "row": row}) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:shapes-smolvlm")
    ap.add_argument("--methods", default="rtn,gptq,vlmq")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--scopes", default="llm,all")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=1000,
                    help="ShapesVQA test samples per configuration (default 1000: 95 %% Wilson interval about +-0.03)")
    ap.add_argument("--eval", choices=("greedy", "teacher-forced"), default="greedy",
                    help="task accuracy by greedy generation, or token-exact from one batched forward pass per sample "
                         "(testbed.evaluate_torch_teacher_forced: same outcomes on 48 of 48 testbed samples, 1.7x faster)")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--calib-text", type=int, default=0,
                    help="add this many text-only sequences sampled from the full-precision model (as --calib-text)")
    ap.add_argument("--calib-text-tokens", type=int, default=400)
    ap.add_argument("--n-val", type=int, default=4, help="validation prompts for the cosine metrics")
    ap.add_argument("--sink-weight", type=float, default=1.0, help="the first token's weight in the LM's Hessians")
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                    help="GPTQ-family columns by decreasing Hessian diagonal (default on, as the pipeline)")
    ap.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=False,
                    help="inside each block, calibrate the layer groups (q/k/v, o, gate/up, down) one after the other")
    ap.add_argument("--heldout", action=argparse.BooleanOptionalAction, default=True,
                    help="also the perplexity on the held-out English text (default on)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/quality")
    args = ap.parse_args(argv)

    import torch

    from vlmq_export.calibrate import ComponentRecipe, Recipe, calibrate
    from vlmq_export.data.loader import load_samples
    from vlmq_export.models import load_family
    from vlmq_export.pipeline import prepare_all, validation_samples
    from vlmq_export.sources import resolve_model
    from vlmq_export.testing.machine import machine_stamp
    from vlmq_export.calibrators.saliency import SaliencyConfig
    from vlmq_export.testbed import format_accuracy, format_interval, paired_difference, testbed_layout
    from vlmq_export.validate.compare import torch_outputs
    from vlmq_export.validate.perplexity import format_perplexity

    torch.set_num_threads(args.threads)
    # the code measured: stamped before the (long) run, so edits made meanwhile do not count
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip())
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.time()
    path = resolve_model(args.model)
    layout = testbed_layout(path)  # the ShapesVQA layout the testbed was trained on
    family = load_family(path)
    base = family.load_model(path)
    calib = load_samples("builtin:shapes", limit=args.n_calib, layout=layout)
    if args.calib_text:
        from vlmq_export.data.generated import generated_text_samples

        calib = calib + generated_text_samples(family, base, args.calib_text, args.calib_text_tokens)
    val = prepare_all(family, validation_samples(args.n_val, layout), with_answer=False)
    ref = torch_outputs(family, base, val)

    stamp = path / "testbed.json"
    cache = RowCache(Path(args.out).with_suffix(".rows.jsonl"), {
        "model": args.model, "testbed": stamp.read_text() if stamp.is_file() else None, "layout": layout,
        "group": args.group, "n_eval": args.n_eval, "n_calib": args.n_calib, "calib_text": args.calib_text,
        "calib_text_tokens": args.calib_text_tokens, "n_val": args.n_val, "eval": args.eval, "sink_weight": args.sink_weight,
        "act_order": args.act_order, "true_sequential": args.true_sequential, "heldout": args.heldout})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    fp = cache.get(scope="-", method="fp", bits=16)
    if fp is None:
        fp = {"scope": "-", "method": "fp", "bits": 16, "calib_s": 0.0, "commit": commit,
              **measure(family, base, None, val, args.heldout, args.n_eval, layout, args.eval == "teacher-forced")}
        cache.put(fp, scope="-", method="fp", bits=16)
    log(f"fp: {format_accuracy(fp)}, "
        f"ppl {fp['perplexity']:.2f}")
    rows = [fp]
    for scope in args.scopes.split(","):
        for bits in (int(b) for b in args.bits.split(",")):
            for spec in args.methods.split(","):
                method, sal = parse_method(spec)
                row = cache.get(scope=scope, method=spec, bits=bits)
                if row is None:
                    model = copy.deepcopy(base)
                    recipe = Recipe(method=method, components={c: ComponentRecipe(bits, args.group) for c in SCOPES[scope]},
                                    sink_weight=args.sink_weight, act_order=args.act_order,
                                    true_sequential=args.true_sequential, saliency=SaliencyConfig(**sal))
                    t0 = time.perf_counter()
                    calibrate(family, model, calib, recipe, device="cpu")
                    calib_s = time.perf_counter() - t0
                    row = {"scope": scope, "method": spec, "bits": bits, "calib_s": calib_s, "commit": commit,
                           **measure(family, model, ref, val, args.heldout, args.n_eval, layout,
                                     args.eval == "teacher-forced")}
                    cache.put(row, scope=scope, method=spec, bits=bits)
                    del model
                else:
                    log(f"{scope} {spec} W{bits}: from {cache.path.name} (measured at {row.get('commit')})")
                rows.append(row)
                log(f"{scope} {spec} W{bits}: acc {row['accuracy']:.3f} {format_interval(row['ci95'])} ppl {row['perplexity']:.2f} "
                    f"img cos {row.get('image_features_cosine') or float('nan'):.4f} ({row['calib_s']:.0f}s calibration)")
    for r in rows[1:]:  # sample by sample against GPTQ at the same scope and bits, and against full precision
        gptq = next((g for g in rows if g["method"] == "gptq" and (g["scope"], g["bits"]) == (r["scope"], r["bits"])), None)
        if gptq is not None and gptq is not r and "outcomes" in r and "outcomes" in gptq:
            r["vs_gptq"] = paired_difference(r["outcomes"], gptq["outcomes"])
        if "outcomes" in r and "outcomes" in fp:
            r["vs_fp"] = paired_difference(r["outcomes"], fp["outcomes"])

    result = {"model": args.model, "commit": commit, "dirty": dirty, "group_size": args.group,
              "n_calib": args.n_calib, "calib_text": args.calib_text, "calib_text_tokens": args.calib_text_tokens,
              "n_eval": args.n_eval, "threads": args.threads, "sink_weight": args.sink_weight,
              "act_order": args.act_order, "true_sequential": args.true_sequential, "machine": machine_stamp(),
              "seconds": time.time() - t_start, "commits": sorted({r.get("commit") or "?" for r in rows}), "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    qtypes = sorted(fp["per_qtype"])
    lines = [f"# Quality sweep: {args.model}", "",
             f"Commit {commit}{' (with uncommitted changes)' if dirty else ''}. ShapesVQA exact match on "
             f"{args.n_eval} test samples (torch, fake-quantized weights, "
             + ("greedy generation" if args.eval == "greedy" else "token-exact teacher-forced: greedy's outcome without "
                "the decode loop") + "; [95 % Wilson interval]), perplexity on the English text"
             + (" and on the held-out English text (95 % per-window bootstrap interval)" if args.heldout else "")
             + ", cosines "
             f"against full precision on {args.n_val} validation prompts. Calibration: {args.n_calib} built-in "
             f"ShapesVQA samples"
             + (f" + {args.calib_text} text sequences of {args.calib_text_tokens} tokens sampled from the model"
                if args.calib_text else "") + f", group {args.group}, symmetric weight-only"
             + (f", first token weighted {args.sink_weight:g} in the Hessians (`--sink-weight`)" if args.sink_weight != 1.0 else "")
             + (", columns in activation order (`--act-order`, the default)" if args.act_order else ", original column order (`--no-act-order`)")
             + (", layer groups calibrated in turn inside each block (`--true-sequential`)" if args.true_sequential else "")
             + ". Scope `llm`: decoder only; `llm+head`: "
             "decoder and lm_head; `all`: vision encoder + projector + decoder. "
             "Δ: the accuracy's difference with GPTQ's at the same scope and bits / with full precision's, on the same "
             "samples, [95 % paired bootstrap interval] (an interval that holds 0 is a tie)."
             + (f" Rows measured at commits {', '.join(result['commits'])} (read back from {cache.path.name})."
                if len(result["commits"]) > 1 else ""), "",
             "| scope | method | bits | accuracy | Δ GPTQ | Δ FP | " + " | ".join(qtypes) + " | perplexity | "
             + ("held-out perplexity [95 %] | " if args.heldout else "") + "image cos | logits cos | top-1 | calibration s |",
             "|---|---|---|---|---|---|" + "---|" * len(qtypes) + "---|" * (6 if args.heldout else 5)]
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    delta = lambda d: "-" if d is None else f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['scope']} | {r['method']} | {r['bits']} | {f(r['accuracy'])} {format_interval(r['ci95'])} | "
                     f"{delta(r.get('vs_gptq'))} | {delta(r.get('vs_fp'))} | "
                     + " | ".join(f"{f(r['per_qtype'].get(q), 2)} {format_interval(r['per_qtype_ci95'].get(q))}"
                                  for q in qtypes)
                     + f" | {f(r['perplexity'], 2)} | "
                     + (f"{format_perplexity(r['perplexity_texts']['heldout'], detail=False)} | " if args.heldout else "")
                     + f"{f(r.get('image_features_cosine'), 4)} | "
                       f"{f(r.get('logits_cosine'), 4)} | {f(r.get('top1_agreement'))} | {r['calib_s']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
