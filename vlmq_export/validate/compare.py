"""Fidelity measurements: the same held-out prompts through two implementations, compared."""
from __future__ import annotations

import copy

import numpy as np
import torch

from ..models import Family, Prepared


def torch_generate(family: Family, model, prepared: Prepared, max_new_tokens: int, stop: bool = True,
                   logits: list | None = None) -> list[int]:
    """Greedy tokens from the HF model's own ``generate`` (the reference the runtime must match); ``logits``, a
    list, receives each step's logits [V] (numpy)."""
    from transformers import GenerationConfig

    stop_ids = list(family.stop_token_ids) if stop else None
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.eos_token_id = stop_ids
    try:
        gc = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False,
                              eos_token_id=stop_ids, pad_token_id=(stop_ids or [0])[0])
        with torch.no_grad():
            out = model.generate(**family.hf_inputs(prepared), generation_config=gc, output_logits=logits is not None,
                                 return_dict_in_generate=True)
    finally:
        model.generation_config = saved
    if logits is not None:
        logits.extend(step[0].float().cpu().numpy() for step in out.logits)
    tokens = out.sequences[0, prepared.seq_len:].tolist()
    if stop_ids:
        for i, t in enumerate(tokens):
            if t in stop_ids:
                return tokens[:i]
    return tokens


def torch_outputs(family: Family, model, prepared: list[Prepared], gen_tokens: int = 0, stop: bool = True) -> list[dict]:
    out = []
    with torch.no_grad():
        for p in prepared:
            rec = {"image_features": None, "logits": None, "tokens": None}
            if p.num_images:
                rec["image_features"] = family.image_features(model, p).float().cpu().numpy()
            rec["logits"] = model(**family.hf_inputs(p), use_cache=False).logits[0].float().cpu().numpy()
            if gen_tokens:
                rec["tokens"] = torch_generate(family, model, p, gen_tokens, stop)
            out.append(rec)
    return out


def onnx_outputs(vlm, prepared: list[Prepared], gen_tokens: int = 0, stop: bool = True) -> list[dict]:
    out = []
    for p in prepared:
        rec = {"image_features": None, "logits": None, "tokens": None}
        if p.num_images:
            rec["image_features"] = vlm.image_features(p)
        rec["logits"] = vlm.prompt_logits(p)
        if gen_tokens:
            rec["tokens"] = vlm.generate_prepared(p, max_new_tokens=gen_tokens, stop=stop).token_ids
        out.append(rec)
    return out


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-30)


def token_agreement(ref: list[int], test: list[int]) -> dict:
    n = max(len(ref), len(test), 1)
    same = sum(1 for a, b in zip(ref, test) if a == b)
    prefix = 0
    for a, b in zip(ref, test):
        if a != b:
            break
        prefix += 1
    return {"positions_equal": same / n, "common_prefix": prefix, "ref_len": len(ref), "test_len": len(test),
            "identical": ref == test}


def compare(ref: list[dict], test: list[dict]) -> dict:
    """Summary of ``test`` against ``ref`` over all samples (worst case for diffs, mean for agreement)."""
    img_diff, img_cos, log_diff, log_cos, top1, greedy, identical = [], [], [], [], [], [], []
    for r, t in zip(ref, test):
        if r["image_features"] is not None:
            img_diff.append(float(np.abs(r["image_features"] - t["image_features"]).max()))
            img_cos.append(float(_cos_rows(r["image_features"], t["image_features"]).mean()))
        log_diff.append(float(np.abs(r["logits"] - t["logits"]).max()))
        log_cos.append(float(_cos_rows(r["logits"], t["logits"]).mean()))
        top1.append(float((r["logits"].argmax(-1) == t["logits"].argmax(-1)).mean()))
        if r["tokens"] is not None and t["tokens"] is not None:
            agr = token_agreement(r["tokens"], t["tokens"])
            greedy.append(agr["positions_equal"])
            identical.append(agr["identical"])
    res = {
        "samples": len(ref),
        "logits_max_abs_diff": max(log_diff) if log_diff else None,
        "logits_cosine": float(np.mean(log_cos)) if log_cos else None,
        "top1_agreement": float(np.mean(top1)) if top1 else None,
    }
    if img_diff:
        res["image_features_max_abs_diff"] = max(img_diff)
        res["image_features_cosine"] = float(np.mean(img_cos))
    if greedy:
        res["greedy_token_agreement"] = float(np.mean(greedy))
        res["greedy_identical_samples"] = int(sum(identical))
    return res


def component_fidelity(float_vlm, quant_vlm, prepared: list[Prepared], components, max_abs: bool = False) -> dict:
    """Each quantized graph alone against its float graph, both fed the float upstream's outputs (cast to each
    graph's input type by its runner): cosine (mean, and min over prompts), top-1 agreement of the logits, and with
    ``max_abs`` the max abs diff.

    ``components``: the quantized ones, which get a row; ``None``: every graph (an FP16 export against its FP32
    twin, where each graph differs)."""
    res: dict[str, dict] = {}
    vis, proj, llm = [], [], []
    for p in prepared:
        if p.num_images:
            feeds = float_vlm.family.vision_feeds(p)
            f_feat = float_vlm.session("vision_encoder").run(["features"], feeds)[0]
            q_feat = quant_vlm.session("vision_encoder").run(["features"], feeds)[0]
            vis.append((_cos_rows(f_feat, q_feat).mean(), _max_abs(f_feat, q_feat)))
            f_emb = float_vlm.session("projector").run(["image_embeds"], {"features": f_feat})[0]
            q_emb = quant_vlm.session("projector").run(["image_embeds"], {"features": f_feat})[0]
            proj.append((_cos_rows(f_emb, q_emb).mean(), _max_abs(f_emb, q_emb)))
        emb, extra = float_vlm.prefill_inputs(p)
        mask = np.ones_like(p.input_ids)
        f_log, _ = float_vlm.llm(emb, mask, p.position_ids, float_vlm.empty_past(), extra)
        q_log, _ = quant_vlm.llm(emb, mask, p.position_ids, quant_vlm.empty_past(), extra)
        llm.append((_cos_rows(f_log[0], q_log[0]).mean(), _max_abs(f_log, q_log),
                    (f_log[0].argmax(-1) == q_log[0].argmax(-1)).mean()))
    wanted = (lambda c: True) if components is None else (lambda c: c in components)
    for comp, name, rows in (("vision", "features", vis), ("projector", "image_embeds", proj)):
        if wanted(comp) and rows:
            res[comp] = {f"{name}_cosine": float(np.mean([r[0] for r in rows])),
                         f"{name}_cosine_min": float(np.min([r[0] for r in rows])),
                         **({f"{name}_max_abs_diff": max(r[1] for r in rows)} if max_abs else {})}
    if (wanted("llm") or wanted("lm_head")) and llm:  # the llm graph holds the lm_head
        res["llm"] = {"logits_cosine": float(np.mean([r[0] for r in llm])),
                      **({"logits_max_abs_diff": max(r[1] for r in llm)} if max_abs else {}),
                      "top1_agreement": float(np.mean([r[2] for r in llm]))}
    return res


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())
