"""Qwen3-VL family: preprocessing and positions vs transformers, the position-table interpolation, float ONNX vs HF
(image features, logits, deepstack), sequential calibration across the deepstack additions, and one VLMQ export
(vision w8, projector w8, llm int4) checked end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmq_export import cli
from vlmq_export.calibrators import QuantConfig
from vlmq_export.calibrators.sequential import quantize_blocks
from vlmq_export.data.shapes import make_split
from vlmq_export.export.onnx_export import export_graph
from vlmq_export.models import load_family
from vlmq_export.models.qwen3_vl import Qwen3VLFamily, pos_embed_interpolation
from vlmq_export.outdir import check_complete
from vlmq_export.pipeline import load_quantized_weights
from vlmq_export.testing.tiny_qwen3_vl import DEEPSTACK_VISUAL_INDEXES, make_tiny_qwen3_vl
from vlmq_export.validate.compare import torch_generate

ort = pytest.importorskip("onnxruntime")

PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl"), seed=0)


@pytest.fixture(scope="module")
def fam(tiny_dir):
    return Qwen3VLFamily.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def model(fam, tiny_dir):
    return fam.load_model(tiny_dir)


@pytest.fixture(scope="module")
def images():
    # 96x120 -> grid 6x8 (the 8x8 position table resampled); 200x60 -> a tall grid
    scenes = make_split("test", 2, image_size=96)
    return [scenes[0].images[0].resize((120, 96)), scenes[1].images[0].resize((60, 200))]


@pytest.fixture(scope="module")
def one(fam, images):
    return fam.prepare(images[:1], PROMPT)


@pytest.fixture(scope="module")
def two(fam, images):
    return fam.prepare(images, "Describe these images.")


@pytest.fixture(scope="module")
def text_only(fam):
    return fam.prepare([], "Text only prompt.")


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
def test_pos_embed_interpolation_matches_transformers(grid):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    ref_index, ref_weight = get_vision_interpolation_indices_and_weights(
        torch.tensor(grid), num_grid_per_side=8, mode="bilinear", align_corners=True, spatial_merge_size=2)
    index, weight = pos_embed_interpolation(np.array(grid), 8, 2)
    assert index.dtype == np.int64 and weight.dtype == np.float32
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(weight, ref_weight.numpy())


def _hf_processor(tiny_dir):
    """transformers' Qwen3VLProcessor without its video half (which needs torchvision)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class ImageOnly(Qwen3VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    return ImageOnly(image_processor=AutoImageProcessor.from_pretrained(tiny_dir), tokenizer=tok,
                     chat_template=tok.chat_template)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prepare_and_positions_match_transformers(fam, model, tiny_dir, images, n_images):
    proc = _hf_processor(tiny_dir)
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": PROMPT}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    assert "system" not in text  # Qwen3-VL's template has no default system turn (Qwen2-VL's has)
    ref = proc(images=images[:n_images] or None, text=[text], return_tensors="np")
    for torch_free in (False, True):
        p = load_family(tiny_dir, torch_free=torch_free).prepare(images[:n_images], PROMPT)
        np.testing.assert_array_equal(p.input_ids, ref["input_ids"])
        if n_images:
            np.testing.assert_array_equal(p.pixel["image_grid_thw"], ref["image_grid_thw"])
            np.testing.assert_allclose(p.pixel["pixel_values"], ref["pixel_values"], atol=1e-6, rtol=0)
    pos, delta = model.model.get_rope_index(torch.from_numpy(ref["input_ids"]), torch.from_numpy(ref["mm_token_type_ids"]),
                                            torch.from_numpy(ref["image_grid_thw"]) if n_images else None)
    np.testing.assert_array_equal(p.position_ids, pos.numpy())
    assert p.rope_delta == int(delta) and (n_images == 0 or p.rope_delta < 0)


