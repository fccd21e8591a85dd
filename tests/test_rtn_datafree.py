"""RTN is data-free: an RTN export runs no calibration data pass, and its codes are those the data pass gave (issue 25)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from vlmq_export import calibrate as calibrate_mod
from vlmq_export import cli
from vlmq_export.calibrate import Recipe, calibrate, component_blocks, prepare_calibration
from vlmq_export.calibrators import QuantConfig, make_calibrator
from vlmq_export.calibrators.sequential import quantize_blocks
from vlmq_export.data.loader import load_samples
from vlmq_export.models import load_family
from vlmq_export.pipeline import load_quantized_weights, resume_dir
from vlmq_export.recipe import ComponentRecipe


def no_data_pass(*_a, **_k):
    raise AssertionError("the calibration data pass ran")


@pytest.mark.parametrize("sym,clip", [(True, False), (False, True)])
def test_rtn_calibrate_without_data_equals_the_data_pass(tiny_dirs, monkeypatch, sym, clip):
    family = load_family(tiny_dirs["qwen2_vl"])
    model = family.load_model(tiny_dirs["qwen2_vl"])
    twin = copy.deepcopy(model)
    samples = load_samples(None, limit=3)
    recipe = Recipe(method="rtn", components={"llm": ComponentRecipe(), "lm_head": ComponentRecipe()},
                    sym=sym, clip_search=clip)
    # today's path: the sequential data pass over real samples, RTN's calibrator fed every layer's inputs
    prepared, _ = prepare_calibration(family, samples, [s.answer for s in samples], lambda _m: None)
    batches = [family.hf_inputs(p) for p in prepared]
    ref = []
    for comp in recipe.components:
        ref += quantize_blocks(twin, component_blocks(family, twin, comp), batches, "rtn", recipe.quant_config(comp),
                               component=comp)[0]

    monkeypatch.setattr(calibrate_mod, "quantize_blocks", no_data_pass)
    model.register_forward_pre_hook(no_data_pass)
    for block in family.decoder_layers(model):
        block.register_forward_pre_hook(no_data_pass)
    res = calibrate(family, model, samples, recipe, device="cpu")

    assert [q.name for q in res.layers] == [q.name for q in ref] and len(ref) > 2
    assert any(q.name.endswith("lm_head") for q in ref)
    for got, want in zip(res.layers, ref):
        assert got.key == want.key and got.bits == want.bits and got.group_size == want.group_size
        assert np.array_equal(got.codes, want.codes) and np.array_equal(got.scales, want.scales)
        assert (got.zeros is None) == sym and (sym or np.array_equal(got.zeros, want.zeros))
    for (name, w), (_n, w_ref) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(w, w_ref), name  # the dequantized weights written back are the same too
    quantized = [r for r in res.records if r.bits]
    assert quantized and all(r.error is None and r.damp is None and r.method == "rtn" for r in quantized)


def test_rtn_export_runs_no_data_pass_and_writes_rtn_codes(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate_mod, "quantize_blocks", no_data_pass)
    out = tmp_path / "rtn"
    rc = cli.main([str(tiny_dirs["qwen2_vl"]), "--int4", "--method", "rtn", "--no-validate", "--n-calib", "2",
                   "-o", str(out), "--quiet"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["data_pass"] is False
    assert not resume_dir(out).exists()
    family = load_family(tiny_dirs["qwen2_vl"])
    model = family.load_model(tiny_dirs["qwen2_vl"])
    written = load_quantized_weights(out, manifest)
    assert len(written) == sum(1 for r in manifest["layers"] if r["bits"]) > 0
    for r in manifest["layers"]:
        if r["bits"]:
            assert r["error"] is None
            w = model.get_submodule(r["name"]).weight.detach()
            rec = manifest["recipe"]  # the target's default recipe, as recorded
            want = make_calibrator("rtn", w, QuantConfig(bits=r["bits"], group_size=r["group_size"],
                                                         sym=rec["symmetric"] or r["bits"] > 4,
                                                         clip_search=rec["clip_search"],
                                                         sym_grid=rec["sym_grid"])).solve()
            assert torch.equal(written[r["name"]], want.dequantize()), r["name"]
