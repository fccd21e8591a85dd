"""ShapesVQA: a seeded, offline, synthetic visual question-answering task.

Each seed gives one scene (1-4 flat-coloured shapes on a plain or faintly
textured background), one question about it and its one-word answer.  It is
the built-in calibration data of the quantizer and a small train/eval task.

Everything is a pure function of the seed (``numpy.random.default_rng``; no
global random state), so the same seed always gives the same image bytes,
question and answer.

Layouts (``layout=``): ``"free"`` (the default, and the only layout before there
were two: shapes anywhere, radius 6-13 % of the image, so a large one spans
several 32-pixel cells) and ``"grid"``: every shape centred in its own cell of
an 8x8 grid (radius 30-46 % of a cell), so with 32-pixel patches at 256 pixels
each vision patch holds at most one whole shape. A seed gives the same
background in both layouts (the shapes differ), and ``"free"`` scenes are
byte-for-byte those of before there were layouts.

Public API::

    make_scene(seed, image_size=256, layout="free") -> Scene
    render(scene) -> PIL.Image.Image                      # RGB, image_size x image_size
    make_question(scene, rng) -> (question, answer, qtype)
    answer_scene(scene, question) -> answer               # independent re-derivation
    sample(seed, image_size=256, layout="free") -> Sample
    make_split(split, n, image_size=256, start=0, layout="free") -> list[Sample]
    SPLITS, KINDS, COLORS, QTYPES, LAYOUTS, Scene, Shape, Background
"""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import CalibrationDataError
from .samples import Sample

# --------------------------------------------------------------------------- vocabulary

KINDS = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "star": "stars", "cross": "crosses"}

# Saturated, mutually distinct colours.  Which ones a scene may use depends on
# its background (see _MIN_CONTRAST).
COLORS = {
    "red": (220, 30, 30),
    "green": (40, 180, 60),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (140, 50, 190),
    "orange": (250, 130, 10),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}

# Background base colours: light and dark neutrals.
BACKGROUNDS = {
    "light": ((214, 214, 214), (236, 228, 206), (204, 214, 226)),
    "dark": ((48, 48, 48), (36, 44, 58), (58, 48, 42)),
}
TEXTURES = ("plain", "noise", "stripes", "checker")
_TEXTURE_AMP = (6, 14)  # +- grey levels around the base colour: low contrast
_MIN_CONTRAST = 130.0  # min RGB distance between a shape colour and the background base

SIZES = {"small": (0.06, 0.08), "large": (0.10, 0.13)}  # radius as a fraction of image_size
_GAP = 0.03  # min free space between two shapes' bounding circles (fraction of image_size)
_MARGIN = 0.02  # min space between a bounding circle and the canvas edge
_SIDE_BAND = 0.4  # a shape is "left" when cx < 0.4*S, "right" when cx > 0.6*S (same for y)

LAYOUTS = ("free", "grid")
GRID_CELLS = 8  # "grid" layout: cells per side (the testbed's 8x8 image tokens)
GRID_SIZES = {"small": (0.30, 0.36), "large": (0.40, 0.46)}  # "grid": radius as a fraction of the cell side

QTYPES = ("color", "count", "position", "presence")

SPLITS = {
    "train": range(0, 1_000_000),
    "val": range(1_000_000, 1_010_000),
    "test": range(2_000_000, 2_010_000),
    "calib": range(3_000_000, 3_010_000),
}


# --------------------------------------------------------------------------- scene


@dataclass
class Shape:
    kind: str  # one of KINDS
    color: str  # one of COLORS
    size: str  # "small" | "large"
    cx: int  # centre, pixels
    cy: int
    radius: int  # radius of the bounding circle, pixels; the shape lies inside it
    angle: float = 0.0  # rotation, degrees (0 for circles)


@dataclass
class Background:
    tone: str  # "light" | "dark"
    rgb: tuple  # base colour
    texture: str = "plain"  # one of TEXTURES
    amplitude: int = 0  # texture strength, +- grey levels
    period: int = 0  # stripes / checker period, pixels
    orientation: str = ""  # stripes: "horizontal" | "vertical" | "diagonal"
    noise_seed: int = 0  # noise texture


