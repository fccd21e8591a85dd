"""--smooth (issue 23): per-channel smoothing scales of W8A8 layers, chosen per block, written into the graphs as a Mul
by 1/s or folded into the preceding norm, recorded per layer, and validated against torch's smoothed twin."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlmq_export import cli
from vlmq_export.calibrators.smooth import ALPHAS
from vlmq_export.export.qdq import QuantizedLinear, weight_key
from vlmq_export.export.smooth_pass import SmoothPass


def _graph(rng):
    """x -> LayerNormalization -> MatMul a, MatMul b (one input: one folded Mul); x -> Mul(gamma) -> MatMul c (an
    RMSNorm's weight: folded); x -> Relu -> MatMul d, and the Relu also feeds an output (the Mul must stay)."""
    K, N = 8, 6
    w = {n: rng.standard_normal((K, N)).astype(np.float32) for n in "abcd"}
    inits = [numpy_helper.from_array(v, f"w_{n}") for n, v in w.items()] + [
        numpy_helper.from_array(rng.uniform(0.5, 2, K).astype(np.float32), "ln_scale"),
        numpy_helper.from_array(rng.standard_normal(K).astype(np.float32), "ln_bias"),
        numpy_helper.from_array(rng.uniform(0.5, 2, K).astype(np.float32), "gamma")]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["ln"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["ln", "w_a"], ["ya"]), helper.make_node("MatMul", ["ln", "w_b"], ["yb"]),
             helper.make_node("Mul", ["gamma", "x"], ["rms"], name="rms"), helper.make_node("MatMul", ["rms", "w_c"], ["yc"]),
             helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "w_d"], ["yd"])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("ya", "yb", "yc", "yd", "r")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])], outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), w


def _run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})


def test_pass_is_exact_folds_where_it_may_and_rekeys():
    rng = np.random.default_rng(0)
    model, w = _graph(rng)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    before = _run(model, x)
    s_ab, s_c, s_d = (rng.uniform(0.2, 5, 8).astype(np.float32) for _ in range(3))
    layers = []
    for n, s in (("a", s_ab), ("b", s_ab), ("c", s_c), ("d", s_d)):
        wnk = w[n].T  # torch layout [N, K]
        layers.append(QuantizedLinear(n, None, None, 8, -1, weight_key(wnk * s[None, :]), smooth=s,
                                      prior_key=weight_key(wnk)))
    irm = ir.from_proto(model)
    spass = SmoothPass(layers)
    spass(irm)
    after_model = ir.to_proto(irm)
    after = _run(after_model, x)
    for a, b in zip(before, after):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert spass.placed["a"] == spass.placed["b"] == "folded into LayerNormalization ln"
    assert spass.placed["c"] == "folded into Mul rms" and spass.placed["d"] == "Mul"
    assert {q.prior_key: q.key for q in layers} == spass.rekey  # float32 graph: the calibrated layers' own keys
    ops = [n.op_type for n in after_model.graph.node]
    assert ops.count("Mul") == 2  # the RMSNorm's own (folded into) and d's, which the Relu's output forbids folding
    # the original weights are gone, the smoothed ones in their place
    names = {i.name for i in after_model.graph.initializer}
    assert not names & {"w_a", "w_b", "w_c", "w_d"} and {"w_a_smoothed", "w_d_smoothed"} <= names


def test_pass_refuses_a_weight_that_is_not_the_calibrated_one():
    rng = np.random.default_rng(1)
    model, w = _graph(rng)
    s = np.full(8, 2.0, np.float32)
    bad = QuantizedLinear("a", None, None, 8, -1, "6x8:not-it", smooth=s, prior_key=weight_key(w["a"].T))
    with pytest.raises(ValueError, match="differs from the calibrated one"):
        SmoothPass([bad])(ir.from_proto(model))


