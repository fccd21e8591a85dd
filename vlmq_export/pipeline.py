"""`vlmq-export MODEL --int4`: load -> calibrate -> export -> Q/DQ -> validate -> publish.

Every stage is a plain function; the CLI only parses arguments and prints.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import torch

from . import outdir
from .calibrate import CALIB_PROMPT_TOKENS, DATA_FREE, Recipe, calibrate, check_device_available
from .data.generated import generated_text_samples
from .data.loader import BUILTIN, builtin_samples, load_samples
from .data.samples import Sample
from .errors import VlmqError
from .export.onnx_export import OPSET, export_graph
from .export.ort_flavour import FLAVOUR_ORT, choose_llm_graph, relocate_records, write_ort_llm
from .calibrators.activation import activation_fake_quant
from .export.qdq import FP8, QuantizedLinear, half_key, weight_key
from .export.quantize_graph import apply_qdq

from .models import Family, Prepared, load_family
from .progress import Progress
from .recipe import check_target, default_out
from .runtime.generate import GRAPHS, OnnxVLM
from .runtime.session import PARITY_ACCURACY_LEVEL
from .sources import resolve_model
from .validate.act_parity import w8a8_layerwise_stage
from .validate.compare import compare, component_fidelity, onnx_outputs, torch_outputs
from .validate.graphs import ort_fusion, portable_int4_problems
from .validate.perplexity import REPORT_HELDOUT_WINDOWS, onnx_logits, perplexities, torch_logits
from .validate.report import write_report

@dataclass
class Options:
    calib: str | None = None  # JSONL / folder / builtin set; None = built-in
    n_calib: int = 16
    calib_text: int = 0  # + this many text-only sequences sampled from the full-precision model itself
    calib_text_tokens: int = 400
    calib_prompt_tokens: int = CALIB_PROMPT_TOKENS  # each calibration prompt's text cut to this many tokens first
    n_val: int = 4
    gen_tokens: int = 16
    validate: bool = True
    keep_float: bool = False
    device: str | None = None  # calibration device (default: cuda when available)
    eval_task: int | None = None  # ShapesVQA test samples for task accuracy (None: 100 for builtin:shapes-*)
    target: str = "onnxruntime"  # a name in targets.TARGETS: what the graphs must follow
    dtype: str | None = None  # the graphs' float type, "fp16" or "fp32" (None: the target's default)
    llm_graph: str | None = None  # "ort" (ONNX Runtime's flavour) or "portable"; None: ort where it can be built
    extra: dict = field(default_factory=dict)


def samples_hash(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.prompt.encode())
        h.update((s.answer or "").encode())
        for im in s.images:
            h.update(im.tobytes())
    return h.hexdigest()


def prepare_all(family: Family, samples: list[Sample], with_answer: bool) -> list[Prepared]:
    return [family.prepare(s.images, s.prompt, s.answer if with_answer else None) for s in samples]


def validation_samples(n: int, layout: str = "free") -> list[Sample]:
    """Held-out prompts: ShapesVQA test scenes in ``layout`` (never used for calibration) and one text-only prompt."""
    samples = builtin_samples(max(n - 1, 1), split="test", which="builtin:shapes", layout=layout)
    samples.append(Sample([], "Write one sentence about the sea.", None, "text-only"))
    return samples


def graph_io(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)

    def desc(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": dims})
        return out

    return {"inputs": desc(model.graph.input), "outputs": desc(model.graph.output)}


def export_model(model_spec: str, out: str | Path | None = None, recipe: Recipe | None = None,
                 options: Options | None = None, progress: Progress | None = None) -> Path:
    recipe = recipe or Recipe()
    opts = options or Options()
    say = progress or Progress("quiet")
    recipe.check()
    opts = dataclasses.replace(opts, dtype=check_target(opts.target, opts.dtype, recipe.components, recipe.sym)[0])
    check_device_available(opts.device)
    out = Path(out) if out else default_out(model_spec, recipe.method, recipe.components, recipe.sym)
    outdir.check_writable(out)  # before any slow work

    model_dir = resolve_model(model_spec)
    family = load_family(model_dir)
    opts = dataclasses.replace(opts, llm_graph=choose_llm_graph(w8a8_llm_graph(recipe, opts.llm_graph), opts.target,
                                                                opts.dtype, family.text_config))
    from .testbed import testbed_layout

    layout = testbed_layout(model_dir)  # a testbed's scenes as it was trained on them ("free" for other models)
    calib = load_samples(opts.calib, limit=opts.n_calib, layout=layout)
    say.start("load", f"model {model_spec}")
    say(f"{family.name}: {len(calib)} calibration samples from {opts.calib or 'built-in set'}")
    model = family.load_checked(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"loaded {n_params / 1e6:.1f}M parameters")
    if opts.calib_text and recipe.method in DATA_FREE:
        say(f"--calib-text ignored: {recipe.method} reads no calibration data")
        opts = dataclasses.replace(opts, calib_text=0)
    if opts.calib_text:
        t0 = time.perf_counter()
        say(f"sampling {opts.calib_text} text sequences of {opts.calib_text_tokens} tokens from the model for calibration")
        calib = calib + generated_text_samples(family, model, opts.calib_text, opts.calib_text_tokens)
        say(f"  done in {time.perf_counter() - t0:.0f}s")

    staging = outdir.Staging(out)
    try:
        manifest = _run(model_spec, model_dir, family, model, calib, recipe, opts, staging.path, say,
                        resume_dir(staging.out), layout)
        manifest["status"] = "complete"
        outdir.write_manifest(staging.path, manifest)
        final = staging.publish()
    except BaseException:
        staging.discard()  # the calibration checkpoint (.OUT.resume) stays for the next run
        raise
    shutil.rmtree(resume_dir(final), ignore_errors=True)
    say.start("done", f"wrote {final}")
    return final


def w8a8_llm_graph(recipe: Recipe, requested: str | None) -> str | None:
    """The llm graph a W8A8 language model needs: the portable one (the ORT flavour rebuilds the MatMuls from the
    weight codes and would drop the activation Q/DQ); ``requested`` otherwise."""
    if not any(recipe.components[c].act for c in ("llm", "lm_head") if c in recipe.components):
        return requested
    if requested == "ort":
        raise VlmqError("--llm-graph ort cannot carry a W8A8 language model (int8 / fp8 activations): "
                        "use --llm-graph portable")
    return "portable"


def resume_dir(out: Path) -> Path:

    """Where calibration keeps finished blocks until the export is published."""
    return out.parent / f".{out.name}.resume"


def _run(model_spec, model_dir, family, model, calib, recipe, opts, work: Path, say, resume: Path,
         layout: str) -> dict:
    """``layout``: the ShapesVQA scenes a testbed was trained on (its validation and task accuracy use them)."""
    t_start = time.perf_counter()
    manifest = {
        "schema_version": outdir.SCHEMA_VERSION, "tool": outdir.TOOL, "status": "incomplete",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"model": model_spec, "path": str(Path(model_dir).resolve()), "family": family.name,
                   "model_type": family.config.model_type,
                   "config_sha256": outdir.sha256_file(Path(model_dir) / "config.json")},
        "recipe": {**recipe.as_dict(), "target": opts.target, "dtype": opts.dtype,
                   "format": "qdq-w8a8" if any(c.act for c in recipe.components.values()) else "qdq-weight-only",
                   "runtimes": runtimes(opts.target, recipe.sym),
                   "lm_head": recipe.components["lm_head"].label() if "lm_head" in recipe.components else "float",
                   "embeddings": "float", "patch_embedding": "float"},
        "versions": outdir.library_versions(), "opset": OPSET,
        "calibration": {"source": opts.calib or "builtin", "samples": len(calib), "sha256": samples_hash(calib),
                        **({"shapes_layout": layout} if layout != "free" and str(opts.calib or "builtin") in BUILTIN
                           else {}),
                        "prompt_tokens": opts.calib_prompt_tokens,
                        "generated_text": {"samples": opts.calib_text, "tokens": opts.calib_text_tokens} if opts.calib_text else None},
        "family": {"num_layers": family.num_layers, "num_kv_heads": family.num_kv_heads,
                   "head_dim": family.head_dim, "hidden_size": family.hidden_size, "mrope": family.mrope},
        "components": {}, "layers": [], "timings_s": {},
    }
    outdir.write_manifest(work, manifest)  # status incomplete until the very end
    family.save_processor(work / "processor")

    # -- float reference and float export
    val = prepare_all(family, validation_samples(opts.n_val, layout), with_answer=False) if opts.validate else []
    float_dir = work / "float"
    say.start("export", "float ONNX graphs")
    t0 = time.perf_counter()
    for spec in family.export_specs(model):
        t = time.perf_counter()
        export_graph(spec, float_dir / f"{spec.name}.onnx")
        say(f"{spec.name}.onnx ({time.perf_counter() - t:.1f}s)")
    half = opts.dtype == "fp16"
    half_dir = work / "float16"
    if half:
        # FP16 graphs by a half-precision torch export, not by converting the float32 graph (ONNX Runtime's
        # float16 converter): the trace keeps the float32 islands that the model's authors wrote into its code
        # (the RMSNorm variance, the rotary cos/sin), nothing is cast by hand, and every weight is the model's own
        # FP16 rounding. Two FP16 spots decided by measurement on the testbed (16 prompts x 32 tokens against the
        # FP32 twin, README): the eager softmax, which transformers asks in float32, is exported as an FP16
        # Softmax (torch writes softmax(dtype=float32) as Softmax + Cast, and the optimizer folds the Cast);
        # casting it back to FP32 moved top-1 agreement 0.9947 -> 0.9954 and greedy tokens not at all, so it
        # stays FP16. The logits stay FP16: rounding the FP32 twin's logits to FP16 alone flips 0.45 % of top-1
        # (near ties), the whole FP16 graph 0.53 %, greedy tokens identical; an FP32 lm_head would cost its size.
        keys16 = {weight_key(w): half_key(w) for w in (m.weight.detach().float().cpu().numpy()
                                                      for m in model.modules() if isinstance(m, torch.nn.Linear))}
        model16 = copy.deepcopy(model).half()
        for spec in family.export_specs(model16):
            t = time.perf_counter()
            export_graph(spec, half_dir / f"{spec.name}.onnx", half=True)
            say(f"{spec.name}.onnx in FP16 ({time.perf_counter() - t:.1f}s)")
        del model16
    manifest["timings_s"]["export"] = time.perf_counter() - t0
    report: dict = {"stages": {}}
    ref_float = None
    if opts.validate:
        say.start("validate", f"float ONNX vs torch on {len(val)} held-out prompts")
        ref_float = torch_outputs(family, model, val, opts.gen_tokens)
        vlm = OnnxVLM(work, graphs={g: float_dir / f"{g}.onnx" for g in GRAPHS}, accuracy_level=PARITY_ACCURACY_LEVEL)
        report["stages"]["float_onnx_vs_torch"] = compare(ref_float, onnx_outputs(vlm, val, opts.gen_tokens))
        del vlm

    n_task = opts.eval_task if opts.eval_task is not None else (100 if model_spec.startswith("builtin:shapes") else 0)
    if n_task:
        from .testbed import evaluate_torch, testbed_recorded_test

        say.start("evaluate", f"ShapesVQA accuracy of the full-precision model on {n_task} test samples")
        report["task"] = {"samples": n_task, "torch_full_precision": evaluate_torch(family, model, n=n_task,
                                                                                    layout=layout)}
        recorded = testbed_recorded_test(model_dir)
        if recorded:  # the testbed's own larger measurement, made when its parts were exported (meta.json)
            report["task"]["recorded_full_precision"] = {**recorded, "source": "the testbed's meta.json"}
        say(f"perplexity on english.txt and the held-out text's first {REPORT_HELDOUT_WINDOWS} windows (torch)")
        report["perplexity"] = {"heldout_windows": REPORT_HELDOUT_WINDOWS, "torch_full_precision": perplexities(
            torch_logits(model), family.tokenizer, REPORT_HELDOUT_WINDOWS)}

    # -- calibration
    comps = ", ".join(f"{c} {r.label()}" for c, r in recipe.components.items())
    data_free = recipe.method in DATA_FREE  # RTN: the codes come from the weights alone, no data pass
    manifest["calibration"]["data_pass"] = not data_free
    say.start("calibrate", f"{recipe.method} ({comps}) "
              + ("from the weights alone" if data_free else f"on {len(calib)} samples"))
    t0 = time.perf_counter()
    cal = calibrate(family, model, calib, recipe, work, say, device=opts.device, checkpoint=resume,
                    job_key={"model": manifest["source"], "calibration": manifest["calibration"]["sha256"]},
                    max_prompt_tokens=opts.calib_prompt_tokens)
    layers, records = cal.layers, cal.records
    manifest["timings_s"]["calibrate"] = time.perf_counter() - t0
    manifest["timings_s"]["calibrate_parts"] = cal.timings
    manifest["calibration"]["warnings"] = cal.warnings
    if cal.saliency is not None:
        report["saliency"] = cal.saliency.summary()
        manifest["calibration"]["saliency_file"] = "saliency.safetensors"

    # -- Q/DQ pass
    say.start("qdq", f"writing {len(layers)} INT4 layers" + (" with FP16 scales" if half else ""))
    written: set[str] = set()
    moved = 0
    qlayers = [dataclasses.replace(q, key=keys16.get(q.key, q.key), prior_key=keys16.get(q.prior_key, q.prior_key))
               for q in layers] if half else layers
    placed: dict[str, str] = {}  # smoothed layers: where each one's 1/s went in the graph (export/smooth_pass.py)
    for g in GRAPHS:
        names, n = apply_qdq((half_dir if half else float_dir) / f"{g}.onnx", work / f"{g}.onnx", qlayers, placed)
        written |= set(names)
        moved += n
    missing = [q.name for q in layers if q.name not in written]
    if missing:
        raise VlmqError(f"{len(missing)} quantized layers not found in the exported graphs (first: {missing[0]})")
    if half:
        manifest["recipe"]["fp16_scales_clamped"] = moved  # scales moved into FP16's normal range (export/qdq.py)
        if moved:
            say(f"warning: {moved} INT4 scales were under FP16's smallest normal number and were raised to it")
    fp32_dir = work / "fp32"  # an FP16 export's FP32 twin (the same codes), the reference of what FP16 costs
    if half and opts.validate:
        for g in GRAPHS:
            apply_qdq(float_dir / f"{g}.onnx", fp32_dir / f"{g}.onnx", layers)
    by_name = {r.name: r for r in records}
    smoothed = {q.name: torch.from_numpy(q.smooth) for q in layers if q.smooth is not None}
    if smoothed:  # the scales, for validate's torch reference (the graphs hold them folded or as Muls)
        from safetensors.torch import save_file

        save_file(smoothed, str(work / "smoothing.safetensors"))
        manifest["calibration"]["smoothing_file"] = "smoothing.safetensors"
        for name, where in placed.items():
            by_name[name].smooth["graph"] = where
    for q in layers:
        base = q.name.replace(".", "_")
        by_name[q.name].__dict__.update({"onnx_weight": f"{base}_q", "onnx_scale": f"{base}_scale",
                                         **({"onnx_zero_point": f"{base}_zero_point"} if q.zeros is not None else {})})
    manifest["layers"] = [r.as_dict() for r in records]
    if opts.llm_graph == FLAVOUR_ORT:  # the same weights and codes in ONNX Runtime's fused operators
        try:
            write_ort_llm(work / "llm.onnx", work / "llm.onnx", family.text_config)  # builds before it writes
        except ValueError as exc:  # a graph form the builder does not read (e.g. weights it cannot find): keep the portable one
            say(f"warning: the ORT flavour of llm.onnx could not be built ({exc}); the portable graph is kept")
            opts.llm_graph = "portable"
        else:
            manifest["layers"] = relocate_records(manifest["layers"])  # q/k/v and gate/up now live in merged weights
            manifest["recipe"]["runtimes"] = ["onnxruntime"]
    for g in GRAPHS:
        f = work / f"{g}.onnx"
        manifest["components"][g] = {"file": f.name, "bytes": f.stat().st_size,
                                     "float_bytes": ((half_dir if half else float_dir) / f.name).stat().st_size,
                                     "sha256": outdir.sha256_file(f), **graph_io(f)}
    manifest["components"]["llm"]["flavour"] = opts.llm_graph

    # -- validation of the quantized graphs
    # TensorRT's rules where TensorRT is among the runtimes (symmetric, portable graph), ONNX Runtime's otherwise
    report.update(int4_form([work / f"{g}.onnx" for g in GRAPHS], recipe.sym and opts.llm_graph != FLAVOUR_ORT))
    report["ort_fusion"] = ort_fusion(work / "llm.onnx")
    served = OnnxVLM(work)  # as `run` serves the graphs; its sessions open on first use
    if opts.validate:
        say.start("validate", "Q/DQ ONNX vs torch fake-quant, and vs full precision")
        with activation_fake_quant(model, layers):  # W8A8 layers' inputs as their Q/DQ (none otherwise)
            ref_fq = torch_outputs(family, model, val, opts.gen_tokens)
        if half:
            with activation_fake_quant(fake_quant_half(model, work, manifest), layers) as model16:
                ref_fq16 = torch_outputs(family, model16, val, opts.gen_tokens)
        outputs: dict = {}
        report["stages"].update(quantized_stages(work, ref_float, ref_fq16 if half else ref_fq, val, opts.gen_tokens,
                                                 served, keep=outputs, dtype=opts.dtype))
        if not half:  # W8A8 vision / projector layer by layer, where rounding ties do not grow (act_parity.py)
            report["stages"].update(w8a8_layerwise_stage(work, family, model, layers, val))
        float_vlm = OnnxVLM(work, graphs={g: float_dir / f"{g}.onnx" for g in GRAPHS}, accuracy_level=PARITY_ACCURACY_LEVEL)
        report["components"] = component_fidelity(float_vlm, served, val, recipe.components)
        del float_vlm
        if half:
            report["stages"].update(fp16_stages(work, fp32_dir, outputs["parity"], ref_fq, ref_fq16, val,
                                                opts.gen_tokens))
            fp32_vlm = OnnxVLM(work, graphs={g: fp32_dir / f"{g}.onnx" for g in GRAPHS},
                               accuracy_level=PARITY_ACCURACY_LEVEL)
            report["components_fp16_vs_fp32"] = component_fidelity(
                fp32_vlm, OnnxVLM(work, accuracy_level=PARITY_ACCURACY_LEVEL), val, None, max_abs=True)
            del fp32_vlm
    if n_task:
        from .testbed import evaluate_onnx, testbed_layout

        say.start("evaluate", f"ShapesVQA accuracy of the exported ONNX in ONNX Runtime on {n_task} test samples")
        report["task"]["onnx_quantized"] = evaluate_onnx(work, n=n_task, vlm=served,
                                                        layout=testbed_layout(model_dir))
        say(f"perplexity on english.txt and the held-out text's first {REPORT_HELDOUT_WINDOWS} windows (ONNX Runtime)")
        report["perplexity"]["onnx_quantized"] = perplexities(onnx_logits(served), family.tokenizer,
                                                              REPORT_HELDOUT_WINDOWS)
    del served
    report["layers"] = {}
    for comp in recipe.components:
        recs = [r for r in records if r.component == comp]
        errs = [r.error for r in recs if r.error is not None and np.isfinite(r.error)]
        report["layers"][comp] = {"quantized": sum(1 for r in recs if r.bits), "float": sum(1 for r in recs if not r.bits),
                                  "mean_error": float(np.mean(errs)) if errs else None}
    if not opts.keep_float:
        for d in (float_dir, half_dir, fp32_dir):
            shutil.rmtree(d, ignore_errors=True)
    manifest["timings_s"]["total"] = time.perf_counter() - t_start
    manifest["validation"] = summary(report)
    write_report(work, manifest, report)
    return manifest


def quantized_stages(out: Path, ref_float: list[dict], ref_fq: list[dict], val: list, gen_tokens: int,
                     served: OnnxVLM | None = None, keep: dict | None = None, dtype: str = "fp32") -> dict:
    """The quantized graphs' two validation stages.

    Parity (``qdq_onnx_vs_torch_fakequant``) runs ONNX Runtime at accuracy level 0, float compute, so
    that it checks the export alone. What quantization costs (``quantized_vs_full_precision``) is
    measured as the graphs are served: at the runtime's default level (int8 activations on CPU), with
    ``served``'s sessions when given. ``keep["parity"]`` receives the level-0 outputs when ``keep`` is given.
    FP16 graphs (``dtype``) are compared with an FP16 torch fake-quant ``ref_fq``, which the stage says.
    """
    parity = onnx_outputs(OnnxVLM(out, accuracy_level=PARITY_ACCURACY_LEVEL), val, gen_tokens)
    if keep is not None:
        keep["parity"] = parity
    stages = {"qdq_onnx_vs_torch_fakequant": {"accuracy_level": PARITY_ACCURACY_LEVEL,
                                              **({"dtype": dtype} if dtype != "fp32" else {}), **compare(ref_fq, parity)}}
    text = [i for i, p in enumerate(val) if not p.num_images]  # what a W8A8 vision's rounding ties cannot reach
    if text:
        stages["qdq_onnx_vs_torch_fakequant"]["text_logits_max_abs_diff"] = max(
            float(np.abs(ref_fq[i]["logits"] - parity[i]["logits"]).max()) for i in text)
    served = served or OnnxVLM(out)
    q = parity if served.accuracy_level == PARITY_ACCURACY_LEVEL else onnx_outputs(served, val, gen_tokens)
    stages["quantized_vs_full_precision"] = {"accuracy_level": served.accuracy_level, **compare(ref_float, q)}
    return stages


def runtimes(target: str, sym: bool) -> list[str]:
    """The runtimes an export's graphs are for, its target's first. ONNX Runtime runs every form we write
    (FP16 graphs too: fast on CUDA, slowly on CPU, where they are validated); TensorRT the symmetric ones."""
    from .targets import get_target

    if not sym:
        return ["onnxruntime"]
    return ["tensorrt", "onnxruntime"] if get_target(target).tensorrt else ["onnxruntime", "tensorrt"]


def fake_quant_half(model, out: Path, manifest: dict):
    """A float16 copy of the calibrated (fake-quant) ``model`` whose quantized weights are read back from the
    FP16 graphs (codes * FP16 scales, as their DequantizeLinear computes them): the torch reference of an
    FP16 export."""
    m = copy.deepcopy(model)
    for name, w in load_quantized_weights(out, manifest).items():
        m.get_submodule(name).weight.data = w
    return m.half()


def fp16_stages(out: Path, fp32_dir: Path, fp16: list[dict], ref_fq: list[dict], ref_fq16: list[dict], val: list,
                gen_tokens: int) -> dict:
    """What FP16 costs: the FP16 Q/DQ graphs' outputs ``fp16`` (accuracy level 0) against their FP32 twin (the same
    codes, level 0), and, for scale, torch's own fake-quant model in float16 against float32."""
    fp32 = onnx_outputs(OnnxVLM(out, graphs={g: fp32_dir / f"{g}.onnx" for g in GRAPHS},
                                accuracy_level=PARITY_ACCURACY_LEVEL), val, gen_tokens)
    return {"fp16_vs_fp32_export": {"accuracy_level": PARITY_ACCURACY_LEVEL, **compare(fp32, fp16)},
            "torch_fakequant_fp16_vs_fp32": compare(ref_fq, ref_fq16)}


