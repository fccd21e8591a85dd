"""Task accuracy on ShapesVQA: greedy exact match, overall and per question type.

Evaluation (any family, any exported OUT, so it also runs on the tiny random models)::

    evaluate_torch(family, model, n=200, split="test", ...) -> dict
    evaluate_torch_teacher_forced(family, model, n=200, ...) -> dict   (token-exact, one batched forward per sample)
    evaluate_onnx(out_dir, n=200, split="test", accuracy_level=4, ...) -> dict

Both generate greedily on ShapesVQA samples and score normalised exact match (strip, lowercase, strip
trailing punctuation), overall and per question type, each with its 95 % Wilson score interval
(:func:`wilson_interval`; at 1000 samples and accuracy 0.5 it is about +-0.031, per question type of ~250 samples
about +-0.06). The result dict::

    {"accuracy": float, "overall": float (= accuracy), "ci95": [low, high],
     "per_qtype": {qtype: float}, "per_qtype_ci95": {qtype: [low, high]}, "n": int, "n_per_qtype": {qtype: int},
     "correct": int, "correct_per_qtype": {qtype: int}, "interval": "wilson 95%",
     "split": str, "backend": "torch" | "onnxruntime", "seconds": float,
     "mistakes": [{"source", "qtype", "question", "answer", "prediction"}, ...]  (at most 20),
     "outcomes": "0110..."  (one character per sample, in order: 1 right, 0 wrong)}

Two evaluations on the same samples compare sample by sample: :func:`paired_difference` gives the difference of
their accuracies with a paired bootstrap interval (much narrower than two Wilson intervals side by side, since most
samples are answered alike).
"""
from __future__ import annotations

import math
import time
from typing import Callable

_PUNCT = ".,;:!?\"'`)( \t\n"

