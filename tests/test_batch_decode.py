"""Batch > 1 decode (runtime/generate.py BatchDecoder): a padded batch gives each row batch 1's tokens and logits,
for the ORT flavour (GroupQueryAttention, SmolVLM) and the portable graph (Qwen2-VL, M-RoPE positions)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmq_export import cli
from vlmq_export.runtime.generate import BatchDecoder, OnnxVLM

# family -> the llm graph the export writes (SmolVLM: the ORT flavour by default)
GRAPHS = {"smolvlm": None, "qwen2_vl": "portable"}
RTOL = 1e-4


@pytest.fixture(scope="module", params=sorted(GRAPHS))
def vlm(request, tiny_dirs, tmp_path_factory) -> OnnxVLM:
    fam = request.param
    out = tmp_path_factory.mktemp("batch") / fam
    extra = ["--llm-graph", GRAPHS[fam]] if GRAPHS[fam] else []
    assert cli.main([str(tiny_dirs[fam]), "--int4", "--method", "rtn", "--no-validate", "-o", str(out),
                     "--n-calib", "2", "--quiet", *extra]) == 0
    vlm = OnnxVLM(Path(out), accuracy_level=0)
    assert vlm.llm_flavour == ("ort-gqa" if fam == "smolvlm" else "portable")
    yield vlm
    vlm.close()


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _prompts(vlm: OnnxVLM) -> list:
    """Prompts of different lengths, two with an image."""
    fam = vlm.family
    prompts = [fam.prepare([], "hi"), fam.prepare([_image(0)], "What is in this picture? Say it in many words."),
               fam.prepare([], "a much longer prompt about many different things " * 3),
               fam.prepare([_image(1)], "and this one?")]
    assert len({p.seq_len for p in prompts}) == len(prompts)
    return prompts


def _assert_same(ref, got) -> None:
    assert got.token_ids == ref.token_ids and got.stopped == ref.stopped and got.text == ref.text
    assert len(got.logits) == len(ref.logits)
    for a, b in zip(ref.logits, got.logits):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=RTOL * float(np.abs(a).max()))


def test_batched_greedy_equals_batch_one(vlm):
    prompts = _prompts(vlm)
    lengths = [12, 5, 12, 8]  # rows leave the batch at different steps
    ref = [vlm.generate_prepared(p, max_new_tokens=n, stop=False, keep_logits=True) for p, n in zip(prompts, lengths)]
    got = vlm.generate_batch(prompts, [{"max_new_tokens": n} for n in lengths], stop=False, keep_logits=True)
    for r, g, n in zip(ref, got, lengths):
        assert len(g.token_ids) == n
        _assert_same(r, g)


def test_a_row_that_stops_early_does_not_disturb_the_others(vlm, monkeypatch):
    prompts = _prompts(vlm)
    free = [vlm.generate_prepared(p, max_new_tokens=10, stop=False) for p in prompts]
    # a token one row samples early (and the others maybe later or never) made a stop token
    stop_tok = free[1].token_ids[2]
    monkeypatch.setattr(type(vlm.family), "stop_token_ids", property(lambda self: [stop_tok]))
    ref = [vlm.generate_prepared(p, max_new_tokens=10, keep_logits=True) for p in prompts]
    assert ref[1].stopped and len(ref[1].token_ids) <= 2
    assert any(not r.stopped for r in ref)  # someone goes on to the end
    got = vlm.generate_batch(prompts, keep_logits=True, max_new_tokens=10)
    for r, g in zip(ref, got):
        _assert_same(r, g)


def test_rows_join_and_leave_between_steps(vlm):
    """What serve does: a request that arrives while others decode joins the running batch; a cancelled one
    leaves it; the rest keep batch 1's logits."""
    prompts = _prompts(vlm)
    ref = [vlm.generate_prepared(p, max_new_tokens=9, stop=False, keep_logits=True) for p in prompts]
    dec = BatchDecoder(vlm)
    rows = [dec.add(prompts[0], max_new_tokens=9, stop=False, keep_logits=True)]
    dec.step()
    rows.append(dec.add(prompts[1], max_new_tokens=9, stop=False, keep_logits=True))
    rows.append(dec.add(prompts[3], max_new_tokens=9, stop=False, keep_logits=True))
    dec.step()
    dec.step()
    rows.append(dec.add(prompts[2], max_new_tokens=9, stop=False, keep_logits=True))
    dec.step()
    dec.cancel(rows[1])
    while dec.rows:
        dec.step()
    assert rows[1].result is None and dec.max_rows == 4
    for i, row in zip((0, 3, 2), (rows[0], rows[2], rows[3])):
        _assert_same(ref[i], row.result)


def test_sampling_parameters_are_per_row(vlm):
    """Seeded sampling in a batch draws each row's tokens as batch 1 does with the same seed."""
    prompts = _prompts(vlm)[:3]
    params = [{"sample": True, "seed": 1, "temperature": 1.5}, {}, {"sample": True, "seed": 7, "top_k": 5}]
    ref = [vlm.generate_prepared(p, max_new_tokens=8, stop=False, **kw) for p, kw in zip(prompts, params)]
    got = vlm.generate_batch(prompts, params, max_new_tokens=8, stop=False)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]


def test_family_extra_llm_feeds_reach_every_llm_call(vlm, monkeypatch):
    """Family.llm_prefill_feeds / llm_decode_feeds (Qwen3-VL's deepstack, Gemma3's image groups) go with every
    llm call of batch-1 and batched generation; the prefill hook sees the projector's outputs."""
    fam, real, seen, projected = vlm.family, vlm.llm, [], []

    def prefill_feeds(p, proj):
        projected.append(None if proj is None else sorted(proj))
        return {"prefill_len": p.seq_len}

    def llm(emb, mask, pos, past, extra=None, logits_to_keep=0):
        seen.append((emb.shape[0], emb.shape[1], extra))
        return real(emb, mask, pos, past, logits_to_keep=logits_to_keep)

    monkeypatch.setattr(fam, "llm_prefill_feeds", prefill_feeds)
    monkeypatch.setattr(fam, "llm_decode_feeds", lambda batch: {"decode_rows": batch})
    monkeypatch.setattr(vlm, "llm", llm)
    prompts = _prompts(vlm)[:2]
    vlm.generate_prepared(prompts[1], max_new_tokens=3, stop=False)
    vlm.generate_batch(prompts, max_new_tokens=3, stop=False)
    assert projected == [["image_embeds"], None, ["image_embeds"]]
    prefills = [(b, s, e) for b, s, e in seen if s > 1]
    decodes = [(b, s, e) for b, s, e in seen if s == 1]
    assert [e for _, _, e in prefills] == [{"prefill_len": s} for _, s, _ in prefills] and len(prefills) == 3
    assert decodes and all(e == {"decode_rows": b} for b, _, e in decodes) and {b for b, _, _ in decodes} == {1, 2}
