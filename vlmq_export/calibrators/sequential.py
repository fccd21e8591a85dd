"""Sequential block-by-block calibration (the GPTQ family's outer loop).

Block i is calibrated on inputs produced by the already-quantized blocks 0..i-1, so each block
corrects for the error of the blocks before it. Per-token weights (VLMQ's saliency factors, MBQ's
modality weights) enter through ``weight_fn(block_index, layer_name, sample_index)``, which returns a
tensor shaped like the layer input's leading dims (or None: all ones). Calibrators that match the
full-precision outputs (GPTAQ, ``needs_float_inputs``) also get each layer's inputs from the
full-precision model, propagated alongside.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import NumericalError, VlmqError
from ..export.qdq import QuantizedLinear, weight_key
from . import QuantConfig, make_calibrator

# legal INT4 block sizes, largest first (TensorRT: 128 and 64; ONNX Runtime also 32 and 16)
FALLBACK_GROUPS = (128, 64, 32, 16)

WeightFn = Callable[[int, str, int], "torch.Tensor | None"]


@dataclass
class LayerPlan:
    name: str  # module path in the HF model
    module: nn.Linear
    bits: int | None  # None: kept float
    group_size: int | None
    note: str = ""  # why the plan differs from the recipe


@dataclass
class LayerRecord:
    name: str
    method: str
    bits: int | None
    group_size: int | None
    error: float | None = None
    damp: float | None = None
    seconds: float = 0.0
    note: str = ""
    shape: list[int] = field(default_factory=list)
    component: str = "llm"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def plan_layers(named_linears: list[tuple[str, nn.Linear]], bits: int, group_size: int) -> list[LayerPlan]:
    """Decide every layer's bits and block before calibrating.

    A layer whose input width is not divisible by the requested block gets the largest smaller legal
    block that divides it; if none does, it stays float. Both are recorded in the plan's note.
    """
    plans = []
    for name, mod in named_linears:
        k = mod.in_features
        if group_size == -1 or k % group_size == 0:
            plans.append(LayerPlan(name, mod, bits, group_size))
            continue
        smaller = [g for g in FALLBACK_GROUPS if g < group_size and k % g == 0]
        if smaller:
            plans.append(LayerPlan(name, mod, bits, smaller[0],
                                   f"in_features {k} not divisible by {group_size}: block {smaller[0]}"))
        else:
            plans.append(LayerPlan(name, mod, None, None,
                                   f"in_features {k} not divisible by any legal block: kept float"))
    return plans


def block_linears(block: nn.Module, prefix: str) -> list[tuple[str, nn.Linear]]:
    return [(f"{prefix}.{n}" if n else prefix, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]


class _Stop(Exception):
    pass


Captured = list[tuple[int, tuple, dict]]  # (sample index, args with hidden states first, kwargs)
# sample index -> one block's (args after the hidden states, kwargs, what the model added to the previous block's
# output before this block or None)
BlockExtras = dict[int, tuple[tuple, dict, "torch.Tensor | None"]]


def capture_inputs(model: nn.Module, blocks: list[nn.Module], batches: list[dict]) -> tuple[Captured, list[BlockExtras]]:
    """Run the model on each batch up to the last of ``blocks`` and keep the first block's inputs and every
    block's own other inputs (args after the hidden states, kwargs): blocks may take different ones
    (Qwen2.5-VL's windowed and full-attention vision blocks get different ``cu_seqlens``; sliding-window
    and global layers different masks), so no block may be run with block 0's. Samples that never reach
    the first block (e.g. text-only samples for a vision block) are left out.

    Where the model adds something to a block's output before the next block (Qwen3-VL's deepstack features after
    its first decoder layers), the difference is kept with the next block's extras and added to the propagated
    hidden states (:func:`with_block_inputs`); where the next block reads the same tensor, it is None."""
    captured: Captured = []
    extras: list[BlockExtras] = [{} for _ in blocks]
    current = {"i": 0}
    previous = {}  # the output of the block that ran last

    def hook(bi, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if bi == 0:
            captured.append((current["i"], (hidden.detach(),) + tuple(args[1:]), kwargs))
        added = None
        prev = previous.pop("out", None)
        if bi > 0 and prev is not None and hidden is not prev and prev.shape == hidden.shape:
            added = (hidden - prev).detach()
            added = added if added.any() else None
        extras[bi][current["i"]] = (tuple(args[1:]), kwargs, added)
        if bi == len(blocks) - 1:
            raise _Stop

    handles = [b.register_forward_pre_hook(lambda _m, a, k, bi=bi: hook(bi, a, k), with_kwargs=True)
               for bi, b in enumerate(blocks)]
    handles += [b.register_forward_hook(lambda _m, _a, out: previous.__setitem__("out", _block_output(out)))
                for b in blocks[:-1]]
    try:
        with torch.no_grad():
            for i, inputs in enumerate(batches):
                current["i"] = i
                try:
                    model(**inputs, use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return captured, extras


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[dict]) -> Captured:
    """The inputs of ``first_block`` (see :func:`capture_inputs`)."""
    return capture_inputs(model, [first_block], batches)[0]


def with_block_inputs(inputs: Captured, hidden: list[torch.Tensor], extras: BlockExtras) -> Captured:
    """``inputs``' samples with new hidden states (plus what the model adds before the block, if anything) and the
    other inputs of the block ``extras`` belongs to."""
    def plus(h, added):
        return h if added is None else h + added.to(h.device, h.dtype)

    return [(si, (plus(h, extras[si][2]), *extras[si][0]), extras[si][1]) for (si, _args, _kw), h in zip(inputs, hidden)]


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise NumericalError(f"non-finite activations (NaN/Inf) at {where}")


def to_device(obj, device):
    """Tensors inside tuples / lists / dicts moved to ``device`` (other objects as they are)."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _run_block(block, inputs: Captured, where: str, device) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for _si, args, kwargs in inputs:
            out = _block_output(block(*to_device(args, device), **to_device(kwargs, device)))
            _check_finite(out, f"output of {where}")
            outs.append(out.cpu())
    return outs


