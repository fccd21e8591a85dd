"""tools/vision_kind_probe.py: the kind-learning probe runs for both towers, is seeded, and refuses bad geometry."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("vision_kind_probe", ROOT / "tools" / "vision_kind_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


SMALL = ["--image-size", "64", "--patch-size", "8", "--steps", "3", "--batch", "4", "--train-scenes", "8",
         "--val-scenes", "4", "--eval-every", "2", "--hidden", "32", "--layers", "1", "--threads", "1"]


@pytest.mark.parametrize("extra", [["--arch", "vit"], ["--arch", "cnn", "--shape-cells-only"]])
def test_probe_runs_and_is_seeded(tool, tmp_path, extra):
    out = tmp_path / "probe.json"
    assert tool.main(SMALL + extra + ["--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["step"] for r in res["curve"]] == [2, 3]
    for r in res["curve"]:
        assert 0.0 <= r["kind_acc"] <= 1.0 and math.isfinite(r["train_loss"])
    again = tool.run(tool.parse_args(SMALL + extra))
    strip = lambda c: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in c]  # noqa: E731
    assert strip(again["curve"]) == strip(res["curve"])


def test_labels_are_kinds_on_shape_cells(tool):
    from vlmq_export.data.shapes import KINDS, make_scene

    x, y = tool.scenes([5, 6], 64)
    assert x.shape == (2, 3, 64, 64) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert y.shape == (2, 64)
    for row, seed in zip(y, (5, 6)):
        kinds = {KINDS.index(s.kind) + 1 for s in make_scene(seed, 64).shapes}
        assert set(row[row > 0].tolist()) <= kinds and (row > 0).any()


@pytest.mark.parametrize("argv", [["--image-size", "100"], ["--steps", "0"]])
def test_bad_arguments_exit(tool, argv):
    with pytest.raises(SystemExit) as exc:
        tool.parse_args(argv)
    assert exc.value.code == 2


def test_vit_patch_grid_must_fit_the_cells(tool):
    with pytest.raises(SystemExit, match="not a multiple"):
        tool.make_tower(tool.parse_args(["--image-size", "64", "--patch-size", "16"]))
