"""ShapesVQA's layouts: "free" (the committed testbed's data, unchanged) and "grid" (one shape per 8x8 cell,
centred, so that with 32-pixel patches at 256 px each image token carries at most one shape)."""
from __future__ import annotations

import hashlib
from argparse import Namespace

import numpy as np
import pytest

from vlmq_export.data import shapes as sv
from conftest import load_tool

# sha256 over the free layout's images, questions and answers of five seeds (train, val, test), computed before
# the layouts existed: the committed testbed's training and evaluation data stay what they were
FREE_DIGEST = "f7c0471bbaa42124d93d59558b263b0a153607146bf7028bac7f171754999f8c"


def test_free_layout_is_unchanged():
    h = hashlib.sha256()
    for seed in (0, 1, 2, 1_000_000, 2_000_000):
        h.update(np.asarray(sv.render(sv.make_scene(seed, 256))).tobytes())
        s = sv.sample(seed)
        h.update((s.prompt + s.answer).encode())
        assert "layout" not in s.meta
    assert h.hexdigest() == FREE_DIGEST
    assert sv.make_scene(7, 256, "free") == sv.make_scene(7, 256)


@pytest.mark.parametrize("seed", range(0, 400, 7))
def test_grid_layout_one_shape_per_cell(seed):
    scene = sv.make_scene(seed, 256, "grid")
    cell = 256 // sv.GRID_CELLS
    cells = [(sh.cy // cell, sh.cx // cell) for sh in scene.shapes]
    assert 1 <= len(scene.shapes) <= 4 and len(set(cells)) == len(cells)
    for sh, (row, col) in zip(scene.shapes, cells):
        assert (sh.cx, sh.cy) == (col * cell + cell // 2, row * cell + cell // 2)  # centred
        assert sh.radius <= cell // 2  # inside its cell
    s = sv.sample(seed, 256, "grid")
    assert s.meta["layout"] == "grid"
    assert sv.answer_scene(sv.Scene.from_dict(s.meta["scene"]), s.prompt) == s.answer


def test_grid_layout_is_seeded_and_differs_from_free():
    a, b = sv.make_split("val", 3, layout="grid"), sv.make_split("val", 3, layout="grid")
    assert [np.asarray(x.images[0]).tobytes() for x in a] == [np.asarray(x.images[0]).tobytes() for x in b]
    free = sv.make_split("val", 3)
    assert [x.meta["scene"]["background"] for x in a] == [x.meta["scene"]["background"] for x in free]
    assert [x.meta["scene"]["shapes"] for x in a] != [x.meta["scene"]["shapes"] for x in free]


def test_layout_errors():
    with pytest.raises(ValueError, match="unknown ShapesVQA layout"):
        sv.make_scene(0, 256, "spiral")
    with pytest.raises(ValueError, match="multiple of 8"):
        sv.make_scene(0, 100, "grid")


def test_trainer_labels_one_token_per_shape_on_the_grid():
    """With patch 32 and pixel-shuffle scale 1 at 256 px (64 image tokens), each shape's kind lands on exactly
    one token, its own cell; on the free layout large shapes spread over several."""
    tool = load_tool("train_shapes_vlm")
    args = Namespace(image_size=256, patch_size=32, scale_factor=1, aux_extended=False, aux_scene=False, layout="grid")
    for seed in range(20):
        lab, _ = tool.cell_labels(seed, args)
        scene = sv.make_scene(seed, 256, "grid")
        assert lab.shape[0] == 64
        assert (lab[:, 1] > 0).sum() == len(scene.shapes)
        for sh in scene.shapes:
            assert lab[(sh.cy // 32) * 8 + sh.cx // 32, 1] == tool.KIND_IDS[sh.kind]
    free = Namespace(**{**vars(args), "layout": "free"})
    assert any((tool.cell_labels(seed, free)[0][:, 1] > 0).sum() > len(sv.make_scene(seed, 256).shapes)
               for seed in range(20))


def test_evaluation_takes_the_layout():
    from vlmq_export.testbed import eval_samples

    grid = eval_samples(3, layout="grid")
    assert [s.meta["layout"] for s in grid] == ["grid"] * 3
    assert [s.meta["scene"] for s in eval_samples(3)] == [s.meta["scene"] for s in sv.make_split("test", 3)]


def test_testbed_layout_reads_testbed_json(tmp_path):
    import json

    from vlmq_export.testbed import testbed_layout

    assert testbed_layout(tmp_path) == "free"  # not a testbed
    (tmp_path / "testbed.json").write_text(json.dumps({"seed": 0}))
    assert testbed_layout(tmp_path) == "free"  # assembled before layouts existed
    (tmp_path / "testbed.json").write_text(json.dumps({"data": {"dataset": "shapesvqa", "layout": "grid"}}))
    assert testbed_layout(tmp_path) == "grid"


def test_eval_evaluates_on_the_sources_layout(rtn_exports, monkeypatch, capsys):
    import json

    import vlmq_export.testbed as testbed
    import vlmq_export.validate.perplexity as perplexity
    from vlmq_export import cli

    seen = []
    monkeypatch.setattr(testbed, "testbed_layout", lambda path: "grid")
    monkeypatch.setattr(testbed, "evaluate_onnx", lambda out, n, layout="free", **kw: seen.append(layout) or {"n": n})
    monkeypatch.setattr(perplexity, "perplexity_onnx", lambda *a, **kw: 1.0)
    assert cli.main(["eval", str(rtn_exports["smolvlm"]), "--n", "2", "--json"]) == 0
    assert seen == ["grid"] and json.loads(capsys.readouterr().out)["onnx"]["n"] == 2


def test_aux_kind_loss_on_shape_cells_only():
    """--aux-kind-on-shapes: the kind head learns from the cells a shape covers only (on the grid layout ~4 % of the
    cells; over all cells the background swamps it and kind stayed at chance in pretraining)."""
    import torch

    tool = load_tool("train_shapes_vlm")
    args = Namespace(image_size=256, patch_size=32, scale_factor=1, aux_extended=False, aux_scene=False, layout="grid",
                     aux_kind_on_shapes=True)
    lab = torch.from_numpy(np.stack([tool.cell_labels(s, args)[0] for s in (1, 2)]))
    kinds = torch.zeros(2, 5, dtype=torch.long)
    n_col, n_kind = tool.aux_sizes(args)
    torch.manual_seed(0)
    logits = torch.randn(2, 64, n_col + n_kind)  # the probe's outputs themselves (aux = identity)
    other = logits.clone()
    bg = lab[..., 1] == 0
    other[..., n_col:][bg] = torch.randn(int(bg.sum()), n_kind) * 5  # other kind logits on background cells only
    off = Namespace(**{**vars(args), "aux_kind_on_shapes": False})

    def loss(a, x):
        return float(tool.aux_loss_of(lambda t: t, x, lab, kinds, a))

    assert loss(args, logits) == pytest.approx(loss(args, other))  # background kind logits do not count
    assert loss(off, logits) != pytest.approx(loss(off, other))  # (they did without the flag)
    shape = other.clone()
    shape[..., n_col:][~bg] += torch.randn(int((~bg).sum()), n_kind) * 5
    assert loss(args, shape) != pytest.approx(loss(args, other))  # shape cells' kind logits do
