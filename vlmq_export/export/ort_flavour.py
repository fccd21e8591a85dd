"""The ONNX Runtime flavour of the language-model graph (``--target onnxruntime``, ``--llm-graph ort``).

Built from the portable ``llm.onnx`` that the export wrote (float or Q/DQ), so it holds the same weights, the same
INT4 codes and scales, bit for bit; only the graph around them changes, into ONNX Runtime's own contrib operators::

    x ─SkipSimplifiedLayerNormalization─▶ MatMul(DQ(q|k|v)) ─▶ GroupQueryAttention ─▶ MatMul(DQ(o)) ─▶ ...
      ─SkipSimplifiedLayerNormalization─▶ MatMul(DQ(gate|up)) ─▶ Split ─▶ SiLU·up ─▶ MatMul(DQ(down)) ─▶ ...

- ``com.microsoft.GroupQueryAttention`` per layer, with packed q|k|v and one pre-allocated past/present buffer
  per layer and kind (``past_key_i`` and ``present_key_i`` are the same memory, [batch, kv_heads, capacity,
  head_dim]): the cache is written in place, no Concat, no repeat_kv Expand, and the step cost does not grow with
  the context. ``seqlens_k`` and ``total_sequence_length`` are computed inside the graph from ``attention_mask``
  (as ONNX Runtime GenAI's builder does), so the graph keeps the portable graph's inputs.
- RoPE inside GQA (``do_rotary``) from cos/sin caches that are initializers computed from the exported
  ``rotary_emb.inv_freq`` (so any 1-D RoPE variant that transformers folds into ``inv_freq`` is kept), indexed by
  the ``position_ids`` input: the fused rotation is cheaper than rotating before GQA.
- M-RoPE (Qwen2-VL, Qwen2.5-VL: ``position_ids`` [3, B, S], the half head split into ``mrope_section`` parts that
  take their positions from the temporal / height / width rows): cos/sin are computed once per call inside the
  graph from ``position_ids`` and ``inv_freq`` with standard ops (as transformers' rotary embedding does; the row
  selection is a one-hot sum, exact), q and k are rotated with standard ops after the merged q|k|v MatMul, and
  GroupQueryAttention runs with ``do_rotary=0`` (the cache slot comes from ``seqlens_k``, not from the position,
  so positions that jump after an image are no matter). The graph's inputs stay the portable graph's, so the
  runtime feeds both flavours alike.
- Biases (Qwen2's q/k/v): the merged q|k|v bias is one Add after the merged MatMul; ONNX Runtime's level-ALL
  optimizer folds DequantizeLinear -> MatMul -> Add into one ``MatMulNBits`` with its bias input.
- ``SkipSimplifiedLayerNormalization`` fuses each residual add into the next RMSNorm.
- q/k/v and gate/up are merged into one MatMul each by concatenating the weights along the output dimension: for
  INT4 that concatenates codes and per-block scales (blocks run along K), which is exact. Weights stay
  ``DequantizeLinear -> MatMul`` so that ONNX Runtime fuses them into ``MatMulNBits`` at session creation with the
  session's accuracy level (``runtime/session.py``), exactly as for the portable graph.

Supported: the Llama decoder (SmolVLM / Idefics3, the testbed, SmolLM2) and the Qwen2-VL / Qwen2.5-VL decoder, in
float32; a tied lm_head (the exporter writes the transposed embedding as the lm_head's own constant) is read like
an untied one. :func:`unsupported` says why another graph is not, and the pipeline then keeps the portable graph.
Torch-free.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

FLAVOUR_ORT = "ort-gqa"
FLAVOUR_PORTABLE = "portable"
FLAVOUR_KEY = "vlmq.flavour"  # the graph's metadata entry that names its flavour (absent: portable)
MS = "com.microsoft"

_LINEAR = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$")
_NORM = re.compile(r"(?:^|\.)layers\.(\d+)\.(input_layernorm|post_attention_layernorm)$")


@dataclass
class Weight:
    """One MatMul's right-hand side as the portable graph holds it, in ONNX layout [K, N]: a float array, or
    codes + DequantizeLinear scale (zero point) and attributes."""

    value: np.ndarray
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    attrs: tuple = ()  # the DequantizeLinear's attributes, sorted (name, value) pairs
    bias: np.ndarray | None = None  # [N], added after the MatMul

    @property
    def n(self) -> int:
        return self.value.shape[1]


def merge(weights: list[Weight]) -> Weight:
    """The weights side by side along N (output features). Exact: blocks run along K, so the codes and each
    block's scale (zero point) of every output column are unchanged."""
    first = weights[0]
    if any(w.attrs != first.attrs or w.value.dtype != first.value.dtype or (w.scale is None) != (first.scale is None)
           or (w.zero_point is None) != (first.zero_point is None) or (w.bias is None) != (first.bias is None)
           for w in weights):
        raise ValueError("weights of different formats cannot be merged")

    def cat(arrays):
        return None if arrays[0] is None else np.concatenate(arrays, axis=-1)  # N is the last axis of every part

    return Weight(cat([w.value for w in weights]), cat([w.scale for w in weights]),
                  cat([w.zero_point for w in weights]), first.attrs, cat([w.bias for w in weights]))


