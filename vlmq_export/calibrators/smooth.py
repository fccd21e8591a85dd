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
divided by ``s``: exact); otherwise an explicit division of the input. :func:`fold_into_norm` and
:class:`SmoothedLinear` are these two forms on torch modules; the export does both on the graphs instead (below).

In the export (``--smooth``, W8A8 components): the Linears that read one tensor (q/k/v, gate/up, fc1 alone, ...)
share one ``s``, chosen per block on the block's calibration inputs before its weights are calibrated
(``sequential.smooth_block``); torch keeps the float structure, with ``W diag(s)`` in the weight and a forward
pre-hook :class:`InputScale` multiplying the input by ``1/s``, so every later step (weight calibration, activation
ranges, validation) sees the smoothed layer. The graphs get the same rewrite from ``export/smooth_pass.py``: a Mul
by ``1/s``, folded into the preceding norm's constant scale where that norm feeds nothing else.
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


def weight_fake_quant(w: torch.Tensor, fmt: str, weight_bits: int = 8) -> torch.Tensor:
    """Per-output-channel symmetric fake-quant of ``w`` [N, K]: INT8 max|w_row| / 127 (``weight_bits`` 7, the
    reduced range: / 63.5, codes in [-64, 63], as the calibrators' grid), FP8 E4M3 max / 448."""
    if fmt == "fp8":
        codes, scales = fp8_weight(w)
        return torch.from_numpy(codes.astype("float32") * scales)
    qmax = 2 ** (weight_bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True) / (QMAX["int8"] if weight_bits == 8 else qmax + 0.5)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(w / scale), -qmax - (weight_bits != 8), qmax) * scale


def output_error(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, fmt: str,
                 amax: float | None = None, weight_bits: int = 8) -> float:
    """``sum_i g_i ||x_i W^T - fq(x_i / s) fq(W diag s)^T||^2 / sum_i g_i`` (``s`` None: no smoothing), the
    activations fake-quantized at the range ``amax`` (default: max |x / s|, their own)."""
    xs, ws = (x, w) if s is None else (x / s, w * s)
    xq = fake_quant(xs, act_scale(float(xs.abs().max()) if amax is None else amax, fmt), fmt)
    err = (xq @ weight_fake_quant(ws, fmt, weight_bits).T - x @ w.T).pow(2).sum(dim=1)
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
                     fmt: str = "int8", alphas=ALPHAS, x_amax: torch.Tensor | None = None,
                     folds: tuple | None = None, weight_bits: int = 8) -> Smoothing:
    """The smoothing of one Linear (``weight`` [N, K]; for Linears that read one input, their weights stacked
    along N) from its calibration inputs ``x`` [T, K] and token weights. ``x_amax`` [K]: the input maxima when
    ``x`` is a subsample of the tokens they were taken over (default: ``x``'s own, over the tokens with g > 0).

    ``folds`` = (fold [T] bool, x_amax of fold 0 [K], x_amax of fold 1 [K]): each candidate is scored out of
    sample, twice: ``s`` and the activation range taken on one fold, the error measured on the other. In sample
    the strongest migration looks best, since it equalises the channels' calibration maxima under one per-tensor
    range; new inputs then clip in any channel that exceeds its calibration maximum (tiny SmolVLM, INT8 vision,
    16 samples: in sample alpha 0.75 won 12 of 13 layers, out of sample 0.5 won 11, 0.75 none). The chosen ``s`` is
    then the one of all tokens."""
    x = x.detach().float().reshape(-1, weight.shape[1])
    g = torch.ones(x.shape[0]) if token_weight is None else token_weight.detach().float().reshape(-1)
    keep = g > 0
    x, g = x[keep], g[keep]
    w = weight.detach().float()
    x_amax = x.abs().amax(dim=0) if x_amax is None else x_amax.float()
    w_amax = w.abs().amax(dim=0)
    if folds is not None:
        fold = folds[0].reshape(-1)[keep]
        if not (fold.any() and (~fold).any()):
            folds = None  # one fold is empty: score in sample

    def score(alpha):
        if folds is None:
            s = None if alpha is None else smooth_scales(x_amax, w_amax, alpha)
            return output_error(x, g, w, s, fmt, weight_bits=weight_bits)
        total = 0.0
        for f in (False, True):  # fit on fold f, measure on the other
            fit, test = fold == f, fold != f
            s = None if alpha is None else smooth_scales(folds[2 if f else 1].float(), w_amax, alpha)
            xs = x[fit] if s is None else x[fit] / s
            total += output_error(x[test], g[test], w, s, fmt, amax=float(xs.abs().max()), weight_bits=weight_bits)
        return total / 2

    best = Smoothing(None, torch.ones(w.shape[1]), {"none": score(None)})
    best_err = best.errors["none"]
    for a in alphas:
        best.errors[a] = score(a)
        if best.errors[a] < best_err:
            best.alpha, best.scales, best_err = a, smooth_scales(x_amax, w_amax, a), best.errors[a]
    if folds is not None:
        best.errors["scored"] = "out of sample (two folds of the calibration samples)"
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


class InputScale:
    """A forward pre-hook: the module's first input times ``inv_s`` (in the input's dtype), as the graph's Mul."""

    def __init__(self, inv_s: torch.Tensor):
        self.inv_s = inv_s.detach().float().cpu()

    def __call__(self, _module, args):
        x = args[0]
        return (x * self.inv_s.to(dtype=x.dtype, device=x.device), *args[1:])


def install_input_scale(linear: nn.Linear, s: torch.Tensor, scale_weight: bool = True):
    """Smooth ``linear`` in place by ``s`` [K]: ``W <- W diag(s)`` (unless ``scale_weight`` is False: the weight
    already holds it, as one loaded from the exported graphs does) and its input times ``1/s`` by a forward pre-hook
    (:class:`InputScale`, registered before any hook added later, so those see the smoothed input). The hook's
    handle is returned."""
    s = s.detach().float().cpu()
    if scale_weight:
        scale_columns(linear, s.to(linear.weight.device))
    return linear.register_forward_pre_hook(InputScale(1.0 / s))
