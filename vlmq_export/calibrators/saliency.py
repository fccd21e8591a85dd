"""VLMQ's token saliency factors from one backward pass per sample (../shared/notes/vlmq-algorithm.md).

For each calibration sample the full-precision model runs forward and backward once, parameters
frozen (only activation gradients), with next-token cross-entropy on the answer tokens. Hooks on
every decoder block output, every vision block output and the projector output keep the per-token
norm of ∂L/∂y. Those norms, normalised and floored, are the per-token weights g_i of
H = 2·Σ g_i x_i x_iᵀ for the layers of that block.

Sites are named ``llm.<i>``, ``vision.<i>``, ``projector`` (block outputs) and, with
``site="linear"``, ``llm.<i>.<module path>`` for every Linear output as well.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..models import Family, Prepared

NORMS = ("l2", "l1", "linf")
SCOPES = ("sample", "layer")
SITES = ("block", "linear")


@dataclass
class SaliencyConfig:
    norm: str = "l2"  # per-token norm of the output gradient
    scope: str = "sample"  # normalise to mean 1 per sample (and site), or over all samples of a site
    floor: float = 0.01  # after normalisation, g = max(g, floor): no token is dropped entirely
    exponent: float = 1.0  # g = ‖∂L/∂y‖^exponent before normalising
    site: str = "block"  # gradient at the block output, or at each Linear's own output
    checkpointing: bool = False  # gradient checkpointing to bound activation memory

    def __post_init__(self):
        for name, allowed in (("norm", NORMS), ("scope", SCOPES), ("site", SITES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"saliency {name} must be one of {', '.join(allowed)}")
        if self.floor < 0 or self.exponent <= 0:
            raise ValueError("saliency floor must be >= 0 and exponent > 0")


@dataclass
class Saliency:
    """Raw per-token gradient norms per sample and site, plus the token modality of LLM positions."""

    raw: list[dict[str, torch.Tensor]]  # sample -> site -> norms shaped like the site output's leading dims
    modality: list[np.ndarray]  # sample -> [S] array of "vision" / "text" / "other"
    config: SaliencyConfig = field(default_factory=SaliencyConfig)
    losses: list[float] = field(default_factory=list)

    def weights(self, site: str, sample: int) -> torch.Tensor | None:
        """Normalised, floored factors g for one sample at one site (None if the site never saw it)."""
        g = self.raw[sample].get(site)
        if g is None:
            return None
        g = g.double() ** self.config.exponent
        if self.config.scope == "sample":
            mean = g.mean()
        else:
            mean = self._site_mean(site)
        g = g / mean if mean > 0 else torch.ones_like(g)
        return g.clamp_min(self.config.floor).float()

    def _site_mean(self, site: str) -> torch.Tensor:
        vals = [r[site].double().reshape(-1) ** self.config.exponent for r in self.raw if site in r]
        return torch.cat(vals).mean()

    def sites(self) -> list[str]:
        """Site names in model order (vision blocks, projector, decoder blocks)."""
        seen: set[str] = set()
        for r in self.raw:
            seen.update(r)
        kind = {"vision": 0, "projector": 1, "llm": 2}

        def key(site: str):
            parts = site.split(".")
            return (kind.get(parts[0], 3), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1, site)
        return sorted(seen, key=key)

    def save(self, path) -> None:
        from safetensors.torch import save_file

        tensors = {f"sample{i}/{site}": g.contiguous().float() for i, r in enumerate(self.raw) for site, g in r.items()}
        meta = {k: str(v) for k, v in self.config.__dict__.items()}
        save_file(tensors, str(path), metadata=meta)
        # safetensors creates the file owner-only (0600); give it the mode every other output file has
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)

    def summary(self) -> dict:
        """Mean raw norm and mean factor per modality, per LLM block; the vision share of total weight."""
        out = {}
        for site in self.sites():
            if not site.startswith("llm.") or site.count(".") != 1:
                continue
            raw = {m: [] for m in ("vision", "text", "other")}
            fac = {m: [] for m in ("vision", "text", "other")}
            for i, r in enumerate(self.raw):
                if site not in r:
                    continue
                g_raw = r[site].reshape(-1).double().numpy()
                g = self.weights(site, i).reshape(-1).double().numpy()
                mod = self.modality[i]
                for m in raw:
                    sel = mod == m
                    raw[m] += g_raw[sel].tolist()
                    fac[m] += g[sel].tolist()
            total = sum(sum(v) for v in fac.values())
            out[site] = {
                **{f"{m}_tokens": len(raw[m]) for m in raw},
                **{f"{m}_mean_grad": float(np.mean(raw[m])) if raw[m] else None for m in raw},
                **{f"{m}_mean_factor": float(np.mean(fac[m])) if fac[m] else None for m in fac},
                "vision_weight_share": float(sum(fac["vision"]) / total) if total else None,
                "vision_token_share": len(raw["vision"]) / max(sum(len(v) for v in raw.values()), 1),
            }
        return out


def token_modality(family: Family, prepared: Prepared) -> np.ndarray:
    ids = prepared.input_ids[0]
    special = set(family.tokenizer.all_special_ids)
    mod = np.where(np.isin(ids, list(special)), "other", "text").astype(object)
    mod[prepared.image_mask[0]] = "vision"
    return mod


def _norm(grad: torch.Tensor, kind: str) -> torch.Tensor:
    g = grad.detach().float()
    if kind == "l2":
        return g.norm(dim=-1)
    if kind == "l1":
        return g.abs().sum(-1)
    return g.abs().amax(-1)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def compute_saliency(family: Family, model: nn.Module, prepared: list[Prepared],
                     config: SaliencyConfig | None = None, progress=None, device=None) -> Saliency:
    """One forward + backward per sample (batch 1); ``prepared`` must carry answers (answer_len > 0),
    else the loss falls back to next-token prediction over the whole prompt."""
    cfg = config or SaliencyConfig()
    say = progress or (lambda _m: None)
    llm_blocks = family.decoder_layers(model)
    vision_blocks = family.vision_layers(model)
    projector = family.projector(model)
    current: dict[str, torch.Tensor] = {}
    handles = []

    def grad_hook(site):
        def fwd(_mod, _args, out):
            t = _first(out)
            if torch.is_tensor(t) and t.requires_grad:
                t.register_hook(lambda g: current.__setitem__(site, _norm(g, cfg.norm).cpu()))
        return fwd

    def make_leaf(only_if_constant: bool):
        def pre(_mod, args, kwargs):
            if args:
                x = args[0]
                if only_if_constant and x.requires_grad:
                    return None
                return (x.detach().requires_grad_(True),) + tuple(args[1:]), kwargs
            x = kwargs["hidden_states"]
            if only_if_constant and x.requires_grad:
                return None
            return args, {**kwargs, "hidden_states": x.detach().requires_grad_(True)}
        return pre

    for i, blk in enumerate(llm_blocks):
        handles.append(blk.register_forward_hook(grad_hook(f"llm.{i}")))
        if cfg.site == "linear":
            for name, mod in blk.named_modules():
                if isinstance(mod, nn.Linear):
                    handles.append(mod.register_forward_hook(grad_hook(f"llm.{i}.{name}")))
    for i, blk in enumerate(vision_blocks):
        handles.append(blk.register_forward_hook(grad_hook(f"vision.{i}")))
    handles.append(projector.register_forward_hook(grad_hook("projector")))
    # gradients must reach the vision tokens: the first vision block's input becomes a leaf; the first
    # decoder block's input only when nothing upstream requires grad (text-only samples)
    handles.append(vision_blocks[0].register_forward_pre_hook(make_leaf(False), with_kwargs=True))
    handles.append(llm_blocks[0].register_forward_pre_hook(make_leaf(True), with_kwargs=True))

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    was_training = model.training
    if cfg.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    raw, modality, losses = [], [], []
    try:
        for si, p in enumerate(prepared):
            current.clear()
            inputs = family.hf_inputs(p)
            if device is not None:
                inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            logits = model(**inputs, use_cache=False).logits[0]
            ids = torch.as_tensor(p.input_ids[0], device=logits.device)
            n = p.answer_len if p.answer_len > 0 else p.seq_len - 1
            start = p.seq_len - n
            loss = torch.nn.functional.cross_entropy(logits[start - 1:-1].float(), ids[start:])
            loss.backward()
            raw.append({k: v.squeeze(0) if k.startswith("llm.") else v for k, v in current.items()})
            modality.append(token_modality(family, p))
            losses.append(loss.item())
            say(f"saliency {si + 1}/{len(prepared)}: loss {losses[-1]:.3f}")
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        if cfg.checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
    return Saliency(raw, modality, cfg, losses)


def self_label(family: Family, model: nn.Module, samples, max_new_tokens: int = 32) -> list[str | None]:
    """Answers for samples that have none, generated greedily by the full-precision model."""
    from ..validate.compare import torch_generate

    answers = []
    for s in samples:
        if s.answer:
            answers.append(s.answer)
            continue
        p = family.prepare(s.images, s.prompt)
        tokens = torch_generate(family, model, p, max_new_tokens, stop=True)
        text = family.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        answers.append(text or None)
    return answers


def mbq_factors(sal: Saliency) -> dict[str, float]:
    """MBQ-style modality weights per LLM block: r = mean grad over vision / over text tokens,
    floored at the median over blocks (text tokens weigh 1)."""
    ratios = {}
    for site, s in sal.summary().items():
        v, t = s["vision_mean_grad"], s["text_mean_grad"]
        if v is not None and t:
            ratios[site] = v / t
    if not ratios:
        return {}
    median = float(np.median(list(ratios.values())))
    return {site: max(r, median) for site, r in ratios.items()}
