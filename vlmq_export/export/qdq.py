"""Graph pass: write calibrated weights into the ONNX as INT4 (or INT8) initializer + DequantizeLinear.

For every float MatMul (or ``Gemm``, which the exporter emits for 2-D inputs) whose constant weight
is one of the quantized ``nn.Linear`` weights, the pass writes exactly the calibrator's codes and
scales (never re-quantizing) in the portable INT4 form (../shared/notes/formats.md)::

    W_q  INT4 [K, N]   ─┐
    scale f32 [K/g, N] ─┴─ DequantizeLinear(axis=0, block_size=g) ─▶ MatMul input B

Asymmetric layers (``zeros`` set) are written as UINT4 codes with a UINT4 zero point [K/g, N] as the
DequantizeLinear's third input: ONNX Runtime fuses that too, TensorRT does not take it.

Weights are matched by value: the pass hashes each graph weight (in torch's [N, K] layout) and
looks it up among the quantized layers, so it does not depend on the exporter's naming.

FP16 graphs (a half-precision export, ``--dtype fp16``): the graph holds each weight rounded to float16, so
the layers are looked up by :func:`weight_key` of that rounding (:func:`half_key` of the float32 weight), and
the scales are written in float16, the DequantizeLinear's output type (TensorRT runs the MatMul in the
scale's type). A scale below float16's smallest normal number (6.1e-5, a group whose weights are all under
~5e-4) is raised to it and the group's codes rescaled to stay within half a step of the calibrated weights;
one beyond float16's range is clamped (``QDQWeightPass.clamped_scales`` counts both): TensorRT requires
finite scales > 0, and a subnormal or zero scale would lose the group. Asymmetric layers (ONNX Runtime only,
which computes with subnormal scales) keep their codes and zero points; their scales are only kept above 0.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir


def weight_key(weight_nk: np.ndarray) -> str:
    """Hash of a float32 weight in torch Linear layout [N, K]."""
    w = np.ascontiguousarray(weight_nk, dtype=np.float32)
    return f"{w.shape[0]}x{w.shape[1]}:" + hashlib.sha1(w.tobytes()).hexdigest()


def half_key(weight_nk: np.ndarray) -> str:
    """The :func:`weight_key` of a float32 weight as a float16 graph holds it."""
    return weight_key(np.asarray(weight_nk, dtype=np.float32).astype(np.float16))


FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)  # 6.1e-5
FP16_MIN_SUBNORMAL = 2.0**-24  # 6e-8
FP16_MAX = float(np.finfo(np.float16).max)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


def fp16_scales(codes: np.ndarray, scales: np.ndarray, bits: int, sym: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """``codes`` [N, K], ``scales`` [N, K/g] float32 -> (codes, float16 scales, how many scales were moved).

    Symmetric: scales under float16's smallest normal number are raised to it, their groups' codes rescaled
    (rounded, clamped to the signed range of ``bits``). Asymmetric: codes kept, scales raised to float16's
    smallest subnormal only. Scales over float16's maximum are clamped to it."""
    floor = FP16_MIN_NORMAL if sym else FP16_MIN_SUBNORMAL
    low, high = scales < floor, scales > FP16_MAX
    moved = int(low.sum() + high.sum())
    new = np.clip(scales, floor, FP16_MAX)
    if not moved or not sym or codes.dtype == FP8:  # FP8 codes are not integers: only the scales move
        return codes, new.astype(np.float16), moved
    rep = codes.shape[1] // scales.shape[1]
    ratio = np.repeat((scales / new).astype(np.float32), rep, axis=1)
    rescaled = np.clip(np.rint(codes * ratio), -(1 << (bits - 1)), (1 << (bits - 1)) - 1).astype(codes.dtype)
    return np.where(np.repeat(low, rep, axis=1), rescaled, codes), new.astype(np.float16), moved


