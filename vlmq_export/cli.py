"""Command line: a thin shell over the pipeline's functions.

    vlmq-export MODEL --int4 [-o OUT] [--method gptq|rtn] [--target tensorrt] [--dtype fp16] [--calib DATA] ...
    vlmq-export run OUT --image IMG --prompt "..." [--backend onnxruntime|tensorrt]
    vlmq-export validate OUT [--model DIR] [--backend ...]
    vlmq-export serve OUT [--host 127.0.0.1] [--port 8000] [--backend ...]
    vlmq-export lint OUT [--target onnxruntime|tensorrt|jetson-orin|jetson-thor]
    vlmq-export build OUT [--target tensorrt|jetson-orin|jetson-thor] [--max-context C] ...
    vlmq-export eval OUT [--torch]
    vlmq-export inspect OUT [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

VERBS = ("run", "serve", "validate", "lint", "eval", "inspect", "build")


def _export_parser() -> argparse.ArgumentParser:
    from .recipe import CALIB_PROMPT_TOKENS

    p = argparse.ArgumentParser(prog="vlmq-export", description=(
        "Quantize a vision-language model post-training and export it to ONNX (INT4 Q/DQ). "
        f"Other verbs: {', '.join(VERBS)} (vlmq-export VERB -h)."))
    p.add_argument("model", help="local Hugging Face model directory, hub id, builtin:shapes-smolvlm (the task-trained testbed), or builtin:tiny-qwen2-vl / builtin:tiny-smolvlm (random, tiny)")
    prec = p.add_mutually_exclusive_group()
    for bits in (4, 3, 2):
        prec.add_argument(f"--int{bits}", dest="bits", action="store_const", const=bits,
                          help=f"W{bits}A16 weight-only ({'default; ' if bits == 4 else ''}stored in INT4 containers)")
    prec.add_argument("--int8", dest="bits", action="store_const", const=8, help="W8A8 (not available yet)")
    prec.add_argument("--fp8", dest="bits", action="store_const", const="fp8", help="FP8 (not available yet)")
    p.add_argument("-o", "--output", help="output directory (default: ./<model>-<method>-w<bits>)")
    p.add_argument("--method", default="vlmq",
                   help="weight calibration: vlmq (default; GPTQ with per-token gradient saliency), gptq, gptaq, "
                        "mbq (modality-balanced weights), rtn")
    p.add_argument("--group-size", type=int, default=128,
                   help="block along the input dimension for --intN (default 128; -1 per output channel)")
    p.add_argument("--components", default="llm",
                   help="comma-separated components to quantize: vision, projector, llm, lm_head (default: llm)")
    head_default = ("the target's where the decoder is quantized: w8g64 for onnxruntime, float for TensorRT; "
                    "from --intN with --components lm_head; none: float")
    for comp, default in (("vision", "w8"), ("projector", "w8"), ("llm", None), ("lm_head", head_default)):
        p.add_argument(f"--{comp.replace('_', '-')}", dest=comp, metavar="wB[gG|pc]",
                       help=f"{comp} precision, e.g. w4, w4g64, w8pc, or int8 / fp8 for W8A8 (implies --components {comp}; "

                            f"default {default or 'from --intN'})"
                            + ("; ONNX Runtime runs w4 fast at any accuracy level, w8g<G> only at the default "
                               "--accuracy-level 4; measured: benchmarks/lm-head.md" if comp == "lm_head" else ""))
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of mean diag(H) (default 0.01)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ-family column order by decreasing diag(H), group scales static from the original weight "
                        "(default on; SmolLM2-135M W4 perplexity GPTQ 30.8 -> 26.5, VLMQ 32.4 -> 27.4, FP 22.2; "
                        "--no-act-order: the original column order)")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction,
                   help="GPTQ-family: inside each block, calibrate the layers that read one tensor (q/k/v, o, "
                        "gate/up, down) one group after the other, each on inputs through the already-quantized "
                        "groups (off: all layers of a block see the float block's inputs; default: the target's, see --target)")
    p.add_argument("--clip-search", action=argparse.BooleanOptionalAction,
                   help="choose each group's scale by a search over clipped ranges instead of max|w|, scored by "
                        "sum_j H_jj (w_j - w_hat_j)^2 for the GPTQ-family methods (the Hessian diagonal: columns the "
                        "calibration data drives hardest count most), sum |w - w_hat|^2.4 for rtn (default: the target's)")
    p.add_argument("--asym", action=argparse.BooleanOptionalAction,
                   help="2- to 4-bit weights on an unsigned grid with a zero point per group (UINT4 + zero point in the "
                        "ONNX): ONNX Runtime only, TensorRT takes symmetric INT4 only (default: the target's, asymmetric for "
                        "onnxruntime; 8-bit weights stay symmetric)")
    p.add_argument("--sym-grid", choices=("half", "extreme", "search"),
                   help="the symmetric INT4 scale of each block: half (max|w| / (qmax + 1/2): both extremes half a "
                        "step off a code), extreme (the larger of max(w+) / qmax and max(w-) / (qmax + 1): the "
                        "block's extreme exactly on a code, positive scale, no zero point) or search (the extreme's "
                        "scale x 0.90..1.10, the smallest block error); default: the target's (see --target)")
    p.add_argument("--sink-weight", type=float,
                   help="weight of each sequence's first token (the attention sink) in the language model's Hessians "
                        "(1: every token alike; default: the target's, 10 for every target; 10 took SmolLM2-135M GPTQ W4 from perplexity 30.8 to 28.0 in the "
                        "original column order, 26.5 to 25.9 with act-order, FP 22.2; mixed on the ShapesVQA testbed, "
                        "see the README)")
    p.add_argument("--gptaq-alpha", type=float, default=0.25,
                   help="--method gptaq: weight of the asymmetric correction (0 = GPTQ, 1 = the exact least-squares "
                        "target, which over-fits on models with massive activations; default 0.25 as in GPTAQ's code)")
    p.add_argument("--act-calibrator", choices=("minmax", "percentile", "entropy", "mse"), default="minmax",
                   help="W8A8 components (--vision int8, --projector fp8, ...): how each Linear input's per-tensor range "
                        "is chosen, token-weighted by the saliency for vlmq / mbq (default minmax; percentile 99.999, "
                        "entropy: KL as ONNX Runtime / TensorRT, mse: least squared error on the format's grid)")
    p.add_argument("--smooth", action="store_true",
                   help="W8A8 components: per-channel smoothing scales first (SmoothQuant's form, the migration "
                        "strength chosen per layer by the saliency-weighted output error, none where it does not help), "
                        "folded into the preceding norm where exact, else a Mul in the graph; recorded per layer")
    p.add_argument("--reduce-range", action="store_true",
                   help="int8 W8A8 components: 7-bit weights (codes in [-64, 63] in INT8 containers), as ONNX Runtime's "
                        "quantizer's reduce_range, so its u8s8 kernels on x86 CPUs without VNNI (AVX2 only) cannot "
                        "saturate their 16-bit pair sums; costs one bit of weight precision")
    s = p.add_argument_group("saliency (vlmq, mbq)")
    s.add_argument("--saliency-norm", default="l2", choices=("l2", "l1", "linf"), help="per-token gradient norm (default l2)")
    s.add_argument("--saliency-scope", default="sample", choices=("sample", "layer"),
                   help="normalise factors to mean 1 per sample (default) or per layer over all samples")
    s.add_argument("--saliency-floor", type=float, default=0.01, help="lower bound of a factor after normalising (default 0.01)")
    s.add_argument("--saliency-exponent", type=float, default=1.0, help="g = norm^exponent (default 1)")
    s.add_argument("--saliency-site", default="block", choices=("block", "linear"),
                   help="gradient at each decoder block's output (default) or at each Linear's output")
    s.add_argument("--grad-checkpointing", action="store_true", help="bound the backward pass's memory")
    p.add_argument("--calib", help="calibration data: a JSONL of {image(s), prompt, answer?}, a folder holding one, "
                                   "or builtin / builtin:shapes / builtin:photos (default: builtin)")
    p.add_argument("--n-calib", type=int, default=16, help="calibration samples to use (default 16)")
    p.add_argument("--calib-text", type=int, default=0, metavar="N",
                   help="also calibrate on N text-only sequences sampled from the full-precision model itself "
                        "(data-free; keeps the language model's general text ability in the calibration; default 0)")
    p.add_argument("--calib-text-tokens", type=int, default=400, metavar="T",
                   help="tokens per --calib-text sequence (default 400)")
    p.add_argument("--calib-prompt-tokens", type=int, default=CALIB_PROMPT_TOKENS, metavar="T",
                   help="each calibration prompt's text is cut to its first T tokens (at most the model's context) "
                        f"before the model labels or sees it (default {CALIB_PROMPT_TOKENS})")
    p.add_argument("--no-validate", action="store_true", help="skip the fidelity checks")
    p.add_argument("--n-val", type=int, default=4, help="held-out validation prompts (default 4)")
    p.add_argument("--gen-tokens", type=int, default=16, help="greedy tokens compared in validation (default 16)")
    p.add_argument("--keep-float", action="store_true", help="keep the float ONNX graphs in OUT/float")
    p.add_argument("--eval-task", type=int, metavar="N",
                   help="ShapesVQA task accuracy on N test samples, torch full precision and exported ONNX "
                        "(default: 100 for builtin:shapes-* models, else off)")
    p.add_argument("--device", help="calibration device (default: cuda when available, else cpu)")
    p.add_argument("--target", default="onnxruntime", metavar="T",
                   help="where the graphs will run: onnxruntime (default), tensorrt, jetson-orin, jetson-thor; "
                        "refuses what the target cannot take (--asym, INT4 blocks other than 64 and 128 for TensorRT); "
                        "sets the weight recipe's defaults (onnxruntime: --asym --true-sequential --sink-weight 10 "
                        "--clip-search; TensorRT: symmetric, --sym-grid extreme --true-sequential --sink-weight 10 "
                        "--clip-search), each overridden by its own flag")
    p.add_argument("--dtype", metavar="fp16|fp32",
                   help="the graphs' float type (activations, INT4 scales, float inputs and outputs); default: fp16 "
                        "for the TensorRT targets, fp32 for onnxruntime (its CPU kernels run FP16 slowly)")
    p.add_argument("--llm-graph", choices=("ort", "portable"),
                   help="the language model's graph: ort (ONNX Runtime's fused attention with an in-place KV cache, "
                        "merged q/k/v and gate/up; --target onnxruntime, Llama decoders) or portable (standard ops, "
                        "what TensorRT takes); default: ort where it can be built, else portable")
    _output_flags(p)
    return p


def _output_flags(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", action="store_true", help="no progress output")
    g.add_argument("--json", action="store_true", help="progress and result as JSON lines")


def _progress(args):
    from transformers.utils import logging as hf_logging

    from .progress import Progress

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return Progress("quiet" if args.quiet else "json" if args.json else "human")


def _check_export_args(args) -> tuple[dict, Path]:
    """Every check argv alone allows, before torch and transformers load (a second's work, not twenty):
    the recipe's numbers and syntax, what the target takes, the device name, and that OUT can be written.
    Returns the components' recipes and OUT; sets ``args.dtype`` to the graphs' dtype."""
    from .errors import VlmqError
    from .outdir import check_writable
    from .recipe import (COMPONENTS, ComponentRecipe, check_device, check_group_size, check_recipe_values,
                         check_saliency_values, check_target, default_out, parse_component_recipe)
    from .export.ort_flavour import choose_llm_graph

    args.target_defaults = apply_target_defaults(args)
    bits = args.bits or 4
    if bits in (8, "fp8"):
        raise VlmqError(f"--{'fp8' if bits == 'fp8' else 'int8'} is not available yet; use --int4, --int3 or --int2")
    if args.n_calib < 1:
        raise VlmqError("--n-calib must be at least 1")
    if args.calib_text < 0 or args.calib_text_tokens < 8:
        raise VlmqError("--calib-text must be >= 0 and --calib-text-tokens >= 8")
    if args.calib_prompt_tokens < 1:
        raise VlmqError("--calib-prompt-tokens must be at least 1")
    if args.n_val < 1 or args.gen_tokens < 1:
        raise VlmqError("--n-val and --gen-tokens must be at least 1")
    if args.eval_task is not None and args.eval_task < 0:
        raise VlmqError("--eval-task must be >= 0")
    check_group_size(args.group_size)
    listed = {c.strip() for c in args.components.split(",") if c.strip()}
    if "lm_head" in listed and args.target_defaults.pop("lm_head", None):
        args.lm_head = None  # a head in --components follows --intN, not the target's default
    if (args.lm_head or "").strip().lower() == "none":  # a float head, whatever the target's default
        args.lm_head = None
        listed.discard("lm_head")
    comps = listed | {c for c in COMPONENTS if getattr(args, c)}
    unknown = sorted(comps - set(COMPONENTS))
    if unknown:
        raise VlmqError(f"unknown component '{unknown[0]}'; components: {', '.join(COMPONENTS)}")
    llm_default = ComponentRecipe(bits, args.group_size)
    components = {c: parse_component_recipe(getattr(args, c), args.group_size) if getattr(args, c)
                  else llm_default if c in ("llm", "lm_head") else parse_component_recipe("w8")
                  for c in COMPONENTS if c in comps}
    if args.reduce_range:
        int8 = [c for c, r in components.items() if r.act == "int8"]
        if not int8:
            raise VlmqError("--reduce-range applies to int8 W8A8 components (e.g. --vision int8); none was asked for")
        for c in int8:
            components[c] = ComponentRecipe(7, -1, "int8")
    llm = components.get("llm")
    if "lm_head" in args.target_defaults and (llm is None or llm.act or llm.bits > 4):
        # the target's 8-bit head goes with a quantized weight-only INT2-4 decoder (what it was measured with): not
        # without the decoder, nor with a W8A8 or 8-bit one
        components.pop("lm_head", None)
        args.target_defaults.pop("lm_head")
        args.lm_head = None
    if args.target_defaults.get("asym") and all(c.bits > 4 for c in components.values()):
        args.asym = args.target_defaults["asym"] = False  # a default: 8-bit weights stay symmetric, no error
    check_recipe_values(args.method, components, not args.asym, args.damp, args.gptaq_alpha, args.sink_weight)
    args.dtype, warnings = check_target(args.target, args.dtype, components, not args.asym)
    for w in warnings:
        print(f"vlmq-export: warning: {w}", file=sys.stderr)
    check_saliency_values(args.saliency_floor, args.saliency_exponent)
    check_device(args.device)
    choose_llm_graph(args.llm_graph, args.target, args.dtype)  # the family is checked once its config is read
    out = Path(args.output) if args.output else default_out(args.model, args.method, components, not args.asym)
    check_writable(out)
    return components, out


def apply_target_defaults(args) -> dict:
    """Fill the recipe options left unset on the command line with ``--target``'s measured defaults
    (``targets.RECIPE_DEFAULTS``); explicit flags win. Returns what was filled."""
    from .targets import recipe_defaults

    filled = {k: v for k, v in recipe_defaults(args.target).items() if getattr(args, k) is None}
    for k, v in filled.items():
        setattr(args, k, v)
    return filled


def cmd_export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    components, out = _check_export_args(args)
    import importlib.util

    from .errors import VlmqError

    missing = [m for m in ("torch", "transformers", "onnxscript", "onnx_ir", "safetensors")
               if importlib.util.find_spec(m) is None]
    if missing:  # a runtime-only install (run, serve, lint, build, inspect)
        raise VlmqError(f"exporting needs {', '.join(missing)}: install the quantize extra "
                        "(pip install 'vlmq-export[quantize]')")
    from .calibrate import Recipe
    from .calibrators.saliency import SaliencyConfig
    from .pipeline import Options, export_model

    recipe = Recipe(method=args.method, components=components, damp=args.damp, act_order=args.act_order,
                    gptaq_alpha=args.gptaq_alpha, clip_search=args.clip_search, sink_weight=args.sink_weight,
                    true_sequential=args.true_sequential, sym=not args.asym, sym_grid=args.sym_grid,
                    act_calibrator=args.act_calibrator, smooth=args.smooth,
                    saliency=SaliencyConfig(norm=args.saliency_norm, scope=args.saliency_scope,

                                            floor=args.saliency_floor, exponent=args.saliency_exponent,
                                            site=args.saliency_site, checkpointing=args.grad_checkpointing))
    opts = Options(calib=args.calib, n_calib=args.n_calib, calib_text=args.calib_text,
                   calib_text_tokens=args.calib_text_tokens, calib_prompt_tokens=args.calib_prompt_tokens,
                   n_val=args.n_val, gen_tokens=args.gen_tokens,
                   validate=not args.no_validate, keep_float=args.keep_float, device=args.device,
                   eval_task=args.eval_task, dtype=args.dtype, target=args.target, llm_graph=args.llm_graph)
    head = components.get("lm_head")
    if head is not None and head.bits == 8 and "lm_head" not in args.target_defaults:  # asked for, not the default
        print("note: ONNX Runtime's CPU kernel for an 8-bit lm_head is fast only at accuracy level 4 "
              "(the default of `run`); at level 0 (`run --accuracy-level 0`) it is slower than float.", file=sys.stderr)
    progress = _progress(args)
    out = export_model(args.model, out, recipe, opts, progress)
    if args.target_defaults and not (args.quiet or args.json):  # after the export: an error stays one line
        flags = (f"--{'' if v is not False else 'no-'}{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}")
                 for k, v in args.target_defaults.items())
        print(f"recipe: --target {args.target} defaults {' '.join(flags)} (measured: benchmarks/grid.md; "
              "explicit flags override)", file=sys.stderr)
    manifest = json.loads((out / "manifest.json").read_text())
    v = manifest.get("validation", {})
    report_json = out / "report" / "validation.json"  # absent with --no-validate
    verdict = json.loads(report_json.read_text()).get("verdict", {}) if report_json.is_file() else {}
    failed = [g for g in verdict.get("gates", []) if g["result"] == "fail"]
    if args.json:
        print(json.dumps({"output": str(out), "validation": v, "verdict": verdict.get("result")}))
    elif not args.quiet:
        print(f"\nwrote {out}")
        if verdict:
            print(f"  verdict: {verdict['result'].upper()} ({len(verdict['gates'])} gates, "
                  f"{len(verdict.get('outlier_layers', []))} outlier layers; report.md / report.html)")
        sizes = {c: manifest["components"][c] for c in manifest["components"]}
        llm = sizes["llm"]
        print(f"  llm.onnx {llm['bytes'] / 1e6:.2f} MB (float {llm['float_bytes'] / 1e6:.2f} MB)")
        for k in ("logits_cosine", "top1_agreement", "greedy_token_agreement", "image_features_cosine",
                  "qdq_max_abs_diff", "qdq_fp16_logits_cosine", "fp16_vs_fp32_top1_agreement",
                  "fp16_vs_fp32_greedy_token_agreement", "task_accuracy_torch_full_precision", "task_accuracy_onnx_quantized",
                  "task_accuracy_recorded_full_precision", "int4_form_ok", "ort_fused_all"):
            if k in v:
                print(f"  {k}: {v[k]:.4f}" if isinstance(v[k], float) else f"  {k}: {v[k]}")
        print(f"  report: {out / 'report' / 'report.md'}")
    if failed:  # the export itself succeeded (exit 0); `vlmq-export validate OUT` exits 1 on the same gates
        print("vlmq-export: warning: validation failed: " + "; ".join(
            f"{g['label']} = {g['value']:.4g} ({g['threshold']})" if isinstance(g["value"], float) else g["label"]
            for g in failed) + " (see the report before shipping)", file=sys.stderr)
    return 0


def _accuracy_level_flag(p: argparse.ArgumentParser) -> None:
    from .runtime.session import DEFAULT_ACCURACY_LEVEL

    p.add_argument("--accuracy-level", type=int, default=DEFAULT_ACCURACY_LEVEL, choices=(0, 1, 2, 3, 4),
                   help=f"INT4 MatMulNBits compute on CPU: 4 int8 activations (ONNX Runtime's default and ours: "
                        f"fast), 0 float (slower; matches torch fake-quant exactly). Default {DEFAULT_ACCURACY_LEVEL}")


def _backend_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"),
                   help="onnxruntime (default) or tensorrt: the engines `vlmq-export build OUT` made on this machine "
                        "(needs TensorRT and Polygraphy)")


def _verify_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the graphs against their sha256 in the manifest (about 0.2 s per 200 MB)")


def _limit_flags(p: argparse.ArgumentParser) -> None:
    from .runtime.limits import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES

    p.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                   help=f"most images per prompt (default {DEFAULT_MAX_IMAGES})")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help=f"most pixels per image, checked from its header before decoding (default "
                        f"{DEFAULT_MAX_IMAGE_PIXELS} = 4096x4096)")


def _check_limit_flags(args) -> None:
    from .errors import VlmqError

    if args.max_images < 0 or args.max_image_pixels < 1:
        raise VlmqError("--max-images must be >= 0 and --max-image-pixels >= 1")


def cmd_run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vlmq-export run", description=(
        "Generate text from image(s) + a prompt with ONNX Runtime. A prompt (text and image tokens) that fills "
        "the model's context is refused; --max-new-tokens is clamped to the context it leaves."))
    p.add_argument("out", help="a vlmq-export output directory")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample, in [0, 2] (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="with --sample, 0 (all) up to the vocabulary size")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample, in (0, 1]")
    p.add_argument("--seed", type=int, help="with --sample, >= 0")
    p.add_argument("--no-stop", action="store_true", help="ignore stop tokens (always generate max-new-tokens)")
    _accuracy_level_flag(p)
    _backend_flag(p)
    _limit_flags(p)
    _verify_flag(p)
    p.add_argument("--tokens", action="store_true", help="print the generated token ids at the end")
    _output_flags(p)
    args = p.parse_args(argv)
    from .data.loader import open_image
    from .outdir import check_complete
    from .runtime import limits
    from .runtime.generate import OnnxVLM

    # every check the server makes too (runtime/limits.py), before any graph is read
    _check_limit_flags(args)
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    limits.check_prompt(args.prompt, "--prompt")
    limits.check_image_count(len(args.image), args.max_images)
    limits.check_generation({name: getattr(args, name) for name in limits.RANGES}, label=flag)
    check_complete(Path(args.out), verify_hashes=not args.no_verify)
    vlm = OnnxVLM(args.out, accuracy_level=args.accuracy_level, backend=args.backend)
    limits.check_generation({"top_k": args.top_k}, vlm.vocab_size, label=flag)
    images = [open_image(Path(i), args.max_image_pixels) for i in args.image]
    stream = None if (args.json or args.quiet) else (lambda s: print(s, end="", flush=True))
    res = vlm.generate(images, args.prompt, max_new_tokens=args.max_new_tokens, sample=args.sample,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       stop=not args.no_stop, on_text=stream)
    if args.json:
        print(json.dumps({"text": res.text, "token_ids": res.token_ids, "prompt_tokens": res.prompt_tokens,
                          "prefill_s": res.prefill_s, "decode_tokens_per_s": res.decode_tokens_per_s}))
    else:
        if stream is None:
            print(res.text)
        else:
            print()
        if args.tokens:
            print("tokens:", " ".join(map(str, res.token_ids)))
        if not args.quiet:
            rate = f" at {res.decode_tokens_per_s:.1f} tok/s" if len(res.token_ids) > 1 else ""
            print(f"[{res.prompt_tokens} prompt tokens, prefill {res.prefill_s * 1e3:.0f} ms, "
                  f"{len(res.token_ids)} new tokens{rate}, " + (f"accuracy level {args.accuracy_level}]"
                  if args.backend == "onnxruntime" else "TensorRT]"), file=sys.stderr)
    return 0


def cmd_serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vlmq-export serve", description=(
        "Serve an output directory over HTTP with ONNX Runtime: POST /v1/chat/completions (the OpenAI chat API: "
        "one user message with text and base64 data: URL images, max_tokens, temperature, top_p, seed, stream), "
        "GET /v1/models, GET /health."))
    p.add_argument("out", help="a vlmq-export output directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--max-tokens-limit", type=int, default=1024,
                   help="largest max_tokens a request may ask for (default 1024)")
    _accuracy_level_flag(p)
    _backend_flag(p)
    _limit_flags(p)
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a connection may send nothing (before or inside a request) before it is closed "
                        "(default 30; 0: never)")
    p.add_argument("--max-batch", type=int, default=4,
                   help="requests decoded together at most: one that arrives while others decode joins their batch "
                        "(default 4; 1: one generation at a time)")
    _verify_flag(p)
    p.add_argument("--quiet", action="store_true", help="no start-up line and no request log")
    args = p.parse_args(argv)
    from .runtime.server import serve

    if not 0 <= args.port <= 65535:
        p.error(f"--port must be in 0..65535, got {args.port}")
    if args.max_tokens_limit < 1:
        p.error("--max-tokens-limit must be at least 1")
    _check_limit_flags(args)
    if not args.timeout >= 0:  # NaN too
        p.error("--timeout must be >= 0")
    if args.max_batch < 1:
        p.error("--max-batch must be at least 1")
    serve(args.out, args.host, args.port, accuracy_level=args.accuracy_level, max_tokens_limit=args.max_tokens_limit,
          quiet=args.quiet, verify=not args.no_verify, timeout=args.timeout or None, max_images=args.max_images,
          max_image_pixels=args.max_image_pixels, backend=args.backend, max_batch=args.max_batch)
    return 0


def cmd_validate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vlmq-export validate",
                                description="Check a complete output directory against its full-precision source model "
                                            "and update its report. Exit 1 when a gate of the report's verdict fails.")
    p.add_argument("out")
    p.add_argument("--model", help="source model (default: the path recorded in the manifest)")
    p.add_argument("--n-val", type=int, default=4)
    p.add_argument("--gen-tokens", type=int, default=16)
    _backend_flag(p)
    _output_flags(p)
    args = p.parse_args(argv)
    from .pipeline import validate_output
    from .validate import gates

    v = validate_output(args.out, args.model, args.n_val, args.gen_tokens, _progress(args), backend=args.backend)
    rows = gates.evaluate(v)
    print(json.dumps({**v, "gates": gates.overall(rows)}, indent=None if args.json else 2))
    for r in rows:
        if r["result"] == "fail":
            print(f"vlmq-export validate: gate failed: {r['label']}: {r['value']} ({r['threshold']})", file=sys.stderr)
    return 1 if any(r["result"] == "fail" for r in rows) else 0


def cmd_lint(argv: list[str]) -> int:
    from .targets import TARGETS
    from .validate.lint import format_lint, lint_output

    p = argparse.ArgumentParser(prog="vlmq-export lint", description=(
        "Check an output directory's graphs against a deployment target's rules, statically and without the "
        "source model. Exit 0 when no target has a problem."))
    p.add_argument("out")
    p.add_argument("--target", action="append", choices=tuple(TARGETS),
                   help=f"{', '.join(TARGETS)} (repeat for several; default: the runtimes the recipe names)")
    p.add_argument("--json", action="store_true", help="the result as JSON")
    args = p.parse_args(argv)
    res = lint_output(args.out, args.target)
    print(json.dumps(res, indent=2) if args.json else format_lint(res))
    return 0 if res["ok"] else 1


def cmd_eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vlmq-export eval", description=(
        "ShapesVQA exact-match accuracy (held-out test split, per question type) and language-model perplexity "
        "on the built-in English text and on the held-out English text (27k tokens, whole), each with a 95 % "
        "per-window bootstrap interval, for an output directory in ONNX Runtime (and its source model in torch)."))
    p.add_argument("out")
    p.add_argument("--n", type=int, default=1000,
                   help="test samples (default 1000: each accuracy comes with its 95 %% Wilson interval, about "
                        "+-0.03 overall at 1000)")
    p.add_argument("--torch", action="store_true", help="also evaluate the full-precision source model in torch")
    p.add_argument("--model", help="source model for --torch (default: the manifest's)")
    p.add_argument("--heldout-windows", type=int, metavar="N",
                   help="score only the held-out text's first N windows of 512 tokens (default: the whole text)")
    _accuracy_level_flag(p)
    _backend_flag(p)
    _verify_flag(p)
    _output_flags(p)
    args = p.parse_args(argv)
    if args.n < 1:
        from .errors import VlmqError

        raise VlmqError("eval: --n must be at least 1")
    from .models import load_family
    from .outdir import check_complete
    from .runtime.generate import OnnxVLM
    from .sources import resolve_model
    from .testbed import evaluate_onnx, evaluate_torch, testbed_layout
    from .validate.perplexity import onnx_logits, perplexity_fields, torch_logits

    if args.heldout_windows is not None and args.heldout_windows < 1:
        from .errors import VlmqError

        raise VlmqError("eval: --heldout-windows must be at least 1")
    out = Path(args.out)
    manifest = check_complete(out, verify_hashes=not args.no_verify)
    vlm = OnnxVLM(out, accuracy_level=args.accuracy_level, backend=args.backend)
    layout = testbed_layout(manifest["source"]["path"])  # the ShapesVQA layout the source was trained on
    res = {"onnx": {**evaluate_onnx(out, n=args.n, accuracy_level=args.accuracy_level, vlm=vlm, layout=layout),
                    **perplexity_fields(onnx_logits(vlm), vlm.family.tokenizer, args.heldout_windows)}}
    if args.torch:
        model_dir = resolve_model(args.model) if args.model else Path(manifest["source"]["path"])
        family = load_family(model_dir)
        model = family.load_checked(model_dir)
        res["torch"] = {**evaluate_torch(family, model, n=args.n, layout=layout),
                        **perplexity_fields(torch_logits(model), family.tokenizer, args.heldout_windows)}
    print(json.dumps(res, indent=None if args.json else 2))
    return 0


HEADLINE = ("logits_cosine", "top1_agreement", "greedy_token_agreement", "image_features_cosine", "qdq_max_abs_diff",
            "qdq_w8a8_layer_max_rel", "qdq_text_max_abs_diff", "qdq_end_to_end_max_abs_diff",
            "task_accuracy_torch_full_precision", "task_accuracy_onnx_quantized", "int4_form_ok", "ort_fused_all")
GRAPH_OF = {"vision": "vision_encoder", "projector": "projector", "llm": "llm", "lm_head": "llm"}


def inspect_summary(out: Path) -> dict:
    """What an output directory holds, from its manifest: per quantized component the format, method and
    layer counts; per graph the file, sizes and inputs; the validation headline."""
    from .outdir import read_manifest

    m = read_manifest(out)
    r, layers = m.get("recipe", {}), m.get("layers", [])
    comps = {}
    for name, c in r.get("components", {}).items():
        recs = [x for x in layers if x.get("component") == name]
        comps[name] = {"bits": c["bits"], "group_size": c["group_size"], "symmetric": c.get("sym", True),
                       "method": r.get("method"), "graph": GRAPH_OF.get(name, name) + ".onnx",
                       "layers_quantized": sum(1 for x in recs if x.get("bits")),
                       "layers_float": sum(1 for x in recs if not x.get("bits"))}
    graphs = {g: {k: c.get(k) for k in ("file", "bytes", "float_bytes", "inputs")}
              for g, c in m.get("components", {}).items()}
    return {"output": str(out), "status": m.get("status"), "source": m.get("source", {}),
            "recipe": {k: r.get(k) for k in ("method", "symmetric", "target", "dtype", "runtimes", "act_order",
                                             "clip_search", "true_sequential", "sink_weight", "lm_head")},
            "calibration": {k: m.get("calibration", {}).get(k) for k in ("source", "samples")},
            "components": comps, "graphs": graphs,
            "validation": {k: v for k, v in m.get("validation", {}).items() if k in HEADLINE}}


def _format_inspect(s: dict) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    r, src = s["recipe"], s["source"]
    lines = [f"{s['output']}: {src.get('model')} ({src.get('family')}), status {s['status']}",
             f"recipe: {r['method']}, {'symmetric' if r.get('symmetric', True) else 'asymmetric'}, "
             f"{r.get('dtype') or 'fp32'} graphs for {r.get('target') or 'onnxruntime'}, runtimes "
             f"{', '.join(r.get('runtimes') or [])}; calibration {s['calibration']['samples']} samples "
             f"({s['calibration']['source']})", "components:"]
    for name, c in s["components"].items():
        group = "per channel" if c["group_size"] == -1 else f"g{c['group_size']}"
        lines.append(f"  {name}: W{c['bits']} {group} {'sym' if c['symmetric'] else 'asym'}, {c['method']}; "
                     f"{c['layers_quantized']} layers quantized, {c['layers_float']} float; in {c['graph']}")
    lines.append("graphs:")
    for g in s["graphs"].values():
        ins = ", ".join(f"{i['name']}[{','.join(map(str, i['shape']))}]" for i in g["inputs"] or [])
        size = f"{g['bytes'] / 1e6:.2f} MB" + (f" (float {g['float_bytes'] / 1e6:.2f} MB)"
                                                 if g.get("float_bytes") not in (None, g["bytes"]) else "")
        lines.append(f"  {g['file']}: {size}; inputs {ins}")
    v = s["validation"]
    lines.append("validation: " + (", ".join(f"{k} {fmt(v[k])}" for k in HEADLINE if k in v) or "none"))
    return "\n".join(lines)


def cmd_inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vlmq-export inspect", description=(
        "Summarise an output directory from its manifest: per quantized component the format and method, the "
        "graph files with sizes and inputs, the validation headline."))
    p.add_argument("out")
    p.add_argument("--json", action="store_true", help="the summary as JSON")
    args = p.parse_args(argv)
    s = inspect_summary(Path(args.out))
    print(json.dumps(s, indent=2) if args.json else _format_inspect(s))
    return 0


def cmd_build(argv: list[str]) -> int:
    from .engines.build import build_output
    from .targets import TRT_TARGETS

    p = argparse.ArgumentParser(prog="vlmq-export build", description=(
        "Write OUT/engines/profiles.json (TensorRT optimization profiles: the language model's prefill and decode, "
        "the vision encoder's from the image processor's limits) and OUT/build_engines.sh (trtexec commands for the "
        "target), and build the engines here with Polygraphy where TensorRT imports and this machine is the target."))
    p.add_argument("out")
    p.add_argument("--target", default="tensorrt", choices=TRT_TARGETS,
                   help="tensorrt (a server GPU, default), jetson-orin or jetson-thor")
    p.add_argument("--max-batch", type=int, default=1, metavar="B", help="largest batch (default 1)")
    p.add_argument("--max-seq", type=int, metavar="S", help="longest prefill, in tokens (default: --max-context)")
    p.add_argument("--max-context", type=int, metavar="C",
                   help="longest context, prompt + generated tokens (default: 4096 or the model's limit if smaller)")
    p.add_argument("--max-images", type=int, default=1, metavar="N", help="most images per prompt (default 1)")
    p.add_argument("--json", action="store_true", help="the result as JSON")
    args = p.parse_args(argv)
    res = build_output(args.out, args.target, max_batch=args.max_batch, max_seq=args.max_seq,
                       max_context=args.max_context, max_images=args.max_images)
    out = Path(args.out)
    if args.json:
        print(json.dumps(res))
    elif res["build_error"]:
        print(f"vlmq-export: error: engine build failed: {res['build_error']} (log: {out / res['log']})", file=sys.stderr)
    elif res["not_built"]:
        print(f"engines not built: {res['not_built']}; wrote {out / res['profiles']} and {out / res['script']}: "
              f"on the {args.target} machine run `bash {out / res['script']}`")
    else:
        print(f"built {len(res['built'])} engines in {out / 'engines'} (TensorRT {res['tensorrt']}, {res['gpu']})")
    return 1 if res["build_error"] else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # OpenMP threads that spin while waiting make torch's many small GPTQ ops ~10-100x slower when another
    # process shares the cores; passive waiting costs little when they are idle. (Read when torch loads.)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .errors import VlmqError

    handlers = {"run": cmd_run, "serve": cmd_serve, "validate": cmd_validate, "lint": cmd_lint, "eval": cmd_eval,
                "inspect": cmd_inspect, "build": cmd_build}
    try:
        if argv and argv[0] in handlers:
            return handlers[argv[0]](argv[1:])
        return cmd_export(argv)
    except VlmqError as exc:
        print(f"vlmq-export: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vlmq-export: interrupted (no output directory was published)", file=sys.stderr)
        return 130
    except Exception as exc:  # unexpected: one line, the traceback only on request
        if os.environ.get("VLMQ_DEBUG"):
            raise
        print(f"vlmq-export: internal error: {type(exc).__name__}: {exc} (set VLMQ_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