def _module(node: onnx.NodeProto) -> str | None:
    """The torch module a node was traced in (the dynamo exporter's name scopes), e.g.
    ``text_model.layers.0.self_attn.q_proj``."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(p.value)
            return scopes[-2] if len(scopes) >= 2 else None
    return None


def read_weights(model: onnx.ModelProto) -> dict:
    """{"layers": {i: {"q_proj"...: Weight, "input_layernorm"...: array}}, "norm": array, "lm_head": Weight,
    "inv_freq": array | None} from a portable llm graph. Weights are found by the module that uses them, not by
    initializer name: the exporter folds equal constants (norms at 1, zero biases) into one shared initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    layers: dict[int, dict] = {}
    out = {"layers": layers, "norm": None, "lm_head": None, "inv_freq": None}

    def const(name):
        return nh.to_array(inits[name]) if name in inits else None

    def rhs(name) -> Weight | None:
        if name in inits:
            return Weight(const(name))
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or any(i and i not in inits for i in dq.input):
            return None
        parts = [const(i) if i else None for i in dq.input] + [None] * (3 - len(dq.input))
        return Weight(parts[0], parts[1], parts[2], tuple(sorted((a.name, helper.get_attribute_value(a))
                                                                 for a in dq.attribute)))

    def bias(matmul: onnx.NodeProto, module: str) -> np.ndarray | None:
        """The constant [N] that an Add of the same module adds to the MatMul's output (the Linear's bias)."""
        for c in consumers.get(matmul.output[0], []):
            other = [i for i in c.input if i != matmul.output[0]]
            if c.op_type == "Add" and _module(c) == module and len(other) == 1 and other[0] in inits:
                return const(other[0])
        return None

    for node in model.graph.node:
        module = _module(node)
        if module is None or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Mul":  # an RMSNorm's weight: the 1-D constant its module multiplies by
            weight = [const(i) for i in node.input if i in inits and len(inits[i].dims) == 1 and inits[i].dims[0] > 1]
            m = _NORM.search(module)
            if weight and m:
                layers.setdefault(int(m.group(1)), {})[m.group(2)] = weight[0]
            elif weight and module.split(".")[-1] == "norm":
                out["norm"] = weight[0]
            continue
        if node.op_type != "MatMul":
            continue
        w = rhs(node.input[1])
        if w is None:
            continue
        m = _LINEAR.search(module)
        if m:
            w.bias = bias(node, module)
            layers.setdefault(int(m.group(1)), {})[m.group(2).split(".")[1]] = w
        elif module.split(".")[-1] == "lm_head" and node.output[0] == "logits":
            out["lm_head"] = w
    for name in inits:
        if name.endswith("rotary_emb.inv_freq"):
            out["inv_freq"] = const(name).astype(np.float32)
    return out


MROPE_DECODERS = ("qwen2_vl_text", "qwen2_5_vl_text")  # Qwen2's decoder (q/k/v biases) with M-RoPE


def rope_parameter(text_config, key: str, default=None):
    """``key`` of a text config's RoPE parameters: in ``rope_parameters`` (transformers 5), ``rope_scaling`` (older
    configs) or at the top level (older configs' ``rope_theta``)."""
    for holder in ("rope_parameters", "rope_scaling"):
        params = getattr(text_config, holder, None)
        params = params.to_dict() if hasattr(params, "to_dict") else params
        if isinstance(params, dict) and params.get(key) is not None:
            return params[key]
    return getattr(text_config, key, default)


