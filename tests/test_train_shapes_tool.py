"""tools/train_shapes_vlm.py: the auxiliary probe's labels and loss, and the training loop end to end on a tiny
random model (no language model weights needed)."""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_tool

pytestmark = pytest.mark.usefixtures("keep_torch_threads")  # tool.main sets torch's threads


@pytest.fixture(scope="module")
def tool():
    return load_tool("train_shapes_vlm")


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


def test_training_loop_end_to_end_on_a_tiny_model(tool, tmp_path, tiny_dirs, monkeypatch):
    """--text-model tiny: train a few steps (data-loader worker, aux probe, LoRA on attention and MLP),
    evaluate, save the best weights, export the assets (and their test accuracy), and start a new run from them
    with more LoRA targets."""
    import json
    import shutil

    import vlmq_export.testbed.assemble as assemble

    from safetensors.torch import load_file

    out = tmp_path / "run"
    common = ["--text-model", "tiny", "--batch", "2", "--questions", "2", "--n-val", "8", "--lora-rank", "2",
              "--aux-weight", "0.5", "--aux-extended", "--threads", "1", "--log-every", "2"]
    assert tool.main(common + ["--out", str(out), "--steps", "4", "--eval-every", "2", "--workers", "1",
                               "--lora-targets", "q_proj,v_proj,down_proj", "--pretrain-steps", "2",
                               "--pretrain-batch", "2"]) == 0
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    vals = [r for r in recs if r["event"] == "val"]
    assert [r["step"] for r in vals] == [2, 4]
    assert all(0.0 <= r["acc"] <= 1.0 and r["loss"] > 0 and r["n_per_qtype"] for r in vals)
    # the auxiliary probe's accuracy per head, after the vision-only pretraining and at each validation
    probes = [r["probe_val"] for r in recs if r["event"] == "pretrain_probe"] + [r["probe_val"] for r in vals]
    assert len(probes) == 3 and all(set(p) == {"color", "kind", "x_band", "y_band", "centre", "kind_count"} for p in probes)
    assert all(0.0 <= v <= 1.0 for p in probes for v in p.values())
    assert [r["step"] for r in recs if r["event"] == "end"] == [4]
    best = json.loads((out / "best.json").read_text())
    assert best["device"] == "cpu" and best["lora_targets"] == ["q_proj", "v_proj", "down_proj"]

    assets = tmp_path / "assets"
    assembled = []

    def fake_assembly(path, *, assets=None):  # the real one needs SmolLM2; the tiny SmolVLM stands in for it
        assembled.append(Path(assets))
        shutil.copytree(tiny_dirs["smolvlm"], path)
        (Path(path) / "testbed.json").write_text(json.dumps({"data": {"dataset": "shapesvqa", "layout": "free"}}))
        return Path(path)

    monkeypatch.setattr(assemble, "make_shapes_smolvlm", fake_assembly)
    assert tool.main(["--out", str(out), "--export-assets", str(assets), "--test-n", "6"]) == 0
    assert assembled == [assets]  # assembled from the parts just written
    test = json.loads((assets / "meta.json").read_text())["test"]
    assert test["n"] == 6 == sum(test["n_per_qtype"].values()) and test["split"] == "test"
    assert test["ci95"][0] <= test["accuracy"] <= test["ci95"][1]
    assert test["per_qtype"].keys() == test["per_qtype_ci95"].keys()
    lora = load_file(str(assets / "lora.safetensors"))
    assert lora and all(v.dtype == torch.float16 for v in lora.values())
    assert any(".mlp.down_proj.lora_B" in k for k in lora) and any(".self_attn.q_proj.lora_A" in k for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if k.endswith("lora_B"))  # trained away from B = 0
    vision = load_file(str(assets / "vision_connector.safetensors"))
    assert vision and all(v.dtype == torch.float32 for v in vision.values())
    assert json.loads((assets / "meta.json").read_text())["step"] == best["step"]
    last = tmp_path / "last_assets"  # the last step's weights instead of the best validation checkpoint's
    assert tool.main(["--out", str(out), "--export-assets", str(last), "--from", str(out / "last.pt"),
                      "--test-n", "0"]) == 0
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == 4 and meta["from"] == "last.pt" and meta["val"]["acc"] == vals[-1]["acc"]
    assert "test" not in meta and len(assembled) == 1
    # parts exported without it get it afterwards (--measure-test)
    assert tool.main(["--measure-test", str(last), "--test-n", "5", "--threads", "1"]) == 0
    meta = json.loads((last / "meta.json").read_text())
    assert meta["test"]["n"] == 5 and meta["step"] == 4 and assembled[-1] == last

    # a new run from the assets folder: the MLP up_proj adapters the assets lack start at B = 0
    out2 = tmp_path / "run2"
    assert tool.main(common + ["--out", str(out2), "--steps", "0", "--init", str(assets),
                               "--lora-targets", "q_proj,v_proj,down_proj,up_proj"]) == 0
    recs2 = [json.loads(line) for line in (out2 / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs2 if r["event"] == "val"] == [0]


def test_init_that_does_not_fit_is_refused(tool, tmp_path):
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"model.vision_model.nope": torch.zeros(1)}, str(bad))
    with pytest.raises(SystemExit, match="does not fit"):
        tool.main(["--text-model", "tiny", "--out", str(tmp_path / "r"), "--steps", "0", "--init", str(bad),
                   "--threads", "1"])


