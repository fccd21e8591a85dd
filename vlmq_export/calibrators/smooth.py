"""Per-channel smoothing scales (the SmoothQuant form) for W8A8 layers.

A Linear ``y = x W^T`` is rewritten ``y = (x / s) (W diag(s))^T``: exact in float, but the input channels with
outliers shrink and the weight's matching columns grow, which moves quantization difficulty from the per-tensor
activation range to the per-channel weight scales. Per input channel ``j``::

    s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)        (1 where either maximum is 0; clamped to [1e-5, 1e5])

``max|x_j|`` is taken over the tokens with weight ``g_i > 0`` (the gate of calibrators/activation.py's weighted
max); the saliency enters where alpha is chosen: per layer, the alpha of :data:`ALPHAS` (or no smoothing at all)
with the smallest saliency-weighted output error ``sum_i g_i ||y_i - y_hat_i||^2 / sum_i g_i`` of the layer
fake-quantized (per-tensor activations by their max, per-channel weights) on the calibration inputs.

Folding: into the preceding LayerNorm / RMSNorm when the norm feeds only smoothed Linears (its weight and bias
divided by ``s``: exact, :func:`fold_into_norm`); otherwise an explicit division of the input
(:class:`SmoothedLinear`, exported as a Mul by ``1/s``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .activation import QMAX, act_scale, fake_quant, fp8_weight

ALPHAS = (0.25, 0.5, 0.75)
S_RANGE = (1e-5, 1e5)


def smooth_scales(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s`` [K] from the per-channel input maxima [K] and weight column maxima [K]."""
    x_amax, w_amax = x_amax.float(), w_amax.float()
    s = x_amax.pow(alpha) / w_amax.pow(1 - alpha)
    s = torch.where((x_amax > 0) & (w_amax > 0), s, torch.ones_like(s))
    return s.clamp(*S_RANGE)


def weight_fake_quant(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per-output-channel symmetric fake-quant of ``w`` [N, K]: INT8 max|w_row| / 127, FP8 E4M3 max / 448."""
    if fmt == "fp8":
        codes, scales = fp8_weight(w)
        return torch.from_numpy(codes.astype("float32") * scales)
    scale = w.abs().amax(dim=1, keepdim=True) / QMAX["int8"]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def output_error(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, fmt: str) -> float:
    """``sum_i g_i ||x_i W^T - fq(x_i / s) fq(W diag s)^T||^2 / sum_i g_i`` (``s`` None: no smoothing)."""
    xs, ws = (x, w) if s is None else (x / s, w * s)
    xq = fake_quant(xs, act_scale(float(xs.abs().max()), fmt), fmt)
    err = (xq @ weight_fake_quant(ws, fmt).T - x @ w.T).pow(2).sum(dim=1)
    return float((g * err).sum() / g.sum())


@dataclass
class Smoothing:
    alpha: float | None  # None: smoothing did not help, s = 1
    scales: torch.Tensor  # [K]
    errors: dict  # alpha (or "none") -> weighted output error

    def as_dict(self) -> dict:
        return {"alpha": self.alpha, "errors": self.errors,
                "s_min": float(self.scales.min()), "s_max": float(self.scales.max())}


def choose_smoothing(x: torch.Tensor, weight: torch.Tensor, token_weight: torch.Tensor | None = None,
                     fmt: str = "int8", alphas=ALPHAS) -> Smoothing:
    """The smoothing of one Linear (``weight`` [N, K]) from its calibration inputs ``x`` [T, K] and token weights."""
    x = x.detach().float().reshape(-1, weight.shape[1])
    g = torch.ones(x.shape[0]) if token_weight is None else token_weight.detach().float().reshape(-1)
    keep = g > 0
    x, g = x[keep], g[keep]
    w = weight.detach().float()
    x_amax, w_amax = x.abs().amax(dim=0), w.abs().amax(dim=0)
    best = Smoothing(None, torch.ones(w.shape[1]), {"none": output_error(x, g, w, None, fmt)})
    best_err = best.errors["none"]
    for a in alphas:
        s = smooth_scales(x_amax, w_amax, a)
        best.errors[a] = output_error(x, g, w, s, fmt)
        if best.errors[a] < best_err:
            best.alpha, best.scales, best_err = a, s, best.errors[a]
    return best


def scale_columns(linear: nn.Linear, s: torch.Tensor) -> None:
    """``W <- W diag(s)`` in place."""
    linear.weight.data = (linear.weight.data.float() * s).to(linear.weight.dtype)


def fold_into_norm(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Exact: ``norm``'s weight (and bias) divided by ``s``, every Linear it feeds gets ``W diag(s)``."""
    norm.weight.data = (norm.weight.data.float() / s).to(norm.weight.dtype)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data = (norm.bias.data.float() / s).to(norm.bias.dtype)
    for lin in linears:
        scale_columns(lin, s)


class SmoothedLinear(nn.Module):
    """A Linear whose input is divided by ``s`` (an explicit Mul by ``1/s``) and whose weight is ``W diag(s)``:
    the smoothing where no preceding norm can take ``1/s``."""

    def __init__(self, linear: nn.Linear, s: torch.Tensor):
        super().__init__()
        scale_columns(linear, s)
        self.linear = linear
        self.register_buffer("inv_s", (1.0 / s).to(linear.weight.dtype))

    @property
    def weight(self):
        return self.linear.weight

    def forward(self, x):
        return self.linear(x * self.inv_s)