def test_both_halves_fall_back_to_qwen3_vl_chat_template(tiny_dir, tmp_path, images):
    """A directory without a chat template: the torch half (which writes OUT/processor) and the torch-free half
    (prepare, the runtime) both use Qwen3-VL's, so the exported processor prepares the same ids (no system turn)."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    (bare / "chat_template.jinja").unlink()
    fam = load_family(bare)
    fam.save_processor(tmp_path / "processor")
    ids = [f.prepare(images[:1], PROMPT).input_ids for f in (fam, load_family(tmp_path / "processor", torch_free=True))]
    np.testing.assert_array_equal(ids[0], ids[1])
    np.testing.assert_array_equal(ids[0], load_family(tiny_dir).prepare(images[:1], PROMPT).input_ids)


def test_family_registered_and_feeds(fam, two, tiny_dir, onnx_sessions):
    from vlmq_export.export.ort_flavour import choose_llm_graph, unsupported

    assert type(load_family(tiny_dir)) is Qwen3VLFamily
    feeds = fam.vision_feeds(two)
    assert list(feeds) == ["pixel_values", "vision_position_ids", "cu_seqlens", "pos_embed_index", "pos_embed_weight"]
    torch_free = load_family(tiny_dir, torch_free=True)
    assert type(torch_free) is Qwen3VLFamily
    for k, v in torch_free.vision_feeds(two).items():
        np.testing.assert_array_equal(feeds[k], v)
    np.testing.assert_allclose(feeds["pos_embed_weight"].sum(-1), 1.0, atol=1e-6)
    assert [i.name for i in onnx_sessions["llm"].get_inputs()][:4] == [
        "inputs_embeds", "attention_mask", "position_ids", "deepstack_embeds"]
    decode = torch_free.llm_decode_feeds(3)["deepstack_embeds"]
    assert decode.shape == (len(DEEPSTACK_VISUAL_INDEXES), 3, 1, fam.hidden_size) and not decode.any()
    assert "deepstack" in unsupported(fam.text_config)
    assert choose_llm_graph(None, "onnxruntime", text_config=fam.text_config) == "portable"


def test_builtin_model_resolves(tmp_path, monkeypatch):
    from vlmq_export.sources import BUILTIN_MODELS, resolve_model

    monkeypatch.setenv("VLMQ_CACHE", str(tmp_path))
    assert "tiny-qwen3-vl" in BUILTIN_MODELS
    path = resolve_model("builtin:tiny-qwen3-vl")
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen3_vl"


# ---------------------------------------------------------------------------------- torch and ONNX vs HF
def _hf_deepstack(model, p):
    with torch.no_grad():
        out = model.model.get_image_features(torch.from_numpy(p.pixel["pixel_values"]),
                                             torch.from_numpy(p.pixel["image_grid_thw"]), return_dict=True)
    return torch.stack([torch.cat(list(f)) for f in out.deepstack_features])


@pytest.mark.parametrize("which", ["one", "two"])
def test_vision_and_projector_onnx_match_hf(fam, model, torch_specs, onnx_sessions, which, request):
    p = request.getfixturevalue(which)
    ref, ref_deep = fam.image_features(model, p), _hf_deepstack(model, p)
    assert ref.shape == (int(p.image_mask.sum()), fam.hidden_size) and float(ref.abs().max()) > 0.5
    assert ref_deep.shape == (len(DEEPSTACK_VISUAL_INDEXES), *ref.shape) and float(ref_deep.abs().max()) > 0.5
    feeds = fam.vision_feeds(p)
    with torch.no_grad():
        t_features = torch_specs["vision_encoder"].module(*(torch.from_numpy(v) for v in feeds.values()))
        t_embeds, t_deep = torch_specs["projector"].module(t_features)
    assert _maxdiff(t_embeds, ref) <= 1e-5 and _maxdiff(t_deep, ref_deep) <= 1e-5
    (features,) = onnx_sessions["vision_encoder"].run(None, feeds)
    embeds, deep = onnx_sessions["projector"].run(None, {"features": features})
    assert _maxdiff(features, t_features) <= 1e-4
    assert _maxdiff(embeds, ref) <= 1e-4 and _maxdiff(deep, ref_deep) <= 1e-4


def test_position_table_matters(fam, torch_specs, one):
    """Other interpolation weights give other features: the learned position table reaches the graph."""
    feeds = fam.vision_feeds(one)
    shuffled = dict(feeds, pos_embed_weight=np.roll(feeds["pos_embed_weight"], 1, axis=0))
    with torch.no_grad():
        a, b = (torch_specs["vision_encoder"].module(*(torch.from_numpy(v) for v in f.values()))
                for f in (feeds, shuffled))
    assert _maxdiff(a, b) > 1e-2


def _onnx_logits(fam, sessions, p, zero_deepstack=False):
    (emb,) = sessions["embed_tokens"].run(None, {"input_ids": p.input_ids})
    proj = None
    if p.num_images:
        (features,) = sessions["vision_encoder"].run(None, fam.vision_feeds(p))
        proj = dict(zip(["image_embeds", "deepstack_embeds"], sessions["projector"].run(None, {"features": features})))
        emb[p.image_mask] = proj["image_embeds"]
    extra = fam.llm_prefill_feeds(p, proj)
    if zero_deepstack:
        extra = {k: np.zeros_like(v) for k, v in extra.items()}
    past = {f"past_{k}_{i}": np.zeros((1, fam.num_kv_heads, 0, fam.head_dim), np.float32)
            for i in range(fam.num_layers) for k in ("key", "value")}
    return sessions["llm"].run(["logits"], {"inputs_embeds": emb, "attention_mask": np.ones_like(p.input_ids),
                                            "position_ids": p.position_ids, **extra, **past})[0]


@pytest.mark.parametrize("which", ["one", "two", "text_only"])
def test_onnx_logits_match_hf(fam, model, onnx_sessions, which, request):
    p = request.getfixturevalue(which)
    with torch.no_grad():
        ref = model(**fam.hf_inputs(p)).logits
    assert float(ref.std()) > 0.1 and _maxdiff(_onnx_logits(fam, onnx_sessions, p), ref) <= 1e-4


def test_deepstack_matters(fam, model, onnx_sessions, two):
    """With the deepstack input zeroed the ONNX logits leave HF's: the llm graph does not ignore it."""
    with torch.no_grad():
        ref = model(**fam.hf_inputs(two)).logits
    assert _maxdiff(_onnx_logits(fam, onnx_sessions, two, zero_deepstack=True), ref) > 1e-2