@pytest.fixture(scope="module")
def smoothed(tiny_dirs, tmp_path_factory):
    """Tiny SmolVLM, INT8 vision + projector with --smooth (the W4 decoder beside it, as TensorRT targets take it);
    tiny Qwen2-VL with FP8 everywhere and --smooth (its decoder's RMSNorms take the folds)."""
    root = tmp_path_factory.mktemp("smooth")
    outs = {"smolvlm": root / "smolvlm", "qwen2_vl": root / "qwen2_vl"}
    assert cli.main([str(tiny_dirs["smolvlm"]), "--vision", "int8", "--projector", "int8", "--llm", "w4", "--method", "gptq",
                     "--no-asym", "--lm-head", "none", "--smooth", "--n-calib", "4", "--n-val", "2",
                     "-o", str(outs["smolvlm"]), "--quiet"]) == 0
    assert cli.main([str(tiny_dirs["qwen2_vl"]), "--vision", "fp8", "--projector", "fp8", "--llm", "fp8", "--method", "vlmq",
                     "--smooth", "--n-calib", "4", "--n-val", "2", "-o", str(outs["qwen2_vl"]), "--quiet"]) == 0
    return outs


@pytest.mark.parametrize("fam", ["smolvlm", "qwen2_vl"])
def test_recorded_per_layer_and_validated(smoothed, fam):
    out = smoothed[fam]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["smooth"] is True
    w8a8 = [r for r in manifest["layers"] if r.get("act")]
    assert w8a8 and all(r.get("smooth") for r in w8a8)
    for r in w8a8:
        sm = r["smooth"]
        assert sm["alpha"] in (None, *ALPHAS) and r["name"] in sm["group"]
        assert sm["errors"]["scored"].startswith("out of sample")
        if sm["alpha"] is not None:  # chosen because it scored lowest, and placed in the graph
            assert sm["errors"][str(sm["alpha"])] < sm["errors"]["none"]
            assert sm["graph"] == "Mul" or sm["graph"].startswith("folded into ")
    on = [r for r in w8a8 if r["smooth"]["alpha"] is not None]
    assert on, "no layer was smoothed"
    from safetensors.numpy import load_file

    scales = load_file(str(out / manifest["calibration"]["smoothing_file"]))
    assert set(scales) == {r["name"] for r in on}
    # the graphs hold the Muls the records name
    muls = sum(1 for c in manifest["components"].values()
               for n in onnx.load(str(out / c["file"]), load_external_data=False).graph.node if n.name.endswith("_smooth_Mul"))
    groups_with_mul = {tuple(r["smooth"]["group"]) for r in on if r["smooth"]["graph"] == "Mul"}
    assert muls == len(groups_with_mul)
    v = json.loads((out / "report" / "validation.json").read_text())["summary"]
    assert v["qdq_w8a8_layer_max_rel"] <= 1e-5  # the smoothed graphs equal torch's smoothed twin, layer by layer
    if fam == "qwen2_vl":  # the decoder's smoothing: folded into its RMSNorms' weights, checked on the text prompt
        assert any(r["component"] == "llm" and r["smooth"].get("graph", "").startswith("folded into Mul") for r in on)
        assert v["qdq_text_max_abs_diff"] <= 1e-4


def test_validate_command_rebuilds_the_smoothed_twin(smoothed, tmp_path):
    """`validate` in a new process: the weights from the graphs are W diag(s), the input scales come from
    smoothing.safetensors; without them the layer-by-layer gate would see every smoothed layer off."""
    import shutil

    from vlmq_export import pipeline

    out = tmp_path / "o"
    shutil.copytree(smoothed["smolvlm"], out)
    assert pipeline.validate_output(out, n_val=2, gen_tokens=2)["qdq_w8a8_layer_max_rel"] <= 1e-5
    (out / "smoothing.safetensors").unlink()
    with pytest.raises(Exception, match="smoothing.safetensors is missing"):
        pipeline.validate_output(out, n_val=2, gen_tokens=2)


@pytest.mark.parametrize("argv, message", [
    (["--int4", "--smooth"], "--smooth applies to W8A8 components"),
    (["--vision", "int8", "--smooth", "--method", "rtn"], "need"),
])
def test_smooth_without_w8a8_or_data_is_a_one_line_error(tiny_dirs, tmp_path, capsys, argv, message):
    assert cli.main([str(tiny_dirs["smolvlm"]), *argv, "-o", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmq-export: error:") and message in err and "\n" not in err
