"""ShapesVQA: determinism, correctness by construction, rendering, splits."""
from __future__ import annotations

import collections
import json
import math
import re

import numpy as np
import pytest

from vlmq_export.data import shapes as sv
from vlmq_export.data.samples import Sample
from vlmq_export.errors import CalibrationDataError

SEEDS = range(300)


@pytest.fixture(scope="module")
def samples():
    # Small images: the checks here are about scenes and questions.
    return [sv.sample(s, image_size=128) for s in SEEDS]


@pytest.fixture(scope="module")
def scenes(samples):
    return [sv.Scene.from_dict(s.meta["scene"]) for s in samples]


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_sample():
    textures = set()
    for seed in [*range(12), 1_000_003, 3_000_000]:
        a, b = sv.sample(seed, 96), sv.sample(seed, 96)
        assert a.images[0].tobytes() == b.images[0].tobytes()
        assert (a.prompt, a.answer, a.meta) == (b.prompt, b.answer, b.meta)
        assert a.source == f"shapesvqa:{seed}"
        textures.add(a.meta["scene"]["background"]["texture"])
    assert textures == set(sv.TEXTURES)  # every code path of the background


def test_different_seeds_differ():
    imgs = [sv.sample(s).images[0].tobytes() for s in range(20)]
    assert len(set(imgs)) == 20
    qas = {(sv.sample(s).prompt, sv.sample(s).answer) for s in range(20)}
    assert len(qas) > 5


def test_no_global_random_state():
    import random

    def run():
        return [(s.images[0].tobytes(), s.prompt, s.answer) for s in map(sv.sample, range(12))]

    random.seed(1)
    np.random.seed(1)
    a = run()
    random.seed(2)
    np.random.seed(2)
    _ = random.random(), np.random.random()
    assert run() == a


def test_make_question_depends_only_on_rng():
    scene = sv.make_scene(5)
    q1 = sv.make_question(scene, np.random.default_rng(123))
    q2 = sv.make_question(scene, np.random.default_rng(123))
    assert q1 == q2


# --------------------------------------------------------------------------- sample format


def test_sample_fields(samples):
    s = samples[0]
    assert isinstance(s, Sample)
    assert len(s.images) == 1 and s.images[0].mode == "RGB" and s.images[0].size == (128, 128)
    assert s.meta["qtype"] in sv.QTYPES
    json.dumps(s.meta)  # scene description is plain data
    assert sv.Scene.from_dict(s.meta["scene"]) == sv.make_scene(0, 128)


def test_answers_are_short_lowercase(samples):
    for s in samples:
        words = s.answer.split()
        assert 1 <= len(words) <= 2, s.answer
        assert s.answer == s.answer.lower().strip()
        assert s.prompt.endswith("?")


def test_answer_vocabulary_per_qtype(samples):
    allowed = {
        "color": set(sv.COLORS),
        "count": {"0", "1", "2", "3", "4"},
        "position": {"left", "right", "top", "bottom"},
        "presence": {"yes", "no"},
    }
    for s in samples:
        assert s.answer in allowed[s.meta["qtype"]], (s.prompt, s.answer)


# --------------------------------------------------------------------------- correctness


def test_answers_rederived_from_scene(samples, scenes):
    for s, scene in zip(samples, scenes):
        assert sv.answer_scene(scene, s.prompt) == s.answer, (s.source, s.prompt, s.answer)


def test_count_answers_match_scene(samples, scenes):
    n_count = 0
    for s, scene in zip(samples, scenes):
        if s.meta["qtype"] != "count":
            continue
        n_count += 1
        m = re.fullmatch(r"How many (\w+) are there\?", s.prompt)
        assert m, s.prompt
        kind = next(k for k in sv.KINDS if sv.PLURALS[k] == m.group(1))
        assert int(s.answer) == sum(sh.kind == kind for sh in scene.shapes)
    assert n_count > 30


def test_count_answers_include_zero_and_several():
    answers = collections.Counter(
        s.answer for s in (sv.sample(i, 64) for i in range(400)) if s.meta["qtype"] == "count")
    assert answers["0"] > 0 and answers["1"] > 0 and answers["2"] > 0


def test_presence_balanced(samples):
    pres = [s.answer for s in samples if s.meta["qtype"] == "presence"]
    assert len(pres) > 30
    yes = pres.count("yes") / len(pres)
    assert 0.3 <= yes <= 0.7, yes