def unsupported(text_config, dtype: str = "fp32") -> str | None:
    """Why the ORT flavour cannot be built for a language model (None: it can)."""
    if dtype != "fp32":
        return "the ORT flavour is built for float32 graphs (ONNX Runtime CPU)"
    model_type = getattr(text_config, "model_type", None)
    if model_type == "qwen3_vl_text":
        return "Qwen3-VL's llm graph takes deepstack_embeds (extra inputs), which the ORT flavour does not build"
    if model_type in MROPE_DECODERS:
        rope_type = rope_parameter(text_config, "rope_type") or rope_parameter(text_config, "type")
        if not rope_parameter(text_config, "mrope_section"):
            return "the text config has no mrope_section"
        if rope_type not in (None, "default", "mrope"):
            return f"RoPE type {rope_type} is not written yet"
        if getattr(text_config, "use_sliding_window", False):
            return "sliding-window attention is not written yet"
    elif model_type == "gemma3_text":
        return "Gemma3's llm graph takes image_group_ids (bidirectional image attention, sliding layers): portable only"
    elif model_type != "llama":
        return f"the ORT flavour covers the Llama and Qwen2-VL decoders, not {model_type or '?'}"
    elif getattr(text_config, "attention_bias", False) or getattr(text_config, "mlp_bias", False):
        return "biased attention / MLP projections are not merged yet"
    if getattr(text_config, "hidden_act", "silu") != "silu":
        return f"activation {text_config.hidden_act} is not written yet"
    return None


LLM_GRAPHS = ("ort", "portable")


def choose_llm_graph(requested: str | None, target: str, dtype: str = "fp32", text_config=None) -> str:
    """The llm graph's flavour for an export: ``requested`` ("ort" / "portable", None: "ort" where it can be built
    for ``target`` onnxruntime, else "portable"). An "ort" request that cannot be met is a one-line VlmqError;
    without ``text_config`` only the target and dtype are checked (argv alone)."""
    from ..errors import VlmqError

    if requested not in (None, *LLM_GRAPHS):
        raise VlmqError(f"unknown --llm-graph '{requested}'; valid: {', '.join(LLM_GRAPHS)}")
    if target != "onnxruntime":
        why = f"--target {target} runs the portable graph (ONNX Runtime's contrib operators are ONNX Runtime's only)"
    elif text_config is None:
        why = unsupported(None, dtype) if dtype != "fp32" else None
    else:
        why = unsupported(text_config, dtype)
    if why and requested == "ort":
        raise VlmqError(f"--llm-graph ort: {why}; use --llm-graph portable")
    return FLAVOUR_PORTABLE if why or requested == "portable" else FLAVOUR_ORT


