"""`vlmq-export inspect`: a summary of an output directory from its manifest (text and --json)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmq_export import cli


@pytest.fixture(scope="module")
def exports(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inspect")
    flags = {"smolvlm": ["--vision", "w8pc", "--n-val", "1", "--gen-tokens", "2"],
             "qwen2_vl": ["--asym", "--group-size", "64", "--no-validate"]}
    outs = {}
    for name, extra in flags.items():
        outs[name] = root / name
        assert cli.main([str(tiny_dirs[name]), "--int4", "--method", "rtn", "-o", str(outs[name]),
                         "--n-calib", "2", "--quiet", *extra]) == 0
    return outs


def test_inspect_json_per_component_format_graphs_and_validation(exports, capsys):
    assert cli.main(["inspect", str(exports["smolvlm"]), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["status"] == "complete" and s["source"]["family"] == "smolvlm"
    assert set(s["components"]) == {"vision", "llm", "lm_head"}  # the head: the onnxruntime target's 8-bit default
    assert (s["components"]["lm_head"]["bits"], s["components"]["lm_head"]["group_size"]) == (8, 64)
    llm, vision = s["components"]["llm"], s["components"]["vision"]
    assert (llm["bits"], llm["group_size"], llm["symmetric"], llm["method"]) == (4, 128, False, "rtn")  # onnxruntime's default
    assert (vision["bits"], vision["group_size"], vision["graph"]) == (8, -1, "vision_encoder.onnx")
    assert llm["layers_quantized"] > 0 and vision["layers_quantized"] > 0
    assert set(s["graphs"]) == {"vision_encoder", "projector", "embed_tokens", "llm"}
    for g in s["graphs"].values():
        assert g["bytes"] == (exports["smolvlm"] / g["file"]).stat().st_size and g["inputs"]
    assert "input_ids" in [i["name"] for i in s["graphs"]["embed_tokens"]["inputs"]]
    assert s["validation"]["int4_form_ok"] is True and 0 < s["validation"]["logits_cosine"] <= 1.0001


def test_inspect_text_of_an_asymmetric_export(exports, capsys):
    assert cli.main(["inspect", str(exports["qwen2_vl"])]) == 0
    text = capsys.readouterr().out
    assert "(qwen2_vl), status complete" in text
    assert "recipe: rtn, asymmetric, fp32 graphs for onnxruntime, runtimes onnxruntime" in text
    assert "  llm: W4 g64 asym, rtn;" in text
    assert "llm.onnx: " in text and "(float " in text and "inputs inputs_embeds[" in text
    # exported with --no-validate: the static checks only, no fidelity numbers
    assert "validation: int4_form_ok True, ort_fused_all True" in text and "logits_cosine" not in text