def test_color_and_position_only_when_unambiguous(samples, scenes):
    for s, scene in zip(samples, scenes):
        if s.meta["qtype"] not in ("color", "position"):
            continue
        kind = s.prompt.split()[4].rstrip("?") if s.meta["qtype"] == "color" else s.prompt.split()[2]
        hits = [sh for sh in scene.shapes if sh.kind == kind]
        assert len(hits) == 1, s.prompt
        if s.meta["qtype"] == "position":
            S = scene.image_size
            v = hits[0].cx if "left" in s.prompt else hits[0].cy
            assert not (0.4 * S <= v <= 0.6 * S), (s.prompt, v)


def test_answer_scene_catches_wrong_answers():
    # The checker reads the scene, not the generator: edit the scene and the answer moves.
    scene = sv.Scene(
        image_size=100, background=sv.Background("light", (214, 214, 214)),
        shapes=[sv.Shape("circle", "red", "large", 20, 80, 10),
                sv.Shape("square", "blue", "small", 80, 50, 6),
                sv.Shape("square", "green", "small", 50, 20, 6)])
    assert sv.answer_scene(scene, "What color is the circle?") == "red"
    assert sv.answer_scene(scene, "How many squares are there?") == "2"
    assert sv.answer_scene(scene, "How many stars are there?") == "0"
    assert sv.answer_scene(scene, "How many crosses are there?") == "0"
    assert sv.answer_scene(scene, "Is the circle on the left or the right?") == "left"
    assert sv.answer_scene(scene, "Is the circle at the top or the bottom?") == "bottom"
    assert sv.answer_scene(scene, "Is there a blue square?") == "yes"
    assert sv.answer_scene(scene, "Is there a blue circle?") == "no"
    assert sv.answer_scene(scene, "Is there an orange square?") == "no"
    with pytest.raises(ValueError):
        sv.answer_scene(scene, "What color is the square?")  # two squares
    with pytest.raises(ValueError):
        sv.answer_scene(scene, "What is the meaning of life?")
    scene.shapes[0].cx = 50  # now in the middle band
    with pytest.raises(ValueError):
        sv.answer_scene(scene, "Is the circle on the left or the right?")


def test_all_qtypes_in_100_samples(samples):
    assert set(s.meta["qtype"] for s in samples[:100]) == set(sv.QTYPES)


def test_qtypes_roughly_uniform(samples):
    c = collections.Counter(s.meta["qtype"] for s in samples)
    for t in sv.QTYPES:
        assert 0.15 <= c[t] / len(samples) <= 0.35, c


# --------------------------------------------------------------------------- scene geometry


def test_scene_geometry(scenes):
    n_shapes = collections.Counter()
    for scene in scenes:
        S = scene.image_size
        assert 1 <= len(scene.shapes) <= 4
        n_shapes[len(scene.shapes)] += 1
        for i, a in enumerate(scene.shapes):
            assert a.kind in sv.KINDS and a.color in sv.COLORS and a.size in sv.SIZES
            assert a.radius <= a.cx <= S - 1 - a.radius and a.radius <= a.cy <= S - 1 - a.radius
            assert sv._rgb_dist(sv.COLORS[a.color], scene.background.rgb) >= 100  # contrast
            for b in scene.shapes[i + 1:]:
                assert math.hypot(a.cx - b.cx, a.cy - b.cy) > a.radius + b.radius  # no overlap
    assert set(n_shapes) == {1, 2, 3, 4}
    assert len(set(k for sc in scenes for k in (s.kind for s in sc.shapes))) >= 3
    assert len(set(k for sc in scenes for k in (s.color for s in sc.shapes))) >= 6
    textures = set(sc.background.texture for sc in scenes)
    assert {"plain"} < textures


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("size", [224, 256])
def test_render_centre_pixel_and_corners(size):
    checked = 0
    for seed in range(40):
        scene = sv.make_scene(seed, size)
        img = np.asarray(sv.render(scene))
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        for sh in scene.shapes:
            if sh.radius >= 8:
                assert tuple(img[sh.cy, sh.cx]) == sv.COLORS[sh.color], (seed, sh)
                checked += 1
        bg = np.asarray(scene.background.rgb, dtype=int)
        amp = scene.background.amplitude
        for y, x in ((0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)):
            assert np.abs(img[y, x].astype(int) - bg).max() <= amp, (seed, y, x)
    assert checked > 40


