"""tools/train_shapes_vlm.py: the auxiliary probe's labels and loss (no language model needed)."""
from __future__ import annotations

import importlib.util
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("train_shapes_vlm", ROOT / "tools" / "train_shapes_vlm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(**kw):
    base = dict(image_size=256, patch_size=16, scale_factor=2, aux_extended=True, aux_scene=True)
    return Namespace(**{**base, **kw})


def test_cell_labels_agree_with_the_scene(tool):
    from vlmq_export.data.shapes import KINDS, make_scene

    colors = list(tool.COLOR_IDS)
    seen_multi = False
    for seed in range(40):
        scene = make_scene(seed, 256)
        lab, kinds = tool.cell_labels(seed, _args())
        assert lab.shape == (64, 6 + len(colors))
        assert kinds.tolist() == [sum(s.kind == k for s in scene.shapes) for k in KINDS]
        background = lab[:, 1] == 0
        assert not lab[background].any()  # background cells carry no label at all
        assert (~background).any()
        for row in lab[~background]:
            kind = KINDS[int(row[1]) - 1]
            same = [s for s in scene.shapes if s.kind == kind]
            assert int(row[5]) == len(same)  # how many of the cell's kind
            flags = {colors[i] for i in range(len(colors)) if row[6 + i]}
            assert flags == {s.color for s in same}  # the colours of all shapes of that kind
            assert colors[int(row[0]) - 1] in flags
            seen_multi |= len(same) > 1
        centres = int(lab[:, 2].sum())
        assert 1 <= centres <= len(scene.shapes)
    assert seen_multi  # the seeds cover scenes with repeated kinds


def test_aux_loss_sizes_and_gradient(tool):
    torch.manual_seed(0)
    for ext, scene_flag in ((False, False), (True, False), (True, True)):
        args = _args(aux_extended=ext, aux_scene=scene_flag)
        labs = [tool.cell_labels(s, args) for s in (3, 4)]
        cell = torch.from_numpy(np.stack([c for c, _ in labs]))
        counts = torch.from_numpy(np.stack([k for _, k in labs]))
        aux = torch.nn.Linear(16, sum(tool.aux_sizes(args)))
        tokens = torch.randn(2, 64, 16, requires_grad=True)
        loss = tool.aux_loss_of(aux, tokens, cell, counts, args)
        loss.backward()
        assert torch.isfinite(loss) and tokens.grad.abs().sum() > 0
    # --aux-scene adds two heads: the count of the cell's kind (5 classes) and its kind's colours (one flag each)
    assert tool.aux_sizes(_args(aux_scene=True))[-2:] == [5, len(tool.COLOR_IDS)]
    assert len(tool.aux_sizes(_args(aux_scene=True))) == len(tool.aux_sizes(_args(aux_scene=False))) + 2


def test_embed_loss_is_zero_on_the_bag_of_words_and_ignores_background(tool):
    torch.manual_seed(0)
    d = 8
    words = {"color": torch.randn(len(tool.COLOR_IDS), d), "kind": torch.randn(len(tool.KIND_IDS), d),
             "count": torch.randn(5, d), "x": torch.randn(4, d), "y": torch.randn(4, d)}
    words["x"][0] = words["x"][2] = 0  # background / middle band: no side word
    words["y"][0] = words["y"][2] = 0
    lab = torch.from_numpy(tool.cell_labels(7, _args())[0])[None]
    shape = lab[0, :, 1] > 0
    tokens = torch.randn(1, lab.shape[1], d)
    assert float(tool.embed_loss(tokens, lab, words)) > 0.1
    for j in torch.nonzero(shape).flatten().tolist():  # each shape cell set to its own scaled bag of words
        c = lab[0, j]
        t = (words["color"][c[0] - 1] + words["kind"][c[1] - 1] + words["count"][min(int(c[5]), 4)]
             + words["x"][c[3]] + words["y"][c[4]])
        tokens[0, j] = t / (3 + int(c[3] != 2) + int(c[4] != 2)) ** 0.5
    assert float(tool.embed_loss(tokens, lab, words)) < 1e-10
    tokens[0, ~shape] = 1e3  # background cells are free
    assert float(tool.embed_loss(tokens, lab, words)) < 1e-10
