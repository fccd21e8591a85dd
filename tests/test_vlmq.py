"""VLMQ calibration: saliency factors, token-weighted sequential GPTQ, baselines, components, resume."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from vlmq_export import cli
from vlmq_export.calibrate import (COMPONENTS, ComponentRecipe, Recipe, calibrate, component_blocks,
                                   parse_component_recipe, prepare_calibration)
from vlmq_export.calibrators import QuantConfig
from vlmq_export.calibrators.saliency import SaliencyConfig, compute_saliency
from vlmq_export.calibrators.sequential import quantize_blocks
from vlmq_export.data.samples import Sample
from vlmq_export.data.shapes import make_split
from vlmq_export.errors import NumericalError, VlmqError
from vlmq_export.models import load_family
from vlmq_export.outdir import check_complete
from vlmq_export.targets import recipe_defaults
from vlmq_export.validate.graphs import int4_dequantize_nodes, portable_int4_problems


@pytest.fixture(scope="module")
def smol(tiny_dirs):
    family = load_family(tiny_dirs["smolvlm"])
    return family, tiny_dirs["smolvlm"]


def samples(n=3, text_only=True):
    out = make_split("calib", n)
    if text_only:
        out.append(Sample([], "Name a colour.", "blue", "text"))
    return out


def prepared(family, items):
    return [family.prepare(s.images, s.prompt, s.answer) for s in items]


def test_saliency_sites_normalisation_and_modalities(smol):
    family, path = smol
    model = family.load_model(path)
    items = samples(2)
    sal = compute_saliency(family, model, prepared(family, items), SaliencyConfig(floor=0.01))
    n_llm, n_vis = family.num_layers, len(family.vision_layers(model))
    assert {f"llm.{i}" for i in range(n_llm)} <= set(sal.sites())
    assert {f"vision.{i}" for i in range(n_vis)} | {"projector"} <= set(sal.raw[0])
    # the text-only sample has decoder factors but none for the vision tower
    assert "vision.0" not in sal.raw[2] and "llm.0" in sal.raw[2]
    for i, p in enumerate(prepared(family, items)):
        g = sal.weights("llm.0", i)
        assert g.shape == (p.seq_len,) and float(g.min()) >= np.float32(0.01)
        raw = sal.raw[i]["llm.0"].double()
        assert torch.allclose((raw / raw.mean()).clamp_min(0.01).float(), g)
        assert (raw > 0).any()
    # the last decoder block's outputs at image positions never reach the loss: gradient exactly 0
    last = sal.summary()[f"llm.{n_llm - 1}"]
    assert last["vision_tokens"] > 0 and last["vision_mean_grad"] == 0.0 and last["text_mean_grad"] > 0
    # parameters stay frozen / untouched
    assert all(p.grad is None for p in model.parameters())


def test_saliency_options_validated():
    with pytest.raises(ValueError):
        SaliencyConfig(norm="l3")
    with pytest.raises(ValueError):
        SaliencyConfig(floor=-1)


def _codes(layers):
    return {q.name: (q.codes, q.scales) for q in layers}


def test_vlmq_with_unit_factors_equals_gptq(smol):
    family, path = smol
    items = samples(2)
    batches = [family.hf_inputs(p) for p in prepared(family, items)]
    results = []
    for method, fn in (("gptq", None), ("vlmq", lambda bi, name, si: torch.ones(1))):
        model = family.load_model(path)
        blocks = component_blocks(family, model, "llm")
        layers, _ = quantize_blocks(model, blocks, batches, method, QuantConfig(bits=3), fn)
        results.append(_codes(layers))
    assert results[0].keys() == results[1].keys() and results[0]
    for name in results[0]:
        assert np.array_equal(results[0][name][0], results[1][name][0])
        assert np.array_equal(results[0][name][1], results[1][name][1])


def test_vlmq_factors_change_the_solution(smol):
    family, path = smol
    items = samples(2)
    out = {}
    for method in ("gptq", "vlmq"):
        model = family.load_model(path)
        out[method] = _codes(calibrate(family, model, items, Recipe(method=method,
                                       components={"llm": ComponentRecipe(3, 128)}), device="cpu").layers)
    assert any(not np.array_equal(out["gptq"][k][0], out["vlmq"][k][0]) for k in out["gptq"])


def test_nan_activations_name_the_layer(smol):
    family, path = smol
    model = family.load_model(path)
    blocks = component_blocks(family, model, "llm")
    blocks[0][1].mlp.up_proj.weight.data[0, 0] = float("nan")
    batches = [family.hf_inputs(p) for p in prepared(family, samples(1, text_only=False))]
    with pytest.raises(NumericalError, match=r"mlp\.down_proj|layers\.0"):
        quantize_blocks(model, blocks, batches, "gptq", QuantConfig())


def test_rank_deficient_hessian_raises_damping_and_records_it(smol):
    family, path = smol
    model = family.load_model(path)
    blocks = component_blocks(family, model, "llm")
    batches = [family.hf_inputs(family.prepare([], "Hi"))]  # a handful of tokens << in_features
    _, records = quantize_blocks(model, blocks, batches, "gptq", QuantConfig(damp=0.0))
    assert all(r.damp is not None and r.damp > 0 for r in records)


def test_too_long_sample_truncated_with_warning(smol, monkeypatch):
    family, _ = smol
    import vlmq_export.calibrate as cal

    long_text = Sample([], "word " * 200, "yes", "long-one")
    with_image = make_split("calib", 1)[0]
    n_img = family.prepare(with_image.images, with_image.prompt, with_image.answer).seq_len
    monkeypatch.setattr(cal, "context_length", lambda fam: 64)
    msgs = []
    prepared_, warnings = prepare_calibration(family, [long_text], ["yes"], msgs.append)
    assert prepared_[0].seq_len == 64 and "long-one" in warnings[0] and "truncated" in warnings[0]
    assert msgs and "long-one" in msgs[0]
    if n_img > 64:  # image tokens beyond the context: the sample cannot be cut, it is skipped
        with pytest.raises(VlmqError):
            prepare_calibration(family, [with_image], [with_image.answer], msgs.append)


def test_component_recipe_parsing():
    assert parse_component_recipe("w4") == ComponentRecipe(4, 128)
    assert parse_component_recipe("w8pc") == ComponentRecipe(8, -1)
    assert parse_component_recipe("w8") == ComponentRecipe(8, -1)
    assert parse_component_recipe("w3g64") == ComponentRecipe(3, 64)
    with pytest.raises(VlmqError):
        parse_component_recipe("w5")
    assert COMPONENTS == ("vision", "projector", "llm", "lm_head")


@pytest.mark.parametrize("method,extra,recorded", [
    ("gptaq", ["--gptaq-alpha", "0.5", "--no-clip-search"], {"gptaq_alpha": 0.5, "clip_search": False}),
    ("mbq", [], {"clip_search": recipe_defaults("onnxruntime")["clip_search"]}),  # the target's default
    ("rtn", ["--clip-search"], {"clip_search": True}),
])
def test_baselines_through_the_pipeline(tiny_dirs, tmp_path, method, extra, recorded):
    out = tmp_path / "out"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int3", "--method", method, "-o", str(out),
                     "--n-calib", "3", "--no-validate", "--quiet", "--llm-graph", "portable", *extra]) == 0
    manifest = check_complete(out)
    assert manifest["recipe"]["method"] == method
    assert {k: manifest["recipe"].get(k) for k in recorded} == recorded
    assert {r["method"] for r in manifest["layers"]} == {method}
    llm = onnx.load(str(out / "llm.onnx"))
    sym = manifest["recipe"]["symmetric"]  # TensorRT's rules for a symmetric export, ONNX Runtime's otherwise
    assert portable_int4_problems(llm, tensorrt=sym) == [] and \
        len(int4_dequantize_nodes(llm)) == sum(r["component"] == "llm" for r in manifest["layers"])  # + the INT8 head


def test_vision_and_projector_quantized_with_saliency(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    assert cli.main([str(tiny_dirs["qwen2_vl"]), "--int4", "--vision", "w4", "--projector", "w8pc", "--lm-head", "none",
                     "-o", str(out), "--n-calib", "3", "--n-val", "2", "--gen-tokens", "4", "--quiet"]) == 0
    manifest = check_complete(out)
    comps = {r["component"] for r in manifest["layers"] if r["bits"]}
    assert comps == {"vision", "projector", "llm"}
    vision = onnx.load(str(out / "vision_encoder.onnx"))
    assert len(int4_dequantize_nodes(vision)) == sum(1 for r in manifest["layers"] if r["component"] == "vision")
    proj = onnx.load(str(out / "projector.onnx"))
    dq8 = [n for n in proj.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq8) == 2 and all(a.i == 1 for n in dq8 for a in n.attribute if a.name == "axis")
    # the patch embedding stays float
    assert not any("patch_embed" in r["name"] for r in manifest["layers"])
    report = json.loads((out / "report" / "validation.json").read_text())
    assert set(report["components"]) == {"vision", "projector", "llm"}
    assert report["components"]["vision"]["features_cosine"] > 0.9
    assert report["stages"]["qdq_onnx_vs_torch_fakequant"]["image_features_max_abs_diff"] <= 1e-4
    assert (out / "saliency.safetensors").is_file() and "llm.0" in report["saliency"]
    # readable like the graphs beside it (safetensors alone writes it owner-only)
    assert (out / "saliency.safetensors").stat().st_mode & 0o777 == (out / "manifest.json").stat().st_mode & 0o777


@pytest.mark.parametrize("family_name,head", [("smolvlm", "w4"), ("qwen2_vl", "w8g64")])
def test_lm_head_quantized_on_request(tiny_dirs, tmp_path, family_name, head, capsys):
    """--lm-head: the head is calibrated last (after the decoder), written as a blockwise DQ into llm.onnx, and
    validated; a tied head is untied first, so the embeddings (embed_tokens.onnx and torch) stay float."""
    out = tmp_path / "out"
    assert cli.main([str(tiny_dirs[family_name]), "--int4", "--lm-head", head, "-o", str(out), "--n-calib", "3",
                     "--n-val", "2", "--gen-tokens", "4", "--quiet"]) == 0
    assert ("accuracy level 4" in capsys.readouterr().err) == head.startswith("w8")
    manifest = check_complete(out)
    heads = [r for r in manifest["layers"] if r["component"] == "lm_head"]
    assert len(heads) == 1 and heads[0]["name"] == "lm_head" and heads[0]["bits"] == int(head[1])
    assert manifest["layers"][-1]["component"] == "lm_head"
    assert manifest["recipe"]["lm_head"] == parse_component_recipe(head).label()
    llm = onnx.load(str(out / "llm.onnx"))
    inits = {i.name: i for i in llm.graph.initializer}
    dq = [n for n in llm.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == heads[0]["onnx_weight"]]
    assert len(dq) == 1
    # a 4-bit head follows the recipe's grid (UINT4 + zero point when asymmetric, the onnxruntime default); 8-bit
    # weights stay symmetric INT8
    want = {"w4": onnx.TensorProto.INT4 if manifest["recipe"]["symmetric"] else onnx.TensorProto.UINT4}.get(
        head, onnx.TensorProto.INT8)
    assert inits[dq[0].input[0]].data_type == want and list(inits[dq[0].input[0]].dims)[1] > 100
    emb = onnx.load(str(out / "embed_tokens.onnx"))
    assert not any(n.op_type == "DequantizeLinear" for n in emb.graph.node)
    report = json.loads((out / "report" / "validation.json").read_text())
    assert report["stages"]["qdq_onnx_vs_torch_fakequant"]["logits_max_abs_diff"] <= 1e-4
    assert "llm" in report["components"]


def test_tied_lm_head_is_untied_before_calibration(tiny_dirs):
    from vlmq_export.models import load_family

    fam = load_family(tiny_dirs["smolvlm"])
    model = fam.load_model(tiny_dirs["smolvlm"])
    emb = model.get_input_embeddings()
    emb.weight.data[: model.lm_head.weight.shape[0]] = model.lm_head.weight.data[: emb.weight.shape[0]]
    model.lm_head.weight = emb.weight  # tie, as SmolLM2 does
    (name, head), = component_blocks(fam, model, "lm_head")
    assert name == "lm_head" and head.weight is not emb.weight
    torch.testing.assert_close(head.weight, emb.weight, rtol=0, atol=0)
    with torch.no_grad():
        head.weight.zero_()
    assert emb.weight.abs().sum() > 0


def test_validate_command_keeps_a_tied_models_embeddings_float(tiny_dirs, tmp_path, capsys):
    """`validate` loads the source model again and gives it the graphs' quantized weights: a quantized lm_head tied
    to the embeddings (SmolLM2, the testbed) is untied first, as calibration did, or the torch reference would carry
    quantized embeddings that embed_tokens.onnx does not (parity off by the head's rounding)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src = tmp_path / "tied"
    shutil.copytree(tiny_dirs["smolvlm"], src)
    weights = load_file(src / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = True
    config.setdefault("text_config", {})["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(config))
    fam = load_family(src)
    model = fam.load_model(src)
    assert fam.lm_head(model).weight is model.get_input_embeddings().weight  # the copy is tied
    out = tmp_path / "o"
    assert cli.main([str(src), "--int4", "--method", "rtn", "--lm-head", "w4", "--no-validate", "-o", str(out),
                     "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["validate", str(out), "--n-val", "2", "--gen-tokens", "2", "--json"]) in (0, 1)
    capsys.readouterr()
    qdq = json.loads((out / "report" / "validation.json").read_text())["stages"]["qdq_onnx_vs_torch_fakequant"]
    assert qdq["logits_max_abs_diff"] <= 1e-4, qdq


class _Interrupt(Exception):
    pass


def test_calibration_resumes_after_interruption(smol, tmp_path):
    family, path = smol
    items = samples(2)
    recipe = Recipe(method="vlmq", components={"llm": ComponentRecipe(4, 128)})
    ref = _codes(calibrate(family, family.load_model(path), items, recipe, device="cpu").layers)

    def stop_after_first_block(msg):
        if msg.startswith("llm block 1/"):
            raise _Interrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Interrupt):
        calibrate(family, family.load_model(path), items, recipe, say=stop_after_first_block, device="cpu",
                  checkpoint=ckpt)
    msgs = []
    resumed = calibrate(family, family.load_model(path), items, recipe, say=msgs.append, device="cpu",
                        checkpoint=ckpt)
    assert any("resumed after block 1/" in m for m in msgs)
    assert any("saliency factors loaded" in m for m in msgs)
    got = _codes(resumed.layers)
    assert got.keys() == ref.keys()
    for k in ref:
        assert np.array_equal(got[k][0], ref[k][0]) and np.array_equal(got[k][1], ref[k][1])


@pytest.mark.parametrize("family_name", ["smolvlm", "qwen2_vl"])
def test_generated_text_samples_are_seeded_text_only(tiny_dirs, family_name):
    from vlmq_export.data.generated import generated_text_samples

    family = load_family(tiny_dirs[family_name])
    model = family.load_model(tiny_dirs[family_name])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = generated_text_samples(family, model, 3, tokens=24, prompt_tokens=6, seed=1)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG state is untouched
    b = generated_text_samples(family, model, 3, tokens=24, prompt_tokens=6, seed=1)
    c = generated_text_samples(family, model, 3, tokens=24, prompt_tokens=6, seed=2)
    assert [(s.prompt, s.answer) for s in a] == [(s.prompt, s.answer) for s in b]
    assert [(s.prompt, s.answer) for s in a] != [(s.prompt, s.answer) for s in c]
    assert all(s.images == [] and s.prompt and s.answer and s.source.startswith("generated:") for s in a)
    with pytest.raises(ValueError):
        generated_text_samples(family, model, 2, tokens=8, prompt_tokens=8)


def test_calib_text_adds_generated_samples(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "--method", "gptq", "-o", str(out), "--n-calib", "2",
                     "--calib-text", "3", "--calib-text-tokens", "24", "--no-validate", "--quiet"]) == 0
    cal = check_complete(out)["calibration"]
    assert cal["samples"] == 5 and cal["generated_text"] == {"samples": 3, "tokens": 24}
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "-o", str(tmp_path / "bad"), "--calib-text", "-1",
                     "--quiet"]) != 0
    assert not (tmp_path / "bad").exists()


def test_gptaq_alpha_out_of_range_is_refused(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "--method", "gptaq", "--gptaq-alpha", "1.5", "-o", str(out),
                     "--n-calib", "2", "--no-validate", "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "--gptaq-alpha" in err[-1] and "Traceback" not in "".join(err)
    assert not out.exists()


def test_sink_weights_scale_the_first_token_of_each_sequence():
    from vlmq_export.calibrators.sequential import sink_weights

    x = torch.zeros(2, 5, 3)
    assert sink_weights(x, None, 10.0).tolist() == [[10.0, 1, 1, 1, 1]] * 2
    g = torch.tensor([0.5, 1, 2, 3, 4])  # per-token factors of the sample: multiplied, first token scaled on top
    assert sink_weights(x, g, 10.0).tolist() == [[5.0, 1, 2, 3, 4]] * 2
    assert sink_weights(x, g[None, :, None], 0.0).tolist() == [[0.0, 1, 2, 3, 4]] * 2  # the [..., 1] form
    with pytest.raises(ValueError):
        sink_weights(torch.zeros(4), None, 2.0)


def test_sink_weight_is_gptq_with_those_token_weights(smol):
    """--sink-weight W is exactly GPTQ fed token weights (W, 1, 1, ...) per sample, and W = 1 is plain GPTQ."""
    family, path = smol
    batches = [family.hf_inputs(p) for p in prepared(family, samples(2))]
    lens = [int(b["input_ids"].shape[1]) for b in batches]
    results = {}
    for label, kw in (("plain", {}), ("w1", {"first_token_weight": 1.0}), ("w10", {"first_token_weight": 10.0}),
                      ("explicit", {"weight_fn": lambda bi, name, si: torch.tensor([10.0] + [1.0] * (lens[si] - 1))})):
        model = family.load_model(path)
        layers, _ = quantize_blocks(model, component_blocks(family, model, "llm"), batches, "gptq", QuantConfig(bits=3), **kw)
        results[label] = _codes(layers)
    for a, b in (("plain", "w1"), ("w10", "explicit")):
        assert results[a].keys() == results[b].keys() and results[a]
        for k in results[a]:
            assert np.array_equal(results[a][k][0], results[b][k][0]) and np.array_equal(results[a][k][1], results[b][k][1])
    assert any(not np.array_equal(results["plain"][k][0], results["w10"][k][0]) for k in results["plain"])


def test_sink_weight_through_the_cli(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "--method", "gptq", "--sink-weight", "10", "-o", str(out),
                     "--n-calib", "2", "--no-validate", "--quiet"]) == 0
    recipe = check_complete(out)["recipe"]
    assert recipe["sink_weight"] == 10.0 and recipe["act_order"] is True  # act-order is on by default
    bad = tmp_path / "bad"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "--sink-weight", "-1", "-o", str(bad),
                     "--n-calib", "2", "--no-validate", "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "--sink-weight" in err[-1] and "Traceback" not in "".join(err)
    assert not bad.exists()


def test_act_order_is_the_default_and_can_be_turned_off():
    parse = cli._export_parser().parse_args
    assert parse(["m", "--int4"]).act_order is True
    assert parse(["m", "--int4", "--no-act-order"]).act_order is False
    assert parse(["m", "--int4", "--act-order"]).act_order is True


# ----------------------------------------------------------------------------- true-sequential
def _first_block_groups(family, model, comp, batches):
    from vlmq_export.calibrators.sequential import block_linears, capture_block_inputs, input_groups

    name, block = component_blocks(family, model, comp)[0]
    inputs = capture_block_inputs(model, block, batches)
    groups, once = input_groups(block, dict(block_linears(block, name)), inputs[0], "cpu")
    assert once  # every Linear runs once per block forward
    return [[n[len(name) + 1:] for n in g] for g in groups]


@pytest.mark.parametrize("fam", ["smolvlm", "qwen2_vl"])
def test_input_groups_follow_the_shared_inputs(tiny_dirs, fam):
    family = load_family(tiny_dirs[fam])
    model = family.load_model(tiny_dirs[fam])
    batches = [family.hf_inputs(p) for p in prepared(family, samples(1, text_only=False))]
    assert _first_block_groups(family, model, "llm", batches) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    vision = _first_block_groups(family, model, "vision", batches)
    if fam == "smolvlm":  # SigLIP: separate q/k/v that read one tensor
        assert vision == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"],
                          ["mlp.fc1"], ["mlp.fc2"]]
    else:  # Qwen2-VL's ViT: one fused qkv Linear
        assert vision == [["attn.qkv"], ["attn.proj"], ["mlp.fc1"], ["mlp.fc2"]]