def test_render_shapes_stay_in_bounding_circle_and_mostly_background():
    for seed in range(10):
        scene = sv.make_scene(seed, 128)
        img = np.asarray(sv.render(scene)).astype(int)
        bg_only = np.asarray(sv.render(sv.Scene(128, scene.background, []))).astype(int)
        yy, xx = np.mgrid[:128, :128]
        inside = np.zeros((128, 128), bool)
        for sh in scene.shapes:
            inside |= (xx - sh.cx) ** 2 + (yy - sh.cy) ** 2 <= (sh.radius + 1.5) ** 2
            # the shape covers a good part of its bounding circle
            disk = (xx - sh.cx) ** 2 + (yy - sh.cy) ** 2 <= sh.radius ** 2
            same = (img[disk] == np.asarray(sv.COLORS[sh.color])).all(axis=1).mean()
            assert same > 0.2, (seed, sh)
        assert (img[~inside] == bg_only[~inside]).all()
        assert (~inside).mean() > 0.6


def test_textured_background_is_low_contrast():
    found = set()
    for seed in range(60):
        scene = sv.make_scene(seed, 64)
        bg = scene.background
        if bg.texture == "plain":
            continue
        found.add(bg.texture)
        img = np.asarray(sv.render(sv.Scene(64, bg, []))).astype(int)
        dev = np.abs(img - np.asarray(bg.rgb)).max()
        assert 0 < dev <= 16, (seed, bg)
    assert found == {"noise", "stripes", "checker"}


# --------------------------------------------------------------------------- splits


def test_splits_disjoint():
    names = list(sv.SPLITS)
    assert {"train", "val", "test", "calib"} <= set(names)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = sv.SPLITS[a], sv.SPLITS[b]
            assert ra.stop <= rb.start or rb.stop <= ra.start, (a, b)


@pytest.mark.parametrize("size", [224, 384, 512])
def test_make_split_sizes(size):
    out = sv.make_split("calib", 3, image_size=size)
    assert len(out) == 3
    assert all(s.images[0].size == (size, size) for s in out)
    assert [s.source for s in out] == [f"shapesvqa:{sv.SPLITS['calib'][i]}" for i in range(3)]


def test_make_split_start_and_errors():
    a = sv.make_split("val", 4, image_size=64)
    b = sv.make_split("val", 2, image_size=64, start=2)
    assert [s.source for s in a[2:]] == [s.source for s in b]
    assert sv.make_split("test", 0) == []
    with pytest.raises(CalibrationDataError):
        sv.make_split("nope", 1)
    with pytest.raises(CalibrationDataError):
        sv.make_split("val", 2, start=len(sv.SPLITS["val"]) - 1)


def test_save_split_writes_scenes_a_user_can_run_and_calibrate_on(tmp_path, capsys):
    """`python -m vlmq_export.data.shapes DIR` (the README's way to get a question the testbed knows): PNGs and
    a data.jsonl that the calibration loader reads back with the same prompts and answers."""
    from vlmq_export.data.loader import load_samples
    from vlmq_export.data.shapes import Scene, answer_scene, main, make_split

    assert main([str(tmp_path), "--n", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(" -> " in l for l in lines)
    want = make_split("test", 3)
    got = load_samples(str(tmp_path), 3)
    assert [(s.prompt, s.answer) for s in got] == [(s.prompt, s.answer) for s in want]
    assert [answer_scene(Scene.from_dict(w.meta["scene"]), w.prompt) for w in want] == [s.answer for s in got]
    assert main([str(tmp_path / "x"), "--n", "100000"]) == 2 and not (tmp_path / "x").exists()


def test_builtin_samples_follow_the_testbeds_layout(tmp_path):
    """A testbed trained on the grid layout is calibrated and validated on grid scenes (testbed.json's data.layout),
    other models on the free layout."""
    from vlmq_export.data.loader import load_samples
    from vlmq_export.pipeline import validation_samples
    from vlmq_export.testbed import testbed_layout

    (tmp_path / "testbed.json").write_text(json.dumps({"data": {"dataset": "shapesvqa", "layout": "grid"}}))
    layout = testbed_layout(tmp_path)
    assert layout == "grid" and testbed_layout(tmp_path / "elsewhere") == "free"
    grid = load_samples("builtin:shapes", 3, layout=layout)
    free = load_samples("builtin:shapes", 3)
    assert [s.meta["layout"] for s in grid] == ["grid"] * 3 and all("layout" not in s.meta for s in free)
    assert [s.meta["scene"] for s in grid] == [sv.make_split("calib", 3, layout="grid")[i].meta["scene"] for i in range(3)]
    assert all(s.meta.get("layout") == "grid" for s in validation_samples(3, layout) if s.images)
