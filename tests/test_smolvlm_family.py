"""SmolVLM / Idefics3 family: preprocessing vs HF, export wrappers vs HF (torch), ONNX Runtime vs torch."""
from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vlmq_export.export.onnx_export import export_graph
from vlmq_export.models.base import Prepared
from vlmq_export.models.smolvlm import END_OF_UTTERANCE, IMAGE_TOKEN, SmolVLMFamily, image_prompt_string
from vlmq_export.testing.tiny_smolvlm import make_tiny_smolvlm

ORT_TOL = 1e-4
TORCH_TOL = 1e-5


def _image(seed: int, h: int, w: int) -> Image.Image:
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    noise = rs.randint(0, 60, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_smolvlm(tmp_path_factory.mktemp("tiny_smolvlm"), seed=0)
    fam = SmolVLMFamily.from_dir(d)
    model = fam.load_model(d)
    return d, fam, model


@pytest.fixture(scope="module")
def split_family(tmp_path_factory):
    """The same tiny model with image splitting on (2x2 tiles + the global tile for landscape images)."""
    d = make_tiny_smolvlm(tmp_path_factory.mktemp("tiny_smolvlm_split"), seed=0, image_splitting=True)
    return SmolVLMFamily.from_dir(d)


@pytest.fixture(scope="module")
def images():
    return [_image(0, 50, 80), _image(1, 90, 40)]


def _vision(fam, model, prepared):
    """vision_encoder + projector wrappers on the family's vision feeds."""
    specs = {s.name: s for s in fam.export_specs(model)}
    pv = torch.from_numpy(fam.vision_feeds(prepared)["pixel_values"])
    with torch.no_grad():
        return specs["projector"].module(specs["vision_encoder"].module(pv))


def _inputs_embeds(fam, model, prepared, image_embeds):
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.from_numpy(prepared.input_ids)).clone()
    mask = torch.from_numpy(prepared.image_mask)
    emb[mask] = image_embeds.to(emb.dtype)
    return emb


def _empty_past(fam, batch):
    return [torch.zeros(batch, fam.num_kv_heads, 0, fam.head_dim) for _ in range(2 * fam.num_layers)]


# ------------------------------------------------------------------------------ preprocessing
def test_from_dir_and_save_processor_round_trip(tiny, images, tmp_path):
    d, fam, _ = tiny
    assert fam.config.model_type == "smolvlm"
    assert type(fam.image_processor).__name__ == "SmolVLMImageProcessorPil"
    fam.save_processor(tmp_path / "processor")
    fam2 = SmolVLMFamily.from_dir(tmp_path / "processor")
    assert fam2.tokenizer.chat_template == fam.tokenizer.chat_template
    assert fam2.image_seq_len == fam.image_seq_len == 4
    assert fam2.stop_token_ids == fam.stop_token_ids
    tok = fam.tokenizer
    assert set(fam.stop_token_ids) == {tok.convert_tokens_to_ids(END_OF_UTTERANCE), tok.eos_token_id}
    a = fam.prepare(images, "What is in the picture?", answer="Two shapes.")
    b = fam2.prepare(images, "What is in the picture?", answer="Two shapes.")
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.pixel["pixel_values"], b.pixel["pixel_values"])
    assert a.answer_len == b.answer_len > 0