# ---------------------------------------------------------------------------------- sequential calibration
def test_decoder_layers_calibrate_on_inputs_with_the_deepstack_addition(fam, tiny_dir, images):
    """Sequential calibration feeds decoder layer i the output of the quantized layers before it *plus* the
    deepstack rows HF adds after layers 0..D-1 (not the bare block output): every layer's calibration inputs equal
    its inputs in the HF forward of the model the calibration leaves behind."""
    model = fam.load_model(tiny_dir)  # quantize_blocks writes weights back: not the shared model
    layers = list(fam.decoder_layers(model))
    batches = [fam.hf_inputs(fam.prepare(images[:n], PROMPT)) for n in (1, 2)] + [
        fam.hf_inputs(fam.prepare([], "Text only prompt."))]
    seen: dict[int, list] = {i: [] for i in range(len(layers))}

    def record(i):
        return lambda _m, args, kwargs: seen[i].append((args[0] if args else kwargs["hidden_states"]).clone())

    hooks = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(layers)]
    outputs0: list = []
    try:
        quantize_blocks(model, [(f"model.language_model.layers.{i}", b) for i, b in enumerate(layers)], batches,
                        "gptq", QuantConfig(bits=4, group_size=32), component="llm")
        calibrated = {i: calls[-len(batches):] for i, calls in seen.items()}  # the last pass: sequential inputs
        for calls in seen.values():
            calls.clear()
        hooks.append(layers[0].register_forward_hook(lambda _m, _a, out: outputs0.append(out.clone())))
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    for i in range(1, len(layers)):
        assert max(_maxdiff(a, b) for a, b in zip(calibrated[i], seen[i])) <= 1e-4, i
    # there is an addition to miss: in HF's forward, layer 1's input is not layer 0's output (for image samples)
    assert _maxdiff(outputs0[1], seen[1][1]) > 1e-2 and _maxdiff(outputs0[2], seen[1][2]) == 0


