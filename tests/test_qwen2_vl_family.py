"""Qwen2-VL family: preprocessing vs transformers, export wrappers vs HF, ONNX graphs vs torch."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from vlmq_export.export.onnx_export import export_graph
from vlmq_export.models.qwen2_vl import Qwen2VLFamily
from vlmq_export.testing.tiny_qwen2_vl import make_tiny_qwen2_vl

ort = pytest.importorskip("onnxruntime")

PROMPT = "Describe the image."


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(0, 64, (h, w, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl"), seed=0)


@pytest.fixture(scope="module")
def fam(tiny_dir):
    return Qwen2VLFamily.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def model(fam, tiny_dir):
    return fam.load_model(tiny_dir)


@pytest.fixture(scope="module")
def images():
    # 90x120 -> grid 1x6x8 (12 tokens); 200x60 -> a different, tall grid; 40x40 -> upscaled to min_pixels
    return [_image(90, 120, 0), _image(200, 60, 1), _image(40, 40, 2)]


@pytest.fixture(scope="module")
def one(fam, images):
    return fam.prepare(images[:1], PROMPT)


@pytest.fixture(scope="module")
def two(fam, images):
    return fam.prepare(images[:2], "Describe these images.")


@pytest.fixture(scope="module")
def torch_specs(fam, model):
    return {s.name: s for s in fam.export_specs(model)}


@pytest.fixture(scope="module")
def onnx_sessions(fam, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sessions, times = {}, {}
    for spec in fam.export_specs(model):
        t0 = time.perf_counter()
        path = export_graph(spec, out / f"{spec.name}.onnx")
        times[spec.name] = time.perf_counter() - t0
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == spec.input_names
        assert [o.name for o in sess.get_outputs()] == spec.output_names
        sessions[spec.name] = sess
    print("\nexport seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    return sessions


def _maxdiff(a, b):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _merged_embeds(fam, model, prepared, image_embeds=None):
    ids = torch.from_numpy(prepared.input_ids)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids).clone()
        if prepared.num_images:
            feats = fam.image_features(model, prepared) if image_embeds is None else image_embeds
            emb[torch.from_numpy(prepared.image_mask)] = feats
    return emb


def _empty_past(fam, batch):
    return [torch.zeros(batch, fam.num_kv_heads, 0, fam.head_dim) for _ in range(2 * fam.num_layers)]


def _hf_logits(fam, model, prepared, extra_ids=()):
    """HF forward on prepared's tokens (+ extra appended text tokens): logits [1, S, V]."""
    inputs = fam.hf_inputs(prepared)
    if extra_ids:
        ids = torch.cat([inputs["input_ids"], torch.tensor([list(extra_ids)])], dim=1)
        inputs["input_ids"] = ids
        inputs["attention_mask"] = torch.ones_like(ids)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = (ids == fam.image_token_id).long()
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------------- preprocessing
def test_from_dir_and_save_processor_roundtrip(fam, images, tmp_path):
    fam.save_processor(tmp_path)
    assert not list(tmp_path.glob("*.safetensors")), "the processor dir must not carry weights"
    again = Qwen2VLFamily.from_dir(tmp_path)
    assert type(again.image_processor) is type(fam.image_processor)
    assert again.tokenizer.chat_template == fam.tokenizer.chat_template
    cfg = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert cfg(again.config) == cfg(fam.config)
    assert again.image_processor.to_dict() == fam.image_processor.to_dict()
    assert again.stop_token_ids == fam.stop_token_ids
    for imgs, answer in ((images[:2], None), (images[:1], "A cat."), ([], None)):
        a, b = fam.prepare(imgs, PROMPT, answer), again.prepare(imgs, PROMPT, answer)
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.position_ids, b.position_ids)
        assert a.rope_delta == b.rope_delta and a.answer_len == b.answer_len
        assert a.pixel.keys() == b.pixel.keys()
        for k in a.pixel:
            np.testing.assert_array_equal(a.pixel[k], b.pixel[k])


