"""What a generation request may ask for: checks shared by ``run`` and ``serve`` (and the generation loop).

Every check raises :class:`LimitError` (a one-line CLI error with exit 2, an HTTP 400 in ``serve``) naming the
parameter, before any graph runs:

* the prompt must hold some text; images per request are capped (``--max-images``, default 8) and so are the
  pixels of each image, read from its header before it is decoded (``--max-image-pixels``, default 4096 x 4096);
* sampling parameters must be finite numbers in range (``RANGES``; ``top_k`` at most the vocabulary);
* the prompt's tokens (text and image tokens) must leave room in the model's context
  (``max_position_embeddings``) for at least one new token; ``max_new_tokens`` is then clamped to the room
  left, so a long prompt ends its answer early with finish reason ``length`` instead of failing.
"""
from __future__ import annotations

import math

from ..errors import VlmqError

DEFAULT_MAX_IMAGES = 8
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
SEED_MAX = 2**63 - 1

# name: (lo, hi) inclusive, None for no bound; top_k's upper bound is the vocabulary (see generation_ranges)
RANGES: dict[str, tuple] = {
    "max_new_tokens": (1, None),
    "temperature": (0.0, 2.0),
    "top_p": (1e-6, 1.0),  # 0 would leave no token to sample
    "top_k": (0, None),
    "seed": (0, SEED_MAX),
}


class LimitError(VlmqError):
    """A request outside what the model or the configured limits take; ``param`` names the parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_range(label: str, value, lo=None, hi=None, param: str | None = None):
    """``value`` if it is finite and within [lo, hi], else a LimitError naming ``label``."""
    if isinstance(value, float) and not math.isfinite(value):
        raise LimitError(f"{label} must be a finite number, got {value}", param)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise LimitError(f"{label} must be {bounds}, got {value}", param)
    return value


def generation_ranges(vocab_size: int | None = None, max_new_tokens: int | None = None) -> dict[str, tuple]:
    """RANGES with top_k bounded by the vocabulary and max_new_tokens by a server's limit."""
    return {**RANGES, "top_k": (0, vocab_size), "max_new_tokens": (1, max_new_tokens)}


def check_generation(values: dict, vocab_size: int | None = None, max_new_tokens: int | None = None,
                     label=lambda name: name) -> None:
    """Check each of ``values`` (names of RANGES: max_new_tokens, temperature, top_p, top_k, seed; None
    skipped) against its range; ``label`` turns a name into what the user wrote (a flag, a JSON key)."""
    ranges = generation_ranges(vocab_size, max_new_tokens)
    for name, value in values.items():
        if value is not None:
            check_range(label(name), value, *ranges[name], param=name)


def check_prompt(prompt, param: str | None = None) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise LimitError("the prompt is empty: give some text", param)
    return prompt


def check_image_count(n: int, max_images: int, param: str | None = None) -> None:
    if n > max_images:
        raise LimitError(f"{n} images, more than the limit of {max_images} per request", param)


def check_image_size(size: tuple[int, int], max_pixels: int, where: str, param: str | None = None) -> None:
    """Refuse an image whose header says it is over ``max_pixels`` (before its pixels are decoded)."""
    w, h = size
    if w * h > max_pixels:
        raise LimitError(f"{where}: image of {w}x{h} = {w * h} pixels is over the limit of {max_pixels}", param)


def context_length(family) -> int | None:
    """The model's context in tokens (``max_position_embeddings``; a family may set ``context_length``)."""
    n = getattr(family, "context_length", None) or getattr(family.text_config, "max_position_embeddings", None)
    return int(n) if n else None


def fit_to_context(prompt_tokens: int, max_new_tokens: int, context: int | None, param: str | None = None) -> int:
    """``max_new_tokens`` clamped to the context left after the prompt; a LimitError if the prompt leaves none."""
    if context is None:
        return max_new_tokens
    if prompt_tokens >= context:
        raise LimitError(f"the prompt is {prompt_tokens} tokens (text and image tokens), the model's context is "
                         f"{context}: no room for an answer; shorten the prompt or send fewer or smaller images", param)
    return min(max_new_tokens, context - prompt_tokens)
