"""The calibration stage: saliency (VLMQ / MBQ) -> sequential weight calibration per component.

Components are calibrated in execution order (vision blocks, projector, decoder blocks), each on
inputs from the already-quantized upstream, so the language model is calibrated on the image
embeddings the quantized vision path will really produce.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .calibrators import QuantConfig
from .calibrators import METHODS as CALIBRATOR_METHODS
from .calibrators.saliency import Saliency, SaliencyConfig, compute_saliency, mbq_factors, self_label
from .calibrators.activation import ACT_CALIBRATORS, fp8_weight, make_activation_calibrator
from .calibrators.sequential import (CHECKPOINT_FORMAT, block_linears, load_tree, quantize_blocks, quantize_weights,
                                     save_tree)
from .data.samples import Sample
from .errors import CalibrationDataError, VlmqError
from .export.qdq import QuantizedLinear
from .models import Family, Prepared
from .recipe import (CALIB_PROMPT_TOKENS, COMPONENTS, METHODS, ComponentRecipe,  # noqa: F401
                     check_recipe_values, check_sym_grid, parse_component_recipe)

# which weight calibrator each method drives (mbq and vlmq: GPTQ fed per-token weights)
CALIBRATOR = {"rtn": "rtn", "gptq": "gptq", "gptaq": "gptaq", "mbq": "gptq", "vlmq": "vlmq"}
NEEDS_SALIENCY = ("mbq", "vlmq")
DATA_FREE = ("rtn",)  # codes from the weights alone: no calibration data pass (calibrators/rtn.py)


@dataclass
class Recipe:
    method: str = "vlmq"
    components: dict[str, ComponentRecipe] = field(default_factory=lambda: {"llm": ComponentRecipe()})
    damp: float = 0.01
    act_order: bool = True  # GPTQ-family columns by decreasing diag(H), static groups (see calibrators/gptq.py)
    gptaq_alpha: float = 0.25  # GPTAQ's weight on the asymmetric correction (used by --method gptaq only)
    clip_search: bool = False  # each group's scale by a search over clipped ranges (calibrators/base.py)
    sink_weight: float = 1.0  # weight of each sequence's first token (the attention sink) in the LM's Hessians
    true_sequential: bool = False  # inside a block, later layer groups see earlier groups quantized (sequential.py)
    sym: bool = True  # False: 2- to 4-bit components on an unsigned grid with zero points (ONNX Runtime only)
    sym_grid: str = "half"  # the symmetric grid's scale: half, extreme or search (calibrators/base.py)
    act_calibrator: str = "minmax"  # W8A8 components: the activation ranges' calibrator (calibrators/activation.py)
    smooth: bool = False  # W8A8 components: per-channel smoothing scales first (calibrators/smooth.py)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)

    def check(self) -> None:
        check_recipe_values(self.method, self.components, self.sym, self.damp, self.gptaq_alpha, self.sink_weight)
        check_sym_grid(self.sym_grid)
        if self.act_calibrator not in ACT_CALIBRATORS:
            raise VlmqError(f"unknown --act-calibrator '{self.act_calibrator}'; valid: {', '.join(ACT_CALIBRATORS)}")
        if self.smooth and not any(c.act for c in self.components.values()):
            raise VlmqError("--smooth applies to W8A8 components: ask one with --vision / --projector / --llm int8 or fp8")
        if self.smooth and self.method in DATA_FREE:
            raise VlmqError(f"--smooth needs calibration data: --method {self.method} reads none")
        if CALIBRATOR[self.method] not in CALIBRATOR_METHODS:
            raise VlmqError(f"--method {self.method} is not available in this build")

    def quant_config(self, comp: str) -> QuantConfig:
        c = self.components[comp]
        return QuantConfig(bits=c.bits, group_size=c.group_size, sym=self.sym_for(comp), damp=self.damp, act_order=self.act_order,
                           asym_alpha=self.gptaq_alpha, clip_search=self.clip_search, sym_grid=self.sym_grid)

    def sym_for(self, comp: str) -> bool:
        """Whether ``comp`` is quantized symmetrically: always at 8 bits (TensorRT's INT8 form), else as asked."""
        return self.sym or self.components[comp].bits > 4

    def as_dict(self) -> dict:
        return {"method": self.method, "damp": self.damp, "act_order": self.act_order, "clip_search": self.clip_search,
                "symmetric": self.sym, "sym_grid": self.sym_grid,
                "sink_weight": self.sink_weight, "true_sequential": self.true_sequential,
                **({"gptaq_alpha": self.gptaq_alpha} if self.method == "gptaq" else {}),
                **({"act_calibrator": self.act_calibrator} if any(c.act for c in self.components.values()) else {}),
                **({"smooth": True} if self.smooth else {}),
                "components": {k: {"bits": v.bits, "group_size": v.group_size, "sym": self.sym_for(k),
                                   **({"act": v.act} if v.act else {})}
                               for k, v in self.components.items()},
                "saliency": dict(self.saliency.__dict__) if self.method in NEEDS_SALIENCY else None}


@dataclass
class CalibrationResult:
    layers: list[QuantizedLinear]
    records: list
    saliency: Saliency | None = None
    warnings: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)