def test_prepare_expands_image_tokens(fam, images):
    tok = fam.tokenizer
    vs, ve = tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")
    p = fam.prepare(images, PROMPT)
    grid = p.pixel["image_grid_thw"]
    assert grid.shape == (3, 3) and len({tuple(g) for g in grid.tolist()}) == 3
    assert p.pixel["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    ids = p.input_ids[0]
    starts, ends = np.flatnonzero(ids == vs), np.flatnonzero(ids == ve)
    assert len(starts) == len(ends) == 3
    for (t, h, w), s, e in zip(grid.tolist(), starts, ends):
        run = ids[s + 1 : e]
        assert len(run) == t * h * w // 4 and (run == fam.image_token_id).all()
    assert p.image_mask.sum() == grid.prod(-1).sum() // 4 and p.num_images == 3
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert text.index("<|vision_end|>") < text.index(PROMPT)
    assert p.answer_len == 0

    a = fam.prepare(images[:1], PROMPT, answer="A red chair.")
    ans = tok("A red chair.", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert a.answer_len == len(ans)
    assert a.input_ids[0, -a.answer_len :].tolist() == ans
    assert a.input_ids[0, : -a.answer_len].tolist() == fam.prepare(images[:1], PROMPT).input_ids[0].tolist()
    assert set(fam.stop_token_ids) >= {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}


def test_position_ids_match_hf_get_rope_index(fam, model, images):
    cases = [
        fam.prepare(images[:1], PROMPT),
        fam.prepare(images[:2], PROMPT, answer="Two pictures."),
        fam.prepare([images[1], images[2], images[0]], PROMPT),
    ]
    for p in cases:
        inputs = fam.hf_inputs(p)
        pos, delta = model.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        assert p.position_ids.shape == (3, 1, p.seq_len)
        np.testing.assert_array_equal(p.position_ids, pos.numpy())
        assert p.rope_delta == int(delta.item()) and p.rope_delta < 0
    text = fam.prepare([], PROMPT)
    np.testing.assert_array_equal(text.position_ids, np.broadcast_to(np.arange(text.seq_len), (3, 1, text.seq_len)))
    assert text.rope_delta == 0 and not text.image_mask.any()
    np.testing.assert_array_equal(fam.decode_position_ids(-7, 20), np.full((3, 1, 1), 13))


def test_vision_feeds_match_transformers_helpers(fam, images):
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    p = fam.prepare(images, PROMPT)
    feeds = fam.vision_feeds(p)
    assert list(feeds) == ["pixel_values", "vision_position_ids", "cu_seqlens"]
    grid = torch.from_numpy(p.pixel["image_grid_thw"])
    np.testing.assert_array_equal(feeds["vision_position_ids"], get_vision_position_ids(grid, fam.merge_size).numpy())
    np.testing.assert_array_equal(feeds["cu_seqlens"], get_vision_cu_seqlens(grid).numpy())
    assert feeds["vision_position_ids"].dtype == np.int64 and feeds["cu_seqlens"].dtype == np.int64
    assert feeds["pixel_values"].dtype == np.float32


# ---------------------------------------------------------------------------------- torch wrappers vs HF
@pytest.mark.parametrize("which", ["one", "two"])
def test_vision_wrappers_match_hf_image_features(fam, model, torch_specs, which, request):
    p = request.getfixturevalue(which)
    ref = fam.image_features(model, p)
    assert ref.shape == (int(p.image_mask.sum()), fam.hidden_size)
    feeds = {k: torch.from_numpy(v) for k, v in fam.vision_feeds(p).items()}
    with torch.no_grad():
        features = torch_specs["vision_encoder"].module(*feeds.values())
        embeds = torch_specs["projector"].module(features)
    assert features.shape == (p.pixel["pixel_values"].shape[0], model.config.vision_config.embed_dim)
    assert float(ref.abs().max()) > 0.5  # not a degenerate model
    assert _maxdiff(embeds, ref) <= 1e-5


def test_llm_wrapper_prefill_and_decode_match_hf(fam, model, torch_specs, two):
    llm = torch_specs["llm"].module
    ref = _hf_logits(fam, model, two)
    emb = _merged_embeds(fam, model, two)
    S = two.seq_len
    with torch.no_grad():
        out = llm(emb, torch.ones(1, S, dtype=torch.long), torch.from_numpy(two.position_ids), *_empty_past(fam, 1))
    logits, present = out[0], out[1:]
    assert float(ref.std()) > 0.1
    assert _maxdiff(logits, ref) <= 1e-5
    assert all(t.shape == (1, fam.num_kv_heads, S, fam.head_dim) for t in present)

    nxt = int(logits[0, -1].argmax())
    with torch.no_grad():
        step = llm(
            model.get_input_embeddings()(torch.tensor([[nxt]])),
            torch.ones(1, S + 1, dtype=torch.long),
            torch.from_numpy(fam.decode_position_ids(two.rope_delta, S)),
            *present,
        )
    full = _hf_logits(fam, model, two, extra_ids=[nxt])
    assert _maxdiff(step[0][0, -1], full[0, -1]) <= 1e-5
    assert step[1].shape[2] == S + 1


def test_export_wrappers_use_the_models_own_modules(fam, model, torch_specs):
    """The quantizer replaces weights on the model's nn.Linear objects; the wrappers must call those objects."""
    linears = lambda m: {id(x) for x in m.modules() if isinstance(x, torch.nn.Linear)}  # noqa: E731
    owned = linears(model)
    used = {name: linears(spec.module) for name, spec in torch_specs.items()}
    assert all(u <= owned for u in used.values())
    assert linears(fam.vision_layers(model)) <= used["vision_encoder"]
    assert linears(fam.projector(model)) == used["projector"]
    assert linears(fam.decoder_layers(model)) | {id(fam.lm_head(model))} <= used["llm"]
    assert len(fam.vision_layers(model)) == 2 and len(fam.decoder_layers(model)) == fam.num_layers == 2
    assert fam.projector(model).mlp[0].in_features == 512


def _padded_batch(fam, model, samples, pad_id):
    """Left-padded batch of merged embeddings, masks and M-RoPE positions (padding: token pad_id, position 0)."""
    T = max(p.seq_len for p in samples)
    emb = torch.zeros(len(samples), T, fam.hidden_size)
    mask = torch.zeros(len(samples), T, dtype=torch.long)
    pos = torch.zeros(3, len(samples), T, dtype=torch.long)
    pad_emb = model.get_input_embeddings()(torch.tensor([pad_id]))[0].detach()
    for b, p in enumerate(samples):
        off = T - p.seq_len
        emb[b, :off] = pad_emb
        emb[b, off:] = _merged_embeds(fam, model, p)[0]
        mask[b, off:] = 1
        pos[:, b, off:] = torch.from_numpy(p.position_ids[:, 0])
    return emb, mask, pos


# ---------------------------------------------------------------------------------- ONNX Runtime vs torch
@pytest.mark.parametrize("which", ["one", "two"])
def test_onnx_image_features(fam, model, torch_specs, onnx_sessions, which, request):
    p = request.getfixturevalue(which)
    feeds = fam.vision_feeds(p)
    (features,) = onnx_sessions["vision_encoder"].run(None, feeds)
    (embeds,) = onnx_sessions["projector"].run(None, {"features": features})
    with torch.no_grad():
        t_features = torch_specs["vision_encoder"].module(*(torch.from_numpy(v) for v in feeds.values()))
    assert _maxdiff(features, t_features) <= 1e-4
    assert _maxdiff(embeds, fam.image_features(model, p)) <= 1e-4


def test_onnx_embed_tokens(fam, model, onnx_sessions, one, two):
    ids = np.stack([one.input_ids[0, :20], two.input_ids[0, -20:]])
    (emb,) = onnx_sessions["embed_tokens"].run(None, {"input_ids": ids})
    with torch.no_grad():
        ref = model.get_input_embeddings()(torch.from_numpy(ids))
    assert _maxdiff(emb, ref) == 0.0


def test_onnx_llm_batch2_prefill_and_decode(fam, model, torch_specs, onnx_sessions, one, two):
    llm = torch_specs["llm"].module
    sess = onnx_sessions["llm"]
    pad_id = fam.tokenizer.pad_token_id
    emb, mask, pos = _padded_batch(fam, model, [one, two], pad_id)
    B, T = mask.shape
    past = _empty_past(fam, B)
    names = torch_specs["llm"].input_names
    feeds = dict(zip(names, (t.numpy() for t in (emb, mask, pos, *past))))
    o_out = sess.run(None, feeds)
    with torch.no_grad():
        t_out = llm(emb, mask, pos, *past)
    assert _maxdiff(o_out[0], t_out[0]) <= 1e-4
    for o, t in zip(o_out[1:], t_out[1:]):
        assert o.shape == (B, fam.num_kv_heads, T, fam.head_dim) and _maxdiff(o, t) <= 1e-4
    # the left-padded row's real positions give the unbatched HF logits
    off = T - one.seq_len
    assert off > 0
    assert _maxdiff(o_out[0][0, off:], _hf_logits(fam, model, one)[0]) <= 1e-4
    assert _maxdiff(o_out[0][1], _hf_logits(fam, model, two)[0]) <= 1e-4

    # one decode step with the present KV fed back (past length T)
    nxt = o_out[0][:, -1].argmax(-1)
    step_emb = model.get_input_embeddings()(torch.from_numpy(nxt)[:, None]).detach()
    step_mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
    step_pos = torch.tensor([p.seq_len + p.rope_delta for p in (one, two)]).view(1, B, 1).expand(3, B, 1).contiguous()
    present = [torch.from_numpy(t) for t in o_out[1:]]
    feeds = dict(zip(names, (t.numpy() for t in (step_emb, step_mask, step_pos, *present))))
    o_step = sess.run(None, feeds)
    with torch.no_grad():
        t_step = llm(step_emb, step_mask, step_pos, *present)
    assert o_step[0].shape == (B, 1, model.config.text_config.vocab_size)
    assert _maxdiff(o_step[0], t_step[0]) <= 1e-4
    assert all(o.shape[2] == T + 1 for o in o_step[1:])
    for b, p in enumerate((one, two)):
        full = _hf_logits(fam, model, p, extra_ids=[int(nxt[b])])
        assert _maxdiff(o_step[0][b, -1], full[0, -1]) <= 1e-4


def test_onnx_llm_batch1_prefill_and_decode(fam, model, onnx_sessions, one):
    """The runtime's shape: batch 1, prefill with empty past, then single-token steps."""
    sess = onnx_sessions["llm"]
    names = [i.name for i in sess.get_inputs()]
    S = one.seq_len
    emb = _merged_embeds(fam, model, one).numpy()
    past = [t.numpy() for t in _empty_past(fam, 1)]
    out = sess.run(None, dict(zip(names, (emb, np.ones((1, S), np.int64), one.position_ids, *past))))
    assert _maxdiff(out[0], _hf_logits(fam, model, one)) <= 1e-4
    toks = []
    for step in range(2):
        nxt = int(out[0][0, -1].argmax())
        toks.append(nxt)
        e = model.get_input_embeddings()(torch.tensor([[nxt]])).detach().numpy()
        n = S + step
        feeds = (e, np.ones((1, n + 1), np.int64), fam.decode_position_ids(one.rope_delta, n), *out[1:])
        out = sess.run(None, dict(zip(names, feeds)))
        assert out[1].shape[2] == n + 1
    assert _maxdiff(out[0][0, -1], _hf_logits(fam, model, one, extra_ids=toks)[0, -1]) <= 1e-4