SMOOTH_TOKENS = 4096  # tokens per input kept for the smoothing's alpha search (the maxima see every token)


def smooth_block(block: nn.Module, modules: dict[str, nn.Linear], inputs, token_weights: Callable, device,
                 fmt: str, weight_bits: int = 8) -> tuple[dict[str, tuple], tuple[list[list[str]], bool]]:
    """Per-channel smoothing (calibrators/smooth.py) of a block's Linears before their calibration: the Linears that
    read one tensor share one ``s``, chosen from that tensor on every sample of ``inputs`` (the block's calibration
    inputs) with the token weights ``token_weights(name, sample, x)`` gives, and installed in place
    (``install_input_scale``) where it lowers the weighted W8A8 output error. Returns ``{layer name: (Smoothing,
    names of its group, key of its float weight before smoothing)}`` for every layer of ``modules``, and
    :func:`input_groups`' answer, found before the hooks (after them each layer reads a tensor of its own)."""
    from .smooth import choose_smoothing, install_input_scale

    probe = input_groups(block, modules, inputs[0], device)
    first = {g[0]: g for g in probe[0]}
    amax: dict[tuple, torch.Tensor] = {}  # (layer, fold) -> max |x| per channel; fold = sample index parity
    kept: dict[str, list] = {n: [] for n in first}
    per_sample = max(1, SMOOTH_TOKENS // max(1, len(inputs)))
    state = {"sample": 0}

    def keep(name):
        def hook(_mod, args, _out):
            x = args[0].detach().float().cpu()
            g = token_weights(name, state["sample"], x)
            x2 = x.reshape(-1, x.shape[-1])
            g2 = torch.ones(x2.shape[0]) if g is None else torch.as_tensor(g, dtype=torch.float32).reshape(-1)
            live = x2[g2 > 0]
            fold = state["sample"] % 2 == 1
            if len(live):
                m = live.abs().amax(dim=0)
                k = (name, fold)
                amax[k] = m if k not in amax else torch.maximum(amax[k], m)
            step = max(1, -(-x2.shape[0] // per_sample))
            sub = x2[::step].clone()  # a copy: a strided view would keep every token's storage alive
            kept[name].append((sub, g2[::step].clone(), torch.full((len(sub),), fold)))
        return hook

    hooks = [modules[n].register_forward_hook(keep(n)) for n in first]
    try:
        with torch.no_grad():
            for si, args, kwargs in inputs:
                state["sample"] = si
                block(*to_device(args, device), **to_device(kwargs, device))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, group in first.items():
        if not kept[name]:
            continue
        x = torch.cat([x for x, _g, _f in kept[name]])
        g = torch.cat([g for _x, g, _f in kept[name]])
        fold = torch.cat([f for _x, _g, f in kept[name]])
        w = torch.cat([modules[n].weight.detach().float().cpu() for n in group])
        zero = torch.zeros(w.shape[1])
        a0, a1 = amax.get((name, False), zero), amax.get((name, True), zero)
        sm = choose_smoothing(x, w, g, fmt, x_amax=torch.maximum(a0, a1), folds=(fold, a0, a1),
                              weight_bits=weight_bits)
        for n in group:
            prior = weight_key(modules[n].weight.detach().float().cpu().numpy())
            if sm.alpha is not None:
                install_input_scale(modules[n], sm.scales)
            out[n] = (sm, group, prior)
    return out, probe


def input_groups(block: nn.Module, modules: dict[str, nn.Module], sample: tuple[int, tuple, dict],
                 device) -> tuple[list[list[str]], bool]:
    """``modules`` grouped by the tensor they read, groups in execution order (one forward of one sample),
    and whether every module ran exactly once (then a pass for one group may stop after its last layer).

    In a Llama-style decoder block: [q, k, v], [o], [gate, up], [down]. The probe keeps every input
    alive until the end, so no later input can reuse a freed one's memory and look shared.
    """
    seen: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def keep(name):
        def hook(_mod, args, _out):  # returns None: the module's output stays as it is
            seen.setdefault(name, args[0])
            calls[name] = calls.get(name, 0) + 1
        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
    try:
        with torch.no_grad():
            _si, args, kwargs = sample
            block(*to_device(args, device), **to_device(kwargs, device))
    finally:
        for h in hooks:
            h.remove()
    groups: dict[tuple, list[str]] = {}
    for name, x in seen.items():  # insertion order = execution order
        groups.setdefault((x.data_ptr(), tuple(x.shape), x.dtype), []).append(name)
    once = all(calls.get(n) == 1 for n in modules)
    return list(groups.values()) + [[n] for n in modules if n not in seen], once


CHECKPOINT_FORMAT = 2  # safetensors + JSON; 1 was torch pickles (never loaded: the job key differs)


def save_tree(obj, path: Path) -> None:
    """``obj`` as ``path.safetensors`` (its tensors and numeric arrays) and ``path.json`` (the structure:
    tuples, lists, str-keyed dicts, numbers, strings, None, string arrays and dataclasses by type name),
    each written whole and then renamed. Raises TypeError for anything else. Nothing is pickled, so loading
    runs no code (:func:`load_tree`)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    by_id: dict[int, str] = {}
    alive = []  # every object keyed by id() stays referenced, so no later temporary reuses its id
    storages: set[tuple[int, int]] = set()

    def tensor_ref(obj: torch.Tensor) -> str:
        if id(obj) not in by_id:  # the same tensor twice (e.g. block 0's float and quantized inputs) is stored once
            t = obj.detach().cpu().contiguous()
            where = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if t.numel() and where in storages:  # shares memory with one already stored: safetensors wants a copy
                t = t.clone()
            storages.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
            by_id[id(obj)] = f"t{len(tensors)}"
            alive.append(obj)
            tensors[by_id[id(obj)]] = t
        return by_id[id(obj)]

    def enc(o):
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        if isinstance(o, np.generic):
            return o.item()
        if torch.is_tensor(o):
            return {"$": "tensor", "key": tensor_ref(o)}
        if isinstance(o, np.ndarray):
            if o.dtype.kind in "US" or (o.dtype.kind == "O" and all(isinstance(x, str) for x in o.flat)):
                return {"$": "strings", "dtype": o.dtype.str, "data": o.tolist()}
            return {"$": "array", "key": tensor_ref(torch.from_numpy(np.ascontiguousarray(o)))}
        if isinstance(o, tuple):
            return {"$": "tuple", "items": [enc(x) for x in o]}
        if isinstance(o, list):
            return [enc(x) for x in o]
        if isinstance(o, dict) and all(isinstance(k, str) for k in o):
            return {"$": "dict", "items": {k: enc(v) for k, v in o.items()}}
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return {"$": "dataclass", "type": type(o).__name__,
                    "fields": {f.name: enc(getattr(o, f.name)) for f in dataclasses.fields(o)}}
        raise TypeError(f"a calibration checkpoint cannot hold a {type(o).__name__}")

    doc = json.dumps({"format": CHECKPOINT_FORMAT, "tree": enc(obj)})
    path = Path(path)
    for suffix, write in ((".safetensors", lambda f: save_file(tensors, str(f))), (".json", lambda f: f.write_text(doc))):
        tmp = path.with_name(path.name + suffix + ".tmp")
        write(tmp)
        os.replace(tmp, path.with_name(path.name + suffix))


def load_tree(path: Path, types: tuple[type, ...] = ()):
    """What :func:`save_tree` wrote to ``path``; dataclasses are rebuilt only for the classes in ``types``.
    A file that is not such a checkpoint is a one-line VlmqError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    allowed = {t.__name__: t for t in types}

    def dec(o):
        if isinstance(o, list):
            return [dec(x) for x in o]
        if not isinstance(o, dict):
            return o
        kind = o["$"]
        if kind == "tensor":
            return tensors[o["key"]]
        if kind == "array":
            return tensors[o["key"]].numpy()
        if kind == "strings":
            return np.array(o["data"], dtype=o["dtype"])
        if kind == "tuple":
            return tuple(dec(x) for x in o["items"])
        if kind == "dict":
            return {k: dec(v) for k, v in o["items"].items()}
        if kind == "dataclass" and o["type"] in allowed:
            return allowed[o["type"]](**{k: dec(v) for k, v in o["fields"].items()})
        raise ValueError(f"unexpected entry {kind!r} {o.get('type', '')}")

    try:
        doc = json.loads(path.with_name(path.name + ".json").read_text())
        if doc.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        tensors = load_file(str(path.with_name(path.name + ".safetensors")))
        return dec(doc["tree"])
    except (ValueError, KeyError, TypeError, AttributeError, OSError, SafetensorError) as exc:
        raise VlmqError(f"{path}: not a readable calibration checkpoint ({type(exc).__name__}: {exc}); "
                        f"delete {path.parent} to calibrate from the start") from None


class Checkpoint:
    """Per-block results and the propagated inputs on disk (safetensors + JSON, :func:`save_tree`), so an
    interrupted run resumes at the next block."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def done(self, n_blocks: int) -> int:
        """Number of leading blocks already calibrated."""
        k = 0
        while k < n_blocks and (self.root / f"block{k}.json").is_file():
            k += 1
        return k

    def save_block(self, bi: int, layers, records, inputs, float_inputs) -> None:
        save_tree({"inputs": inputs, "float_inputs": float_inputs}, self.root / f"inputs{bi}")
        save_tree({"layers": layers, "records": records}, self.root / f"block{bi}")  # last: marks the block done
        for suffix in (".json", ".safetensors"):
            (self.root / f"inputs{bi - 1}{suffix}").unlink(missing_ok=True)

    def load_block(self, bi: int):
        return load_tree(self.root / f"block{bi}", (QuantizedLinear, LayerRecord))

    def load_inputs(self, bi: int):
        path = self.root / f"inputs{bi}"
        return load_tree(path) if path.with_name(path.name + ".json").is_file() else None


def sink_weights(x: torch.Tensor, g: torch.Tensor | None, first_token_weight: float) -> torch.Tensor:
    """Per-token weights for a layer input ``x`` [batch, tokens, K]: ``g`` (None: ones) with each sequence's
    first token multiplied by ``first_token_weight``.

    Why: in a decoder-only LM the first token is the attention sink. SmolLM2-135M carries massive
    activations there (~2000 in the last blocks' down_proj inputs) and every later token attends to its
    keys and values, so its output error reaches the whole sequence, yet it is one token of hundreds in
    the Hessian. Measured on SmolLM2-135M W4 g128, 64 generated samples (perplexity, FP 22.2): weight 1
    (plain GPTQ) 30.8, 0 (sink left out) 42.2, 10: 28.0.
    """
    if x.dim() < 2:
        raise ValueError(f"first-token weighting needs [batch, tokens, K] inputs, got shape {tuple(x.shape)}")
    w = torch.ones(x.shape[:-1], dtype=torch.float32)
    if g is not None:
        g = torch.as_tensor(g, dtype=torch.float32).cpu()
        if g.dim() == x.dim() and g.shape[-1] == 1:  # [..., 1] is accepted by add_batch too
            g = g[..., 0]
        w = w * g  # broadcast to the input's leading dims
    w[..., 0] *= float(first_token_weight)
    return w


def plan_blocks(blocks: list[tuple[str, nn.Module]], config: QuantConfig, say) -> list[list[LayerPlan]]:
    """:func:`plan_layers` of every block's Linears, each distinct decision said once (not once per layer)."""
    all_plans = [plan_layers(block_linears(block, name), config.bits, config.group_size) for name, block in blocks]
    by_note: dict[str, list[str]] = {}
    for p in (p for plans in all_plans for p in plans if p.note):
        by_note.setdefault(p.note, []).append(p.name)
    for note, names in by_note.items():
        say(f"{names[0]}: {note}" if len(names) == 1 else f"{len(names)} layers (e.g. {names[0]}): {note}")
    return all_plans


def float_record(p: LayerPlan, component: str) -> LayerRecord:
    return LayerRecord(p.name, "float", None, None, note=p.note, shape=list(p.module.weight.shape), component=component)


def layer_result(p: LayerPlan, res, key: str, shape: list[int], seconds: float, method: str,
                 component: str) -> tuple[QuantizedLinear, LayerRecord]:
    """The layer as the ONNX pass writes it and its record (error and damping None where not measured: NaN)."""
    def measured(v):
        return None if math.isnan(v) else float(v)

    q = QuantizedLinear(name=p.name, codes=res.codes.cpu().numpy(), scales=res.scales.float().cpu().numpy(),
                        bits=res.bits, group_size=res.group_size, key=key,
                        zeros=None if res.zeros is None else res.zeros.cpu().numpy())
    return q, LayerRecord(p.name, method, res.bits, res.group_size, measured(res.error), measured(res.damp_used),
                          seconds, p.note, shape, component)


def quantize_blocks(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    batches: list[dict],
    method: str,
    config: QuantConfig,
    weight_fn: WeightFn | None = None,
    progress: Callable[[str], None] | None = None,
    component: str = "llm",
    device: str | torch.device | None = None,
    checkpoint: Path | None = None,
    first_token_weight: float = 1.0,
    true_sequential: bool = False,
    observe: Callable[[str, torch.Tensor, "torch.Tensor | None"], None] | None = None,
    smooth: str | None = None,
) -> tuple[list[QuantizedLinear], list[LayerRecord]]:
    """Calibrate every Linear of ``blocks`` (named, in execution order), writing the dequantized weights
    back into the model.

    ``batches`` are HF forward kwargs (one sample each). Returns the layers as the ONNX pass writes
    them (keys = hashes of the *float* weights) and one record per layer (float ones too).

    Memory: captured activations stay on the CPU; each block in turn is moved to ``device`` (e.g.
    CUDA), calibrated there with its calibrators, and moved back. With ``checkpoint`` (a folder), each
    finished block and the propagated inputs are saved, and a later call with the same folder resumes
    after the last finished block.

    ``first_token_weight`` multiplies the weight of each sample's first token (on top of ``weight_fn``'s):
    in a decoder that token is the attention sink every later token reads (see :func:`sink_weights`).

    ``true_sequential`` (GPTQ's ``--true-sequential``): inside a block too, each group of layers that
    read the same tensor (:func:`input_groups`) is calibrated on inputs that come through the block's
    already-quantized earlier groups: one forward pass over the samples per group instead of one per
    block. Off, every layer of a block sees the inputs of the block with all its weights still float.

    ``observe(layer_name, x, g)``: also called with every input a weight calibrator gets and its token weights
    (the activation calibrators of W8A8, calibrators/activation.py); not called for resumed blocks.

    ``smooth`` ("int8" or "fp8", W8A8 components): each block's Linears are first smoothed (:func:`smooth_block`)
    for that activation format; their layers carry the scales (``QuantizedLinear.smooth``, with ``prior_key`` the
    float weight's key before smoothing, which the float graphs hold) and their records ``smooth``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    ckpt = Checkpoint(checkpoint) if checkpoint is not None else None
    say = progress or (lambda _msg: None)
    all_plans = plan_blocks(blocks, config, say)  # every layer's bits and block, before any calibration work
    quantized: list[QuantizedLinear] = []
    records: list[LayerRecord] = []
    start = ckpt.done(len(blocks)) if ckpt else 0
    for bi in range(start):  # resume: re-apply finished blocks
        saved = ckpt.load_block(bi)
        modules = dict(block_linears(blocks[bi][1], blocks[bi][0]))
        for q in saved["layers"]:
            w = modules[q.name].weight
            w.data = torch.from_numpy(q.dequantize()).to(w.dtype).to(w.device)
        quantized += saved["layers"]
        records += saved["records"]
    if start:
        say(f"{component}: resumed after block {start}/{len(blocks)} from {ckpt.root}")
    if start == len(blocks):
        return quantized, records
    captured, extras = capture_inputs(model, [b for _n, b in blocks], batches)  # each block's own kwargs
    saved_inputs = ckpt.load_inputs(start - 1) if start else None
    if saved_inputs is not None:
        inputs, float_inputs = saved_inputs["inputs"], saved_inputs["float_inputs"]
    else:
        inputs, float_inputs = captured, None
    if not inputs:
        return [], [LayerRecord(p.name, "float", None, None, note="no calibration sample reaches this component",
                                shape=list(p.module.weight.shape), component=component)
                    for plans in all_plans for p in plans]
    t_all = time.perf_counter()
    for bi, (bname, block) in enumerate(blocks):
        if bi < start:
            continue
        t_block = time.perf_counter()
        n_before = len(quantized), len(records)
        home = next(block.parameters()).device
        block.to(device)
        plans = all_plans[bi]
        def token_weights(name, si, x, bi=bi):  # a layer input's per-token weights (saliency, sink)
            g = weight_fn(bi, name, si) if weight_fn else None
            return sink_weights(x, g, first_token_weight) if first_token_weight != 1.0 else g

        smoothed, probe = {}, None
        if smooth:
            smoothed, probe = smooth_block(block, {p.name: p.module for p in plans if p.bits is not None}, inputs,
                                           token_weights, device, smooth, weight_bits=config.bits)
        cals = {}
        for p in plans:
            if p.bits is None:
                records.append(float_record(p, component))
                continue
            cfg = QuantConfig(**{**config.__dict__, "group_size": p.group_size})
            cals[p.name] = (p, make_calibrator(method, p.module.weight.data, cfg, p.name))
        paired = any(getattr(c, "needs_float_inputs", False) for _p, c in cals.values())
        if paired and float_inputs is None:
            float_inputs = list(inputs)  # block 0: both models see the same inputs

        state = {"sample": 0, "stash": None, "fp": {}, "active": set(cals), "stop_after": None}
        hooks = []
        for name, (p, cal) in cals.items():
            def hook(mod, args, _out, cal=cal, name=name):
                if name not in state["active"]:
                    return
                x = args[0].detach()
                _check_finite(x, f"input of {name}")
                si = state["sample"]
                if state["stash"] is not None:  # full-precision pass of a paired method: keep x
                    state["stash"][(name, si)] = x
                    return
                g = token_weights(name, si, x)
                if observe is not None:
                    observe(name, x, g)

                if getattr(cal, "needs_float_inputs", False):
                    cal.add_pair(x, state["fp"].pop((name, si)), g)
                else:
                    cal.add_batch(x, g)
                if name == state["stop_after"]:  # the rest of the block's forward feeds no calibrator
                    raise _Stop
            hooks.append(p.module.register_forward_hook(hook))
        solved: dict[str, tuple] = {}
        try:
            with torch.no_grad():
                next_float = None
                if paired:  # every layer's full-precision input, before any weight of the block changes
                    state["stash"] = state["fp"]
                    next_float = []
                    for si, args, kwargs in float_inputs:
                        state["sample"] = si
                        next_float.append(_block_output(block(*to_device(args, device),
                                                              **to_device(kwargs, device))).cpu())
                    state["stash"] = None
                groups, may_stop = [list(cals)], False
                if true_sequential and len(cals) > 1:
                    state["active"] = set()  # the probe feeds no calibrator
                    groups, may_stop = probe or input_groups(block, {n: p.module for n, (p, _c) in cals.items()},
                                                             inputs[0], device)
                for group in groups:
                    state["active"] = set(group)
                    state["stop_after"] = group[-1] if may_stop else None
                    for si, args, kwargs in inputs:
                        state["sample"] = si
                        try:
                            block(*to_device(args, device), **to_device(kwargs, device))
                        except _Stop:
                            pass
                    for name in group:  # solve and write back: later groups see these weights quantized
                        p, cal = cals[name]
                        t0 = time.perf_counter()
                        float_w = p.module.weight.data
                        key = weight_key(float_w.detach().float().cpu().numpy())
                        res = cal.solve()
                        cal.free()
                        p.module.weight.data = res.dequantize().to(float_w.dtype).to(float_w.device)
                        solved[name] = (res, key, list(float_w.shape), time.perf_counter() - t0)
        finally:
            for h in hooks:
                h.remove()

        for name, (p, _cal) in cals.items():  # records in the block's layer order
            q, r = layer_result(p, *solved[name], method, component)
            if name in smoothed:
                sm, group, prior = smoothed[name]
                r.smooth = {**sm.as_dict(), "group": list(group)}
                if sm.alpha is not None:
                    q = dataclasses.replace(q, smooth=sm.scales.numpy().astype(np.float32), prior_key=prior)
            quantized.append(q)
            records.append(r)

        if bi + 1 < len(blocks):  # propagate through the now-quantized block
            outs = _run_block(block, inputs, bname, device)
            inputs = with_block_inputs(inputs, outs, extras[bi + 1])
            if paired:
                float_inputs = with_block_inputs(float_inputs, next_float, extras[bi + 1])
        block.to(home)
        if ckpt is not None:
            try:
                ckpt.save_block(bi, quantized[n_before[0]:], records[n_before[1]:], inputs, float_inputs)
            except TypeError as exc:  # a block input this format does not hold: calibrate on, without resume
                say(f"warning: no calibration checkpoint for {component}: {exc}")
                ckpt = None
        done = records[n_before[1]:]
        per_layer = ", ".join(f"{r.name[len(bname) + 1:] or r.name} {r.error:.3g}" for r in done if r.error is not None)
        eta = (time.perf_counter() - t_all) / (bi + 1 - start) * (len(blocks) - bi - 1)
        say(f"{component} block {bi + 1}/{len(blocks)}: {time.perf_counter() - t_block:.1f}s, "
            f"elapsed {time.perf_counter() - t_all:.0f}s, ETA {eta:.0f}s; errors: {per_layer or 'n/a'}")
    return quantized, records


def quantize_weights(blocks: list[tuple[str, nn.Module]], method: str, config: QuantConfig,
                     progress: Callable[[str], None] | None = None, component: str = "llm",
                     device: str | torch.device | None = None) -> tuple[list[QuantizedLinear], list[LayerRecord]]:
    """:func:`quantize_blocks` for a data-free ``method`` (RTN): every Linear of ``blocks`` quantized from its
    weight alone, on ``device``, with no calibration sample and no forward pass; the same codes and scales as
    the data pass gives (they never depended on it), the dequantized weights written back. The records'
    error is None: without data it is not measured."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    quantized: list[QuantizedLinear] = []
    records: list[LayerRecord] = []
    for plans in plan_blocks(blocks, config, progress or (lambda _msg: None)):
        for p in plans:
            if p.bits is None:
                records.append(float_record(p, component))
                continue
            t0 = time.perf_counter()
            float_w = p.module.weight.data
            cal = make_calibrator(method, float_w.to(device), QuantConfig(**{**config.__dict__, "group_size": p.group_size}),
                                  p.name)
            if not getattr(cal, "data_free", False):
                raise ValueError(f"--method {method} needs calibration data: use quantize_blocks")
            key = weight_key(float_w.detach().float().cpu().numpy())
            res = cal.solve()
            p.module.weight.data = res.dequantize().to(float_w.dtype).to(float_w.device)
            q, r = layer_result(p, res, key, list(float_w.shape), time.perf_counter() - t0, method, component)
            quantized.append(q)
            records.append(r)
    return quantized, records
