"""Calibration / evaluation samples: image(s) + prompt + optional answer."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sample:
    images: list = field(default_factory=list)  # PIL.Image.Image, RGB
    prompt: str = ""
    answer: str | None = None
    source: str = ""  # where it came from (file name, generator seed), for messages
    meta: dict = field(default_factory=dict)  # e.g. ShapesVQA question type
