"""Graph pass: per-channel smoothing of W8A8 layers (calibrators/smooth.py) written into the float graphs.

For every MatMul (or Gemm) whose constant weight is a smoothed layer's float ``W`` (matched by ``prior_key``, the
weight's hash before smoothing, which the float graphs exported before calibration hold)::

    x ─▶ MatMul(W)      becomes      x ─▶ Mul(1/s) ─▶ MatMul(W diag(s))

exactly what torch computes with the layer's :class:`~..calibrators.smooth.InputScale` hook: the same ``1/s`` and
``W diag(s)`` in the graph's float type. Layers that read one tensor with the same ``s`` (q/k/v, gate/up) share one
Mul. The Mul is then folded where that is exact and nothing else reads the tensor: into the constant scale (and
bias) of a preceding ``LayerNormalization``, or into the constant operand of a preceding ``Mul`` (an RMSNorm's
weight). Otherwise it stays, and the activation Q/DQ (export/act_qdq.py) goes on its output.

Run before the activation and weight Q/DQ passes; :attr:`SmoothPass.rekey` maps each ``prior_key`` to the key of
the smoothed weight now in the graph (the float32 graphs: the calibrated layer's own key, checked), and
:attr:`SmoothPass.placed` says per layer where its ``1/s`` went.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .qdq import QuantizedLinear, linear_weight_key


class SmoothPass(ir.passes.InPlacePass):
    def __init__(self, layers: list[QuantizedLinear], check_keys: bool = True):
        super().__init__()
        self.by_prior = {q.prior_key: q for q in layers if q.smooth is not None and q.prior_key}
        self.check_keys = check_keys  # float32 graphs: the smoothed weight must hash to the layer's key
        self.rekey: dict[str, str] = {}
        self.placed: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        muls: dict[tuple, ir.Node] = {}  # (input, 1/s) -> its Mul
        owners: dict[int, list[str]] = {}  # id(Mul) -> the layers behind it
        for node in list(graph):
            key = linear_weight_key(node)
            q = self.by_prior.get(key) if key else None
            if q is None:
                continue
            s = np.asarray(q.smooth, dtype=np.float32)
            b = node.inputs[1]
            w = b.const_value.numpy()
            trans_b = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1
            if w.shape[1 if trans_b else 0] != s.shape[0]:
                raise ValueError(f"{q.name}: {s.shape[0]} smoothing scales for a weight of shape {w.shape}")
            ws = (w.astype(np.float32) * (s[None, :] if trans_b else s[:, None])).astype(w.dtype)
            node.replace_input_with(1, _initializer(graph, f"{b.name}_smoothed", ws))
            new_key = linear_weight_key(node)
            if self.check_keys and w.dtype == np.float32 and new_key != q.key:
                raise ValueError(f"{q.name}: the smoothed graph weight differs from the calibrated one")
            self.rekey[q.prior_key] = new_key
            x = node.inputs[0]
            inv = (np.float32(1.0) / s).astype(w.dtype)
            k = (id(x), inv.tobytes())
            if k not in muls:
                base = q.name.replace(".", "_") + "_smooth"
                c = _initializer(graph, f"{base}_inv_s", inv)
                m = ir.node("Mul", [x, c], name=f"{base}_Mul")
                m.outputs[0].name, m.outputs[0].dtype, m.outputs[0].shape = f"{base}_x", x.dtype, x.shape
                graph.insert_before(node, m)
                muls[k] = m
            node.replace_input_with(0, muls[k].outputs[0])
            owners.setdefault(id(muls[k]), []).append(q.name)
            if not b.uses() and not b.is_graph_output():
                graph.initializers.pop(b.name, None)
        for m in muls.values():
            where = self._fold(graph, m)
            for name in owners[id(m)]:
                self.placed[name] = where
        return ir.passes.PassResult(model, bool(muls))

    @staticmethod
    def _fold(graph: ir.Graph, m: ir.Node) -> str:
        """Fold Mul ``m`` (x * 1/s) into x's producer where exact; what happened, in words."""
        x, inv_v = m.inputs
        inv = inv_v.const_value.numpy()
        p = x.producer()
        if p is None or x.is_graph_output() or len(x.uses()) != 1 or p.domain not in ("", "ai.onnx"):
            return "Mul"
        if p.op_type == "LayerNormalization" and p.attributes.get_int("axis", -1) in (-1, len(x.shape or []) - 1):
            consts = [v for v in p.inputs[1:] if v is not None]
            if not consts or any(v.const_value is None or v.const_value.numpy().shape != inv.shape for v in consts):
                return "Mul"
            for i, v in enumerate(p.inputs[1:], start=1):
                if v is not None:
                    p.replace_input_with(i, _initializer(graph, f"{v.name}_smoothed",
                                                         (v.const_value.numpy() * inv).astype(v.const_value.numpy().dtype)))
        elif p.op_type == "Mul":
            idx = next((i for i, v in enumerate(p.inputs) if v is not None and v.const_value is not None
                        and v.const_value.numpy().shape[-1:] == inv.shape
                        and v.const_value.numpy().size == inv.size), None)
            if idx is None:
                return "Mul"
            v = p.inputs[idx]
            p.replace_input_with(idx, _initializer(graph, f"{v.name}_smoothed",
                                                   (v.const_value.numpy() * inv).astype(v.const_value.numpy().dtype)))
        else:
            return "Mul"
        m.outputs[0].replace_all_uses_with(x)
        graph.remove(m, safe=True)
        return f"folded into {p.op_type} {p.name}"


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    name = _unique(graph, name)
    v = ir.Value(name=name, const_value=ir.Tensor(np.ascontiguousarray(array), name=name))
    v.shape, v.dtype = v.const_value.shape, v.const_value.dtype
    graph.register_initializer(v)
    return v


def _unique(graph: ir.Graph, name: str) -> str:
    n, i = name, 1
    while n in graph.initializers:
        n, i = f"{name}_{i}", i + 1
    return n
