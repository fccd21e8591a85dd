"""Calibration and evaluation data: a folder of images + a JSONL of prompts, or the built-in sets.

JSONL, one sample per line::

    {"image": "cat.jpg", "prompt": "What is on the table?", "answer": "a cat"}
    {"images": ["a.png", "b.png"], "prompt": "Compare the two pictures."}
    {"prompt": "A text-only sample."}

Image paths are relative to the JSONL's folder. ``answer`` is optional. The built-in set needs no
network: ShapesVQA scenes (synthetic, with answers) plus real photos that ship inside installed
packages. There is no fallback to random tensors: no data is an error.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import CalibrationDataError
from ..runtime.limits import check_image_size
from .samples import Sample

BUILTIN = ("builtin", "builtin:shapes", "builtin:photos")
PHOTO_PROMPTS = ("Describe this image.", "What is the person wearing?", "What is in the picture?")


def open_image(path, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """Open an image fully (so corrupt files fail here, naming the file, or ``name`` for a file object).

    ``max_pixels``: refuse an image whose header gives more pixels, before its pixels are decoded (a small
    PNG can decode to gigabytes). Pillow's own decompression-bomb check (``Image.MAX_IMAGE_PIXELS``: a
    warning above it, ``DecompressionBombError`` above twice it) is turned into the same one-line refusal.
    """
    name = name or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if max_pixels is not None:
                    check_image_size(im.size, max_pixels, name)
                im.load()
                return im.convert("RGB")
    except FileNotFoundError:
        raise CalibrationDataError(f"image not found: {name}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CalibrationDataError(f"{name}: refused as a possible decompression bomb ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CalibrationDataError(f"corrupt or unreadable image: {name} ({type(exc).__name__})") from None


def builtin_photos() -> list[Sample]:
    """Real photographs shipped with matplotlib's sample data."""
    try:
        from matplotlib import cbook
    except ImportError:
        return []
    samples = []
    for i, name in enumerate(("grace_hopper.jpg",)):
        try:
            path = Path(cbook.get_sample_data(name, asfileobj=False))
        except (OSError, ValueError):
            continue
        if path.is_file():
            for j, prompt in enumerate(PHOTO_PROMPTS):
                samples.append(Sample([open_image(path)], prompt, None, f"photo:{name}#{j}"))
    return samples


def builtin_samples(n: int, split: str = "calib", which: str = "builtin", image_size: int = 256,
                    layout: str = "free") -> list[Sample]:
    """``n`` built-in samples: matplotlib's photographs and/or ShapesVQA scenes of ``split`` in ``layout`` (the one
    the model was trained on, for a testbed: ``testbed.testbed_layout``)."""
    from .shapes import make_split

    out: list[Sample] = []
    if which in ("builtin", "builtin:photos"):
        out += builtin_photos()
    if which in ("builtin", "builtin:shapes"):
        out += make_split(split, max(n - len(out), 0) if which == "builtin" else n, image_size=image_size,
                          layout=layout)
    return out[:n]


def load_jsonl(path: Path, limit: int | None = None) -> list[Sample]:
    root = path.parent
    samples: list[Sample] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise CalibrationDataError(f"{path}:{lineno}: not valid JSON") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                raise CalibrationDataError(f"{path}:{lineno}: each line needs a non-empty \"prompt\"")
            names = rec.get("images", [])
            if "image" in rec:
                names = [rec["image"], *names]
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise CalibrationDataError(f"{path}:{lineno}: \"images\" must be a list of file names")
            images = [open_image(root / n) for n in names]
            answer = rec.get("answer")
            samples.append(Sample(images, rec["prompt"], answer if isinstance(answer, str) else None,
                                  f"{path.name}:{lineno}"))
            if limit and len(samples) >= limit:
                break
    return samples


def load_samples(spec: str | Path | None, limit: int | None = None, split: str = "calib",
                 layout: str = "free") -> list[Sample]:
    """Samples from a JSONL file, a folder holding one JSONL, or a built-in set name (its ShapesVQA scenes in
    ``layout``)."""
    if spec is None or str(spec) in BUILTIN:
        samples = builtin_samples(limit or 16, split=split, which=str(spec or "builtin"), layout=layout)
    else:
        path = Path(spec)
        if path.is_dir():
            files = sorted(path.glob("*.jsonl"))
            if not files:
                raise CalibrationDataError(f"{path}: no .jsonl file of prompts in this folder")
            if len(files) > 1:
                raise CalibrationDataError(f"{path}: several .jsonl files ({', '.join(f.name for f in files)}); pass one")
            path = files[0]
        elif not path.is_file():
            raise CalibrationDataError(f"calibration data not found: {path}")
        samples = load_jsonl(path, limit)
    if not samples:
        raise CalibrationDataError(f"calibration set {spec} is empty: nothing to calibrate on")
    return samples
