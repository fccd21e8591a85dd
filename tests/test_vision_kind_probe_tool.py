"""tools/vision_kind_probe.py: the kind-learning probe runs for both towers, is seeded, and refuses bad geometry."""
from __future__ import annotations

import json
import math

import pytest
from conftest import load_tool

pytestmark = pytest.mark.usefixtures("keep_torch_threads")  # tool.main sets torch's threads


@pytest.fixture(scope="module")
def tool():
    return load_tool("vision_kind_probe")



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