@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_true_sequential_calibrates_groups_on_quantized_inputs(smol, method):
    """The first group (q/k/v) of the first block sees the same inputs either way; the groups after it see
    the block's quantized q/k/v, so their codes change."""
    family, path = smol
    batches = [family.hf_inputs(p) for p in prepared(family, samples(2))]
    results = {}
    for ts in (False, True):
        model = family.load_model(path)
        layers, records = quantize_blocks(model, component_blocks(family, model, "llm"), batches, method,
                                          QuantConfig(bits=3), true_sequential=ts)
        results[ts] = _codes(layers)
        assert [r.name for r in records][:7] == [f"model.text_model.layers.0.{n}" for n in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # the manifest keeps the block's layer order
    assert results[False].keys() == results[True].keys()
    first = "model.text_model.layers.0."
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert np.array_equal(results[False][first + n][0], results[True][first + n][0])
    for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert not np.array_equal(results[False][first + n][0], results[True][first + n][0]), n


def test_true_sequential_through_the_cli(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "--method", "vlmq", "--true-sequential", "-o", str(out),
                     "--n-calib", "2", "--no-validate", "--quiet"]) == 0
    assert check_complete(out)["recipe"]["true_sequential"] is True


def test_true_sequential_stopping_early_changes_nothing(smol, monkeypatch):
    """A group's pass stops the block's forward after the group's last layer; without stopping, the same codes."""
    from vlmq_export.calibrators import sequential

    family, path = smol
    batches = [family.hf_inputs(p) for p in prepared(family, samples(2))]
    results = []
    for stop in (True, False):
        if not stop:
            probe = sequential.input_groups
            monkeypatch.setattr(sequential, "input_groups", lambda *a: (probe(*a)[0], False))
        model = family.load_model(path)
        layers, _ = quantize_blocks(model, component_blocks(family, model, "llm"), batches, "gptaq",
                                    QuantConfig(bits=3), true_sequential=True)
        results.append(_codes(layers))
    assert results[0].keys() == results[1].keys() and results[0]
    for k in results[0]:
        assert np.array_equal(results[0][k][0], results[1][k][0]) and np.array_equal(results[0][k][1], results[1][k][1])