@dataclass
class QuantizedLinear:
    """One calibrated layer as the pass writes it."""

    name: str  # torch module path, for messages and the manifest
    codes: np.ndarray  # int8 [N, K], values within the signed range of ``bits``
    scales: np.ndarray  # float32 [N, K // group]
    bits: int
    group_size: int  # block along K; group == K means one block per output channel
    key: str  # weight_key of the float weight that the exported graph holds
    zeros: np.ndarray | None = None  # int8 [N, K // group] zero points (asymmetric, unsigned codes); None: symmetric
    # W8A8 (export/act_qdq.py): ``codes`` are float8_e4m3fn for "fp8"; the input's per-tensor range
    act_fmt: str | None = None  # "int8" or "fp8": the layer's input gets a QuantizeLinear -> DequantizeLinear
    act_amax: float | None = None  # its symmetric range (scale = amax / 127 or / 448)
    # per-channel smoothing (calibrators/smooth.py, export/smooth_pass.py): the codes are of ``W diag(smooth)``, the
    # input is multiplied by ``1 / smooth``; ``prior_key`` is the weight_key of ``W`` (what the float graphs hold)
    smooth: np.ndarray | None = None  # float32 [K]
    prior_key: str | None = None

    def dequantize(self) -> np.ndarray:
        """``(codes - zeros) * scales`` float32 [N, K], each scale (zero) repeated over its group."""
        rep = self.codes.shape[1] // self.scales.shape[1]
        c = self.codes.astype(np.float32)
        if self.zeros is not None:
            c = c - np.repeat(self.zeros.astype(np.float32), rep, axis=1)
        return c * np.repeat(self.scales.astype(np.float32), rep, axis=1)