def _rope_caches(inv_freq: np.ndarray, max_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_pos, head_dim/2] as transformers computes them (float32 positions x inv_freq)."""
    freqs = np.arange(max_pos, dtype=np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


class _Builder:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: set[str] = set()

    def init(self, name: str, array: np.ndarray) -> str:
        """An initializer ``name`` (a name given twice is one initializer: the same constant)."""
        if name not in self.names:
            self.names.add(name)
            self.inits.append(nh.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | str, domain: str = "", **attrs) -> list[str]:
        outputs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}",
                                           domain=domain, **attrs))
        return outputs

    def matmul(self, x: str, w: Weight, name: str) -> str:
        """``x @ w (+ bias)``; a quantized ``w`` stays DequantizeLinear -> MatMul (ONNX Runtime fuses it into
        MatMulNBits)."""
        if w.scale is None:
            b = self.init(f"{name}.weight", w.value)
        else:
            ins = [self.init(f"{name}_q", w.value), self.init(f"{name}_scale", w.scale)]
            if w.zero_point is not None:
                ins.append(self.init(f"{name}_zero_point", w.zero_point))
            b = self.node("DequantizeLinear", ins, f"{name}_dq", **dict(w.attrs))[0]
        y = self.node("MatMul", [x, b], f"{name}_out")[0]
        if w.bias is not None:
            y = self.node("Add", [y, self.init(f"{name}.bias", w.bias)], f"{name}_biased")[0]
        return y

    def mrope(self, inv_freq: np.ndarray, sections: list[int]) -> None:
        """``rope_cos`` / ``rope_sin_signed`` [B, S, 1, head_dim] from ``position_ids`` [3, B, S], as transformers'
        Qwen2-VL rotary embedding: frequency j of the half head takes its position from row (section of j) % 3,
        cos/sin are repeated over both halves. The one-hot selection is exact (one position plus zeros); the sine
        of the first half is negated so that :meth:`rotate` needs no Neg per layer."""
        half = inv_freq.size
        if sum(sections) != half:
            raise ValueError(f"mrope_section {sections} does not add up to head_dim / 2 = {half}")
        row = np.concatenate([np.full(n, i % 3) for i, n in enumerate(sections)])
        onehot = (np.arange(3)[:, None] == row[None, :]).astype(np.float32).reshape(3, 1, 1, half)
        pos = self.node("Cast", ["position_ids"], "rope_pos", to=TensorProto.FLOAT)[0]
        pos = self.node("Unsqueeze", [pos, self.init("axis_last", np.array([-1], np.int64))], "rope_pos4")[0]
        pos = self.node("Mul", [pos, self.init("mrope_onehot", onehot)], "rope_pos_sections")[0]  # [3, B, S, half]
        pos = self.node("ReduceSum", [pos, self.init("axis0", np.array([0], np.int64))], "rope_pos_per_freq",
                        keepdims=0)[0]  # [B, S, half]
        freqs = self.node("Mul", [pos, self.init("inv_freq", inv_freq.astype(np.float32))], "rope_freqs")[0]
        cos, sin = self.node("Cos", [freqs], "rope_cos_half")[0], self.node("Sin", [freqs], "rope_sin_half")[0]
        neg = self.node("Neg", [sin], "rope_neg_sin_half")[0]
        axis2 = self.init("axis2", np.array([2], np.int64))
        for name, parts in (("rope_cos", [cos, cos]), ("rope_sin_signed", [neg, sin])):
            cat = self.node("Concat", parts, f"{name}_3d", axis=-1)[0]
            self.node("Unsqueeze", [cat, axis2], name)

    def rotate(self, x: str, heads: int, head_dim: int, name: str) -> str:
        """``x`` [B, S, heads * head_dim] rotated as transformers' ``x * cos + rotate_half(x) * sin``:
        rotate_half(x) * sin = [x2, x1] * [-sin, sin] (exact: the sign moves from x2 to sin)."""
        split = self.init(f"shape_{heads}_heads", np.array([0, 0, heads, head_dim], np.int64))
        flat = self.init(f"shape_{heads}_flat", np.array([0, 0, heads * head_dim], np.int64))
        x4 = self.node("Reshape", [x, split], f"{name}_4d")[0]
        x1, x2 = self.node("Split", [x4], [f"{name}_x1", f"{name}_x2"], axis=-1, num_outputs=2)
        swapped = self.node("Concat", [x2, x1], f"{name}_swapped", axis=-1)[0]
        a = self.node("Mul", [x4, "rope_cos"], f"{name}_cos")[0]
        b = self.node("Mul", [swapped, "rope_sin_signed"], f"{name}_sin")[0]
        y = self.node("Add", [a, b], f"{name}_rot4d")[0]
        return self.node("Reshape", [y, flat], f"{name}_rot")[0]


def build_llm(src: onnx.ModelProto, *, num_heads: int, num_kv_heads: int, head_dim: int, hidden_size: int,
              rms_norm_eps: float, max_positions: int, rope_theta: float = 10000.0,
              mrope_section: list[int] | None = None) -> onnx.ModelProto:
    """The ORT-flavour graph of a portable llm graph ``src`` (inputs ``inputs_embeds``, ``attention_mask``,
    ``position_ids``, ``past_key_i``/``past_value_i``; outputs ``logits``, ``present_key_i``/``present_value_i``,
    names as the portable graph's), plus an input ``logits_to_keep`` [1] the portable graph lacks: logits for the
    last N positions only (0: all). With ``mrope_section`` (Qwen2-VL) ``position_ids`` are [3, B, S] and q and k
    are rotated before GroupQueryAttention. Raises ValueError when ``src`` does not hold every weight the graph
    needs."""
    if any(n.op_type == "QuantizeLinear" for n in src.graph.node):
        raise ValueError("the llm graph quantizes activations (QuantizeLinear), which the ORT flavour does not carry")
    w = read_weights(src)
    n_layers = len(w["layers"])
    need = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_layernorm",
            "post_attention_layernorm")
    missing = [f"layer {i} {k}" for i in range(n_layers) for k in need if k not in w["layers"].get(i, {})]
    missing += [k for k in ("norm", "lm_head") if w[k] is None]
    if missing or n_layers == 0:
        raise ValueError(f"the llm graph lacks weights the ORT flavour needs: {', '.join(missing[:4]) or 'layers'}")
    inv_freq = w["inv_freq"]
    if inv_freq is None:
        inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    b = _Builder()
    if mrope_section is None:
        cos, sin = _rope_caches(inv_freq, max_positions)
        b.init("cos_cache", cos)
        b.init("sin_cache", sin)
    else:
        b.mrope(inv_freq, list(mrope_section))
    # seqlens_k = tokens in the cache after this step - 1 (per row), total_sequence_length = the mask's width
    b.init("one_i64", np.array([1], np.int64))
    b.init("axis1", np.array([1], np.int64))
    b.node("ReduceSum", ["attention_mask", "axis1"], "mask_sum", keepdims=0)
    b.node("Sub", ["mask_sum", "one_i64"], "seqlens_k_i64")
    b.node("Cast", ["seqlens_k_i64"], "seqlens_k", to=TensorProto.INT32)
    b.node("Shape", ["attention_mask"], "mask_shape", start=1, end=2)
    b.node("Squeeze", ["mask_shape"], "total_len_i64")
    b.node("Cast", ["total_len_i64"], "total_sequence_length", to=TensorProto.INT32)

    x, residual = "inputs_embeds", None
    for i in range(n_layers):
        lw = w["layers"][i]
        ln1 = b.init(f"layers.{i}.input_layernorm.weight", lw["input_layernorm"])
        if residual is None:
            h = b.node("SimplifiedLayerNormalization", [x, ln1], f"l{i}_ln1", epsilon=rms_norm_eps, axis=-1,
                       stash_type=1)[0]
            residual = x
        else:
            h, _, _, residual = b.node("SkipSimplifiedLayerNormalization", [x, residual, ln1],
                                       [f"l{i}_ln1", "", "", f"l{i}_res1"], domain=MS, epsilon=rms_norm_eps)
        qkv = b.matmul(h, merge([lw["q_proj"], lw["k_proj"], lw["v_proj"]]), f"layers.{i}.qkv_proj")
        if mrope_section is None:  # GQA rotates by position_ids from its caches
            qkv_in = [qkv, "", "", f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length",
                      "cos_cache", "sin_cache", "position_ids"]
        else:  # M-RoPE: q and k rotated here
            sizes = b.init("qkv_sizes", np.array([num_heads, num_kv_heads, num_kv_heads], np.int64) * head_dim)
            q, k, v = b.node("Split", [qkv, sizes], [f"l{i}_q", f"l{i}_k", f"l{i}_v"], axis=-1)
            qkv_in = [b.rotate(q, num_heads, head_dim, f"l{i}_q"), b.rotate(k, num_kv_heads, head_dim, f"l{i}_k"), v,
                      f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length"]
        attn = b.node("GroupQueryAttention", qkv_in, [f"l{i}_attn", f"present_key_{i}", f"present_value_{i}"],
                      domain=MS, num_heads=num_heads, kv_num_heads=num_kv_heads,
                      do_rotary=int(mrope_section is None), rotary_interleaved=0)[0]
        o = b.matmul(attn, lw["o_proj"], f"layers.{i}.o_proj")
        ln2 = b.init(f"layers.{i}.post_attention_layernorm.weight", lw["post_attention_layernorm"])
        h, _, _, residual = b.node("SkipSimplifiedLayerNormalization", [o, residual, ln2],
                                   [f"l{i}_ln2", "", "", f"l{i}_res2"], domain=MS, epsilon=rms_norm_eps)
        gu = b.matmul(h, merge([lw["gate_proj"], lw["up_proj"]]), f"layers.{i}.gate_up_proj")
        gate, up = b.node("Split", [gu], [f"l{i}_gate", f"l{i}_up"], axis=-1, num_outputs=2)
        sig = b.node("Sigmoid", [gate], f"l{i}_sig")[0]
        act = b.node("Mul", [gate, sig], f"l{i}_silu")[0]
        act = b.node("Mul", [act, up], f"l{i}_act")[0]
        x = b.matmul(act, lw["down_proj"], f"layers.{i}.down_proj")
    norm = b.init("norm.weight", w["norm"])
    h = b.node("SkipSimplifiedLayerNormalization", [x, residual, norm], ["final_norm"], domain=MS,
               epsilon=rms_norm_eps)[0]
    # logits_to_keep (HF's meaning): the head runs on the last N positions only, all of them for 0; a prefill
    # that only samples the next token passes 1 and skips the head's work on every other prompt position
    b.init("int64_max", np.array([np.iinfo(np.int64).max], np.int64))
    start = b.node("Neg", ["logits_to_keep"], "logits_start")[0]
    h = b.node("Slice", [h, start, "int64_max", "axis1"], "final_norm_kept")[0]
    logits = b.matmul(h, w["lm_head"], "lm_head")
    b.nodes[-1].output[0] = "logits"  # the lm_head MatMul writes the graph output directly
    del logits

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    positions = ["batch", "sequence"] if mrope_section is None else [3, "batch", "sequence"]
    kv_shape = ["batch", num_kv_heads, "capacity", head_dim]
    inputs = [helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "sequence", hidden_size]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_sequence"]),
              helper.make_tensor_value_info("position_ids", i64, positions),
              helper.make_tensor_value_info("logits_to_keep", i64, [1])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "kept_sequence", w["lm_head"].n])]
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", f32, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", f32, kv_shape))
    graph = helper.make_graph(b.nodes, "llm_ort_gqa", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
                              producer_name="vlmq-export")
    model.ir_version = src.ir_version
    helper.set_model_props(model, {FLAVOUR_KEY: FLAVOUR_ORT})  # what the runtime reads to pick its KV cache
    return model


_MERGED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2), "o_proj": ("o_proj", 0),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}


def relocate_records(records: list[dict]) -> list[dict]:
    """The manifest's layer records of the language model, pointed at where :func:`build_llm` put each weight:
    ``onnx_weight`` / ``onnx_scale`` / ``onnx_zero_point`` name the (merged) initializers and ``onnx_columns``
    [start, stop) the layer's output columns in them (the last axis of the codes, scales and zero points).
    Records of other components are returned unchanged."""
    by_group: dict[tuple, list[tuple[int, dict]]] = {}
    out = []
    for rec in records:
        rec = dict(rec)
        out.append(rec)
        if rec.get("component") not in ("llm", "lm_head") or not rec.get("onnx_weight"):
            continue
        m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$", rec["name"])
        if m and m.group(2) in _MERGED:
            merged, order = _MERGED[m.group(2)]
            by_group.setdefault((f"layers.{m.group(1)}.{merged}",), []).append((order, rec))
        elif rec["name"].split(".")[-1] == "lm_head":
            by_group.setdefault(("lm_head",), []).append((0, rec))
    for (base,), members in by_group.items():
        start = 0
        for _order, rec in sorted(members, key=lambda t: t[0]):
            stop = start + int(rec["shape"][0])
            rec.update({"onnx_weight": f"{base}_q", "onnx_scale": f"{base}_scale", "onnx_columns": [start, stop]})
            if rec.get("onnx_zero_point"):
                rec["onnx_zero_point"] = f"{base}_zero_point"
            start = stop
    return out


def write_ort_llm(portable: str | Path, out: str | Path, text_config) -> Path:
    """Build the ORT flavour of the portable graph at ``portable`` into ``out`` (may be the same path). Saved
    without onnx's checker, which knows no SimplifiedLayerNormalization (ONNX Runtime's own, in the default
    domain); ONNX Runtime checks the graph when a session opens it."""
    from .onnx_export import _EXTERNAL_THRESHOLD, model_bytes

    tc = text_config
    src = onnx.load(str(portable))
    model = build_llm(src, num_heads=tc.num_attention_heads, num_kv_heads=tc.num_key_value_heads,
                      head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
                      hidden_size=tc.hidden_size, rms_norm_eps=float(tc.rms_norm_eps),
                      max_positions=int(tc.max_position_embeddings),
                      rope_theta=float(rope_parameter(tc, "rope_theta", 10000.0)),
                      mrope_section=rope_parameter(tc, "mrope_section")
                      if getattr(tc, "model_type", None) in MROPE_DECODERS else None)
    out = Path(out)
    data = out.with_name(out.name + ".data")
    if data.exists():
        data.unlink()
    big = model_bytes(model) > _EXTERNAL_THRESHOLD
    onnx.save_model(model, out, save_as_external_data=big, all_tensors_to_one_file=True, location=data.name)
    return out