@dataclass
class Scene:
    image_size: int
    background: Background
    shapes: list = field(default_factory=list)  # list[Shape]
    seed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        bg = dict(d["background"])
        bg["rgb"] = tuple(bg["rgb"])
        return cls(image_size=int(d["image_size"]), background=Background(**bg),
                   shapes=[Shape(**s) for s in d["shapes"]], seed=d.get("seed"))


def _rgb_dist(a, b) -> float:
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def allowed_colors(bg_rgb) -> list[str]:
    """Shape colours that contrast with a background base colour."""
    return [c for c, rgb in COLORS.items() if _rgb_dist(rgb, bg_rgb) >= _MIN_CONTRAST]


def make_scene(seed: int, image_size: int = 256, layout: str = "free") -> Scene:
    """The scene of ``seed``: deterministic, 1-4 non-overlapping shapes, placed as ``layout`` says."""
    image_size = int(image_size)
    if image_size < 32:
        raise ValueError(f"ShapesVQA image_size must be >= 32, got {image_size}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ShapesVQA layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "grid" and image_size % GRID_CELLS:
        raise ValueError(f"the grid layout needs image_size a multiple of {GRID_CELLS}, got {image_size}")
    rng = np.random.default_rng([int(seed), 0])
    S = image_size

    tone = ("light", "dark")[int(rng.integers(2))]
    palette = BACKGROUNDS[tone]
    base = palette[int(rng.integers(len(palette)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    bg = Background(tone=tone, rgb=tuple(base), texture=texture)
    if texture != "plain":
        bg.amplitude = int(rng.integers(_TEXTURE_AMP[0], _TEXTURE_AMP[1] + 1))
    if texture in ("stripes", "checker"):
        bg.period = max(4, int(round(S * float(rng.uniform(0.03, 0.08)))))
    if texture == "stripes":
        bg.orientation = ("horizontal", "vertical", "diagonal")[int(rng.integers(3))]
    if texture == "noise":
        bg.noise_seed = int(rng.integers(2**31))

    colors = allowed_colors(base)
    n = int(rng.integers(1, 5))
    shapes: list[Shape] = []
    if layout == "grid":
        cell = S // GRID_CELLS
        cells = rng.choice(GRID_CELLS * GRID_CELLS, size=n, replace=False)
    for i in range(n):
        # Repeat an existing kind fairly often so that counts of 2-4 occur.
        if shapes and rng.random() < 0.35:
            kind = shapes[int(rng.integers(len(shapes)))].kind
        else:
            kind = KINDS[int(rng.integers(len(KINDS)))]
        color = colors[int(rng.integers(len(colors)))]
        size = ("small", "large")[int(rng.integers(2))]
        if layout == "grid":
            lo, hi = GRID_SIZES[size]
            r = max(3, int(round(cell * float(rng.uniform(lo, hi)))))
            angle = 0.0 if kind == "circle" else round(float(rng.uniform(-15.0, 15.0)), 2)
            row, col = divmod(int(cells[i]), GRID_CELLS)
            shapes.append(Shape(kind, color, size, col * cell + cell // 2, row * cell + cell // 2, r, angle))
            continue
        lo, hi = SIZES[size]
        r = max(3, int(round(S * float(rng.uniform(lo, hi)))))
        angle = 0.0 if kind == "circle" else round(float(rng.uniform(-15.0, 15.0)), 2)
        lo_c = int(math.ceil(r + _MARGIN * S))
        hi_c = int(math.floor(S - 1 - r - _MARGIN * S))
        for _try in range(200):
            cx = int(rng.integers(lo_c, hi_c + 1))
            cy = int(rng.integers(lo_c, hi_c + 1))
            if all(math.hypot(cx - o.cx, cy - o.cy) >= r + o.radius + _GAP * S for o in shapes):
                shapes.append(Shape(kind, color, size, cx, cy, r, angle))
                break
        # (a shape that finds no free spot is dropped; never happens at these sizes)
    return Scene(image_size=S, background=bg, shapes=shapes, seed=int(seed))


# --------------------------------------------------------------------------- rendering


def _background_image(bg: Background, S: int) -> Image.Image:
    if bg.texture == "plain" or bg.amplitude == 0:
        return Image.new("RGB", (S, S), tuple(bg.rgb))
    a = bg.amplitude
    if bg.texture == "noise":
        g = np.random.default_rng(bg.noise_seed).integers(-a, a + 1, size=(S, S), dtype=np.int16)
    else:
        idx = np.arange(S)
        p = max(1, bg.period)
        if bg.texture == "checker":
            band = ((idx[:, None] // p) + (idx[None, :] // p)) % 2
        elif bg.orientation == "horizontal":
            band = np.broadcast_to(((idx // p) % 2)[:, None], (S, S))
        elif bg.orientation == "vertical":
            band = np.broadcast_to(((idx // p) % 2)[None, :], (S, S))
        else:  # diagonal
            band = ((idx[:, None] + idx[None, :]) // p) % 2
        g = (band.astype(np.int16) * 2 - 1) * a
    arr = np.asarray(bg.rgb, dtype=np.int16)[None, None, :] + g[:, :, None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _rot(points, cx, cy, angle_deg):
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def shape_polygon(shape: Shape) -> list[tuple[float, float]] | None:
    """Polygon vertices (pixels) of a shape; None for circles."""
    r = float(shape.radius)
    if shape.kind == "circle":
        return None
    if shape.kind == "square":
        h = r / math.sqrt(2.0)
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape.kind == "triangle":  # equilateral, pointing up, centroid at the centre
        pts = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    elif shape.kind == "star":  # five points
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else 0.45 * r
            a = math.radians(-90 + 36 * i)
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    elif shape.kind == "cross":  # plus sign, arms reach the bounding circle
        w = 0.3 * r  # half arm width
        L = math.sqrt(r * r - w * w)
        pts = [(-w, -L), (w, -L), (w, -w), (L, -w), (L, w), (w, w),
               (w, L), (-w, L), (-w, w), (-L, w), (-L, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")
    return _rot(pts, shape.cx, shape.cy, shape.angle)


def render(scene: Scene) -> Image.Image:
    """The RGB image of a scene (flat colours, no anti-aliasing)."""
    S = scene.image_size
    img = _background_image(scene.background, S)
    draw = ImageDraw.Draw(img)
    for sh in scene.shapes:
        fill = COLORS[sh.color]
        if sh.kind == "circle":
            r = sh.radius
            draw.ellipse((sh.cx - r, sh.cy - r, sh.cx + r, sh.cy + r), fill=fill)
        else:
            draw.polygon(shape_polygon(sh), fill=fill)
    return img


# --------------------------------------------------------------------------- questions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _side(v: int, S: int, neg: str, pos: str) -> str | None:
    if v < _SIDE_BAND * S:
        return neg
    if v > (1.0 - _SIDE_BAND) * S:
        return pos
    return None


def _color_q(scene, rng):
    unique = [s for s in scene.shapes if sum(o.kind == s.kind for o in scene.shapes) == 1]
    if not unique:
        return None
    s = unique[int(rng.integers(len(unique)))]
    return f"What color is the {s.kind}?", s.color


def _count_q(scene, rng):
    present = sorted({s.kind for s in scene.shapes}, key=KINDS.index)
    absent = [k for k in KINDS if k not in present]
    if absent and rng.random() < 0.2:  # zero counts now and then
        kind = absent[int(rng.integers(len(absent)))]
    else:
        kind = present[int(rng.integers(len(present)))]
    n = sum(s.kind == kind for s in scene.shapes)
    return f"How many {PLURALS[kind]} are there?", str(n)


def _position_q(scene, rng):
    S = scene.image_size
    options = []
    for s in scene.shapes:
        if sum(o.kind == s.kind for o in scene.shapes) != 1:
            continue
        lr = _side(s.cx, S, "left", "right")
        if lr:
            options.append((f"Is the {s.kind} on the left or the right?", lr))
        tb = _side(s.cy, S, "top", "bottom")
        if tb:
            options.append((f"Is the {s.kind} at the top or the bottom?", tb))
    if not options:
        return None
    return options[int(rng.integers(len(options)))]


def _presence_q(scene, rng):
    present = {(s.color, s.kind) for s in scene.shapes}
    if rng.random() < 0.5:
        color, kind = sorted(present)[int(rng.integers(len(present)))]
        ans = "yes"
    else:
        # Mostly near misses: a present kind in another colour, or a present
        # colour on another kind; otherwise any absent combination.
        u = rng.random()
        if u < 0.4:
            pool = [(c, s.kind) for s in scene.shapes for c in COLORS if (c, s.kind) not in present]
        elif u < 0.8:
            pool = [(s.color, k) for s in scene.shapes for k in KINDS if (s.color, k) not in present]
        else:
            pool = []
        if not pool:
            pool = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
        pool = sorted(set(pool))
        color, kind = pool[int(rng.integers(len(pool)))]
        ans = "no"
    return f"Is there {_article(color)} {color} {kind}?", ans


_MAKERS = {"color": _color_q, "count": _count_q, "position": _position_q, "presence": _presence_q}

# About a quarter of scenes have no kind that occurs exactly once (or no such
# shape clearly on one side), so colour / position questions cannot always be
# asked.  Weighting them up where they can be asked makes the four types about
# equally frequent over many seeds (checked in tests/test_shapes.py).
QTYPE_WEIGHTS = {"color": 1.9, "count": 1.0, "position": 2.2, "presence": 1.0}


def _supported(scene: Scene, qtype: str) -> bool:
    if qtype in ("count", "presence"):
        return True
    kinds = [s.kind for s in scene.shapes]
    unique = [s for s in scene.shapes if kinds.count(s.kind) == 1]
    if qtype == "color":
        return bool(unique)
    S = scene.image_size
    return any(_side(s.cx, S, "l", "r") or _side(s.cy, S, "t", "b") for s in unique)


def make_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, answer, qtype) about ``scene``, drawn with ``rng``.

    The type is drawn among the types the scene supports (a colour or position
    question needs a kind that occurs exactly once, and for position that shape
    must be clearly on one side), weighted by QTYPE_WEIGHTS.
    """
    if not scene.shapes:
        raise ValueError("ShapesVQA: cannot ask about an empty scene")
    types = [t for t in QTYPES if _supported(scene, t)]
    w = np.array([QTYPE_WEIGHTS[t] for t in types], dtype=float)
    qtype = types[int(rng.choice(len(types), p=w / w.sum()))]
    question, answer = _MAKERS[qtype](scene, rng)
    return question, answer, qtype


# --------------------------------------------------------------------------- answer checker

_SINGULAR = {**{k: k for k in KINDS}, **{p: k for k, p in PLURALS.items()}}

_Q_COLOR = re.compile(r"what colou?r is the (\w+)\??")
_Q_COUNT = re.compile(r"how many (\w+)(?: are there)?\??")
_Q_LR = re.compile(r"is the (\w+) on the left or (?:on )?the right\??")
_Q_TB = re.compile(r"is the (\w+) at the top or (?:at )?the bottom\??")
_Q_PRESENT = re.compile(r"is there an? (\w+) (\w+)\??")


def answer_scene(scene: Scene, question: str) -> str:
    """Re-derive the answer to ``question`` from the scene description alone.

    Parses the question text (independently of make_question) and raises
    ValueError for a question it cannot parse or that is ambiguous for this
    scene (several shapes of the kind asked about, or one in the middle band).
    """
    q = " ".join(question.strip().lower().split())
    shapes = scene.shapes
    S = float(scene.image_size)

    def kind_of(word: str) -> str:
        if word not in _SINGULAR:
            raise ValueError(f"unknown shape {word!r} in {question!r}")
        return _SINGULAR[word]

    def the_one(word: str) -> Shape:
        kind = kind_of(word)
        hits = [s for s in shapes if s.kind == kind]
        if len(hits) != 1:
            raise ValueError(f"{question!r} is ambiguous: {len(hits)} {kind} shapes")
        return hits[0]

    if m := _Q_COLOR.fullmatch(q):
        return the_one(m.group(1)).color
    if m := _Q_COUNT.fullmatch(q):
        kind = kind_of(m.group(1))
        return str(len([s for s in shapes if s.kind == kind]))
    for rx, coord, lo_word, hi_word in ((_Q_LR, "cx", "left", "right"), (_Q_TB, "cy", "top", "bottom")):
        if m := rx.fullmatch(q):
            t = getattr(the_one(m.group(1)), coord) / S - 0.5  # -0.5 .. 0.5
            if abs(t) <= 0.1:
                raise ValueError(f"{question!r} is ambiguous: the shape is in the middle")
            return lo_word if t < 0 else hi_word
    if m := _Q_PRESENT.fullmatch(q):
        color, kind = m.group(1), kind_of(m.group(2))
        if color not in COLORS:
            raise ValueError(f"unknown colour {color!r} in {question!r}")
        return "yes" if any(s.color == color and s.kind == kind for s in shapes) else "no"
    raise ValueError(f"not a ShapesVQA question: {question!r}")


# --------------------------------------------------------------------------- samples & splits


def sample(seed: int, image_size: int = 256, layout: str = "free") -> Sample:
    """One ShapesVQA sample: image, question (prompt), answer. ``meta["layout"]`` only for a layout other than "free"."""
    scene = make_scene(seed, image_size, layout)
    question, answer, qtype = make_question(scene, np.random.default_rng([int(seed), 1]))
    meta = {"qtype": qtype, "scene": scene.to_dict(), **({"layout": layout} if layout != "free" else {})}
    return Sample(images=[render(scene)], prompt=question, answer=answer, source=f"shapesvqa:{int(seed)}", meta=meta)


def split_seeds(split: str, n: int, start: int = 0) -> range:
    """Seeds ``start .. start+n`` of a split."""
    if split not in SPLITS:
        raise CalibrationDataError(f"unknown ShapesVQA split {split!r}; expected one of {sorted(SPLITS)}")
    seeds = SPLITS[split]
    n, start = int(n), int(start)
    if n < 0 or start < 0 or start + n > len(seeds):
        raise CalibrationDataError(
            f"ShapesVQA split {split!r} has {len(seeds)} samples; cannot take {n} from index {start}")
    return seeds[start:start + n]


def make_split(split: str, n: int, image_size: int = 256, start: int = 0, layout: str = "free") -> list[Sample]:
    """``n`` samples of a split (``"train"``, ``"val"``, ``"test"``, ``"calib"``)."""
    return [sample(s, image_size, layout) for s in split_seeds(split, n, start)]


def iter_split(split: str, n: int, image_size: int = 256, start: int = 0, layout: str = "free"):
    """Like make_split, but yields the samples one at a time."""
    for s in split_seeds(split, n, start):
        yield sample(s, image_size, layout)


# --------------------------------------------------------------------------- command line


def save_split(out_dir: str | Path, split: str = "test", n: int = 4, start: int = 0) -> Path:
    """Write ``n`` samples of a split as PNG files plus ``data.jsonl`` ({image, prompt, answer, qtype}): scenes
    to try `vlmq-export run` on (the testbed only knows ShapesVQA questions), or a `--calib` folder."""
    seeds = split_seeds(split, n, start)  # a bad range is refused before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in map(sample, seeds):
        name = s.source.replace(":", "-") + ".png"
        s.images[0].save(out_dir / name)
        lines.append(json.dumps({"image": name, "prompt": s.prompt, "answer": s.answer, "qtype": s.meta["qtype"]}))
    (out_dir / "data.jsonl").write_text("\n".join(lines) + "\n")
    return out_dir / "data.jsonl"


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vlmq_export.data.shapes", description=(
        "Write ShapesVQA scenes (PNG) and their questions and answers (data.jsonl) to a folder."))
    p.add_argument("out_dir")
    p.add_argument("--split", default="test", choices=sorted(SPLITS))
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--start", type=int, default=0)
    args = p.parse_args(argv)
    try:
        path = save_split(args.out_dir, args.split, args.n, args.start)
    except CalibrationDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        print(f"{path.parent / rec['image']}: {rec['prompt']} -> {rec['answer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
