"""End to end: `vlmq-export DIR --int4 -o OUT` on tiny models, then run / validate / bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from vlmq_export import cli
from vlmq_export.data.shapes import make_split
from vlmq_export.models import load_family
from vlmq_export.outdir import check_complete
from vlmq_export.pipeline import load_quantized_weights, validation_samples
from vlmq_export.runtime.generate import GRAPHS, OnnxVLM
from vlmq_export.runtime.session import DEFAULT_ACCURACY_LEVEL, make_session
from vlmq_export.validate.compare import torch_generate
from vlmq_export.validate.graphs import int4_dequantize_nodes, ort_fusion, portable_int4_problems

FAMILIES = ("qwen2_vl", "smolvlm")


@pytest.fixture(scope="module")
def exported(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    outs = {}
    for fam in FAMILIES:
        out = tmp_path_factory.mktemp("out") / fam
        rc = cli.main([str(tiny_dirs[fam]), "--int4", "-o", str(out), "--n-calib", "6", "--quiet"])
        assert rc == 0
        outs[fam] = out
    return outs


def fake_quant_model(model_dir: Path, out: Path):
    family = load_family(model_dir)
    model = family.load_model(model_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    for name, w in load_quantized_weights(out, manifest).items():
        model.get_submodule(name).weight.data = w
    return family, model


@pytest.mark.parametrize("fam", FAMILIES)
def test_graphs_written_checked_and_int4(exported, fam):
    out = exported[fam]
    manifest = check_complete(out)
    portable = manifest["components"]["llm"]["flavour"] == "portable"  # the ORT flavour is the default for both
    for g in GRAPHS:  # the ORT flavour holds ONNX Runtime's own operators: ONNX Runtime checks it (next lines)
        if g != "llm" or portable:
            onnx.checker.check_model(str(out / f"{g}.onnx"), full_check=True)
    llm = onnx.load(str(out / "llm.onnx"))
    assert llm.opset_import[0].version == 21
    dqs = int4_dequantize_nodes(llm)
    quantized = {r["onnx_weight"] for r in manifest["layers"] if r["bits"] and r["component"] == "llm"}  # merged
    # q|k|v, gate|up: one each; the lm_head is 8-bit by the onnxruntime default (targets.RECIPE_DEFAULTS)
    head, = [r for r in manifest["layers"] if r["component"] == "lm_head"]
    assert (head["bits"], head["group_size"], manifest["recipe"]["lm_head"]) == (8, 64, "w8g64")
    assert len(dqs) == len(quantized) > 0
    # the onnxruntime default is asymmetric (targets.RECIPE_DEFAULTS): UINT4 codes with a constant zero point per
    # block, by ONNX Runtime's rules (the symmetric, TensorRT-legal form: test_lint, test_symmetric_* below)
    assert manifest["recipe"]["symmetric"] is False
    assert all(d["axis"] == 0 and d["block_size"] == 128 and d["dtype"] == "uint4" and d["zero_point_constant"]
               and d["feeds_matmul_b"] for d in dqs)
    assert portable_int4_problems(llm, tensorrt=False) == []
    # the language model's float MatMuls are all gone: every decoder Linear is INT4, the lm_head INT8
    float_mm = [n for n in llm.graph.node if n.op_type == "MatMul"
                and any(i.name == n.input[1] for i in llm.graph.initializer)]
    assert float_mm == []
    fusion = ort_fusion(out / "llm.onnx")
    assert fusion["matmulnbits"] == len(dqs) + 1 and fusion["dequantize_left"] == 0  # + 1: the INT8 head
    assert (out / "processor" / "tokenizer.json").is_file()
    assert os.path.getsize(out / "llm.onnx") < 0.6 * manifest["components"]["llm"]["float_bytes"]


def test_accuracy_level_reaches_the_fused_kernel(exported, tmp_path):
    """The session's level is the MatMulNBits attribute ONNX Runtime writes; the default is 4."""
    llm = exported["smolvlm"] / "llm.onnx"

    def levels(**kw):
        opt = tmp_path / f"opt{len(list(tmp_path.iterdir()))}.onnx"
        make_session(llm, providers=["CPUExecutionProvider"], optimized_model_path=opt, **kw)
        nodes = [n for n in onnx.load(str(opt)).graph.node if n.op_type == "MatMulNBits"]
        assert nodes
        return {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"}

    assert levels() == {DEFAULT_ACCURACY_LEVEL} == {4}
    assert levels(accuracy_level=0) == {0}
    assert OnnxVLM(exported["smolvlm"]).accuracy_level == 4


@pytest.mark.parametrize("fam", FAMILIES)
def test_qdq_onnx_matches_torch_fakequant(tiny_dirs, exported, fam):
    out = exported[fam]
    family, model = fake_quant_model(tiny_dirs[fam], out)
    vlm = OnnxVLM(out, accuracy_level=0)
    scenes = make_split("test", 3, image_size=96 if fam == "qwen2_vl" else 64)
    cases = [([scenes[0].images[0]], "What color is it?"),
             ([scenes[1].images[0], scenes[2].images[0].resize((160, 96))], "Compare."),
             ([], "Text only prompt.")]
    with torch.no_grad():
        for images, prompt in cases:
            p = family.prepare(images, prompt)
            ref = model(**family.hf_inputs(p)).logits[0].numpy()
            assert np.abs(vlm.prompt_logits(p) - ref).max() <= 1e-4
            if images:
                ref_img = family.image_features(model, p).numpy()
                assert np.abs(vlm.image_features(p) - ref_img).max() <= 1e-4


# Level 0 computes the fused INT4 MatMuls in float: equal to torch fake-quant by construction, the same 16 tokens.
# The default (4, int8 activations) moves logits by ~1 %: it must pick torch's tokens until the first step where
# torch's top two logits are a near-tie, and there the token it picks must be one of those, so a broken fast path
# (wrong kernel, wrong level plumbing: tokens far down torch's ranking) still fails here.
@pytest.mark.parametrize("level", [None, 0], ids=["default-level", "level0"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_run_cli_matches_torch_greedy(tiny_dirs, exported, fam, level, tmp_path, capsys):
    out = exported[fam]
    sample = make_split("test", 1)[0]
    img = tmp_path / "scene.png"
    sample.images[0].save(img)
    rc = cli.main(["run", str(out), "--image", str(img), "--prompt", sample.prompt,
                   "--max-new-tokens", "16", "--no-stop", "--json"]
                  + ([] if level is None else ["--accuracy-level", str(level)]))
    assert rc == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]
    family, model = fake_quant_model(tiny_dirs[fam], out)
    steps = []
    ref = torch_generate(family, model, family.prepare(sample.images, sample.prompt), 16, stop=False, logits=steps)
    assert len(ref) == 16 and len(got) == 16
    if level == 0 or got == ref:
        assert got == ref
        return
    i = next(k for k in range(16) if got[k] != ref[k])  # the same prefix up to here: torch's logits apply
    gap = (steps[i][ref[i]] - steps[i][got[i]]) / (steps[i].max() - steps[i].min())
    assert gap <= 0.02, f"step {i}: level 4 picked {got[i]}, {gap:.1%} of the logit range below torch's {ref[i]}"


def test_report_and_validate_verb(exported, capsys):
    out = exported["smolvlm"]
    report = json.loads((out / "report" / "validation.json").read_text())
    stages = report["stages"]
    assert stages["float_onnx_vs_torch"]["logits_max_abs_diff"] <= 1e-4
    assert stages["qdq_onnx_vs_torch_fakequant"]["logits_max_abs_diff"] <= 1e-4
    assert stages["qdq_onnx_vs_torch_fakequant"]["accuracy_level"] == 0  # parity: float compute
    q = stages["quantized_vs_full_precision"]
    assert q["accuracy_level"] == DEFAULT_ACCURACY_LEVEL == 4  # measured as `run` serves it
    assert 0.9 < q["logits_cosine"] < 1.0  # INT4 changes the model, but not beyond recognition
    assert (out / "report" / "report.md").read_text().startswith("# vlmq-export report")
    rc = cli.main(["validate", str(out), "--n-val", "2", "--gen-tokens", "4", "--quiet"])
    assert rc == 0
    v = json.loads(capsys.readouterr().out)
    assert v["qdq_max_abs_diff"] <= 1e-4 and v["int4_form_ok"] and v["ort_fused_all"]


def test_validation_prompts_are_held_out():
    calib = {s.source for s in make_split("calib", 50)}
    assert not calib & {s.source for s in validation_samples(8)}


# ----------------------------------------------------------------------------- interruption
@pytest.mark.parametrize("stage", ["calibrate", "qdq"])
def test_killed_export_leaves_nothing_complete(tiny_dirs, tmp_path, stage):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vlmq_export.cli", str(tiny_dirs["smolvlm"]), "--int4", "-o", str(out),
           "--json", "--n-calib", "4"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = False
    for line in proc.stderr:
        if line.startswith("{") and json.loads(line).get("stage") == stage:
            proc.send_signal(signal.SIGKILL)
            seen = True
            break
    proc.wait(timeout=60)
    assert seen, f"stage {stage} never started"
    assert not out.exists()
    partial = list(tmp_path.glob(".out.partial-*"))
    assert partial, "the staging directory should be what remains"
    for path in (out, partial[0]):
        rc = subprocess.run([sys.executable, "-m", "vlmq_export.cli", "validate", str(path)],
                            capture_output=True, text=True)
        assert rc.returncode != 0 and "error" in rc.stderr


# ----------------------------------------------------------------------------- bad input
def run_error(argv, capsys) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith("vlmq-export: error:"), err
    return err


def assert_nothing_written(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_missing_model_path(tmp_path, capsys):
    err = run_error([str(tmp_path / "nope"), "--int4", "-o", str(tmp_path / "out")], capsys)
    assert "not found" in err
    assert_nothing_written(tmp_path)


def test_unsupported_architecture_names_supported(tmp_path, capsys):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    err = run_error([str(model), "--int4", "-o", str(tmp_path / "out")], capsys)
    assert "bert" in err and "qwen2_vl" in err and "smolvlm" in err
    assert_nothing_written(tmp_path)


def test_corrupt_image_named(tiny_dirs, tmp_path, capsys):
    data = tmp_path / "calib"
    data.mkdir()
    make_split("calib", 1)[0].images[0].save(data / "good.png")
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (data / "data.jsonl").write_text(json.dumps({"image": "good.png", "prompt": "a"}) + "\n"
                                     + json.dumps({"image": "broken.jpg", "prompt": "b"}) + "\n")
    err = run_error([str(tiny_dirs["smolvlm"]), "--int4", "-o", str(tmp_path / "out"), "--calib", str(data)], capsys)
    assert "broken.jpg" in err
    assert_nothing_written(tmp_path)


def test_empty_calibration_set(tiny_dirs, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    err = run_error([str(tiny_dirs["smolvlm"]), "--int4", "-o", str(tmp_path / "out"),
                     "--calib", str(tmp_path / "empty.jsonl")], capsys)
    assert "empty" in err
    assert_nothing_written(tmp_path)


def test_out_exists_and_is_foreign(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    err = run_error([str(tiny_dirs["smolvlm"]), "--int4", "-o", str(out)], capsys)
    assert "not a vlmq-export output" in err
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_unknown_method_lists_valid(tiny_dirs, tmp_path, capsys):
    err = run_error([str(tiny_dirs["smolvlm"]), "--int4", "--method", "awq", "-o", str(tmp_path / "out")], capsys)
    assert "gptq" in err and "rtn" in err
    assert_nothing_written(tmp_path)


def test_width_not_divisible_by_group_gets_smaller_block(tiny_dirs, tmp_path):
    """A decoder MLP of width 320: down_proj's K=320 is not a multiple of 128 -> block 64, in the manifest."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    src = tiny_dirs["smolvlm"]
    model_dir = tmp_path / "odd"
    config = AutoConfig.from_pretrained(src)
    config.text_config.intermediate_size = 320
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(model_dir)
    family = load_family(src)
    family.tokenizer.save_pretrained(model_dir)
    family.image_processor.save_pretrained(model_dir)
    out = tmp_path / "out"
    assert cli.main([str(model_dir), "--int4", "-o", str(out), "--n-calib", "4", "--no-validate", "--quiet",
                     "--no-asym"]) == 0  # symmetric: block 64 is checked by TensorRT's rules below
    manifest = check_complete(out)
    down = [r for r in manifest["layers"] if r["name"].endswith("down_proj")]
    assert down and all(r["group_size"] == 64 and "320" in r["note"] for r in down)
    blocks = {d["weight"]: d["block_size"] for d in int4_dequantize_nodes(onnx.load(str(out / "llm.onnx")))}
    assert {blocks[r["onnx_weight"]] for r in down} == {64}
    assert portable_int4_problems(onnx.load(str(out / "llm.onnx"))) == []


def test_asym_export_is_onnx_runtime_only_and_exact(tiny_dirs, tmp_path, capsys, monkeypatch):
    """--asym: UINT4 codes with a UINT4 zero point per block, fused by ONNX Runtime, equal to torch fake-quant,
    marked ONNX Runtime only in the manifest and the report (TensorRT's static check names the zero points)."""
    src = tiny_dirs["smolvlm"]
    monkeypatch.chdir(tmp_path)  # the default output name carries -asym
    # a float head: the decoder's form is the subject here (the default 8-bit head: tests/test_lm_head_default.py)
    assert cli.main([str(src), "--int4", "--asym", "--method", "gptq", "--n-calib", "4", "--lm-head", "none",
                     "--quiet"]) == 0
    out = tmp_path / f"{src.name}-gptq-llmw4g128-asym"
    manifest = check_complete(out)
    assert manifest["recipe"]["symmetric"] is False and manifest["recipe"]["runtimes"] == ["onnxruntime"]
    assert manifest["recipe"]["components"]["llm"]["sym"] is False
    llm = onnx.load(str(out / "llm.onnx"))
    dqs = int4_dequantize_nodes(llm)
    assert dqs and all(d["dtype"] == "uint4" and d["zero_point"] and d["zero_point_constant"] for d in dqs)
    assert all(r.get("onnx_zero_point") for r in manifest["layers"] if r["bits"])
    assert portable_int4_problems(llm, tensorrt=False) == []
    trt = portable_int4_problems(llm)
    assert len(trt) == 2 * len(dqs) and any("zero point" in p for p in trt)
    fusion = ort_fusion(out / "llm.onnx")
    assert fusion["matmulnbits"] == len(dqs) and fusion["dequantize_left"] == 0
    zeros = {i.name: onnx.numpy_helper.to_array(i) for i in llm.graph.initializer if i.name.endswith("_zero_point")}
    assert len(zeros) == len(dqs) and any(len(np.unique(z)) > 1 for z in zeros.values())
    report = json.loads((out / "report" / "validation.json").read_text())
    assert report["int4_form_rules"] == "onnxruntime" and report["int4_form_problems"] == []
    assert report["stages"]["qdq_onnx_vs_torch_fakequant"]["logits_max_abs_diff"] <= 1e-4
    assert "ONNX Runtime only" in (out / "report" / "report.md").read_text()
    family, model = fake_quant_model(src, out)  # reads codes, scales and zero points back from the graphs
    vlm = OnnxVLM(out, accuracy_level=0)
    p = family.prepare(make_split("test", 1, image_size=64)[0].images, "What color is it?")
    with torch.no_grad():
        ref = model(**family.hf_inputs(p)).logits[0].numpy()
    assert np.abs(vlm.prompt_logits(p) - ref).max() <= 1e-4
    rc = cli.main(["validate", str(out), "--n-val", "2", "--gen-tokens", "4", "--quiet"])
    v = json.loads(capsys.readouterr().out)
    assert rc == 0 and v["int4_form_ok"] and v["ort_fused_all"] and v["qdq_max_abs_diff"] <= 1e-4


def test_asym_without_low_bit_component_refused(tiny_dirs, tmp_path, capsys):
    err = run_error([str(tiny_dirs["smolvlm"]), "--int4", "--llm", "w8", "--asym", "-o", str(tmp_path / "out")], capsys)
    assert "--asym" in err
    assert_nothing_written(tmp_path)
