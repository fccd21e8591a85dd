"""The lm_head's default precision by target (issue 24, benchmarks/lm-head.md): an 8-bit head for onnxruntime,
float for the TensorRT targets, `--lm-head none` keeps a float head."""
from __future__ import annotations

import json

import onnx
import pytest

from vlmq_export import cli
from vlmq_export.targets import TRT_TARGETS


def components(tmp_path, *flags) -> dict:
    args = cli._export_parser().parse_args(["m", "-o", str(tmp_path / "o"), *flags])
    return {c: r.label() for c, r in cli._check_export_args(args)[0].items()}


def test_default_head_by_target_and_its_overrides(tmp_path):
    assert components(tmp_path) == {"llm": "w4g128", "lm_head": "w8g64"}
    assert components(tmp_path, "--lm-head", "none") == {"llm": "w4g128"}
    assert components(tmp_path, "--lm-head", "w8pc") == {"llm": "w4g128", "lm_head": "w8pc"}
    # the head named in --components follows --intN, as before; without the decoder the head stays float
    assert components(tmp_path, "--components", "llm,lm_head") == {"llm": "w4g128", "lm_head": "w4g128"}
    assert components(tmp_path, "--components", "vision") == {"vision": "w8pc"}
    # a W8A8 or 8-bit decoder keeps a float head unless one is asked for
    assert components(tmp_path, "--llm", "int8") == {"llm": "int8"}
    assert components(tmp_path, "--llm", "w8") == {"llm": "w8pc"}
    assert components(tmp_path, "--llm", "fp8", "--lm-head", "w8g64") == {"llm": "fp8", "lm_head": "w8g64"}
    for target in TRT_TARGETS:
        assert components(tmp_path, "--target", target) == {"llm": "w4g128"}


@pytest.mark.parametrize("flags, head", [([], "w8g64"), (["--lm-head", "none"], "float")])
def test_default_export_writes_the_head_it_records(tiny_dirs, tmp_path, flags, head):
    out = tmp_path / "o"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "--method", "rtn", "--no-clip-search", "--no-validate",
                     "-o", str(out), "--quiet", *flags]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["lm_head"] == head
    heads = [r for r in manifest["layers"] if r["component"] == "lm_head"]
    llm = onnx.load(str(out / "llm.onnx"))
    inits = {i.name: i for i in llm.graph.initializer}
    if head == "float":
        assert heads == []
        logits = [n for n in llm.graph.node if "logits" in n.output]
        assert len(logits) == 1 and logits[0].op_type == "MatMul" and logits[0].input[1] in inits
        return
    assert len(heads) == 1 and heads[0]["bits"] == 8 and heads[0]["group_size"] == 64
    dq, = [n for n in llm.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == heads[0]["onnx_weight"]]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
    assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8 and attrs.get("block_size") == 64