ProgressFn = Callable[[int, int, dict], None]  # (done, total, running result) after each sample
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``correct / n`` (95 % by default).

    Unlike the normal approximation it stays inside [0, 1] and is honest at 0 or n successes. ``n == 0``:
    ``(nan, nan)``.
    """
    if not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got {correct} of {n}")
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # exactly 0 / 1 at the edges (rounding would leave 1 - 1e-16, below an accuracy of 1.0)
    return (0.0 if correct == 0 else max(0.0, min(p, centre - half)),
            1.0 if correct == n else min(1.0, max(p, centre + half)))


def paired_difference(outcomes: str, baseline: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """Accuracy of ``outcomes`` minus that of ``baseline`` (both :class:`_Scorer` ``outcomes`` strings over the same
    samples in the same order) with a 95 % paired bootstrap interval: samples drawn with replacement, the same draw
    for both, ``n_boot`` times (percentile interval). Also the discordant counts (only ``outcomes`` right / only
    ``baseline`` right), which are all the difference is made of."""
    import numpy as np

    if len(outcomes) != len(baseline) or not outcomes:
        raise ValueError(f"paired outcomes need the same non-zero length, got {len(outcomes)} and {len(baseline)}")
    a = np.frombuffer(outcomes.encode(), dtype=np.uint8) - ord("0")
    b = np.frombuffer(baseline.encode(), dtype=np.uint8) - ord("0")
    d = a.astype(np.int64) - b
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "n": int(len(d)),
            "only_this": int((d > 0).sum()), "only_baseline": int((d < 0).sum()), "interval": "paired bootstrap 95%"}


def normalize_answer(text: str) -> str:
    """Strip, lowercase, strip trailing punctuation (and surrounding quotes / brackets)."""
    t = (text or "").strip().lower()
    return t.strip(_PUNCT)


def eval_samples(n: int = 200, split: str = "test", image_size: int = 256, start: int = 0,
                 layout: str = "free") -> list:
    """The first ``n`` ShapesVQA samples of ``split`` (deterministic), in ``layout`` (the testbed's ``data.layout``)."""
    from ..data.shapes import make_split

    return make_split(split, n, image_size, start=start, layout=layout)


class _Scorer:
    def __init__(self, split: str, backend: str):
        self.split, self.backend = split, backend
        self.per: dict[str, list[int]] = {}
        self.outcomes: list[str] = []
        self.mistakes: list[dict] = []
        self.t0 = time.perf_counter()

    def add(self, s, prediction: str) -> None:
        qtype = (s.meta or {}).get("qtype", "unknown")
        ok = normalize_answer(prediction) == normalize_answer(s.answer)
        self.per.setdefault(qtype, []).append(int(ok))
        self.outcomes.append("1" if ok else "0")
        if not ok and len(self.mistakes) < 20:
            self.mistakes.append({"source": s.source, "qtype": qtype, "question": s.prompt, "answer": s.answer,
                                  "prediction": prediction})

    def result(self) -> dict:
        allv = [v for vs in self.per.values() for v in vs]
        n, correct = len(allv), sum(allv)
        acc = correct / n if n else float("nan")
        per = sorted(self.per.items())
        return {
            "accuracy": acc,
            "overall": acc,  # alias
            "ci95": list(wilson_interval(correct, n)),
            "per_qtype": {k: sum(v) / len(v) for k, v in per},
            "per_qtype_ci95": {k: list(wilson_interval(sum(v), len(v))) for k, v in per},
            "n": n,
            "n_per_qtype": {k: len(v) for k, v in per},
            "correct": correct,
            "correct_per_qtype": {k: sum(v) for k, v in per},
            "interval": "wilson 95%",
            "split": self.split,
            "backend": self.backend,
            "seconds": round(time.perf_counter() - self.t0, 2),
            "mistakes": list(self.mistakes),
            "outcomes": "".join(self.outcomes),
        }


def evaluate_torch(family, model, n: int = 200, split: str = "test", *, max_new_tokens: int = 6,
                   image_size: int = 256, layout: str = "free", samples: list | None = None,
                   progress: ProgressFn | None = None) -> dict:
    """Greedy exact-match accuracy of a torch model (``family.load_model``) on ShapesVQA ``split``.

    ``samples`` overrides the split (any objects with ``images``, ``prompt``, ``answer``, ``meta['qtype']``).
    """
    import torch

    samples = samples if samples is not None else eval_samples(n, split, image_size, layout=layout)
    sc = _Scorer(split, "torch")
    stop = list(family.stop_token_ids)
    pad = family.tokenizer.pad_token_id
    pad = stop[0] if pad is None else pad
    model.eval()
    for i, s in enumerate(samples):
        prepared = family.prepare(s.images, s.prompt)
        inputs = family.hf_inputs(prepared)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                 pad_token_id=pad)
        new = out[0, prepared.seq_len:].tolist()
        new = new[:next((j for j, t in enumerate(new) if t in stop), len(new))]
        sc.add(s, family.tokenizer.decode(new, skip_special_tokens=True))
        if progress is not None:
            progress(i + 1, len(samples), sc.result())
    return sc.result()