class ActRanges:
    """W8A8 (``ComponentRecipe.act``): one activation calibrator per Linear of a component, fed by
    ``quantize_blocks``' ``observe`` with the inputs and token weights its weight calibrators get (the saliency
    for vlmq / mbq, none otherwise). FP8 components: the weights become per-channel E4M3, rounded to nearest
    from the float weights (the weight calibrator's INT8 result only fed the later blocks' calibration inputs)."""

    def __init__(self, fmt: str, method: str, blocks) -> None:
        self.fmt, self.method, self.cals = fmt, method, {}
        self.float_w = {n: m.weight.detach().clone() for b, blk in blocks for n, m in block_linears(blk, b)} \
            if fmt == "fp8" else {}

    def observe(self, name: str, x: torch.Tensor, g: torch.Tensor | None) -> None:
        if name not in self.cals:
            self.cals[name] = make_activation_calibrator(self.method, name, self.fmt)
        self.cals[name].observe(x, g)

    def finish(self, model, layers: list[QuantizedLinear], records: list) -> list[QuantizedLinear]:
        """``layers`` with their input ranges (and FP8 weights, written back into ``model``); ``records`` noted."""
        by_name, out = {r.name: r for r in records}, []
        for q in layers:
            if q.name not in self.cals:
                raise CalibrationDataError(f"{q.name}: no calibration input reached it, so it has no activation range")
            q = replace(q, act_fmt=self.fmt, act_amax=self.cals[q.name].compute_range())
            rec = by_name[q.name]
            if self.fmt == "fp8":  # (a smoothed layer's float weight is W diag(s), as the hook's scale_columns wrote it)
                w0 = self.float_w[q.name]
                codes, scales = fp8_weight(w0 if q.smooth is None else
                                           (w0.float() * torch.from_numpy(q.smooth).to(w0.device)).to(w0.dtype))
                q = replace(q, codes=codes, scales=scales)
                w = model.get_submodule(q.name).weight
                w.data = torch.from_numpy(q.dequantize()).to(dtype=w.dtype, device=w.device)
                rec.error, rec.note = None, "FP8 E4M3 weights, per channel, rounded to nearest"
            rec.act = {"format": self.fmt, "calibrator": self.method, "amax": q.act_amax}
            out.append(q)
        return out


def context_length(family: Family) -> int:
    """The model's context for calibration (:func:`runtime.limits.context_length`; unbounded if unknown)."""
    from .runtime.limits import context_length as model_context

    return model_context(family) or 1 << 30


def fit_context(p: Prepared, max_len: int) -> Prepared | None:
    """Cut a too-long sample to ``max_len`` tokens from the end; None if that would cut image tokens."""
    if p.seq_len <= max_len:
        return p
    if p.image_mask[0, max_len:].any():
        return None
    cut = p.seq_len - max_len
    pos = p.position_ids[..., :max_len]
    return Prepared(input_ids=p.input_ids[:, :max_len], image_mask=p.image_mask[:, :max_len], position_ids=pos,
                    rope_delta=p.rope_delta, pixel=p.pixel, answer_len=max(p.answer_len - cut, 0),
                    num_images=p.num_images)


