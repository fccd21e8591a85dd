"""`lint`'s TensorRT rules, one hand-built graph per rule: a valid FP16 INT4 DequantizeLinear -> MatMul graph,
then each broken variant, through ``lint_graph`` (what ``lint`` runs per graph). No export, no torch."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from vlmq_export.targets import TRT_TARGETS
from vlmq_export.validate.lint import lint_graph

K, N, B = 128, 16, 64
COST = "runs the INT4 MatMuls in FP32: slow, unverified"


def _tensor(name: str, dtype: int, dims: list[int], values) -> onnx.TensorProto:
    return helper.make_tensor(name, dtype, dims, np.asarray(values).ravel().tolist())


def int4_graph(*, dtype=T.FLOAT16, wtype=T.INT4, dims=(K, N), block=B, axis=0, scale_dims=None, scale=0.01,
               zero_point=False, between=None, into="B", scale_const=True, opset=21) -> onnx.ModelProto:
    """Y = X @ DequantizeLinear(W); ``between`` puts one node of that op type between the DQ and the MatMul."""
    k, n = dims
    scale_dims = list(scale_dims or [k // block, n])
    w = _tensor("W", wtype, [k, n], np.arange(k * n) % 7 - 3 if wtype == T.INT4 else np.arange(k * n) % 15)
    inits = [w]
    inputs = [helper.make_tensor_value_info("X", dtype, [1, k])]
    if scale_const:
        inits.append(_tensor("S", dtype, scale_dims, np.full(scale_dims, scale)))
    else:
        inputs.append(helper.make_tensor_value_info("S", dtype, scale_dims))
    dq_in = ["W", "S"]
    if zero_point:
        inits.append(_tensor("Z", wtype, scale_dims, np.zeros(scale_dims)))
        dq_in.append("Z")
    nodes = [helper.make_node("DequantizeLinear", dq_in, ["Wf"], name="dq", axis=axis, block_size=block)]
    b = "Wf"
    if between == "Reshape":
        inits.append(_tensor("shape", T.INT64, [2], [k, n]))
        nodes.append(helper.make_node("Reshape", ["Wf", "shape"], ["Wr"], name="mid"))
        b = "Wr"
    elif between == "Transpose":
        nodes.append(helper.make_node("Transpose", ["Wf"], ["Wr"], name="mid", perm=[0, 1]))
        b = "Wr"
    elif between:
        extra = {"to": dtype} if between == "Cast" else {}
        nodes.append(helper.make_node(between, ["Wf"], ["Wr"], name="mid", **extra))
        b = "Wr"
    mm_in = ["X", b] if into == "B" else [b, "X"]
    nodes.append(helper.make_node("MatMul", mm_in, ["Y"], name="mm"))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("Y", dtype, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def q8_graph(*, qtype=T.INT8, act_scale_dims=(), act_zp=0.0, w_axis=1, w_scale_dims=(N,), cast=False,
             conv=False) -> onnx.ModelProto:
    """INT8 / FP8 activation and weight Q/DQ: Y = DQ(Q(X)) @ DQ(W) (or a Conv with a [N, K, 1, 1] weight)."""
    f16 = T.FLOAT16
    wdims = [N, K, 1, 1] if conv else [K, N]
    xdims = [1, K, 1, 1] if conv else [1, K]
    w = np.arange(np.prod(wdims)) % 7 - 3
    inits = [_tensor("W", qtype, wdims, w), _tensor("SW", f16, list(w_scale_dims), np.full(w_scale_dims, 0.02)),
             _tensor("SX", f16, list(act_scale_dims), np.full(act_scale_dims, 0.05)),
             _tensor("ZX", qtype, list(act_scale_dims), np.full(act_scale_dims, act_zp))]
    nodes = [helper.make_node("QuantizeLinear", ["X", "SX", "ZX"], ["Xq"], name="q_x", axis=1),
             helper.make_node("DequantizeLinear", ["Xq", "SX", "ZX"], ["Xd"], name="dq_x", axis=1),
             helper.make_node("DequantizeLinear", ["W", "SW"], ["Wd"], name="dq_w", axis=w_axis)]
    b = "Wd"
    if cast:
        nodes.append(helper.make_node("Cast", ["Wd"], ["Wc"], name="cast", to=f16))
        b = "Wc"
    nodes.append(helper.make_node("Conv" if conv else "MatMul", ["Xd", b], ["Y"], name="op"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", f16, xdims)],
                              [helper.make_tensor_value_info("Y", f16, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def lint(model: onnx.ModelProto, tmp_path, target: str, external: bool = False) -> dict:
    path = tmp_path / f"{target}.onnx"
    if external:  # the exports keep big tensors (scales included) in a side file
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{target}.data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return lint_graph(path, target)


def only(res: dict, text: str) -> None:
    """Exactly one problem, the expected one, and no warning."""
    assert len(res["problems"]) == 1 and text in res["problems"][0], res["problems"]
    assert res["warnings"] == []


@pytest.mark.parametrize("target", TRT_TARGETS)
def test_the_fp16_int4_graph_is_clean_on_every_tensorrt_target(tmp_path, target):
    assert set(TRT_TARGETS) == {"tensorrt", "jetson-orin", "jetson-thor"}
    for external in (False, True):
        res = lint(int4_graph(), tmp_path, target, external)
        assert res["problems"] == [] and res["warnings"] == [] and res["int4_dequantize"] == 1


@pytest.mark.parametrize("target", TRT_TARGETS)
def test_fp32_int4_is_a_warning_that_names_the_cost(tmp_path, target):
    res = lint(int4_graph(dtype=T.FLOAT), tmp_path, target)
    assert res["problems"] == []
    assert len(res["warnings"]) == 1 and COST in res["warnings"][0]
    assert "INT4 scales (1 DequantizeLinear) and activations" in res["warnings"][0]


@pytest.mark.parametrize("scale", [0.0, -0.01, float("inf"), float("nan")])
def test_scales_must_be_finite_and_positive(tmp_path, scale):
    for external in (False, True):  # read from the side file too
        only(lint(int4_graph(scale=scale), tmp_path, "tensorrt", external), "32 of 32 scales are not finite and > 0")


def test_one_bad_scale_among_good_ones_is_counted(tmp_path):
    model = int4_graph()
    s = next(i for i in model.graph.initializer if i.name == "S")
    values = numpy_helper.to_array(s).copy()
    values[1, 3] = 0
    s.CopyFrom(numpy_helper.from_array(values, "S"))
    only(lint(model, tmp_path, "jetson-orin"), "1 of 32 scales are not finite and > 0")


def test_scales_must_be_constant(tmp_path):
    only(lint(int4_graph(scale_const=False), tmp_path, "tensorrt"), "scale is not a constant initializer")


def test_4bit_tensors_need_an_even_element_count(tmp_path):
    only(lint(int4_graph(dims=(K - 1, 1), scale_dims=[1, 1]), tmp_path, "jetson-thor"),
         "4-bit tensor [127, 1] has an odd element count")


@pytest.mark.parametrize("op", ["Reshape", "Transpose", "Cast", "Identity"])
def test_nothing_between_a_dequantize_and_its_matmul(tmp_path, op):
    res = lint(int4_graph(between=op), tmp_path, "tensorrt")
    only(res, f"does not feed a MatMul's input B directly (feeds {op} 'mid' input 0)")


def test_int4_feeds_input_b_not_a(tmp_path):
    only(lint(int4_graph(dims=(K, K), into="A"), tmp_path, "tensorrt"), "(feeds MatMul 'mm' input 0)")


def test_int4_zero_point_is_refused_even_when_zero(tmp_path):
    only(lint(int4_graph(zero_point=True), tmp_path, "jetson-orin"), "has a zero point")


def test_unsigned_int4_is_refused(tmp_path):
    only(lint(int4_graph(wtype=T.UINT4), tmp_path, "jetson-thor"), "unsigned INT4")


def test_blocks_along_axis_0_only(tmp_path):
    only(lint(int4_graph(dims=(K, K), axis=1, scale_dims=[K, K // B]), tmp_path, "tensorrt"),
         "axis 1 (needs 0: blocks along K)")
    assert lint(int4_graph(axis=-2), tmp_path, "tensorrt")["problems"] == []  # -2 is axis 0 of a [K, N] weight


def test_blocks_of_the_targets_sizes_only(tmp_path):
    only(lint(int4_graph(block=32), tmp_path, "jetson-orin"), "block 32 (TensorRT takes (64, 128))")


def test_scale_shape_is_k_over_b_by_n(tmp_path):
    only(lint(int4_graph(scale_dims=[K // B, 1]), tmp_path, "tensorrt"),
         "scale shape [2, 1] (needs [K/B, N] = [2, 16])")


def test_opset_within_each_targets_range(tmp_path):
    model = int4_graph(opset=22)  # past what TensorRT 10.3 documents, within 10.13's
    only(lint(model, tmp_path, "jetson-orin"), "opset 22 outside 9..21")
    only(lint(model, tmp_path, "tensorrt"), "opset 22 outside 9..21")
    assert lint(model, tmp_path, "jetson-thor")["problems"] == []
    only(lint(int4_graph(opset=25), tmp_path, "jetson-thor"), "opset 25 outside 9..24")
    only(lint(int4_graph(opset=20), tmp_path, "jetson-thor"), "opset 20 < 21: INT4 DequantizeLinear")


def test_int8_activation_and_weight_qdq_pass(tmp_path):
    for target in TRT_TARGETS:
        res = lint(q8_graph(), tmp_path, target)
        assert res["problems"] == [] and res["warnings"] == [] and res["int4_dequantize"] == 0
    assert lint(q8_graph(conv=True, w_axis=0), tmp_path, "tensorrt")["problems"] == []


def test_fp8_passes_thor_and_fails_orin(tmp_path):
    model = q8_graph(qtype=T.FLOAT8E4M3FN)
    assert lint(model, tmp_path, "jetson-thor")["problems"] == []
    assert lint(model, tmp_path, "tensorrt")["problems"] == []
    problems = lint(model, tmp_path, "jetson-orin")["problems"]
    assert len(problems) == 3  # the activation's Q and DQ and the weight's DQ
    assert all("FP8 (FLOAT8E4M3FN) Q/DQ: jetson-orin" in p and "has no FP8" in p for p in problems)
    e5m2 = lint(q8_graph(qtype=T.FLOAT8E5M2), tmp_path, "jetson-thor")["problems"]
    assert len(e5m2) == 3 and all("TensorRT's FP8 is FLOAT8E4M3FN" in p for p in e5m2)


def test_activation_scales_are_per_tensor(tmp_path):
    problems = lint(q8_graph(act_scale_dims=(K,)), tmp_path, "tensorrt")["problems"]
    assert len(problems) == 2 and all("activation scale of shape [128]" in p for p in problems)


def test_int8_zero_points_are_zero_and_signed(tmp_path):
    problems = lint(q8_graph(act_zp=3), tmp_path, "tensorrt")["problems"]
    assert len(problems) == 2 and all("non-zero zero point" in p for p in problems)
    model = q8_graph()
    for i in model.graph.initializer:
        if i.name == "ZX":
            i.CopyFrom(_tensor("ZX", T.UINT8, [], [0]))
    problems = lint(model, tmp_path, "tensorrt")["problems"]
    assert len(problems) == 2 and all("UINT8 (TensorRT takes signed INT8" in p for p in problems)


def test_weight_scale_along_the_output_axis(tmp_path):
    only(lint(q8_graph(w_axis=0, w_scale_dims=(K,)), tmp_path, "tensorrt"),
         "dq_w (W): weight scale of shape [128] on axis 0 (TensorRT takes a scalar or a 1-D per-channel scale: "
         "axis 1, length 16")
    only(lint(q8_graph(conv=True, w_axis=1, w_scale_dims=(K,)), tmp_path, "jetson-thor"), "axis 0, length 16")


def test_no_cast_after_an_int8_dequantize(tmp_path):
    only(lint(q8_graph(cast=True), tmp_path, "jetson-orin"), "a Cast after the DequantizeLinear")


def test_onnxruntime_rules_are_unchanged(tmp_path):
    """The ONNX Runtime target takes zero points, UINT4 and any block; it still wants the MatMul's input B."""
    res = lint(int4_graph(dtype=T.FLOAT, wtype=T.UINT4, zero_point=True, block=32), tmp_path, "onnxruntime")
    assert res["problems"] == [] and res["matmulnbits"] == 1
    res = lint(int4_graph(dtype=T.FLOAT, between="Identity"), tmp_path, "onnxruntime")
    assert any("does not feed a MatMul's input B directly" in p for p in res["problems"])


def test_lint_and_build_read_one_target_table(tmp_path, monkeypatch):
    """Change a target in targets.py and both lint and the engine build script follow."""
    import dataclasses

    from vlmq_export import targets
    from vlmq_export.engines.script import render_script

    orin = targets.TARGETS["jetson-orin"]
    monkeypatch.setitem(targets.TARGETS, "jetson-orin", dataclasses.replace(orin, min_trt=(10, 9), opsets=(9, 22)))
    assert "MIN_TRT_MAJOR=10\nMIN_TRT_MINOR=9\n" in render_script({"graphs": {}}, "jetson-orin", False)
    assert lint(int4_graph(opset=22), tmp_path, "jetson-orin")["problems"] == []
