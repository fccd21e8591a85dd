"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: preprocessing and the numpy packing vs transformers, the pruned
vision tower, float ONNX vs torch, and one VLMQ export per family (vision and projector w8, LLM int4) checked end
to end: Q/DQ ONNX vs torch fake-quant, ``run`` vs torch greedy generation, ``lint``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmq_export import cli
from vlmq_export.export.onnx_export import export_graph
from vlmq_export.models import load_family
from vlmq_export.models.llava import LlavaFamily
from vlmq_export.models.llava_next import LlavaNextFamily, LlavaOnevisionFamily, bilinear_resize, select_best_resolution
from vlmq_export.outdir import check_complete
from vlmq_export.pipeline import load_quantized_weights
from vlmq_export.runtime.generate import OnnxVLM
from vlmq_export.testing.tiny_llava import make_tiny_llava, make_tiny_llava_next, make_tiny_llava_onevision
from vlmq_export.validate.compare import torch_generate

ort = pytest.importorskip("onnxruntime")

FAMILIES = {"llava": (make_tiny_llava, LlavaFamily), "llava_next": (make_tiny_llava_next, LlavaNextFamily),
            "llava_onevision": (make_tiny_llava_onevision, LlavaOnevisionFamily)}
PROMPT = "Describe the image."
# The fake-quant reference reads every Linear's codes back from the graphs (``load_quantized_weights``): keep the
# llm graph portable (ONNX Runtime's flavour merges q|k|v) where this build offers the choice.
PORTABLE_LLM = ["--llm-graph", "portable"] if "--llm-graph" in cli._export_parser().format_help() else []
# (height, width): wide, tall, square (one tile), tiny (upscaled), larger than every pinpoint (OneVision
# downscales it), a square of 4x4 tiles (downscaled too), very wide
SIZES = [(70, 100), (120, 40), (56, 56), (20, 30), (300, 500), (224, 224), (90, 500)]


