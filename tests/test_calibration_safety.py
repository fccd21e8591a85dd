"""Calibration resume checkpoints hold no pickles (nothing in them runs code); calibration prompts are cut early."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmq_export.calibrate import ComponentRecipe, Recipe, calibrate
from vlmq_export.data.samples import Sample
from vlmq_export.data.shapes import make_split
from vlmq_export.errors import VlmqError
from vlmq_export.models import load_family


class _Interrupt(Exception):
    pass


class Payload:
    """A pickle that creates ``marker`` when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def interrupted_checkpoint(family, path, items, recipe, ckpt: Path, after: str) -> None:
    def stop(msg):
        if msg.startswith(after):
            raise _Interrupt

    with pytest.raises(_Interrupt):
        calibrate(family, family.load_model(path), items, recipe, say=stop, device="cpu", checkpoint=ckpt)


def codes(result):
    return {q.name: (q.codes, q.scales) for q in result.layers}


@pytest.fixture(scope="module")
def smol(tiny_dirs):
    return load_family(tiny_dirs["smolvlm"]), tiny_dirs["smolvlm"]


def items():
    return make_split("calib", 2) + [Sample([], "Name a colour.", "blue", "text")]


def test_pickles_in_the_checkpoint_folder_are_never_loaded(smol, tmp_path):
    family, path = smol
    recipe = Recipe(method="vlmq", components={"llm": ComponentRecipe(4, 128)})
    ckpt = tmp_path / "ckpt"
    interrupted_checkpoint(family, path, items(), recipe, ckpt, "llm block 1/")
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)  # what torch.load(weights_only=False) would run
    bomb = buf.getvalue()
    for name in ("saliency.pt", "llm/block0.pt", "llm/block1.pt", "llm/inputs0.pt"):  # the old format's files
        (ckpt / name).write_bytes(bomb)
    msgs = []
    try:
        resumed = calibrate(family, family.load_model(path), items(), recipe, say=msgs.append, device="cpu",
                            checkpoint=ckpt)
    finally:
        assert not marker.exists(), "a pickle in the checkpoint folder ran"
    assert any("resumed after block 1/" in m for m in msgs) and any("saliency factors loaded" in m for m in msgs)
    assert resumed.layers
    # a pickle under the new format's names is refused, not run
    (ckpt / "llm" / "block0.safetensors").write_bytes(bomb)
    with pytest.raises(VlmqError, match=r"block0: not a readable calibration checkpoint .*delete .*llm"):
        calibrate(family, family.load_model(path), items(), recipe, device="cpu", checkpoint=ckpt)
    assert not marker.exists()


def test_resume_from_safetensors_checkpoints_gives_the_same_codes(tiny_dirs, tmp_path):
    """GPTAQ (float inputs kept beside the quantized ones) on Qwen2-VL's vision tower and decoder."""
    family, path = load_family(tiny_dirs["qwen2_vl"]), tiny_dirs["qwen2_vl"]
    recipe = Recipe(method="gptaq", components={"vision": ComponentRecipe(8, -1), "llm": ComponentRecipe(4, 64)})
    ref = codes(calibrate(family, family.load_model(path), items(), recipe, device="cpu"))
    ckpt = tmp_path / "ckpt"
    interrupted_checkpoint(family, path, items(), recipe, ckpt, "llm block 1/")
    files = {p.suffix for p in ckpt.rglob("*") if p.is_file()}
    assert files == {".json", ".safetensors"}  # no pickle anywhere
    msgs = []
    got = codes(calibrate(family, family.load_model(path), items(), recipe, say=msgs.append, device="cpu",
                          checkpoint=ckpt))
    assert any("llm: resumed after block 1/" in m for m in msgs)
    assert got.keys() == ref.keys()
    for k in ref:
        assert np.array_equal(got[k][0], ref[k][0]) and np.array_equal(got[k][1], ref[k][1]), k


def test_a_huge_calibration_prompt_is_cut_before_the_model_labels_it(smol):
    """A prompt of ~12k tokens without an answer: VLMQ self-labels it with the model, which must see at most
    the calibration prompt budget (2048 tokens of text), not the whole prompt."""
    family, path = smol
    model = family.load_model(path)
    huge = Sample([], "Describe this. " + " ".join(f"word{i % 97}" for i in range(6000)), None, "huge")
    assert len(family.tokenizer.encode(huge.prompt, add_special_tokens=False)) > 8000
    seen = []

    def record(_mod, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        x = x if x is not None else kwargs.get("inputs_embeds")
        seen.append(int(x.shape[1]))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        res = calibrate(family, model, [huge, Sample([], "Name a colour.", "blue", "text")],
                        Recipe(method="vlmq", components={"llm": ComponentRecipe(4, 128)}), device="cpu")
    finally:
        handle.remove()
    assert seen and max(seen) <= 2048 + 64  # the cut prompt, its chat template and the generated answer
    cut = [re.search(r"sample huge: prompt of \d+ characters cut to (\d+) tokens", w) for w in res.warnings]
    assert any(cut) and int(next(m for m in cut if m).group(1)) <= 2048
    # 1/8 of the context stays free for the template and the answer: the labelled sample is not cut again
    assert not any("exceed the context" in w for w in res.warnings)