def summary(report: dict) -> dict:
    s = {}
    st = report.get("stages", {})
    if "float_onnx_vs_torch" in st:
        s["float_onnx_max_abs_diff"] = max(v for k, v in st["float_onnx_vs_torch"].items()
                                           if k.endswith("max_abs_diff") and v is not None)
    if "qdq_onnx_vs_torch_fakequant" in st:
        qdq = st["qdq_onnx_vs_torch_fakequant"]
        fp16 = qdq.get("dtype") == "fp16"  # FP16 graphs against FP16 torch: their own gates (gates.py)
        s["qdq_fp16_max_abs_diff" if fp16 else "qdq_max_abs_diff"] = max(
            v for k, v in qdq.items() if k.endswith("max_abs_diff") and v is not None)
        if "qdq_w8a8_layerwise" in st:  # W8A8 vision / projector: gated layer by layer, as their rounding ties grow
            # end to end (validate/act_parity.py); the end-to-end number stays reported, the text-only prompt's gates
            # the llm
            s["qdq_w8a8_layer_max_rel"] = st["qdq_w8a8_layerwise"]["max_rel"]
            s["qdq_end_to_end_max_abs_diff"] = s.pop("qdq_max_abs_diff")
            s["qdq_text_max_abs_diff"] = qdq.get("text_logits_max_abs_diff")
        if fp16:
            s["qdq_fp16_logits_cosine"] = qdq["logits_cosine"]
    for k in ("logits_cosine", "top1_agreement", "greedy_token_agreement"):
        if k in st.get("fp16_vs_fp32_export", {}):
            s[f"fp16_vs_fp32_{k}"] = st["fp16_vs_fp32_export"][k]
    q = st.get("quantized_vs_full_precision", {})
    for k in ("image_features_cosine", "logits_cosine", "top1_agreement", "greedy_token_agreement"):
        if k in q:
            s[k] = q[k]
    for comp, metrics in report.get("components", {}).items():
        for k, v in metrics.items():
            if not k.endswith("_min"):
                s[f"{comp}_{k}"] = v
    task = report.get("task", {})
    for key in ("torch_full_precision", "onnx_quantized", "recorded_full_precision"):
        if key in task:
            s[f"task_accuracy_{key}"] = task[key].get("accuracy")
    if "recorded_full_precision" in task:
        s["task_samples_recorded_full_precision"] = task["recorded_full_precision"].get("n")
    if s.get("task_accuracy_torch_full_precision") is not None and s.get("task_accuracy_onnx_quantized") is not None:
        s["task_accuracy_drop"] = s["task_accuracy_torch_full_precision"] - s["task_accuracy_onnx_quantized"]
    s["int4_form_ok"] = not report.get("int4_form_problems")
    f = report.get("ort_fusion", {})
    # not applicable (None, no gate row) where the language model has no INT4 weights (float or W8A8)
    s["ort_fused_all"] = (None if not f.get("int4_dequantize") else
                          f.get("matmulnbits", 0) >= f["int4_dequantize"] and f.get("dequantize_left") == 0)
    return s