def linear_weight_key(node: ir.Node) -> str | None:
    """The :func:`weight_key` (torch layout [N, K]) of a plain MatMul's or Gemm's constant 2-D float input B,
    or None when ``node`` is not such a node."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
        return None
    b = node.inputs[1]
    if b is None or b.const_value is None:
        return None
    w = b.const_value.numpy()
    if w.ndim != 2 or w.dtype not in (np.float32, np.float16):
        return None
    trans_b = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1
    if node.op_type == "Gemm" and (node.attributes.get_int("transA", 0) != 0
                                   or node.attributes.get_float("alpha", 1.0) != 1.0
                                   or node.attributes.get_float("beta", 1.0) != 1.0):
        return None
    return weight_key(w if trans_b else w.T)


class QDQWeightPass(ir.passes.InPlacePass):
    """Replace matched float weights with INT4 + DequantizeLinear (blockwise, axis 0)."""

    def __init__(self, layers: list[QuantizedLinear]):
        super().__init__()
        self.clamped_scales = 0  # float16 scales moved into float16's normal range (see the module's doc)
        self.by_key: dict[str, QuantizedLinear] = {}
        for layer in layers:
            other = self.by_key.get(layer.key)
            if other is not None and not (
                np.array_equal(other.codes, layer.codes) and np.array_equal(other.scales, layer.scales)
                and np.array_equal(np.asarray(other.zeros), np.asarray(layer.zeros))
            ):
                raise ValueError(f"layers {other.name} and {layer.name} share a float weight but not their codes")
            self.by_key[layer.key] = layer
        self.matched: set[str] = set()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        cache: dict[str, ir.Value] = {}  # one DQ per quantized weight even if used twice
        for node in list(graph):
            key = linear_weight_key(node)
            layer = self.by_key.get(key) if key else None
            if layer is None:
                continue
            w = node.inputs[1].const_value.numpy()
            dq_out = cache.get(layer.key)
            if dq_out is None:
                dq_out = self._dequantize(graph, node, layer, w.dtype)
                cache[layer.key] = dq_out
            if node.op_type == "MatMul":
                node.replace_input_with(1, dq_out)
            else:
                self._gemm_to_matmul(graph, node, dq_out)
            self.matched.add(layer.key)
            modified = True
        # drop float initializers nothing uses any more
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                del graph.initializers[name]
        return ir.passes.PassResult(model, modified)

    @property
    def unmatched(self) -> list[str]:
        return [layer.name for key, layer in self.by_key.items() if key not in self.matched]

    def _dequantize(self, graph: ir.Graph, node: ir.Node, layer: QuantizedLinear, dtype: np.dtype) -> ir.Value:
        """INT4 (bits <= 4) or INT8 codes [K, N] and their DequantizeLinear, whose scale (and so output) has the
        graph weight's float type ``dtype``.

        Blockwise: scale [K/g, N], axis 0, block g. Per-channel (group -1): 4-bit as one block of K
        (which ONNX Runtime still fuses), 8-bit as TensorRT's per-channel form (axis 1, scale [N]).
        Asymmetric (``zeros``, bits <= 4 only): UINT4 codes and a UINT4 zero point shaped as the scale.
        """
        n, k = layer.codes.shape
        if layer.bits > 8:
            raise NotImplementedError(f"{layer.name}: {layer.bits}-bit weights are not supported")
        asym = layer.zeros is not None
        if asym and layer.bits > 4:
            raise NotImplementedError(f"{layer.name}: asymmetric {layer.bits}-bit weights are not supported")
        fp8 = layer.codes.dtype == FP8
        container = FP8 if fp8 else (ml_dtypes.uint4 if asym else ml_dtypes.int4) if layer.bits <= 4 else np.int8
        base = layer.name.replace(".", "_") or "w"
        codes, scales = layer.codes, layer.scales.astype(np.float32)
        if dtype == np.float16:
            codes, scales, moved = fp16_scales(codes, scales, layer.bits, sym=not asym)
            self.clamped_scales += moved
        scales = np.ascontiguousarray(scales.T)  # [K/g, N]
        if layer.group_size in (-1, k) and layer.bits >= 7:  # 8-bit, or W8A8's reduced-range 7-bit
            attrs = {"axis": 1}
            scales = scales.reshape(n)
        else:
            attrs = {"axis": 0, "block_size": k if layer.group_size == -1 else layer.group_size}
        q = ir.Value(name=f"{base}_q", const_value=ir.Tensor(
            np.ascontiguousarray(codes.T).astype(container), name=f"{base}_q"))
        s = ir.Value(name=f"{base}_scale", const_value=ir.Tensor(scales, name=f"{base}_scale"))
        inputs = [q, s]
        if asym:
            zeros = np.ascontiguousarray(layer.zeros.T).astype(container)  # [K/g, N]
            inputs.append(ir.Value(name=f"{base}_zero_point", const_value=ir.Tensor(zeros, name=f"{base}_zero_point")))
        for v in inputs:
            v.shape = v.const_value.shape
            v.dtype = v.const_value.dtype
            graph.register_initializer(v)
        dq = ir.node("DequantizeLinear", inputs, attrs, name=f"{base}_DequantizeLinear")
        dq.outputs[0].name = f"{base}_dq"
        dq.outputs[0].dtype = ir.DataType.FLOAT16 if dtype == np.float16 else ir.DataType.FLOAT
        dq.outputs[0].shape = ir.Shape([k, n])
        graph.insert_before(node, dq)
        return dq.outputs[0]

    @staticmethod
    def _gemm_to_matmul(graph: ir.Graph, node: ir.Node, dq_out: ir.Value) -> None:
        a, c = node.inputs[0], node.inputs[2] if len(node.inputs) > 2 else None
        mm = ir.node("MatMul", [a, dq_out], name=f"{node.name}_MatMul")
        new = [mm]
        out = mm.outputs[0]
        if c is not None:
            add = ir.node("Add", [out, c], name=f"{node.name}_Add")
            new.append(add)
            out = add.outputs[0]
        old_out = node.outputs[0]
        name = old_out.name
        out.shape, out.dtype = old_out.shape, old_out.dtype
        graph.insert_before(node, new)
        old_out.replace_all_uses_with(out, replace_graph_outputs=True)
        old_out.name = f"{name}_gemm_unused"
        out.name = name
        if c is not None:
            mm.outputs[0].name = f"{name}_matmul"
        graph.remove(node, safe=True)