def _image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed + h * 7 + w).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _maxdiff(a, b):
    a, b = (t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


class _Lazy(dict):
    """name -> value, computed on first use (module-scoped caches keyed by family)."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, key):
        self[key] = self.make(key)
        return self[key]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return _Lazy(lambda name: FAMILIES[name][0](root / name))


@pytest.fixture(scope="module")
def fams(dirs):
    return _Lazy(lambda name: load_family(dirs[name]))


@pytest.fixture(scope="module")
def models(fams, dirs):
    return _Lazy(lambda name: fams[name].load_model(dirs[name]))


@pytest.fixture(scope="module")
def hf_models(fams, dirs):
    """transformers' models as from_pretrained gives them (vision tower not pruned)."""
    import transformers

    return _Lazy(lambda name: getattr(transformers, fams[name].model_class_name).from_pretrained(dirs[name]).eval())


def _prompts(fam):
    return {"one": fam.prepare([_image(70, 100)], PROMPT),
            "two": fam.prepare([_image(70, 100), _image(120, 40, seed=1)], "Describe these images."),
            "text": fam.prepare([], "Text only prompt.")}


# ---------------------------------------------------------------------------------- preprocessing vs transformers
def _hf_processor_outputs(name, fam, tiny_dir, images, text):
    """input_ids and pixel kwargs of transformers' own processor for the family (OneVision's processor class cannot
    be built here, torchvision being absent for its video half: its image-token count, ``replace_image_token``, is
    called on the image processor's output instead)."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(tiny_dir)
    ip = fam.image_processor
    if name == "llava_onevision":
        proc = object.__new__(tf.LlavaOnevisionProcessor)
        proc.image_processor, proc.image_token, proc.num_image_tokens = ip, "<image>", fam.patch_side**2
        proc.vision_feature_select_strategy, proc.vision_aspect_ratio = "full", fam.config.vision_aspect_ratio
        out = dict(ip([images], return_tensors="np"))
        counts = iter([len(proc.replace_image_token(out, i)) // len("<image>") for i in range(len(images))])
        pad = tok.convert_tokens_to_ids("<image>")
        out["input_ids"] = np.asarray([[t for i in tok(text, add_special_tokens=False)["input_ids"]
                                        for t in ([pad] * next(counts) if i == pad else [i])]])
        return out
    cls = tf.LlavaProcessor if name == "llava" else tf.LlavaNextProcessor
    proc = cls(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
               num_additional_image_tokens=1, chat_template=fam.tokenizer.chat_template)
    return dict(proc(images=images, text=text, return_tensors="np"))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prepare_matches_transformers_processor(fams, dirs, name):
    fam, torch_free = fams[name], load_family(dirs[name], torch_free=True)
    assert type(torch_free) is FAMILIES[name][1]
    cases = [[_image(*s)] for s in SIZES] + [[_image(70, 100), _image(120, 40, seed=1)]]
    counts = set()
    for images in cases:
        p = torch_free.prepare(images, PROMPT)
        ref = _hf_processor_outputs(name, fam, dirs[name], images, torch_free.chat_text(len(images), PROMPT))
        np.testing.assert_array_equal(p.input_ids, ref["input_ids"])
        assert set(p.pixel) == {"pixel_values", "image_sizes", "batch_num_images"} & set(ref) | {"pixel_values"}
        for k, v in p.pixel.items():
            assert _maxdiff(v, ref[k]) == 0.0, k
        counts.add(int(p.image_mask.sum()))
    assert len(counts) >= (2 if name == "llava" else len(cases) - 2)  # anyres: the count follows the size


def test_clip_processor_reads_int_sizes_as_transformers_does():
    """Older checkpoints give ``size`` and ``crop_size`` as ints (shortest edge, square crop)."""
    from transformers import CLIPImageProcessorPil

    from vlmq_export.models.llava import ClipImageProcessor

    images = [_image(50, 90), _image(90, 31)]
    ref = CLIPImageProcessorPil(size=40, crop_size=32)(images, return_tensors="np")["pixel_values"]
    assert _maxdiff(ClipImageProcessor({"size": 40, "crop_size": 32})(images)["pixel_values"], ref) == 0.0


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_numpy_packing_matches_transformers_pack_image_features(fams, hf_models, name):
    """The numpy ``pack_image_features`` against transformers' on random tile features, over the sizes."""
    fam, inner = fams[name], hf_models[name].model
    g = torch.Generator().manual_seed(0)
    newline = torch.randn(fam.hidden_size, generator=g)
    cases = [[_image(*s)] for s in SIZES] + [[_image(70, 100), _image(300, 500, seed=1)]]
    for images in cases:
        p = fam.prepare(images, PROMPT)
        tiles = [torch.randn(n, fam.tokens_per_tile, fam.hidden_size, generator=g) for n in fam.tile_counts(p)]
        sizes = torch.from_numpy(p.pixel["image_sizes"])
        if name == "llava_next":
            ref, _ = inner.pack_image_features(tiles, sizes, "default", image_newline=newline)
        else:
            ref, _ = inner.pack_image_features(tiles, sizes, image_newline=newline)
        rows = torch.cat([t.reshape(-1, fam.hidden_size) for t in tiles] + [newline[None]]).numpy()
        got = fam.pack_image_features(p, rows)
        assert got.shape == (int(p.image_mask.sum()), fam.hidden_size)
        assert _maxdiff(got, torch.cat(ref)) <= 1e-5


def test_onevision_downscales_and_bilinear_matches_torch(fams):
    fam = fams["llava_onevision"]
    assert fam.packed_shape((224, 224), True) == (12, 12)  # 16x16 patches, ratio sqrt(256/144) > 1.1
    assert fam.packed_shape((70, 100), True) == LlavaNextFamily.packed_shape(fam, (70, 100), True)
    x = np.random.default_rng(0).standard_normal((5, 16, 27)).astype(np.float32)
    for h, w in ((12, 20), (7, 3), (16, 27)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], [h, w], mode="bilinear")[0]
        assert _maxdiff(bilinear_resize(x, h, w), ref) <= 1e-5  # float32 rounding
    assert select_best_resolution((70, 100), [[56, 112], [112, 56], [112, 112]]) == (112, 112)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_builtin_model_resolves(tmp_path, monkeypatch, name):
    from vlmq_export.sources import BUILTIN_MODELS, resolve_model

    builtin = "tiny-" + name.replace("_", "-")
    monkeypatch.setenv("VLMQ_CACHE", str(tmp_path))
    assert builtin in BUILTIN_MODELS
    assert type(load_family(resolve_model(f"builtin:{builtin}"))) is FAMILIES[name][1]


# ---------------------------------------------------------------------------------- torch and ONNX vs HF
def test_unused_vision_layers_are_dropped(fams, models, hf_models):
    """LLaVA's feature layer -2 never uses the last CLIP layer: load_model drops it, the features stay the same."""
    fam = fams["llava"]
    assert len(fam.vision_layers(models["llava"])) == 2 and len(fam.vision_layers(hf_models["llava"])) == 3
    p = fam.prepare([_image(70, 100)], PROMPT)
    assert _maxdiff(fam.image_features(models["llava"], p), fam.image_features(hf_models["llava"], p)) == 0.0


