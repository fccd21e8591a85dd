"""Gemma3: preprocessing vs transformers' Gemma3Processor, float ONNX vs HF (one and two images, text only, a prompt
and decode steps past the sliding window, batch 2), that the bidirectional image mask and the sliding window both
matter, per-block calibration masks (sliding vs global), and one VLMQ export (vision w8, LLM int4) checked end to
end: the validation's Q/DQ vs fake-quant numbers, ``run`` vs torch greedy, ``lint``, ``build`` profiles."""
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
from vlmq_export.models.gemma3 import LLM_EXTRA_INPUT, Gemma3Family, image_group_ids
from vlmq_export.models.gemma3_torch import Gemma3DecoderWrapper, gemma3_masks
from vlmq_export.testing.tiny_gemma3 import LAYER_TYPES, SLIDING_WINDOW, make_tiny_gemma3

ort = pytest.importorskip("onnxruntime")

PROMPT = "Describe the image."
LONG = ("What color is the square? The square is blue. How many shapes are there? There are three shapes. "
        "Is there a cat? No, there is no cat in the image.")


def _image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed + h * 7 + w).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _maxdiff(a, b):
    a, b = (t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"), seed=0)


@pytest.fixture(scope="module")
def fam(tiny_dir):
    return Gemma3Family.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def model(fam, tiny_dir):
    return fam.load_model(tiny_dir)


@pytest.fixture(scope="module")
def prompts(fam):
    """one image; two images of other sizes; text only; one image then text far past the sliding window."""
    return {"one": fam.prepare([_image(75, 100)], PROMPT),
            "two": fam.prepare([_image(75, 100), _image(120, 60)], "Describe these images."),
            "text": fam.prepare([], "Text only prompt."),
            "long": fam.prepare([_image(40, 40)], LONG)}


@pytest.fixture(scope="module")
def sessions(fam, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    specs = {s.name: s for s in fam.export_specs(model)}
    return {n: ort.InferenceSession(str(export_graph(s, out / f"{n}.onnx")), opts, providers=["CPUExecutionProvider"])
            for n, s in specs.items()}


def _embeds(fam, sess, p):
    (emb,) = sess["embed_tokens"].run(None, {"input_ids": p.input_ids})
    if p.num_images:
        (feats,) = sess["vision_encoder"].run(None, fam.vision_feeds(p))
        emb[p.image_mask] = sess["projector"].run(None, {"features": feats})[0]
    return emb


def _llm(fam, sess, emb, groups, past=None):
    """(logits, presents) of the llm graph: prefill (past None) or a step on ``past``."""
    b, s = emb.shape[:2]
    past = past or {f"past_{k}_{i}": np.zeros((b, fam.num_kv_heads, 0, fam.head_dim), np.float32)
                    for i in range(fam.num_layers) for k in ("key", "value")}
    p = next(iter(past.values())).shape[2]
    out = sess["llm"].run(None, {"inputs_embeds": emb, "attention_mask": np.ones((b, p + s), np.int64),
                                 "position_ids": np.broadcast_to(np.arange(p, p + s), (b, s)).astype(np.int64),
                                 LLM_EXTRA_INPUT: groups, **past})
    names = [o.name for o in sess["llm"].get_outputs()]
    return out[0], {n.replace("present_", "past_"): v for n, v in zip(names[1:], out[1:])}


def _hf_logits(fam, model, p, drop=()):
    with torch.no_grad():
        return model(**{k: v for k, v in fam.hf_inputs(p).items() if k not in drop}).logits


# ---------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("which", ["one", "two", "text"])
def test_prepare_matches_transformers_processor(fam, tiny_dir, which):
    """input_ids, pixel_values and token_type_ids equal Gemma3Processor's (on the rendered chat template); the
    torch-free family prepares the same."""
    from transformers import AutoProcessor

    images, prompt = {"one": ([_image(75, 100)], PROMPT), "two": ([_image(75, 100), _image(120, 60)], "Two images."),
                      "text": ([], "Text only prompt.")}[which]
    p = fam.prepare(images, prompt)
    proc = AutoProcessor.from_pretrained(tiny_dir)
    ref = proc(text=fam.chat_text(len(images), prompt), images=images or None, add_special_tokens=False,
               return_tensors="np")
    np.testing.assert_array_equal(p.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(p.image_mask.astype(np.int64), ref["token_type_ids"])
    assert p.image_mask.sum() == 4 * len(images)  # mm_tokens_per_image soft tokens per image
    if images:
        assert _maxdiff(p.pixel["pixel_values"], ref["pixel_values"]) == 0.0
    torch_free = load_family(tiny_dir, torch_free=True).prepare(images, prompt)
    np.testing.assert_array_equal(torch_free.input_ids, p.input_ids)
    assert p.pixel.keys() == torch_free.pixel.keys()
    for k, v in p.pixel.items():
        np.testing.assert_array_equal(torch_free.pixel[k], v)


def test_image_group_ids_match_transformers():
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    mask = np.zeros((2, 12), bool)
    mask[0, 1:4] = mask[0, 6:8] = mask[0, 11] = mask[1, 0:2] = True
    want = get_block_sequence_ids_for_mask(torch.from_numpy(mask.astype(np.int64))).numpy()
    np.testing.assert_array_equal(image_group_ids(mask), want)
    assert image_group_ids(mask)[0, 11] == 2


def test_registered_builtin_and_refusals(tiny_dir, tmp_path, monkeypatch):
    """Registered and built in; pan-and-scan, a stray image placeholder and ONNX Runtime's llm flavour refused."""
    from vlmq_export.errors import PromptError, UnsupportedModelError, VlmqError
    from vlmq_export.export.ort_flavour import choose_llm_graph
    from vlmq_export.models.gemma3 import Gemma3ImageProcessor
    from vlmq_export.sources import BUILTIN_MODELS, resolve_model

    assert type(load_family(tiny_dir)) is Gemma3Family and type(load_family(tiny_dir, torch_free=True)) is Gemma3Family
    with pytest.raises(UnsupportedModelError, match="pan-and-scan"):
        Gemma3ImageProcessor({"do_pan_and_scan": True})
    with pytest.raises(PromptError, match="1 <start_of_image> placeholders for 0 images"):
        load_family(tiny_dir, torch_free=True).prepare([], "What is <start_of_image>?")
    text_config = load_family(tiny_dir, torch_free=True).text_config
    assert choose_llm_graph(None, "onnxruntime", text_config=text_config) == "portable"
    with pytest.raises(VlmqError, match="--llm-graph ort: Gemma3's llm graph takes image_group_ids"):
        choose_llm_graph("ort", "onnxruntime", text_config=text_config)
    monkeypatch.setenv("VLMQ_CACHE", str(tmp_path))
    assert "tiny-gemma3" in BUILTIN_MODELS
    assert json.loads((resolve_model("builtin:tiny-gemma3") / "config.json").read_text())["model_type"] == "gemma3"


def test_projector_as_linear_equals_transformers(fam, model, tiny_dir, prompts):
    """load_model holds the projection matrix as an nn.Linear (quantizable); image features equal those of the
    unmodified transformers model."""
    from transformers import Gemma3ForConditionalGeneration

    assert isinstance(model.model.multi_modal_projector.mm_input_projection, torch.nn.Linear)
    hf = Gemma3ForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    assert not any(isinstance(m, torch.nn.Linear) for m in hf.model.multi_modal_projector.modules())
    p = prompts["two"]
    assert _maxdiff(fam.image_features(model, p), fam.image_features(hf, p)) <= 1e-6


# ---------------------------------------------------------------------------------- float ONNX vs HF
def test_float_onnx_matches_hf(fam, model, sessions, prompts):
    """Image features and logits: one and two images, text only, one image then text past the sliding window."""
    for which, p in prompts.items():
        assert p.seq_len > 2 * SLIDING_WINDOW, which  # every prompt runs the sliding layers' window
        if p.num_images:
            ref = fam.image_features(model, p)
            assert ref.shape == (int(p.image_mask.sum()), fam.hidden_size) and float(ref.abs().max()) > 0.1
            (feats,) = sessions["vision_encoder"].run(None, fam.vision_feeds(p))
            assert _maxdiff(sessions["projector"].run(None, {"features": feats})[0], ref) <= 1e-4, which
        ref = _hf_logits(fam, model, p)
        logits, _ = _llm(fam, sessions, _embeds(fam, sessions, p), fam.llm_prefill_feeds(p, None)[LLM_EXTRA_INPUT])
        assert float(ref.std()) > 0.1 and _maxdiff(logits, ref) <= 1e-4, which


def test_float_onnx_decode_steps_and_batch_match_hf(fam, model, sessions, prompts):
    """Five decode steps on the KV cache after the long prompt (the image leaves the sliding window) against HF's
    full forward over the grown sequence; and a batch of two prompts of one length."""
    p = prompts["long"]
    logits, past = _llm(fam, sessions, _embeds(fam, sessions, p), fam.llm_prefill_feeds(p, None)[LLM_EXTRA_INPUT])
    ids = p.input_ids
    for _ in range(5):
        nxt = np.array([[int(logits[0, -1].argmax())]], np.int64)
        ids = np.concatenate([ids, nxt], 1)
        (emb,) = sessions["embed_tokens"].run(None, {"input_ids": nxt})
        logits, past = _llm(fam, sessions, emb, fam.llm_decode_feeds(1)[LLM_EXTRA_INPUT], past)
        grown = type(p)(input_ids=ids, image_mask=np.pad(p.image_mask, ((0, 0), (0, ids.shape[1] - p.seq_len))),
                        position_ids=np.arange(ids.shape[1])[None], pixel=p.pixel, num_images=1)
        assert _maxdiff(logits[0, -1], _hf_logits(fam, model, grown)[0, -1]) <= 1e-4
    pair = [fam.prepare([_image(75, 100, seed=s)], PROMPT) for s in (2, 3)]
    emb = np.concatenate([_embeds(fam, sessions, q) for q in pair])
    groups = np.concatenate([fam.llm_prefill_feeds(q, None)[LLM_EXTRA_INPUT] for q in pair])
    inputs = [fam.hf_inputs(q) for q in pair]
    with torch.no_grad():
        ref = model(**{k: torch.cat([i[k] for i in inputs]) for k in inputs[0]}).logits
    assert _maxdiff(_llm(fam, sessions, emb, groups)[0], ref) <= 1e-4


def test_bidirectional_image_mask_and_sliding_window_matter(fam, model, sessions, prompts):
    """Without the image groups the graph is causal-only: it then equals HF without token_type_ids and is far from
    HF with them; a decoder without the sliding window is far from HF on the long prompt."""
    p = prompts["two"]
    emb = _embeds(fam, sessions, p)
    causal, _ = _llm(fam, sessions, emb, np.full(p.input_ids.shape, -1, np.int64))
    assert _maxdiff(causal, _hf_logits(fam, model, p, drop=("token_type_ids",))) <= 1e-4
    assert _maxdiff(causal, _hf_logits(fam, model, p)) > 1e-2

    p = prompts["long"]
    wrapper = Gemma3DecoderWrapper(model)
    wrapper.sliding_window = 10**6
    past = [torch.zeros(1, fam.num_kv_heads, 0, fam.head_dim) for _ in range(2 * fam.num_layers)]
    with torch.no_grad():
        unwindowed = wrapper(torch.from_numpy(_embeds(fam, sessions, p)), torch.ones_like(torch.from_numpy(p.input_ids)),
                             torch.from_numpy(p.position_ids), torch.from_numpy(image_group_ids(p.image_mask)), *past)[0]
    assert _maxdiff(unwindowed, _hf_logits(fam, model, p)) > 1e-2


# ---------------------------------------------------------------------------------- sequential calibration
def test_each_decoder_block_calibrates_with_its_own_mask_and_rope(fam, tiny_dir, prompts):
    """Sliding blocks get the sliding mask and the local RoPE, the global block the full mask and the global RoPE, as
    in the HF forward (never block 0's), both when captured and when quantize_blocks runs them."""
    from vlmq_export.calibrators import QuantConfig
    from vlmq_export.calibrators.sequential import capture_inputs, quantize_blocks

    model = fam.load_model(tiny_dir)  # quantize_blocks writes weights back: not the shared model
    blocks = list(fam.decoder_layers(model))
    assert len(set(LAYER_TYPES)) == 2
    samples = [prompts["one"], prompts["long"]]
    batches = [fam.hf_inputs(p) for p in samples]
    want = []
    for p in samples:
        ids = torch.from_numpy(p.input_ids)
        masks = gemma3_masks(torch.ones_like(ids), torch.from_numpy(image_group_ids(p.image_mask)), SLIDING_WINDOW,
                             torch.float32)
        want.append({t: (m == 0) for t, m in masks.items()})
    assert not torch.equal(want[1]["sliding_attention"], want[1]["full_attention"])
    rotary = model.model.language_model.rotary_emb
    _first, extras = capture_inputs(model, blocks, batches)
    for bi, kind in enumerate(LAYER_TYPES):
        for si, p in enumerate(samples):
            kw = extras[bi][si][1]
            assert torch.equal(kw["attention_mask"].bool(), want[si][kind]), (bi, si)
            cos, _sin = rotary(torch.zeros(1), torch.from_numpy(p.position_ids), kind)
            assert torch.allclose(kw["position_embeddings"][0], cos), (bi, si)

    seen: dict[int, list] = {bi: [] for bi in range(len(blocks))}
    hooks = [b.register_forward_pre_hook(lambda _m, _a, kw, bi=bi: seen[bi].append(kw["attention_mask"].bool()),
                                         with_kwargs=True) for bi, b in enumerate(blocks)]
    try:
        quantize_blocks(model, [(f"model.language_model.layers.{i}", b) for i, b in enumerate(blocks)], batches,
                        "gptq", QuantConfig(bits=8, group_size=-1), component="llm")
    finally:
        for h in hooks:
            h.remove()
    for bi, kind in enumerate(LAYER_TYPES):
        assert seen[bi] and all(any(torch.equal(m, w[kind]) for w in want) for m in seen[bi]), bi


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory) -> Path:
    """VLMQ: vision and projector w8, LLM int4; validated by the export itself (2 samples, 20 greedy tokens)."""
    out = tmp_path_factory.mktemp("out") / "gemma3"
    assert cli.main([str(tiny_dir), "--int4", "--method", "vlmq", "--vision", "w8", "--projector", "w8", "-o", str(out),
                     "--n-calib", "4", "--n-val", "2", "--gen-tokens", "20", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def fake_quant(fam, tiny_dir, exported):
    from vlmq_export.pipeline import apply_quantized_weights

    model = fam.load_model(tiny_dir)
    manifest = json.loads((exported / "manifest.json").read_text())
    apply_quantized_weights(fam, model, exported, manifest)  # the tied head untied: the embeddings stay float
    return model


def test_vlmq_export_quantizes_vision_projector_llm_and_validates(exported):
    from safetensors import safe_open

    from vlmq_export.outdir import check_complete

    manifest = check_complete(exported)
    assert manifest["components"]["llm"]["flavour"] == "portable"  # the ORT flavour refuses image_group_ids
    assert [i["name"] for i in manifest["components"]["llm"]["inputs"]][:4] == [
        "inputs_embeds", "attention_mask", "position_ids", LLM_EXTRA_INPUT]
    layers = [r for r in manifest["layers"] if r["bits"]]
    assert {r["component"] for r in layers} == {"vision", "projector", "llm", "lm_head"} and {r["method"] for r in layers} == {"vlmq"}
    assert {r["bits"] for r in layers if r["component"] != "llm"} == {8}
    assert [r["name"] for r in layers if r["component"] == "projector"] == ["model.multi_modal_projector.mm_input_projection"]
    with safe_open(exported / "saliency.safetensors", "np") as f:  # VLMQ's factors from image+text samples
        assert {k.split("/")[1] for k in f.keys()} >= {"vision.0", "projector", "llm.0", "llm.2"}
    stages = json.loads((exported / "report" / "validation.json").read_text())["stages"]
    for stage in ("float_onnx_vs_torch", "qdq_onnx_vs_torch_fakequant"):
        assert stages[stage]["logits_max_abs_diff"] <= 1e-4 and stages[stage]["image_features_max_abs_diff"] <= 1e-4
    assert stages["qdq_onnx_vs_torch_fakequant"]["greedy_identical_samples"] == stages["qdq_onnx_vs_torch_fakequant"]["samples"]


def test_qdq_onnx_matches_torch_fakequant(fam, fake_quant, exported, prompts):
    from vlmq_export.runtime.generate import OnnxVLM

    vlm = OnnxVLM(exported, accuracy_level=0)
    with torch.no_grad():
        for which, p in prompts.items():
            ref = fake_quant(**fam.hf_inputs(p)).logits[0].numpy()
            assert np.abs(vlm.prompt_logits(p) - ref).max() <= 1e-4, which
            if p.num_images:
                assert _maxdiff(vlm.image_features(p), fam.image_features(fake_quant, p)) <= 1e-4, which


def test_run_matches_torch_greedy_past_the_window_lint_and_build(fam, fake_quant, exported, tmp_path, capsys):
    from vlmq_export.validate.compare import torch_generate

    img = tmp_path / "a.png"
    _image(120, 60).save(img)
    assert cli.main(["run", str(exported), "--image", str(img), "--prompt", PROMPT, "--max-new-tokens", "24",
                     "--no-stop", "--json", "--accuracy-level", "0"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]
    p = fam.prepare([Image.open(img)], PROMPT)
    ref = torch_generate(fam, fake_quant, p, 24, stop=False)
    assert len(ref) == 24 and got == ref and len(set(ref)) > 3  # 24 tokens, three windows past the image
    assert cli.main(["lint", str(exported)]) == 0
    # build: the extra input is sized as inputs_embeds; one 56x56 crop per image
    assert cli.main(["build", str(exported), "--max-images", "2", "--max-context", "256"]) == 0
    graphs = json.loads((exported / "engines" / "profiles.json").read_text())["graphs"]
    for prof in graphs["llm"]["profiles"]:
        s = prof["shapes"]
        assert all(s[LLM_EXTRA_INPUT][k] == s["inputs_embeds"][k][:2] for k in ("min", "opt", "max")), prof["name"]
    assert graphs["vision_encoder"]["profiles"][0]["shapes"]["pixel_values"]["max"] == [2, 3, 56, 56]


def test_batched_decode_equals_batch_one(fam, exported, prompts):
    """BatchDecoder (serve's batching): rows of different lengths share a cache whose columns are padded per row
    (mask 0); the sliding window counts a row's tokens, not cache columns, so each row keeps batch 1's tokens and
    logits; rows join late."""
    from vlmq_export.runtime.generate import BatchDecoder, OnnxVLM

    vlm = OnnxVLM(exported, accuracy_level=0)
    rows = [prompts["text"], prompts["two"], prompts["long"], prompts["one"]]
    assert len({p.seq_len for p in rows}) == len(rows)
    ref = [vlm.generate_prepared(p, max_new_tokens=12, stop=False, keep_logits=True) for p in rows]
    dec = BatchDecoder(vlm)
    got = [dec.add(rows[0], max_new_tokens=12, stop=False, keep_logits=True)]
    dec.step()
    got += [dec.add(p, max_new_tokens=12, stop=False, keep_logits=True) for p in rows[1:]]
    while dec.rows:
        dec.step()
    for r, g in zip(ref, got):
        assert g.result.token_ids == r.token_ids
        for a, b in zip(r.logits, g.result.logits):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