def _per_row(a: np.ndarray) -> np.ndarray:
    """An ONNX scale / zero point [K/g, N] in the calibrators' layout [N, K/g] (per-channel [N] -> [N, 1])."""
    return a[:, None] if a.ndim == 1 else a.T


def load_quantized_weights(out: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The dequantized weight of every INT4 layer, read back from the graphs (codes * scales)."""
    from onnx import numpy_helper

    records = [r for r in manifest["layers"] if r.get("onnx_weight")]  # merged layers share one weight (columns)
    wanted = {r["onnx_weight"] for r in records}
    parts_wanted = {r[k] for r in records for k in ("onnx_scale", "onnx_zero_point") if r.get(k)}
    found: dict[str, np.ndarray] = {}
    for comp in manifest["components"].values():
        model = onnx.load(str(Path(out) / comp["file"]))
        for init in model.graph.initializer:
            if init.name in wanted or init.name in parts_wanted:
                found[init.name] = numpy_helper.to_array(init)
    weights = {}
    for rec in records:
        wname, zname = rec["onnx_weight"], rec.get("onnx_zero_point")
        if wname not in found or rec["onnx_scale"] not in found or (zname and zname not in found):
            raise VlmqError(f"{out}: layer {rec['name']} is in the manifest but not in the graphs")

        cols = slice(*rec["onnx_columns"]) if rec.get("onnx_columns") else slice(None)  # a merged weight's part
        codes, scales = found[wname][..., cols], found[rec["onnx_scale"]][..., cols]
        layer = QuantizedLinear(name=rec["name"], codes=(codes if codes.dtype == FP8 else codes.astype(np.int8)).T,
                                scales=_per_row(scales), bits=rec["bits"],
                                group_size=rec["group_size"], key="",
                                zeros=_per_row(found[zname][..., cols]).astype(np.int8) if zname else None)
        weights[rec["name"]] = torch.from_numpy(layer.dequantize())  # the pass's own (codes - zeros) * scales
    return weights


def apply_quantized_weights(family: Family, model, out: Path, manifest: dict) -> None:
    """Give ``model`` (freshly loaded) the weights the graphs carry (:func:`load_quantized_weights`). A quantized
    lm_head tied to the input embeddings is untied first, as calibration did: the embeddings stay float, as
    ``embed_tokens.onnx`` keeps them."""
    from .calibrate import untie_lm_head

    if any(r["component"] == "lm_head" and r.get("onnx_weight") for r in manifest["layers"]):
        untie_lm_head(model, family.lm_head(model))
    for name, w in load_quantized_weights(out, manifest).items():
        mod = model.get_submodule(name)
        mod.weight.data = w.to(mod.weight.dtype)


def install_smoothing(model, out: Path, manifest: dict) -> None:
    """The smoothed W8A8 layers' input scales (``smoothing.safetensors``) as forward pre-hooks on ``model``, whose
    weights already are the graphs' ``W diag(s)`` (:func:`apply_quantized_weights`): the torch twin of the graphs'
    Mul (or folded norm) by ``1/s``."""
    name = manifest.get("calibration", {}).get("smoothing_file")
    if not name:
        return
    from safetensors.torch import load_file

    from .calibrators.smooth import install_input_scale

    path = Path(out) / name
    if not path.is_file():
        raise VlmqError(f"{out}: {name} is missing (the smoothed layers' scales)")
    for layer, s in load_file(str(path)).items():
        install_input_scale(model.get_submodule(layer), s, scale_weight=False)


def int4_form(paths, sym: bool) -> dict:
    """The static check of the quantized graphs: TensorRT's rules when symmetric, ONNX Runtime's otherwise."""
    problems = []
    for path in paths:
        problems += portable_int4_problems(onnx.load(str(path), load_external_data=False), tensorrt=sym)
    return {"int4_form_problems": problems, "int4_form_rules": "tensorrt" if sym else "onnxruntime"}


def validate_output(out: str | Path, model: str | None = None, n_val: int = 4, gen_tokens: int = 16,
                    progress: Progress | None = None, backend: str = "onnxruntime") -> dict:
    """Re-validate a complete output directory against its source model: re-measures the quantized graphs
    (parity, cost against full precision, INT4 form, ONNX Runtime fusion) and merges them into report/ and the
    manifest's summary, keeping what it does not recompute. ``backend="tensorrt"`` also compares OUT's TensorRT
    engines with ONNX Runtime on the same feeds (Polygraphy's Comparator; stage ``tensorrt_vs_onnxruntime``)."""
    from .runtime.runners import check_backend, engine_profiles

    say = progress or Progress("quiet")
    out = Path(out)
    manifest = outdir.check_complete(out)
    check_backend(out, backend)  # TensorRT and the engines, before the source model loads
    say.start("validate", f"{out} against {model or manifest['source']['path']}")
    model_dir = resolve_model(model) if model else Path(manifest["source"]["path"])
    if not (model_dir / "config.json").is_file():
        raise VlmqError(f"source model {model_dir} not found; pass --model")
    family = load_family(model_dir)
    torch_model = family.load_checked(model_dir)
    from .testbed import testbed_layout

    val = prepare_all(family, validation_samples(n_val, testbed_layout(model_dir)), with_answer=False)
    ref_float = torch_outputs(family, torch_model, val, gen_tokens)
    apply_quantized_weights(family, torch_model, out, manifest)
    install_smoothing(torch_model, out, manifest)
    dtype = manifest["recipe"].get("dtype", "fp32")
    # W8A8 layers' inputs fake-quantized at their recorded ranges, as the export's own validation does
    acts = [SimpleNamespace(name=r["name"], act_fmt=r["act"]["format"], act_amax=r["act"]["amax"])
            for r in manifest["layers"] if r.get("act")]
    with activation_fake_quant(torch_model.half() if dtype == "fp16" else torch_model, acts) as fq_model:
        ref_fq = torch_outputs(family, fq_model, val, gen_tokens)
    stages = quantized_stages(out, ref_float, ref_fq, val, gen_tokens, dtype=dtype)
    if dtype != "fp16":  # W8A8 vision / projector layer by layer, where rounding ties do not grow (act_parity.py)
        stages.update(w8a8_layerwise_stage(out, family, torch_model, acts, val))
    if backend == "tensorrt":
        from .validate.trt_compare import compare_engines

        say.start("validate", "TensorRT engines vs ONNX Runtime (Polygraphy Comparator)")
        stages["tensorrt_vs_onnxruntime"] = compare_engines(out, val, engine_profiles(out))
    fresh = {**int4_form([out / c["file"] for c in manifest["components"].values()],
                         manifest["recipe"].get("symmetric", True)
                         and manifest["components"]["llm"].get("flavour", "portable") != FLAVOUR_ORT),
             "ort_fusion": ort_fusion(out / manifest["components"]["llm"]["file"])}
    # merge: what this run recomputes replaces, the rest (float export check, task accuracy, per-component
    # fidelity, saliency, layers) stays as the export measured it, and the report says which is which
    prev = {}
    vfile = out / "report" / "validation.json"
    if vfile.is_file():
        try:
            prev = json.loads(vfile.read_text())
        except ValueError:
            say(f"{vfile} is unreadable: the report keeps only this run's numbers")
    report = {k: v for k, v in prev.items() if k not in ("source", "recipe", "summary", "verdict")}
    report["stages"] = {**report.get("stages", {}), **stages}
    report.update(fresh)
    this_run = {"by": "validate", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report["measured"] = {**report.get("measured", {}), **{f"stages.{k}": this_run for k in stages},
                          "int4_form": this_run, "ort_fusion": this_run}
    manifest["validation"] = {**manifest.get("validation", {}), **summary(report)}
    if "tensorrt_vs_onnxruntime" in stages:
        manifest["validation"]["tensorrt_matches_onnxruntime"] = stages["tensorrt_vs_onnxruntime"]["passed"]
    write_report(out, manifest, report)
    outdir.write_manifest(out, manifest)
    return manifest["validation"]