@pytest.fixture(scope="module")
def float_onnx(fams, models, tmp_path_factory):
    def make(name):
        out = tmp_path_factory.mktemp(f"onnx_{name}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        specs = {s.name: s for s in fams[name].export_specs(models[name])}
        return {n: ort.InferenceSession(str(export_graph(s, out / f"{n}.onnx")), opts, providers=["CPUExecutionProvider"])
                for n, s in specs.items()}
    return _Lazy(make)


def _onnx_embeds(fam, sess, p):
    (emb,) = sess["embed_tokens"].run(None, {"input_ids": p.input_ids})
    if p.num_images:
        (feats,) = sess["vision_encoder"].run(None, fam.vision_feeds(p))
        emb[p.image_mask] = fam.pack_image_features(p, sess["projector"].run(None, {"features": feats})[0])
    return emb


def _onnx_logits(fam, sess, emb):
    past = {f"past_{k}_{i}": np.zeros((emb.shape[0], fam.num_kv_heads, 0, fam.head_dim), np.float32)
            for i in range(fam.num_layers) for k in ("key", "value")}
    pos = np.broadcast_to(np.arange(emb.shape[1], dtype=np.int64), emb.shape[:2]).copy()
    return sess["llm"].run(["logits"], {"inputs_embeds": emb, "attention_mask": np.ones(emb.shape[:2], np.int64),
                                        "position_ids": pos, **past})[0]


# LLaVA-1.5's graphs are NeXT's without the newline row, and its end-to-end test compares them with torch too
@pytest.mark.parametrize("name", [pytest.param("llava", marks=pytest.mark.slow), "llava_next", "llava_onevision"])
def test_float_onnx_matches_hf(fams, hf_models, float_onnx, name):
    """Image features (packed) and logits for one and two images of different sizes, and a batch of two prompts."""
    fam, hf, sess = fams[name], hf_models[name], float_onnx[name]
    prompts = _prompts(fam)
    for which in ("one", "two"):
        p = prompts[which]
        (feats,) = sess["vision_encoder"].run(None, fam.vision_feeds(p))
        img = fam.pack_image_features(p, sess["projector"].run(None, {"features": feats})[0])
        ref = fam.image_features(hf, p)
        assert ref.shape == (int(p.image_mask.sum()), fam.hidden_size) and float(ref.abs().max()) > 0.1
        assert _maxdiff(img, ref) <= 1e-4, which
        with torch.no_grad():
            ref_logits = hf(**fam.hf_inputs(p)).logits
        assert float(ref_logits.std()) > 0.05 and _maxdiff(_onnx_logits(fam, sess, _onnx_embeds(fam, sess, p)), ref_logits) <= 1e-4
    # batch 2: the same prompt with two different images of one size (so both sequences have one length)
    pair = [fam.prepare([_image(70, 100, seed=s)], PROMPT) for s in (2, 3)]
    emb = np.concatenate([_onnx_embeds(fam, sess, p) for p in pair])
    inputs = [fam.hf_inputs(p) for p in pair]
    batch = {k: torch.cat([i[k] for i in inputs]) for k in inputs[0]}
    if "batch_num_images" in batch:
        batch["batch_num_images"] = torch.tensor([1, 1])
    with torch.no_grad():
        ref = hf(**batch).logits
    assert _maxdiff(_onnx_logits(fam, sess, emb), ref) <= 1e-4


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def exported(dirs, tmp_path_factory):
    def make(name):
        out = tmp_path_factory.mktemp("out") / name
        assert cli.main([str(dirs[name]), "--int4", "--method", "vlmq", "--vision", "w8", "--projector", "w8",
                         "-o", str(out), "--n-calib", "4", "--no-validate", "--quiet", *PORTABLE_LLM]) == 0  # checked below
        return out
    return _Lazy(make)


@pytest.fixture(scope="module")
def fake_quant(fams, dirs, exported):
    def make(name):
        model = fams[name].load_model(dirs[name])
        manifest = json.loads((exported[name] / "manifest.json").read_text())
        for layer, w in load_quantized_weights(exported[name], manifest).items():
            model.get_submodule(layer).weight.data = w
        return model
    return _Lazy(make)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_vlmq_export_quantizes_vision_projector_llm(fams, fake_quant, exported, name, tmp_path, capsys):
    from safetensors import safe_open

    fam, out = fams[name], exported[name]
    manifest = check_complete(out)
    layers = [r for r in manifest["layers"] if r["bits"]]
    assert {r["component"] for r in layers} == {"vision", "projector", "llm", "lm_head"} and {r["method"] for r in layers} == {"vlmq"}
    assert {r["bits"] for r in layers if r["component"] != "llm"} == {8}
    assert sum(r["component"] == "projector" for r in layers) == 2
    with safe_open(out / "saliency.safetensors", "np") as f:  # VLMQ's factors from image+text samples
        assert {k.split("/")[1] for k in f.keys()} >= {"vision.0", "projector", "llm.0", "llm.1"}

    # Q/DQ ONNX vs torch fake-quant: one and two images, text only
    model = fake_quant[name]
    vlm = OnnxVLM(out, accuracy_level=0)
    with torch.no_grad():
        for p in _prompts(fam).values():
            ref = model(**fam.hf_inputs(p)).logits[0].numpy()
            assert np.abs(vlm.prompt_logits(p) - ref).max() <= 1e-4
            if p.num_images:
                assert _maxdiff(vlm.image_features(p), fam.image_features(model, p)) <= 1e-4

    # run (the CLI, ONNX Runtime) gives torch's greedy tokens; lint passes
    img = tmp_path / "a.png"
    _image(120, 40).save(img)
    assert cli.main(["run", str(out), "--image", str(img), "--prompt", PROMPT, "--max-new-tokens", "16",
                     "--no-stop", "--json", "--accuracy-level", "0"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]
    ref = torch_generate(fam, model, fam.prepare([Image.open(img)], PROMPT), 16, stop=False)
    assert len(ref) == 16 and got == ref
    assert cli.main(["lint", str(out)]) == 0
