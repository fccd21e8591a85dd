"""Qwen2.5-VL family: window index vs transformers, the windowed vision wrapper vs HF, float ONNX vs torch,
per-block calibration inputs, and one VLMQ export (vision w8) checked end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmq_export import cli
from vlmq_export.calibrators import QuantConfig
from vlmq_export.calibrators.sequential import capture_inputs, quantize_blocks
from vlmq_export.data.shapes import make_split
from vlmq_export.export.onnx_export import export_graph
from vlmq_export.models import load_family
from vlmq_export.models.qwen2_5_vl import Qwen2_5_VLFamily, vision_window_index
from vlmq_export.outdir import check_complete
from vlmq_export.pipeline import load_quantized_weights
from vlmq_export.runtime.generate import OnnxVLM
from vlmq_export.testing.tiny_qwen2_5_vl import FULLATT_BLOCK_INDEXES, make_tiny_qwen2_5_vl
from vlmq_export.validate.compare import torch_generate
from vlmq_export.validate.graphs import int4_dequantize_nodes

ort = pytest.importorskip("onnxruntime")

PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0)


@pytest.fixture(scope="module")
def fam(tiny_dir):
    return Qwen2_5_VLFamily.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def model(fam, tiny_dir):
    return fam.load_model(tiny_dir)


@pytest.fixture(scope="module")
def images():
    # 96x120 -> grid 6x8 (3x4 merge blocks: windows of 2x2, padded); 200x60 -> a tall grid
    scenes = make_split("test", 2, image_size=96)
    return [scenes[0].images[0].resize((120, 96)), scenes[1].images[0].resize((60, 200))]


@pytest.fixture(scope="module")
def one(fam, images):
    return fam.prepare(images[:1], PROMPT)


@pytest.fixture(scope="module")
def two(fam, images):
    return fam.prepare(images, "Describe these images.")


@pytest.fixture(scope="module")
def torch_specs(fam, model):
    return {s.name: s for s in fam.export_specs(model)}


@pytest.fixture(scope="module")
def onnx_sessions(torch_specs, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sessions = {}
    for name, spec in torch_specs.items():
        sess = ort.InferenceSession(str(export_graph(spec, out / f"{name}.onnx")), opts, providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == spec.input_names
        sessions[name] = sess
    return sessions


def _maxdiff(a, b):
    a, b = (t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# ---------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("grid", [[[1, 6, 8], [1, 4, 4]], [[1, 8, 6], [1, 10, 14], [2, 4, 8]], [[1, 16, 12]]])
def test_window_index_matches_transformers(fam, grid):
    from transformers.vision_utils import get_vision_window_index

    ref_index, ref_cu = get_vision_window_index(torch.tensor(grid), 2, 56, 14)
    index, cu = vision_window_index(np.array(grid), 2, 56, 14)
    assert index.dtype == cu.dtype == np.int64
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())
    assert len(cu) > len(grid) + 1  # windowing happens: more windows than images


def test_family_registered_and_feeds(fam, two, tiny_dir):
    assert type(load_family(tiny_dir)) is Qwen2_5_VLFamily
    assert type(load_family(tiny_dir, torch_free=True)) is Qwen2_5_VLFamily
    feeds = fam.vision_feeds(two)
    assert list(feeds) == ["pixel_values", "vision_position_ids", "cu_seqlens", "window_index", "cu_window_seqlens"]
    torch_free = load_family(tiny_dir, torch_free=True).vision_feeds(two)
    for k in feeds:
        np.testing.assert_array_equal(feeds[k], torch_free[k])
    L = feeds["pixel_values"].shape[0]
    assert sorted(feeds["window_index"].tolist()) == list(range(L // 4))
    assert feeds["cu_window_seqlens"][-1] == L and len(feeds["cu_window_seqlens"]) > 3


def test_builtin_model_resolves(tmp_path, monkeypatch):
    from vlmq_export.sources import BUILTIN_MODELS, resolve_model

    monkeypatch.setenv("VLMQ_CACHE", str(tmp_path))
    assert "tiny-qwen2.5-vl" in BUILTIN_MODELS
    path = resolve_model("builtin:tiny-qwen2.5-vl")
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen2_5_vl"


# ---------------------------------------------------------------------------------- torch and ONNX vs HF
@pytest.mark.parametrize("which", ["one", "two"])
def test_vision_wrapper_and_onnx_match_hf_image_features(fam, model, torch_specs, onnx_sessions, which, request):
    p = request.getfixturevalue(which)
    ref = fam.image_features(model, p)
    assert ref.shape == (int(p.image_mask.sum()), fam.hidden_size) and float(ref.abs().max()) > 0.5
    feeds = fam.vision_feeds(p)
    with torch.no_grad():
        t_features = torch_specs["vision_encoder"].module(*(torch.from_numpy(v) for v in feeds.values()))
        assert _maxdiff(torch_specs["projector"].module(t_features), ref) <= 1e-5
    (features,) = onnx_sessions["vision_encoder"].run(None, feeds)
    (embeds,) = onnx_sessions["projector"].run(None, {"features": features})
    assert _maxdiff(features, t_features) <= 1e-4
    assert _maxdiff(embeds, ref) <= 1e-4


def test_window_attention_matters(fam, model, torch_specs, two):
    """All blocks under full attention give other features: the windowed blocks are really windowed."""
    feeds = [torch.from_numpy(v) for v in fam.vision_feeds(two).values()]
    visual = model.model.visual
    with torch.no_grad():
        windowed = torch_specs["vision_encoder"].module(*feeds)
        saved, visual.fullatt_block_indexes = visual.fullatt_block_indexes, list(range(len(visual.blocks)))
        try:
            full = torch_specs["vision_encoder"].module(*feeds)
        finally:
            visual.fullatt_block_indexes = saved
    assert _maxdiff(windowed, full) > 1e-2


@pytest.mark.parametrize("which", ["one", "two"])
def test_onnx_logits_match_hf(fam, model, onnx_sessions, which, request):
    p = request.getfixturevalue(which)
    (emb,) = onnx_sessions["embed_tokens"].run(None, {"input_ids": p.input_ids})
    (img,) = onnx_sessions["projector"].run(None, {"features": onnx_sessions["vision_encoder"].run(None, fam.vision_feeds(p))[0]})
    emb[p.image_mask] = img
    past = {f"past_{k}_{i}": np.zeros((1, fam.num_kv_heads, 0, fam.head_dim), np.float32)
            for i in range(fam.num_layers) for k in ("key", "value")}
    logits = onnx_sessions["llm"].run(["logits"], {"inputs_embeds": emb, "attention_mask": np.ones_like(p.input_ids),
                                                   "position_ids": p.position_ids, **past})[0]
    with torch.no_grad():
        ref = model(**fam.hf_inputs(p)).logits
    assert float(ref.std()) > 0.1 and _maxdiff(logits, ref) <= 1e-4


# ---------------------------------------------------------------------------------- sequential calibration
def test_each_vision_block_calibrates_with_its_own_cu_seqlens(fam, tiny_dir, images):
    """Windowed blocks get cu_window_seqlens and full-attention blocks cu_seqlens, as in the HF forward (not block
    0's for all: that would calibrate the full-attention blocks on windowed activations)."""
    model = fam.load_model(tiny_dir)  # quantize_blocks writes weights back: not the shared model
    blocks = list(model.model.visual.blocks)
    batches = [fam.hf_inputs(fam.prepare(images[:n], PROMPT)) for n in (1, 2)]
    _first, extras = capture_inputs(model, blocks, batches)
    feeds = [fam.vision_feeds(fam.prepare(images[:n], PROMPT)) for n in (1, 2)]
    for bi, ex in enumerate(extras):
        want = "cu_seqlens" if bi in FULLATT_BLOCK_INDEXES else "cu_window_seqlens"
        assert [ex[si][1]["cu_seqlens"].tolist() for si in (0, 1)] == [f[want].tolist() for f in feeds]

    seen: dict[int, list] = {bi: [] for bi in range(len(blocks))}
    hooks = [b.register_forward_pre_hook(lambda _m, _a, kw, bi=bi: seen[bi].append(kw["cu_seqlens"].tolist()),
                                         with_kwargs=True) for bi, b in enumerate(blocks)]
    try:
        quantize_blocks(model, [(f"model.visual.blocks.{i}", b) for i, b in enumerate(blocks)], batches, "gptq",
                        QuantConfig(bits=8, group_size=-1), component="vision")
    finally:
        for h in hooks:
            h.remove()
    for bi, calls in seen.items():
        want = "cu_seqlens" if bi in FULLATT_BLOCK_INDEXES else "cu_window_seqlens"
        assert calls and {tuple(c) for c in calls} == {tuple(f[want].tolist()) for f in feeds}, bi


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "q25"
    assert cli.main([str(tiny_dir), "--int4", "--method", "vlmq", "--vision", "w8", "-o", str(out),
                     "--n-calib", "4", "--no-validate", "--quiet"]) == 0  # the tests below validate
    return out


@pytest.fixture(scope="module")
def fake_quant(fam, tiny_dir, exported):
    model = fam.load_model(tiny_dir)
    manifest = json.loads((exported / "manifest.json").read_text())
    for name, w in load_quantized_weights(exported, manifest).items():
        model.get_submodule(name).weight.data = w
    return model


def test_vlmq_export_quantizes_vision_and_llm(exported):
    import onnx
    from safetensors import safe_open

    manifest = check_complete(exported)
    assert manifest["components"]["llm"]["flavour"] == "ort-gqa"  # the default for --target onnxruntime
    layers = [r for r in manifest["layers"] if r["bits"]]
    assert {r["component"] for r in layers} == {"vision", "llm", "lm_head"} and {r["method"] for r in layers} == {"vlmq"}
    assert {r["bits"] for r in layers if r["component"] == "vision"} == {8}
    n_vision = sum(1 for r in layers if r["component"] == "vision")
    assert n_vision == 4 * 5  # per block: qkv, proj and the three SwiGLU Linears
    vision = onnx.load(str(exported / "vision_encoder.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in vision.graph.node) >= n_vision
    llm_weights = {r["onnx_weight"] for r in layers if r["component"] == "llm"}  # merged q|k|v, gate|up: one each
    assert len(int4_dequantize_nodes(onnx.load(str(exported / "llm.onnx")))) == len(llm_weights)
    with safe_open(exported / "saliency.safetensors", "np") as f:  # VLMQ's factors, image+text samples
        assert {k.split("/")[1] for k in f.keys()} >= {"vision.0", "vision.3", "llm.0", "llm.1"}


def test_qdq_onnx_matches_torch_fakequant(fam, fake_quant, exported, one, two):
    vlm = OnnxVLM(exported, accuracy_level=0)
    with torch.no_grad():
        for p in (one, two, fam.prepare([], "Text only prompt.")):
            ref = fake_quant(**fam.hf_inputs(p)).logits[0].numpy()
            assert np.abs(vlm.prompt_logits(p) - ref).max() <= 1e-4
            if p.num_images:
                assert np.abs(vlm.image_features(p) - fam.image_features(fake_quant, p).numpy()).max() <= 1e-4


def test_run_matches_torch_greedy_and_lint_passes(fam, fake_quant, exported, images, tmp_path, capsys):
    img = tmp_path / "a.png"
    images[0].save(img)
    assert cli.main(["run", str(exported), "--image", str(img), "--prompt", PROMPT, "--max-new-tokens", "16",
                     "--no-stop", "--json", "--accuracy-level", "0"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]
    from PIL import Image

    ref = torch_generate(fam, fake_quant, fam.prepare([Image.open(img)], PROMPT), 16, stop=False)
    assert len(ref) == 16 and got == ref
    assert cli.main(["lint", str(exported)]) == 0