def evaluate_torch_teacher_forced(family, model, n: int = 200, split: str = "test", *, image_size: int = 256,
                                  layout: str = "free", samples: list | None = None, batch_size: int = 8,
                                  progress: ProgressFn | None = None) -> dict:
    """:func:`evaluate_torch`'s result from one forward pass per sample, batched: a sample is right when every
    answer token (and the closing one) is the arg-max given the reference answer before it, which is exactly "greedy
    decoding reproduces the reference tokens and stops". Token for token, so it never counts right what greedy
    generation gets wrong; an answer greedy generation spells differently but normalises equal (``Red`` for ``red``)
    counts wrong here. Any stop token closes the answer (SmolVLM's ``<end_of_utterance>`` and ``<|im_end|>`` rows of
    the tied head are equal). Faster than generating (no decode loop, batched matmuls; 1.7x on the testbed at batch
    8): what sweeps over many quantized models use. ``backend`` reads "torch (teacher-forced)"."""
    import numpy as np
    import torch

    samples = samples if samples is not None else eval_samples(n, split, image_size, layout=layout)
    sc = _Scorer(split, "torch (teacher-forced)")
    stop = torch.tensor(sorted(family.stop_token_ids))
    pad = family.tokenizer.pad_token_id
    pad = int(stop[0]) if pad is None else pad
    model.eval()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        preps = [family.prepare(s.images, s.prompt, s.answer) for s in chunk]
        inputs = [family.hf_inputs(p) for p in preps]
        lens = [int(x["input_ids"].shape[1]) for x in inputs]
        L = max(lens)
        batch = {}
        for key in inputs[0]:
            if all(x[key].dim() >= 2 and x[key].shape[:2] == (1, n) for x, n in zip(inputs, lens)):
                # per-token tensors (input_ids, attention_mask, Qwen2-VL's mm_token_type_ids): right-padded
                fill = pad if key == "input_ids" else 0
                batch[key] = torch.cat([torch.nn.functional.pad(x[key], (0, 0) * (x[key].dim() - 2) + (0, L - n),
                                                                value=fill) for x, n in zip(inputs, lens)])
            else:  # pixels and image grids: the family's own batching is along the first axis
                batch[key] = torch.cat([x[key] for x in inputs], dim=0)
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits
        for j, (s, p, n_tok) in enumerate(zip(chunk, preps, lens)):
            ids = batch["input_ids"][j, :n_tok]
            pos = np.arange(n_tok - p.answer_len, n_tok)
            pred = logits[j, pos - 1].argmax(-1)
            want = ids[pos]
            ok = (pred == want) | (torch.isin(want, stop) & torch.isin(pred, stop))
            if bool(ok.all()):
                sc.add(s, s.answer)
            else:  # the arg-max tokens (each after the reference prefix), marked so they never score right
                said = family.tokenizer.decode(pred[~torch.isin(pred, stop)].tolist(), skip_special_tokens=True)
                sc.add(s, f"{said} [teacher-forced arg-max, not the reference tokens]")
            if progress is not None:
                progress(start + j + 1, len(samples), sc.result())
    return sc.result()


def evaluate_onnx(out_dir: str | Path, n: int = 200, split: str = "test", accuracy_level: int | None = None, *,
                  max_new_tokens: int = 6, image_size: int = 256, layout: str = "free", samples: list | None = None,
                  progress: ProgressFn | None = None, vlm=None) -> dict:
    """Greedy exact-match accuracy of an exported OUT in ONNX Runtime on ShapesVQA ``split``.

    ``accuracy_level``: the ``MatMulNBits`` compute level (default: the runtime's,
    :data:`~vlmq_export.runtime.session.DEFAULT_ACCURACY_LEVEL`). ``vlm``: an already open
    :class:`~vlmq_export.runtime.generate.OnnxVLM` (reuses its sessions and its level).
    """
    from ..runtime.generate import OnnxVLM
    from ..runtime.session import DEFAULT_ACCURACY_LEVEL

    if vlm is None:
        vlm = OnnxVLM(out_dir, accuracy_level=DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level)
    elif accuracy_level is not None and accuracy_level != vlm.accuracy_level:
        raise ValueError(f"accuracy_level {accuracy_level} differs from the open session's {vlm.accuracy_level}")
    samples = samples if samples is not None else eval_samples(n, split, image_size, layout=layout)
    sc = _Scorer(split, "onnxruntime")
    for i, s in enumerate(samples):
        res = vlm.generate_prepared(vlm.family.prepare(s.images, s.prompt), max_new_tokens=max_new_tokens)
        sc.add(s, res.text)
        if progress is not None:
            progress(i + 1, len(samples), sc.result())
    out = sc.result()
    out["accuracy_level"] = vlm.accuracy_level
    return out


def format_interval(ci) -> str:
    """``[0.50, 0.56]``, or ``""`` for a result without an interval (older reports)."""
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def format_accuracy(res: dict) -> str:
    """One line: ``acc 0.950 [0.91, 0.97] (190/200) | color 0.96 [0.88, 0.99] count 0.90 [...] ...`` (95 % Wilson)."""
    cis = res.get("per_qtype_ci95", {})
    per = " ".join(f"{k} {v:.2f} {format_interval(cis.get(k))}".rstrip() for k, v in res["per_qtype"].items())
    return f"acc {res['accuracy']:.3f} {format_interval(res.get('ci95'))} ({res['correct']}/{res['n']}) | {per}"
