"""Language-model perplexity on a named English text shipped in ``vlmq_export/assets``, with a 95 % interval.

``english``: ``english.txt``, 810 SmolLM2 tokens written for the project. ``heldout``: ``heldout_english.txt``,
27k tokens of US State of the Union addresses (public domain, see ``assets/HELDOUT.md``) that no calibration,
benchmark or default was ever tuned on.

The text is scored in fixed non-overlapping windows (512 tokens): each window is one forward pass from scratch,
its first token is context only. Perplexity = exp(sum of next-token NLLs / tokens scored). Its interval is a
per-window bootstrap: resample the windows with replacement (``BOOTSTRAP_RESAMPLES`` times, fixed seed) and take
the 2.5th and 97.5th percentiles of the resamples' perplexities.
"""
from __future__ import annotations

import math
from importlib import resources

import numpy as np

from ..models.base import Prepared

TEXTS = {"english": "assets/english.txt", "heldout": "assets/heldout_english.txt"}
WINDOW = 512
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# The export's report scores the held-out text's first 8 windows (4,088 tokens), `eval` all 53: on the quickstart
# testbed a 512-token window costs 2.8 CPU-seconds in ONNX Runtime (INT4) and 1.75 in torch (float), so the
# report's 2 + 8 windows in each add about 45 CPU-seconds (about 25 s on 2 cores) to the export, where the whole
# text would add about 250 (2 min).
REPORT_HELDOUT_WINDOWS = 8


def named_text(name: str) -> str:
    return resources.files("vlmq_export").joinpath(TEXTS[name]).read_text(encoding="utf-8")


def english_text() -> str:
    return named_text("english")


def text_ids(tokenizer, text: str | None = None, max_tokens: int | None = 1024) -> np.ndarray:
    text = text or english_text()
    try:  # transformers' tokenizers would warn that the text is longer than the model's context: it is windowed
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    except TypeError:  # the torch-free tokenizer (models/processing.py) takes no `verbose` and does not warn
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token NLL of ``ids[1:]``. exp in float32 (float16 logits are widened), sums in float64: 4x
    faster than all-float64 over a 49k vocabulary, the same to ~1e-9."""
    logits = logits[:-1].astype(np.promote_types(logits.dtype, np.float32), copy=False)
    peak = logits.max(-1)
    lse = np.log(np.exp(logits - peak[:, None]).sum(-1, dtype=np.float64)) + peak
    return float((lse - logits[np.arange(len(ids) - 1), ids[1:]]).mean())


def torch_logits(model):
    """A causal LM (or a VLM called with text only) as ``chunk -> logits``."""
    import torch

    def run(chunk: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(chunk)[None], use_cache=False).logits[0].float().numpy()
    return run


def onnx_logits(vlm):
    """An exported OUT's embed_tokens.onnx + llm.onnx (``OnnxVLM``) as ``chunk -> logits``."""

    def run(chunk: np.ndarray) -> np.ndarray:
        x = chunk[None]
        emb = vlm.session("embed_tokens").run(["inputs_embeds"], {"input_ids": x})[0]
        pos = np.arange(len(chunk), dtype=np.int64)[None]
        if vlm.family.mrope:
            pos = np.broadcast_to(pos, (3, 1, len(chunk))).copy()
        text = Prepared(input_ids=x, image_mask=np.zeros(x.shape, bool), position_ids=pos)
        return vlm.llm(emb, np.ones_like(x), pos, vlm.empty_past(), vlm.family.llm_prefill_feeds(text, None))[0][0]
    return run


def window_nlls(logits_of, ids: np.ndarray, window: int = WINDOW,
                max_windows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per window: the sum of next-token NLLs and the number of tokens scored (the first ``max_windows``)."""
    nll, count = [], []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2 or (max_windows is not None and len(nll) >= max_windows):
            break
        nll.append(_nll(logits_of(chunk), chunk) * (len(chunk) - 1))
        count.append(len(chunk) - 1)
    return np.asarray(nll, dtype=np.float64), np.asarray(count, dtype=np.int64)


def bootstrap_interval(nll: np.ndarray, count: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of exp(sum nll / sum tokens) over windows resampled with replacement."""
    nll, count = np.asarray(nll, dtype=np.float64), np.asarray(count, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(nll), size=(resamples, len(nll)))
    ppl = np.exp(nll[idx].sum(1) / count[idx].sum(1))
    lo, hi = np.percentile(ppl, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def summarize(nll: np.ndarray, count: np.ndarray, text: str | None = None) -> dict:
    """``{"perplexity", "ci95", "windows", "tokens"}`` (and the text's name) from per-window NLLs."""
    res = {"text": text} if text else {}
    return {**res, "perplexity": math.exp(float(nll.sum()) / int(count.sum())),
            "ci95": list(bootstrap_interval(nll, count)), "windows": len(nll), "tokens": int(count.sum())}


def text_perplexity(logits_of, tokenizer, text: str = "heldout", max_windows: int | None = None) -> dict:
    """Perplexity with its 95 % interval on a named text (``TEXTS``), the whole text unless ``max_windows``."""
    ids = text_ids(tokenizer, named_text(text), max_tokens=None)
    return summarize(*window_nlls(logits_of, ids, max_windows=max_windows), text=text)


def perplexities(logits_of, tokenizer, max_windows: int | None = None) -> dict:
    """Both texts: ``{"english": {...}, "heldout": {...}}``; ``max_windows`` bounds the held-out text only."""
    return {"english": text_perplexity(logits_of, tokenizer, "english"),
            "heldout": text_perplexity(logits_of, tokenizer, "heldout", max_windows)}


def perplexity_fields(logits_of, tokenizer, max_windows: int | None = None) -> dict:
    """What ``eval`` and the report record: ``perplexity`` (english.txt, the number it always was) and
    ``perplexity_texts`` (both texts with their intervals)."""
    texts = perplexities(logits_of, tokenizer, max_windows)
    return {"perplexity": texts["english"]["perplexity"], "perplexity_texts": texts}


def lm_perplexity(model, tokenizer, heldout: bool = False) -> dict:
    """A torch LM's perplexity fields for a benchmark row: ``perplexity`` on english.txt and, with ``heldout``,
    ``perplexity_texts`` (:func:`perplexity_fields`: both texts with their intervals)."""
    if heldout:
        return perplexity_fields(torch_logits(model), tokenizer)
    return {"perplexity": text_perplexity(torch_logits(model), tokenizer, "english")["perplexity"]}


def format_perplexity(p: dict, detail: bool = True) -> str:
    """``24.53 [23.10, 26.02] (53 windows, 27,010 tokens)`` (without the parenthesis unless ``detail``)."""
    lo, hi = p["ci95"]
    text = f"{p['perplexity']:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"{text} ({p['windows']} windows, {p['tokens']:,} tokens)" if detail else text


def perplexity_torch(model, ids: np.ndarray, window: int = WINDOW) -> float:
    """exp(mean next-token NLL) of a causal LM (or a VLM called with text only), non-overlapping windows."""
    nll, count = window_nlls(torch_logits(model), ids, window)
    return math.exp(nll.sum() / count.sum())


def perplexity_onnx(vlm, ids: np.ndarray, window: int = WINDOW) -> float:
    """The same through an exported OUT's embed_tokens.onnx + llm.onnx (``OnnxVLM``)."""
    nll, count = window_nlls(onnx_logits(vlm), ids, window)
    return math.exp(nll.sum() / count.sum())
