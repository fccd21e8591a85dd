"""Graph passes run on every exported graph before anything else touches it.

They keep the graphs standard ONNX (TensorRT reads them as they are) and only change the form of
what the exporter wrote, never what it computes, so that ONNX Runtime's own fusions recognise it.

``RsqrtAsDivPass``  ``x * Reciprocal(Sqrt(v))`` -> ``Div(x, Sqrt(v))``. torch's ``rsqrt`` exports as
    Sqrt + Reciprocal, and the RMSNorm of Llama/Qwen2 decoders (``x * rsqrt(mean(x^2) + eps) * w``)
    then escapes ONNX Runtime's ``SimplifiedLayerNormFusion``, which looks for
    ``Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul``. In Div form every RMSNorm becomes one
    ``SimplifiedLayerNormalization`` kernel instead of seven nodes (SmolLM2-135M: 366 fewer nodes per
    decode step). ``x / y`` and ``x * (1 / y)`` differ by at most one rounding.
"""
from __future__ import annotations

import onnx
import onnx_ir as ir


class RsqrtAsDivPass(ir.passes.InPlacePass):
    """Rewrite ``Mul(x, Reciprocal(Sqrt(v)))`` (either operand order) as ``Div(x, Sqrt(v))``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        rewritten = 0
        for node in list(graph):
            if not _is(node, "Reciprocal"):
                continue
            sqrt = node.inputs[0].producer() if node.inputs[0] is not None else None
            if sqrt is None or not _is(sqrt, "Sqrt"):
                continue
            out = node.outputs[0]
            if out.is_graph_output():
                continue
            uses = list(out.uses())
            if not uses or not all(_is(u.node, "Mul") and len(u.node.inputs) == 2 for u in uses):
                continue
            for use in uses:
                mul = use.node
                x = mul.inputs[1 - use.idx]
                div = ir.node("Div", [x, sqrt.outputs[0]], name=f"{mul.name or 'mul'}_div")
                if mul.outputs[0].dtype is not None:
                    div.outputs[0].dtype = mul.outputs[0].dtype
                div.outputs[0].shape = mul.outputs[0].shape
                graph.insert_before(mul, div)
                name = mul.outputs[0].name
                mul.outputs[0].replace_all_uses_with(div.outputs[0], replace_graph_outputs=True)
                graph.remove(mul, safe=True)
                div.outputs[0].name = name
                rewritten += 1
            graph.remove(node, safe=True)
        self.rewritten = rewritten
        return ir.passes.PassResult(model, rewritten > 0)


def _is(node: ir.Node, op: str) -> bool:
    return node.op_type == op and node.domain in ("", "ai.onnx")


def canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run the export passes on a freshly exported graph."""
    m = ir.from_proto(model)
    RsqrtAsDivPass()(m)
    return ir.to_proto(m)