def test_prepare_token_layout(tiny, images):
    _, fam, _ = tiny
    tok = fam.tokenizer
    p = fam.prepare(images[:1], "What is this?")
    text = tok.decode(p.input_ids[0])
    expected = f"<|im_start|>User:{image_prompt_string(0, 0, 4)}What is this?{END_OF_UTTERANCE}\nAssistant:"
    assert text == expected
    assert int(p.image_mask.sum()) == fam.image_seq_len == 4
    assert p.pixel["pixel_values"].shape == (1, 1, 3, 64, 64)
    assert p.pixel["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(p.position_ids, np.arange(p.seq_len)[None])
    assert p.answer_len == 0 and p.num_images == 1 and p.rope_delta == 0

    p2 = fam.prepare(images, "Compare them.", answer="The left one is larger.")
    assert int(p2.image_mask.sum()) == 2 * fam.image_seq_len
    assert p2.num_images == 2
    tail = tok.decode(p2.input_ids[0, -p2.answer_len:])
    assert tail == f" The left one is larger.{END_OF_UTTERANCE}"
    assert tok.decode(p2.input_ids[0, : -p2.answer_len]).endswith("Assistant:")
    # placeholders given by the caller are honoured
    p3 = fam.prepare(images, f"First {IMAGE_TOKEN} then {IMAGE_TOKEN}?")
    assert int(p3.image_mask.sum()) == 8
    with pytest.raises(ValueError):
        fam.prepare(images[:1], f"{IMAGE_TOKEN}{IMAGE_TOKEN}")


def _hf_processor(fam):
    """transformers' own processor for this layout (SmolVLMProcessor needs torchvision for its video half;
    Idefics3Processor builds the identical image prompt and runs offline)."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    ip = fam.image_processor
    hf_ip = Idefics3ImageProcessorPil(
        do_image_splitting=ip.do_image_splitting,
        max_image_size=dict(ip.max_image_size),
        size=dict(ip.size),
        resample=ip.resample,
    )
    return Idefics3Processor(
        image_processor=hf_ip,
        tokenizer=copy.deepcopy(fam.tokenizer),
        image_seq_len=fam.image_seq_len,
        chat_template=fam.tokenizer.chat_template,
    )


@pytest.mark.parametrize("splitting", [False, True], ids=["single", "split"])
@pytest.mark.parametrize("n_images", [1, 2])
def test_prepare_matches_hf_processor(tiny, split_family, images, splitting, n_images):
    fam = split_family if splitting else tiny[1]
    imgs = images[:n_images]
    proc = _hf_processor(fam)
    messages = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": "Describe."}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    ref = proc(images=imgs, text=text, return_tensors="np")
    p = fam.prepare(imgs, "Describe.")
    np.testing.assert_array_equal(p.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(p.pixel["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(p.pixel["pixel_attention_mask"], ref["pixel_attention_mask"])
    tiles = p.pixel["pixel_values"].shape[1]
    # split: the 80x50 image -> 2x2 tiles + global, the 90x40 one -> 2x1 tiles + global
    assert tiles == ((5, 8)[n_images - 1] if splitting else n_images)
    assert int(p.image_mask.sum()) == tiles * fam.image_seq_len
    if splitting:
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        assert image_prompt_string(2, 2, 4) == get_image_prompt_string(
            2, 2, 4, "<fake_token_around_image>", IMAGE_TOKEN, "<global-img>"
        )
        assert "<row_2_col_2>" in fam.tokenizer.decode(p.input_ids[0])


# ------------------------------------------------------------------------------ torch wrappers vs HF
@pytest.mark.parametrize("n_images", [1, 2])
def test_image_features_wrappers_match_hf(tiny, images, n_images):
    _, fam, model = tiny
    p = fam.prepare(images[:n_images], "What is this?")
    ref = fam.image_features(model, p)
    assert ref.shape == (n_images * fam.image_seq_len, fam.hidden_size)
    got = _vision(fam, model, p)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= TORCH_TOL


def test_image_features_split_tiles_and_padding_tiles(tiny, split_family, images):
    _, fam, model = tiny
    p = split_family.prepare(images, "What is this?")
    ref = fam.image_features(model, p)
    assert ref.shape[0] == 8 * fam.image_seq_len == int(p.image_mask.sum())
    assert (_vision(fam, model, p) - ref).abs().max().item() <= TORCH_TOL
    # an all-zero padding tile (what batching pads with) is dropped, as HF drops it
    pv, pam = p.pixel["pixel_values"], p.pixel["pixel_attention_mask"]
    padded = Prepared(
        input_ids=p.input_ids,
        image_mask=p.image_mask,
        position_ids=p.position_ids,
        pixel={
            "pixel_values": np.concatenate([pv, np.zeros_like(pv[:, :1])], axis=1),
            "pixel_attention_mask": np.concatenate([pam, np.zeros_like(pam[:, :1])], axis=1),
        },
    )
    assert fam.vision_feeds(padded)["pixel_values"].shape[0] == 8
    assert (fam.image_features(model, padded) - ref).abs().max().item() == 0.0


def test_llm_wrapper_prefill_and_decode_match_hf(tiny, images):
    _, fam, model = tiny
    llm = {s.name: s for s in fam.export_specs(model)}["llm"].module
    p = fam.prepare(images[:1], "What is this?")
    hf = fam.hf_inputs(p)
    with torch.no_grad():
        ref = model(**hf).logits
        emb = _inputs_embeds(fam, model, p, fam.image_features(model, p))
        out = llm(emb, hf["attention_mask"], torch.from_numpy(p.position_ids), *_empty_past(fam, 1))
    logits, presents = out[0], out[1:]
    assert (logits - ref).abs().max().item() <= TORCH_TOL
    assert len(presents) == 2 * fam.num_layers
    assert presents[0].shape == (1, fam.num_kv_heads, p.seq_len, fam.head_dim)

    nxt = int(ref[0, -1].argmax())
    ids = np.concatenate([p.input_ids, [[nxt]]], axis=1)
    with torch.no_grad():
        full = model(**{**hf, "input_ids": torch.from_numpy(ids), "attention_mask": torch.ones(1, ids.shape[1], dtype=torch.long)}).logits
        step = llm(
            model.get_input_embeddings()(torch.tensor([[nxt]])),
            torch.ones(1, ids.shape[1], dtype=torch.long),
            torch.from_numpy(fam.decode_position_ids(0, p.seq_len)),
            *presents,
        )
    assert step[1].shape[2] == p.seq_len + 1
    assert (step[0][0, -1] - full[0, -1]).abs().max().item() <= TORCH_TOL


def test_idefics3_model_type(tmp_path, images):
    d = make_tiny_smolvlm(tmp_path / "idefics3", seed=3, model_type="idefics3")
    fam = SmolVLMFamily.from_dir(d)
    model = fam.load_model(d)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    p = fam.prepare(images[:1], "Hi")
    ref = fam.image_features(model, p)
    assert (_vision(fam, model, p) - ref).abs().max().item() <= TORCH_TOL
    llm = {s.name: s for s in fam.export_specs(model)}["llm"].module
    with torch.no_grad():
        emb = _inputs_embeds(fam, model, p, ref)
        got = llm(emb, torch.ones_like(torch.from_numpy(p.input_ids)), torch.from_numpy(p.position_ids), *_empty_past(fam, 1))[0]
        want = model(**fam.hf_inputs(p)).logits
    assert (got - want).abs().max().item() <= TORCH_TOL


# ------------------------------------------------------------------------------ ONNX Runtime vs torch
@pytest.fixture(scope="module")
def onnx_graphs(tiny, tmp_path_factory):
    import onnxruntime as ort

    _, fam, model = tiny
    out = tmp_path_factory.mktemp("smolvlm_onnx")
    sessions, times = {}, {}
    for spec in fam.export_specs(model):
        t0 = time.perf_counter()
        path = export_graph(spec, out / f"{spec.name}.onnx")
        times[spec.name] = time.perf_counter() - t0
        sessions[spec.name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    print("\nexport seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    return sessions


def test_onnx_io_names(tiny, onnx_graphs):
    _, fam, _ = tiny
    io = {n: ([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()]) for n, s in onnx_graphs.items()}
    assert io["vision_encoder"] == (["pixel_values"], ["features"])
    assert io["projector"] == (["features"], ["image_embeds"])
    assert io["embed_tokens"] == (["input_ids"], ["inputs_embeds"])
    kv = [f"{k}_{i}" for i in range(fam.num_layers) for k in ("key", "value")]
    assert io["llm"] == (
        ["inputs_embeds", "attention_mask", "position_ids", *[f"past_{n}" for n in kv]],
        ["logits", *[f"present_{n}" for n in kv]],
    )


def _ort_image_embeds(fam, sessions, prepared):
    feats = sessions["vision_encoder"].run(None, fam.vision_feeds(prepared))[0]
    return sessions["projector"].run(None, {"features": feats})[0]


@pytest.mark.parametrize("n_images", [1, 2])
def test_onnx_image_features(tiny, onnx_graphs, images, n_images):
    _, fam, model = tiny
    p = fam.prepare(images[:n_images], "What is this?")
    ref = fam.image_features(model, p).numpy()
    got = _ort_image_embeds(fam, onnx_graphs, p)
    assert got.shape == ref.shape == (int(p.image_mask.sum()), fam.hidden_size)
    assert np.abs(got - ref).max() <= ORT_TOL


def test_onnx_image_features_split(tiny, split_family, onnx_graphs, images):
    _, fam, model = tiny
    p = split_family.prepare(images[:1], "What is this?")
    ref = fam.image_features(model, p).numpy()
    got = _ort_image_embeds(fam, onnx_graphs, p)
    assert got.shape == ref.shape == (5 * fam.image_seq_len, fam.hidden_size)
    assert np.abs(got - ref).max() <= ORT_TOL


def test_onnx_embed_tokens(tiny, onnx_graphs):
    _, fam, model = tiny
    ids = np.array([[1, 5, 7, 300], [2, 3, 4, 319]], dtype=np.int64)
    got = onnx_graphs["embed_tokens"].run(None, {"input_ids": ids})[0]
    ref = model.get_input_embeddings()(torch.from_numpy(ids)).detach().numpy()
    assert np.abs(got - ref).max() == 0.0


def test_onnx_llm_prefill_batch2_and_decode(tiny, onnx_graphs, images):
    _, fam, model = tiny
    sess = onnx_graphs["llm"]
    names = [i.name for i in sess.get_inputs()][3:]
    p = fam.prepare(images[:1], "What is this?")
    img = torch.from_numpy(_ort_image_embeds(fam, onnx_graphs, p))
    e0 = _inputs_embeds(fam, model, p, img)
    rs = np.random.RandomState(0)
    ids1 = rs.randint(10, 320, size=p.input_ids.shape).astype(np.int64)
    with torch.no_grad():
        e1 = model.get_input_embeddings()(torch.from_numpy(ids1))
    emb = torch.cat([e0, e1]).numpy()
    S = p.seq_len
    mask = np.ones((2, S), np.int64)
    mask[1, :3] = 0  # left padding in row 1
    pos = np.stack([np.arange(S), np.clip(np.arange(S) - 3, 0, None)]).astype(np.int64)
    feeds = {"inputs_embeds": emb, "attention_mask": mask, "position_ids": pos}
    feeds.update({n: np.zeros((2, fam.num_kv_heads, 0, fam.head_dim), np.float32) for n in names})
    logits, *presents = sess.run(None, feeds)

    llm = {s.name: s for s in fam.export_specs(model)}["llm"].module
    with torch.no_grad():
        tout = llm(*(torch.from_numpy(feeds[k]) for k in ("inputs_embeds", "attention_mask", "position_ids")),
                   *_empty_past(fam, 2))
        hf = model(**fam.hf_inputs(p)).logits.numpy()
        hf1 = model(input_ids=torch.from_numpy(ids1[:, 3:])).logits.numpy()
    assert logits.shape == (2, S, fam.text_config.vocab_size)
    assert np.abs(logits[:, 3:] - tout[0].numpy()[:, 3:]).max() <= ORT_TOL
    assert np.abs(logits[0] - hf[0]).max() <= ORT_TOL
    assert np.abs(logits[1, 3:] - hf1[0]).max() <= ORT_TOL  # left padding == the unpadded sequence
    assert presents[0].shape == (2, fam.num_kv_heads, S, fam.head_dim)

    # one decode step with the present KV fed back vs HF on the full sequence
    nxt = logits[:, -1].argmax(-1)
    with torch.no_grad():
        step_emb = model.get_input_embeddings()(torch.from_numpy(nxt[:, None])).numpy()
    feeds = {
        "inputs_embeds": step_emb,
        "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
        "position_ids": pos[:, -1:] + 1,
    }
    feeds.update(dict(zip(names, presents)))
    step_logits, *step_presents = sess.run(None, feeds)
    assert step_presents[-1].shape == (2, fam.num_kv_heads, S + 1, fam.head_dim)
    ids0 = np.concatenate([p.input_ids, nxt[:1, None]], 1)
    with torch.no_grad():
        full0 = model(**{**fam.hf_inputs(p), "input_ids": torch.from_numpy(ids0),
                         "attention_mask": torch.ones(1, S + 1, dtype=torch.long)}).logits.numpy()
        full1 = model(input_ids=torch.from_numpy(np.concatenate([ids1[:, 3:], nxt[1:, None]], 1))).logits.numpy()
    assert np.abs(step_logits[0, -1] - full0[0, -1]).max() <= ORT_TOL
    assert np.abs(step_logits[1, -1] - full1[0, -1]).max() <= ORT_TOL
