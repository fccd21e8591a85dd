"""Export passes: the Rsqrt -> Div rewrite, and the decoder graphs' form (eager attention, fused RMSNorm)."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from vlmq_export.export.onnx_export import export_graph
from vlmq_export.export.passes import RsqrtAsDivPass
from vlmq_export.models import load_family


def _rms_graph(extra_reciprocal_use: bool = False) -> onnx.ModelProto:
    """y = w * x * Reciprocal(Sqrt(mean(x^2) + eps)); optionally the Reciprocal also feeds an Add."""
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["std"]),
        helper.make_node("Reciprocal", ["std"], ["inv"]),
        helper.make_node("Mul", ["inv", "x"], ["xn"]),  # Reciprocal first: either order is matched
        helper.make_node("Mul", ["w", "xn"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])]
    if extra_reciprocal_use:
        nodes.append(helper.make_node("Add", ["inv", "eps"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3, 1]))
    inits = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]),
        helper.make_tensor("w", TensorProto.FLOAT, [8], np.linspace(0.5, 1.5, 8).astype(np.float32)),
    ]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run(model: onnx.ModelProto, x: np.ndarray, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, opt_path=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    if opt_path:
        so.optimized_model_filepath = str(opt_path)
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def test_rsqrt_as_div_is_exact_and_lets_ort_fuse_rmsnorm(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32) * 3
    before = _rms_graph()
    m = ir.from_proto(before)
    p = RsqrtAsDivPass()
    p(m)
    after = ir.to_proto(m)
    onnx.checker.check_model(after, full_check=True)
    assert p.rewritten == 1
    assert _ops(after)["Reciprocal"] == 0 and _ops(after)["Div"] == 1 and _ops(after)["Mul"] == 1
    ref = (x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5)) * np.linspace(0.5, 1.5, 8).astype(np.float32)
    np.testing.assert_allclose(_run(after, x)[0], ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_run(after, x)[0], _run(before, x)[0], rtol=1e-6, atol=1e-6)
    # ONNX Runtime fuses the Div form into one kernel; the exporter's Reciprocal form it leaves alone
    for model, fused in ((after, 1), (before, 0)):
        opt = tmp_path / f"opt{fused}.onnx"
        _run(model, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, opt)
        assert _ops(onnx.load(str(opt)))["SimplifiedLayerNormalization"] == fused


def test_rsqrt_as_div_leaves_a_reciprocal_with_other_uses():
    m = ir.from_proto(_rms_graph(extra_reciprocal_use=True))
    p = RsqrtAsDivPass()
    p(m)
    assert p.rewritten == 0
    assert _ops(ir.to_proto(m))["Reciprocal"] == 1


@pytest.mark.parametrize("family_name", ["smolvlm", "qwen2_vl"])
def test_decoder_graph_form(tiny_dirs, family_name, tmp_path):
    """The llm graph traces eager attention (no SDPA NaN guard), keeps no Reciprocal, and ONNX Runtime
    fuses every RMSNorm (2 per layer + the final norm); the torch model keeps its own attention."""
    d = tiny_dirs[family_name]
    fam = load_family(d)
    model = fam.load_model(d)
    spec = next(s for s in fam.export_specs(model) if s.name == "llm")
    path = export_graph(spec, tmp_path / "llm.onnx")
    assert spec.attention is not None and spec.attention[0].config._attn_implementation == "sdpa"
    ops = _ops(onnx.load(str(path)))
    assert ops["IsNaN"] == 0 and ops["Reciprocal"] == 0
    opt = tmp_path / "llm.opt.onnx"
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert _ops(onnx.load(str(opt)))["SimplifiedLayerNormalization"] == 2 * fam.num_layers + 1
