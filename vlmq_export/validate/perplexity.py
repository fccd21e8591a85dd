"""Language-model perplexity on a fixed English text (shipped as ``vlmq_export/assets/english.txt``)."""
from __future__ import annotations

import math
from importlib import resources

import numpy as np
import torch


def english_text() -> str:
    return resources.files("vlmq_export").joinpath("assets/english.txt").read_text(encoding="utf-8")


def text_ids(tokenizer, text: str | None = None, max_tokens: int = 1024) -> np.ndarray:
    ids = tokenizer(text or english_text(), add_special_tokens=False)["input_ids"][:max_tokens]
    return np.asarray(ids, dtype=np.int64)


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    logits = logits[:-1].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def perplexity_torch(model, ids: np.ndarray, window: int = 512) -> float:
    """exp(mean next-token NLL) of a causal LM (or a VLM called with text only), non-overlapping windows."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window]
            if len(chunk) < 2:
                break
            logits = model(input_ids=torch.from_numpy(chunk)[None], use_cache=False).logits[0].float().numpy()
            nll += _nll(logits, chunk) * (len(chunk) - 1)
            count += len(chunk) - 1
    return math.exp(nll / count)


def perplexity_onnx(vlm, ids: np.ndarray, window: int = 512) -> float:
    """The same through an exported OUT's embed_tokens.onnx + llm.onnx (``OnnxVLM``)."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        x = chunk[None]
        emb = vlm.session("embed_tokens").run(["inputs_embeds"], {"input_ids": x})[0]
        pos = np.arange(len(chunk), dtype=np.int64)[None]
        if vlm.family.mrope:
            pos = np.broadcast_to(pos, (3, 1, len(chunk))).copy()
        logits, _ = vlm.llm(emb, np.ones_like(x), pos, vlm.empty_past())
        nll += _nll(logits[0], chunk) * (len(chunk) - 1)
        count += len(chunk) - 1
    return math.exp(nll / count)