def test_probe_accuracy_is_one_for_the_labels_and_drops_when_a_head_is_wrong(tool):
    args = _args(aux_scene=False)
    labs = [tool.cell_labels(s, args) for s in (3, 4, 5)]
    cell = torch.from_numpy(np.stack([c for c, _ in labs]))
    counts = torch.from_numpy(np.stack([k for _, k in labs]))
    sizes = tool.aux_sizes(args)
    hot = lambda lab, n: torch.nn.functional.one_hot(lab, n).float()  # noqa: E731
    B, L = cell.shape[:2]
    count_logits = hot(counts.clamp_max(4), 5).flatten(1)[:, None, :].expand(B, L, -1)  # every cell: the image's counts
    logits = torch.cat([hot(cell[..., 0], sizes[0]), hot(cell[..., 1], sizes[1]), hot(cell[..., 2], sizes[2]),
                        hot(cell[..., 3], sizes[3]), hot(cell[..., 4], sizes[4]), count_logits], dim=-1)
    identity = torch.nn.Identity()  # the "probe" returns the tokens: they are the logits
    acc = tool.probe_accuracy(identity, logits, cell, counts, args)
    assert set(acc) == {"color", "kind", "x_band", "y_band", "centre", "kind_count"}
    assert all(v == 1.0 for v in acc.values())
    wrong = logits.clone()
    o = sizes[0]
    wrong[..., o:o + sizes[1]] = hot(torch.zeros_like(cell[..., 1]), sizes[1])  # the kind head always says background
    acc = tool.probe_accuracy(identity, wrong, cell, counts, args)
    assert acc["kind"] == 0.0 and acc["color"] == 1.0 and acc["kind_count"] == 1.0


def test_budget_fits_the_steps_also_after_a_resume(tool, tmp_path):
    """--budget-minutes times steps 6-25 of each invocation and cuts --steps to what fits (here: nothing more)."""
    import json

    out = tmp_path / "run"
    common = ["--text-model", "tiny", "--batch", "1", "--questions", "1", "--n-val", "2", "--threads", "1",
              "--out", str(out), "--steps", "60", "--budget-minutes", "0.0001", "--eval-every", "1000",
              "--ckpt-every", "1000", "--log-every", "1000"]
    assert tool.main(common) == 0
    assert tool.main(common + ["--resume"]) == 0
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["steps"]) for r in recs if r["event"] == "budget"] == [(25, 25), (50, 50)]
    assert [r["step"] for r in recs if r["event"] == "end"] == [25, 50]