def fit_prompts(family: Family, samples: list[Sample], max_tokens: int, say) -> tuple[list[Sample], list[str]]:
    """Samples whose prompt text is cut to its first ``max_tokens`` tokens (at most 7/8 of the model's context:
    the rest is room for the chat template, images and the answer), before any model work sees them
    (self-labelling, saliency, the calibration passes). The tokenizer reads at most 64 characters per kept
    token, so a 200k-token prompt costs milliseconds here, not minutes of labelling."""
    context = context_length(family)
    budget = max(min(max_tokens, context - context // 8), 1)
    out, warnings = [], []
    for s in samples:
        head = s.prompt[: budget * 64]
        ids = family.tokenizer.encode(head, add_special_tokens=False)
        if len(ids) <= budget and len(head) == len(s.prompt):
            out.append(s)
            continue
        out.append(replace(s, prompt=family.tokenizer.decode(ids[:budget]) if len(ids) > budget else head))
        msg = f"sample {s.source}: prompt of {len(s.prompt)} characters cut to {min(len(ids), budget)} tokens"
        warnings.append(msg)
        say(f"warning: {msg}")
    return out, warnings


def prepare_calibration(family: Family, samples: list[Sample], answers: list[str | None], say) -> tuple[list[Prepared], list[str]]:
    limit = context_length(family)
    prepared, warnings = [], []
    for s, answer in zip(samples, answers):
        p = family.prepare(s.images, s.prompt, answer)
        fitted = fit_context(p, limit)
        if fitted is None:
            msg = f"sample {s.source}: {p.seq_len} tokens exceed the context of {limit} inside its image tokens: skipped"
        elif fitted is not p:
            msg = f"sample {s.source}: {p.seq_len} tokens exceed the context of {limit}: truncated"
        else:
            msg = None
        if msg:
            warnings.append(msg)
            say(f"warning: {msg}")
        if fitted is not None:
            prepared.append(fitted)
    if not prepared:
        raise CalibrationDataError("no calibration sample fits the model's context")
    return prepared, warnings


def _module_path(model: torch.nn.Module, target: torch.nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise ValueError("module not found in model")


def untie_lm_head(model, head: torch.nn.Module) -> bool:
    """Give ``head`` its own weight when it shares the input embeddings' (tied), so that quantizing it
    leaves the embeddings float, as ``embed_tokens.onnx`` keeps them. True if it was tied."""
    emb = model.get_input_embeddings()
    if emb is None or head.weight is not emb.weight:
        return False
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    return True


def component_blocks(family: Family, model, comp: str) -> list[tuple[str, torch.nn.Module]]:
    if comp == "lm_head":
        head = family.lm_head(model)
        untie_lm_head(model, head)
        return [(_module_path(model, head), head)]
    if comp == "projector":  # one module, or several side by side (Qwen3-VL's merger and deepstack mergers)
        projs = family.projectors(model) if hasattr(family, "projectors") else [family.projector(model)]
        return [(_module_path(model, proj), proj) for proj in projs]
    stack = family.vision_layers(model) if comp == "vision" else family.decoder_layers(model)
    prefix = _module_path(model, stack)
    return [(f"{prefix}.{i}", blk) for i, blk in enumerate(stack)]


def weight_function(recipe: Recipe, sal: Saliency | None, comp: str, blocks, num_llm_layers: int):
    """Per-token weights for ``quantize_blocks``: saliency (vlmq), modality weights (mbq) or None."""
    if sal is None or recipe.method not in NEEDS_SALIENCY:
        return None
    if recipe.method == "mbq":
        if comp != "llm":
            return None  # vision / projector: one modality; lm_head: uniform weights
        ratios = mbq_factors(sal)

        def mbq(bi, _layer, si):
            r = ratios.get(f"llm.{bi}", 1.0)
            return torch.from_numpy(np.where(sal.modality[si] == "vision", r, 1.0).astype(np.float32))
        return mbq

    block_names = [name for name, _ in blocks]

    last_llm = f"llm.{num_llm_layers - 1}"

    def vlmq(bi, layer, si):
        if comp == "projector":
            return sal.weights("projector", si)
        if comp == "lm_head":  # its input is the last block's output, normed: that block's factors
            return sal.weights(last_llm, si)
        site = f"{comp}.{bi}"
        if sal.config.site == "linear" and comp == "llm":
            rel = layer[len(block_names[bi]) + 1:]
            g = sal.weights(f"{site}.{rel}", si)
            if g is not None:
                return g
        return sal.weights(site, si)
    return vlmq


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device_available(device: str | None) -> None:
    """A one-line error for a calibration device this machine does not have (before the model loads)."""
    if device is None:
        return
    kind, _, index = device.partition(":")
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise VlmqError(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__}); "
                            "use --device cpu or leave --device out")
        if index and int(index) >= n:
            raise VlmqError(f"--device {device}: torch sees {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")
    elif kind != "cpu":
        backend = getattr(torch.backends, kind, None) if kind == "mps" else getattr(torch, kind, None)
        if backend is None or not backend.is_available():
            raise VlmqError(f"--device {device}: not available in this torch build; use --device cpu")


def open_checkpoint(root: Path | None, key: dict, say) -> Path | None:
    """A resume folder for this exact job (model, recipe, data); a folder for another job is cleared."""
    if root is None:
        return None
    root = Path(root)
    stamp = json.dumps(key, sort_keys=True, default=str)
    keyfile = root / "key.json"
    if root.exists() and (not keyfile.is_file() or keyfile.read_text() != stamp):
        shutil.rmtree(root)
    if root.exists() and any(root.iterdir()):
        say(f"found calibration checkpoint {root}: resuming")
    root.mkdir(parents=True, exist_ok=True)
    keyfile.write_text(stamp)
    return root


def calibration_batches(family: Family, model, samples: list[Sample], recipe: Recipe, work: Path | None, say,
                        device: str, ckpt: Path | None, max_prompt_tokens: int, timings: dict):
    """The calibration data pass's inputs: ``(batches, saliency or None, warnings)`` (prompts fitted, samples
    self-labelled and saliency computed where the method needs it)."""
    samples, cut = fit_prompts(family, samples, max_prompt_tokens, say)
    answers = [s.answer for s in samples]
    sal = None
    if recipe.method in NEEDS_SALIENCY:
        t0 = time.perf_counter()
        sal_file = ckpt / "saliency" if ckpt else None
        if sal_file is not None and sal_file.with_suffix(".json").is_file():
            saved = load_tree(sal_file, (Saliency, SaliencyConfig))
            answers, sal = saved["answers"], saved["saliency"]
            prepared, warnings = prepare_calibration(family, samples, answers, say)
            say("saliency factors loaded from the checkpoint")
        else:
            if any(a is None for a in answers):
                say(f"self-labelling {sum(a is None for a in answers)} samples without answers")
                answers = self_label(family, model, samples)
            prepared, warnings = prepare_calibration(family, samples, answers, say)
            home = next(model.parameters()).device
            model.to(device)
            try:
                sal = compute_saliency(family, model, prepared, recipe.saliency, progress=say, device=device)
            finally:
                model.to(home)
            if sal_file is not None:
                save_tree({"answers": answers, "saliency": sal}, sal_file)
        if work is not None:
            sal.save(Path(work) / "saliency.safetensors")
        timings["saliency"] = time.perf_counter() - t0
    else:
        prepared, warnings = prepare_calibration(family, samples, answers, say)
    batches = [family.hf_inputs(p) for p in prepared]
    return batches, sal, cut + warnings


def calibrate(family: Family, model, samples: list[Sample], recipe: Recipe, work: Path | None = None,
              say=None, device: str | None = None, checkpoint: Path | None = None,
              job_key: dict | None = None, max_prompt_tokens: int = CALIB_PROMPT_TOKENS) -> CalibrationResult:
    """Calibrate ``recipe.components`` of ``model`` in place (weights become their dequantized values).

    ``checkpoint``: a folder where finished blocks are kept; rerunning the same job resumes there.
    A data-free method (:data:`DATA_FREE`: RTN) reads no sample and runs no forward pass: each Linear is
    quantized from its weight alone (:func:`quantize_weights`); ``samples`` and ``checkpoint`` are unused.
    ``max_prompt_tokens``: each prompt's text is cut to this many tokens first (:func:`fit_prompts`).
    """
    say = say or (lambda _m: None)
    recipe.check()
    device = device or default_device()
    timings = {}
    data_free = recipe.method in DATA_FREE  # no sample, no forward pass, nothing to resume
    if data_free:
        batches, sal, warnings = None, None, []
    else:
        ckpt = open_checkpoint(checkpoint, {"recipe": recipe.as_dict(), "format": CHECKPOINT_FORMAT,
                                            "max_prompt_tokens": max_prompt_tokens, **(job_key or {})}, say)
        batches, sal, warnings = calibration_batches(family, model, samples, recipe, work, say, device, ckpt,
                                                     max_prompt_tokens, timings)
    layers, records = [], []
    for comp in COMPONENTS:  # execution order
        if comp not in recipe.components:
            continue
        t0 = time.perf_counter()
        blocks = component_blocks(family, model, comp)
        say(f"{comp}: {recipe.method} {recipe.components[comp].label()} over {len(blocks)} block(s)"
            + (", from the weights alone (no calibration data)" if data_free else ""))
        if data_free:
            q, r = quantize_weights(blocks, CALIBRATOR[recipe.method], recipe.quant_config(comp), say,
                                    component=comp, device=device)
        else:
            act = recipe.components[comp].act
            # projector modules side by side read inputs of their own: each one calibrates alone, not as a chain
            chains = [[b] for b in blocks] if comp == "projector" else [blocks]
            q, r = [], []
            for k, chain in enumerate(chains):
                acts = ActRanges(act, recipe.act_calibrator, chain) if act else None
                sub = comp if k == 0 else f"{comp}{k}"
                qk, rk = quantize_blocks(model, chain, batches, CALIBRATOR[recipe.method], recipe.quant_config(comp),
                                         weight_function(recipe, sal, comp, chain, family.num_layers), say,
                                         component=comp, device=device,
                                         checkpoint=ckpt / sub if ckpt and not acts else None,
                                         first_token_weight=recipe.sink_weight if comp in ("llm", "lm_head") else 1.0,
                                         true_sequential=recipe.true_sequential, observe=acts.observe if acts else None,
                                         smooth=act if acts and recipe.smooth else None)
                q += acts.finish(model, qk, rk) if acts else qk
                r += rk
        layers += q
        records += r
        timings[comp] = time.perf_counter() - t0
    for r in records:
        r.method = recipe.method if r.bits else "float"
    return CalibrationResult(layers, records, sal, warnings, timings)
