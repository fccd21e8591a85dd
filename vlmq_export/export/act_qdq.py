"""Graph pass: per-tensor activation Q/DQ on the input of every W8A8 layer (INT8 or FP8 E4M3).

For every MatMul (or Gemm) whose constant weight is a layer with ``act_fmt`` set (matched by the float
weight's hash, as :class:`~.qdq.QDQWeightPass` does; this pass runs first, on the float weights), its input A
goes through::

    x ─▶ QuantizeLinear(scale, zero_point) ─▶ DequantizeLinear(scale, zero_point) ─▶ MatMul input A

with a scalar scale ``amax / 127`` (INT8) or ``amax / 448`` (FP8) in the input's float type and a scalar zero
point 0 of type INT8 or FLOAT8E4M3FN (symmetric, TensorRT's form; ../shared/notes/tensorrt.md: Q/DQ on the
inputs of MatMul/Gemm, per-tensor, no Cast after the DQ). The weight itself is written by the weight pass
(per-channel, axis 1). Layers that read one tensor with the same range (q/k/v, gate/up) share its QuantizeLinear,
each with a DequantizeLinear of its own (the QDQ node-unit form ONNX Runtime's selectors look for). Measured on the
testbed's vision encoder (benchmarks/w8a8-ort.json): ONNX Runtime 1.x fuses o/fc1/fc2 into ``MatMulIntegerToFloat``
(12 of 24) but leaves q/k/v as DQ -> float MatMul, with a shared DQ, a DQ per MatMul, or a Q per MatMul alike (its
common-subexpression pass merges duplicated Qs); why is still open.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from .qdq import QuantizedLinear, linear_weight_key

QMAX = {"int8": 127.0, "fp8": 448.0}  # = calibrators.activation.QMAX (torch-free here)
ZERO = {"int8": np.int8, "fp8": ml_dtypes.float8_e4m3fn}


def act_scale(amax: float, fmt: str) -> float:
    """The scale of a symmetric per-tensor activation Q/DQ of range ``amax`` (1.0 for an all-zero input)."""
    return float(amax) / QMAX[fmt] if amax > 0 else 1.0


class ActQDQPass(ir.passes.InPlacePass):
    def __init__(self, layers: list[QuantizedLinear]):
        super().__init__()
        for q in layers:
            if q.act_fmt not in QMAX or q.act_amax is None or not np.isfinite(q.act_amax) or q.act_amax < 0:
                raise ValueError(f"{q.name}: activation format {q.act_fmt!r} and range {q.act_amax!r} are not a W8A8 layer's")
        self.by_key = {q.key: q for q in layers}
        self.matched: set[str] = set()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        shared: dict[tuple, ir.Node] = {}  # (input, format, scale) -> its QuantizeLinear
        for node in list(graph):
            key = linear_weight_key(node)
            layer = self.by_key.get(key) if key else None
            if layer is None:
                continue
            x = node.inputs[0]
            dtype = node.inputs[1].const_value.numpy().dtype
            scale = np.array(act_scale(layer.act_amax, layer.act_fmt), dtype=dtype)
            k = (id(x), layer.act_fmt, float(scale))
            if k not in shared:
                shared[k] = self._quantize(graph, node, x, layer, scale)
            node.replace_input_with(0, self._dequantize(graph, node, shared[k], layer))
            self.matched.add(key)
        return ir.passes.PassResult(model, bool(self.matched))

    @staticmethod
    def _quantize(graph: ir.Graph, node: ir.Node, x: ir.Value, layer: QuantizedLinear, scale: np.ndarray) -> ir.Node:
        base = act_qdq_base(layer)
        s = ir.Value(name=f"{base}_scale", const_value=ir.Tensor(scale, name=f"{base}_scale"))
        z = ir.Value(name=f"{base}_zero_point",
                     const_value=ir.Tensor(np.zeros((), dtype=ZERO[layer.act_fmt]), name=f"{base}_zero_point"))
        for v in (s, z):
            v.shape, v.dtype = v.const_value.shape, v.const_value.dtype
            graph.register_initializer(v)
        q = ir.node("QuantizeLinear", [x, s, z], name=f"{base}_QuantizeLinear")
        q.outputs[0].name, q.outputs[0].dtype, q.outputs[0].shape = f"{base}_q", z.dtype, x.shape
        graph.insert_before(node, q)
        return q

    @staticmethod
    def _dequantize(graph: ir.Graph, node: ir.Node, q: ir.Node, layer: QuantizedLinear) -> ir.Value:
        """A DequantizeLinear of ``q`` (its scale and zero point) for ``node`` alone."""
        base = act_qdq_base(layer)
        dq = ir.node("DequantizeLinear", [q.outputs[0], *q.inputs[1:]], name=f"{base}_DequantizeLinear")
        dq.outputs[0].name, dq.outputs[0].dtype = f"{base}_dq", q.inputs[1].dtype
        dq.outputs[0].shape = q.outputs[0].shape
        graph.insert_before(node, dq)
        return dq.outputs[0]


def act_qdq_base(layer) -> str:
    """The name stem of ``layer``'s activation QuantizeLinear / DequantizeLinear (``<stem>_DequantizeLinear``)."""
    return (layer.name.replace(".", "_") or "x") + "_act"