def test_vision_blocks_and_mergers_calibrate_on_their_own_inputs(fam, tiny_dir):
    """Vision and projector through ``calibrate``: nothing is added between the vision blocks (they chain as they
    are), and each merger, the main one and the deepstack ones, calibrates on its own input (the last vision block's
    output or its deepstack block's, from the vision-quantized model), not on another merger's output."""
    from vlmq_export.calibrate import ComponentRecipe, Recipe, calibrate
    from vlmq_export.calibrators.sequential import capture_inputs

    model = fam.load_model(tiny_dir)
    visual = model.model.visual
    items = make_split("calib", 2)
    batches = [fam.hf_inputs(fam.prepare(s.images, s.prompt)) for s in items]
    _first, extras = capture_inputs(model, list(visual.blocks), batches)
    assert all(ex[si][2] is None for ex in extras for si in ex)
    mergers = [visual.merger, *visual.deepstack_merger_list]
    seen: dict[int, list] = {i: [] for i in range(len(mergers))}
    hooks = [m.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].clone()))
             for i, m in enumerate(mergers)]
    recipe = Recipe(method="gptq", components={"vision": ComponentRecipe(8, -1), "projector": ComponentRecipe(8, -1)})
    try:
        result = calibrate(fam, model, items, recipe, device="cpu")
        calibrated = {i: calls[-len(items):] for i, calls in seen.items()}  # the last pass: calibration inputs
        for calls in seen.values():
            calls.clear()
        with torch.no_grad():
            for b in batches:
                model.model.get_image_features(b["pixel_values"], b["image_grid_thw"])
    finally:
        for h in hooks:
            h.remove()
    names = [r.name for r in result.records if r.component == "projector"]
    assert len(names) == 6 and sum("deepstack_merger_list" in n for n in names) == 4
    for i in seen:
        assert max(_maxdiff(a, b) for a, b in zip(calibrated[i], seen[i])) <= 1e-5, i
    assert _maxdiff(seen[1][0], seen[2][0]) > 1e-2  # the deepstack mergers do read different blocks


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "q3"
    assert cli.main([str(tiny_dir), "--int4", "--method", "vlmq", "--vision", "w8", "--projector", "w8", "-o", str(out),
                     "--n-calib", "4", "--n-val", "2", "--gen-tokens", "4", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def fake_quant(fam, tiny_dir, exported):
    model = fam.load_model(tiny_dir)
    manifest = json.loads((exported / "manifest.json").read_text())
    for name, w in load_quantized_weights(exported, manifest).items():
        model.get_submodule(name).weight.data = w
    return model


def test_vlmq_export_quantizes_vision_projector_and_llm(exported):
    import onnx
    from safetensors import safe_open

    manifest = check_complete(exported)
    assert manifest["components"]["llm"]["flavour"] == "portable"  # the ORT flavour has no deepstack input
    layers = [r for r in manifest["layers"] if r["bits"]]
    assert {r["method"] for r in layers} == {"vlmq"}
    assert {(r["component"], r["bits"]) for r in layers} == {("vision", 8), ("projector", 8), ("llm", 4), ("lm_head", 8)}
    assert sum(r["component"] == "vision" for r in layers) == 4 * 4  # per block: qkv, proj, linear_fc1, linear_fc2
    projector = sorted(r["name"] for r in layers if r["component"] == "projector")
    assert len(projector) == 2 * 3 and sum("deepstack_merger_list" in n for n in projector) == 4
    graph = onnx.load(str(exported / "projector.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in graph.graph.node) >= 6
    with safe_open(exported / "saliency.safetensors", "np") as f:  # VLMQ's factors, image+text samples
        assert {k.split("/")[1] for k in f.keys()} >= {"vision.0", "vision.3", "projector", "llm.0", "llm.2"}


def test_pipeline_validation_numbers(exported):
    """The pipeline's own validation: float ONNX vs torch and Q/DQ ONNX vs torch fake-quant within 1e-4."""
    stages = json.loads((exported / "report" / "validation.json").read_text())["stages"]
    for stage in ("float_onnx_vs_torch", "qdq_onnx_vs_torch_fakequant"):
        assert stages[stage]["logits_max_abs_diff"] <= 1e-4, stage
        assert stages[stage]["image_features_max_abs_diff"] <= 1e-4, stage


def test_qdq_onnx_matches_torch_fakequant(fam, fake_quant, exported, one, two, text_only):
    from vlmq_export.runtime.generate import OnnxVLM

    vlm = OnnxVLM(exported, accuracy_level=0)
    with torch.no_grad():
        for p in (one, two, text_only):
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


def test_build_sizes_the_extra_inputs(exported, images, tmp_path):
    """`build` sizes every input, deepstack_embeds and the position-table taps included; real feeds lie inside."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(exported, out)
    assert cli.main(["build", str(out), "--max-images", "2", "--max-context", "2048"]) == 0
    graphs = json.loads((out / "engines" / "profiles.json").read_text())["graphs"]
    fam = load_family(out / "processor", torch_free=True)
    p = fam.prepare(images, PROMPT)
    prefill, decode = graphs["llm"]["profiles"]
    for shapes, feeds in ((graphs["vision_encoder"]["profiles"][0]["shapes"], fam.vision_feeds(p)),
                          (prefill["shapes"], fam.llm_prefill_feeds(p, None)), (decode["shapes"], fam.llm_decode_feeds(1))):
        for name, arr in feeds.items():
            lo, hi = shapes[name]["min"], shapes[name]["max"]
            assert len(lo) == arr.ndim and all(a <= d <= b for a, d, b in zip(lo, arr.shape, hi)), (name, arr.shape)


def test_batch_generation_equals_one_by_one(exported, one, two, text_only):
    """Batch 3 (two image prompts of different sizes and a text-only one): each row's greedy tokens are batch 1's
    (the deepstack feeds per row at prefill, zeros for every row at decode)."""
    from vlmq_export.runtime.generate import OnnxVLM

    vlm = OnnxVLM(exported, accuracy_level=0)
    prompts = [two, text_only, one]
    batched = vlm.generate_batch(prompts, max_new_tokens=8, stop=False)
    for p, got in zip(prompts, batched):
        assert got.token_ids == vlm.generate_prepared(p, max_new_tokens=8, stop=False).token_ids
