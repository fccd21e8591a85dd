"""The weight-calibrator interface shared by every weight-only method (RTN, GPTQ, VLMQ).

A calibrator owns one linear layer's weight ``W`` [N out, K in] (``nn.Linear`` layout). The
caller feeds it the layer's calibration inputs with :meth:`WeightCalibrator.add_batch`
(optionally with one importance factor ``g_i >= 0`` per token), then calls
:meth:`WeightCalibrator.solve`, which returns a :class:`QuantResult`, and :meth:`free`.

Inputs are accumulated into the token-weighted Hessian of the layer-wise objective
``sum_i g_i ||(W - W_hat) x_i||^2``::

    H = 2 / sum_i g_i * sum_i g_i x_i x_i^T      (float32, running normalisation)

Weighting is done by scaling each token's input row by ``sqrt(g_i)`` before the outer product;
``token_weight=None`` is turned into ones and goes through the very same code path, so g == 1
reproduces unweighted GPTQ bit for bit.

Quantization grid, per group of ``group_size`` input columns of one output row (per-channel when
``group_size == -1``: one scale per output row). Symmetric (the default; signed codes, no zero point,
positive scales: the form TensorRT accepts), its scale chosen by ``sym_grid``::

    qmax  = 2**(bits-1) - 1          qmin = -2**(bits-1)
    "half":    scale = max|w| / (qmax + 1/2)    (8 bits: max|w| / 127)
    "extreme": scale = max(max(w+) / qmax, max(w-) / (qmax + 1))   (w+ = max(w, 0), w- = max(-w, 0)):
               the group's extreme lands exactly on code qmax or qmin, the other side inside the range
    "search":  the "extreme" scale times the factor in 0.90 ... 1.10 with the smallest clip_error
    (1.0 where the group is all zeros: any positive scale represents zeros exactly and stays finite in fp16)
    code  = clamp(round(w / scale), qmin, qmax)       (round half to even, like ONNX)
    w_hat = code * scale             (float32; exactly what ONNX DequantizeLinear computes)

Asymmetric (``sym=False``, bits <= 4; unsigned codes and an integer zero point per group, the
reference GPTQ quantizer's ``sym=False``; ONNX Runtime only)::

    qmin  = 0                        qmax = 2**bits - 1
    lo, hi = min(min w, 0), max(max w, 0)
    scale = (hi - lo) / qmax         zero = round(-lo / scale)       (in [0, qmax])
    code  = clamp(round(w / scale) + zero, 0, qmax)
    w_hat = (code - zero) * scale    (exactly what DequantizeLinear computes with a zero point)

In the symmetric grid ``qmin`` is one level beyond ``-qmax``: the "extreme" grid puts a dominant negative
extreme there, GPTQ's error feedback can reach it on any grid. The stored ``codes``/``scales``/``zeros`` are the truth:
:meth:`QuantResult.dequantize` is the only definition of ``W_hat``, and the reported ``error`` is
computed from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CalibrationDataError, NumericalError
from ..recipe import SYM_GRIDS  # the symmetric scale of a group (see group_scales)

SUPPORTED_BITS = (2, 3, 4, 7, 8)  # 7: W8A8 INT8 weights in the reduced range (--reduce-range), int8 containers


@dataclass
class QuantConfig:
    bits: int = 4  # 2, 3, 4, 8
    group_size: int = 128  # input columns per scale; -1 = per-channel (one scale per output row)
    sym: bool = True  # symmetric, no zero point (TensorRT's form); False: unsigned codes + zero point, bits <= 4
    damp: float = 0.01  # GPTQ damping, fraction of mean(diag(H)); raised x10 if Cholesky fails
    block_size: int = 128  # GPTQ lazy-batch column block (rounded up to a multiple of group_size)
    act_order: bool = False  # GPTQ: columns by decreasing diag(H); groups stay static (see gptq.py)
    asym_alpha: float = 0.25  # GPTAQ: weight of the asymmetric correction W C H^-1 (see gptaq.py); 0 = GPTQ
    clip_search: bool = False  # each group's scale by a grid search over clipped ranges (group_scales; the
    #   Hessian methods score it by the Hessian diagonal, see clip_error)
    sym_grid: str = "half"  # the symmetric scale: "half", "extreme" or "search" (see SYM_GRIDS, group_scales)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (per-channel), got {self.group_size}")
        if not self.sym and self.bits > 4:
            raise ValueError(f"asymmetric quantization (sym=False) is implemented for 2 to 4 bits, got {self.bits}")
        if not self.damp >= 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if not 0.0 <= self.asym_alpha <= 1.0:
            raise ValueError(f"asym_alpha (GPTAQ) must be in [0, 1], got {self.asym_alpha}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.sym_grid not in SYM_GRIDS:
            raise ValueError(f"sym_grid must be one of {SYM_GRIDS}, got {self.sym_grid!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.sym else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.sym else 2 ** self.bits - 1

    def group_for(self, in_features: int) -> int:
        """Columns per scale for a layer with ``in_features`` inputs (K for per-channel)."""
        group = in_features if self.group_size == -1 else self.group_size
        if in_features % group:
            raise ValueError(
                f"in_features {in_features} is not divisible by group_size {self.group_size}: "
                "pad the layer or keep it at another precision (decide before calibrating)"
            )
        return group


@dataclass
class QuantResult:
    codes: torch.Tensor  # int8 [N, K], values in [qmin, qmax] (signed; unsigned when asymmetric)
    scales: torch.Tensor  # float32 [N, K // group] (per-channel: [N, 1])
    bits: int
    group_size: int  # as configured: -1 = per-channel
    error: float  # sum_i g_i ||(W - W_hat) x_i||^2 / sum_i g_i on the calibration data; NaN if none
    damp_used: float  # fraction of mean(diag(H)) actually used (NaN for RTN, which does not damp)
    zeros: torch.Tensor | None = None  # int8 [N, K // group] zero points (asymmetric only), in [0, qmax]

    def dequantize(self) -> torch.Tensor:
        """``W_hat = (codes - zeros) * scales`` with each scale (zero) repeated over its group: float32 [N, K]."""
        return dequantize_codes(self.codes, self.scales, self.zeros)


def dequantize_codes(codes, scales, zeros=None) -> torch.Tensor:
    """``(codes - zeros) * scales`` [N, K] float32 from codes [N, K] and per-group scales/zeros [N, G]."""
    k = codes.shape[1]
    c = codes.float()
    if zeros is not None:
        c = c - expand_scales(zeros.float(), k)
    return c * expand_scales(scales.float(), k)


# ----------------------------------------------------------------------------- grid helpers
def expand_scales(scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """[N, G] scales -> [N, K], each scale repeated over its K // G columns."""
    return scales.repeat_interleave(in_features // scales.shape[1], dim=1)


CLIP_RANGES = tuple(1.0 - i / 100 for i in range(80))  # clip search: 1.00, 0.99, ... 0.21 of max|w|
CLIP_NORM = 2.4  # ... scored by sum |w - w_hat|^2.4 (the reference GPTQ quantizer's norm)
SEARCH_FACTORS = tuple(1 + i / 100 for i in sorted(range(-10, 11), key=abs))  # sym_grid "search": 1.00, 0.99, 1.01, ...


SEARCH_CHUNK = 1 << 16  # weights per piece of a grid search: rows searched 64k weights at a time stay in the CPU's cache
# (4096 x 4096, group 128, asymmetric clip search: 25.8-28.4 s whole, 8.0-9.0 s in pieces on 2 cores, the same scales;
# benchmarks/clip-search.json). Only searches over more than two pieces' worth are cut: inside GPTQ on SmolLM2's
# layers (one 64-column group at a time) pieces gained nothing and cost 9 % on 1536 x 64 (two pieces), whole solves
# 1.56 s against 1.60 s per block (benchmarks/clip-search-gptq.json)


def _in_pieces(w: torch.Tensor) -> bool:
    return w.shape[0] * w.shape[1] > 2 * SEARCH_CHUNK


def _row_chunks(w: torch.Tensor, col_weight: torch.Tensor | None):
    """``w`` [R, g] (and ``col_weight`` with it, when it has a row per row of ``w``) in pieces of ``SEARCH_CHUNK``
    weights: each row's search reads that row alone, so searching piece by piece gives the same result."""
    rows = max(1, SEARCH_CHUNK // max(1, w.shape[1]))
    per_row = col_weight is not None and col_weight.dim() == 2 and col_weight.shape[0] == w.shape[0] > 1
    for i in range(0, w.shape[0], rows):
        yield w[i:i + rows], col_weight[i:i + rows] if per_row else col_weight


def clip_error(w: torch.Tensor, w_hat: torch.Tensor, col_weight: torch.Tensor | None) -> torch.Tensor:
    """The clip search's score of each row: ``sum |w - w_hat|^2.4`` (the reference GPTQ quantizer's), or with
    ``col_weight`` (the Hessian diagonal of each column, broadcast against ``w``) ``sum_j H_jj (w_j - w_hat_j)^2``:
    the layer's output error on the calibration data without the cross terms between columns."""
    if col_weight is None:
        return (w_hat - w).abs().pow(CLIP_NORM).sum(dim=1)
    return ((w_hat - w).square() * col_weight).sum(dim=1)


def sym_scale(w: torch.Tensor, qmax: int, grid: str = "half") -> torch.Tensor:
    """The symmetric scale of each row of ``w`` [N, g] on ``grid`` before any search, > 0 (see the module doc).

    "half" (the reference GPTQ's grid at <= 4 bits): max|w| / (qmax + 1/2), so all 2^b levels are used and
    both extremes sit half a step off a code; 8 bits use max|w| / 127 (TensorRT's symmetric INT8 convention).
    "extreme" (and "search"'s centre): the larger of max(w+) / qmax and max(w-) / (qmax + 1), so the side
    that needs it maps its extreme exactly onto code qmax or qmin (ONNX Runtime's RTN with a positive scale).
    """
    if grid == "half":
        scale = w.abs().amax(dim=1) / (qmax if qmax >= 127 else qmax + 0.5)
    else:
        scale = torch.maximum(w.amax(dim=1).clamp(min=0) / qmax, (-w.amin(dim=1)).clamp(min=0) / (qmax + 1))
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def group_scales(w: torch.Tensor, qmax: int, clip: bool = False, col_weight: torch.Tensor | None = None,
                 grid: str = "half") -> torch.Tensor:
    """Symmetric scale of each row of ``w`` [N, g] (one group per row), > 0: :func:`sym_scale` on ``grid``,
    times the factor with the smallest :func:`clip_error` among the candidates, 1 first (ties keep it):

    - ``grid="search"``: 1.00, 0.99, 1.01, ... 0.90, 1.10 (a finer or coarser step than the extreme's);
    - ``clip``: 1.00, 0.99, ... 0.21 (the reference GPTQ quantizer's ``mse`` option: clipping a few outliers
      buys a finer grid for the rest; with ``col_weight`` the columns the data drives hardest count most).

    The unscaled scale is among the candidates, so the row's score never exceeds the unsearched one's.
    """
    factors = (SEARCH_FACTORS if grid == "search" else (1.0,)) + (CLIP_RANGES if clip else ())
    if len(factors) > 1 and _in_pieces(w):
        return torch.cat([group_scales(c, qmax, clip, cw, grid) for c, cw in _row_chunks(w, col_weight)])
    scale = sym_scale(w, qmax, grid)
    if len(factors) == 1:
        return scale
    qmin = -qmax - 1
    best, best_err = scale, torch.full_like(scale, float("inf"))
    for p in dict.fromkeys(factors):  # in order, duplicates once
        s = p * scale
        err = clip_error(w, quantize_codes(w, s.unsqueeze(1), qmin, qmax) * s.unsqueeze(1), col_weight)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def group_zero_scales(w: torch.Tensor, qmax: int, clip: bool = False,
                      col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale (> 0) and zero point (float, integer valued in [0, qmax]) of each row of ``w`` [N, g].

    The reference GPTQ quantizer with ``sym=False``: the range [min(w, 0), max(w, 0)] split into qmax
    steps, the zero point the code of 0. ``clip``: the range ``p·[lo, hi]`` for p in 1.00, 0.99, ... 0.21
    with the smallest :func:`clip_error` (as :func:`group_scales`; the zero point does not depend on p).
    """
    if clip and _in_pieces(w):
        parts = [group_zero_scales(c, qmax, clip, cw) for c, cw in _row_chunks(w, col_weight)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    full = (hi - lo) / qmax
    full = torch.where(full > 0, full, torch.ones_like(full))
    zero = torch.round(-lo / full)  # (hi - lo) == 0 only when the row is all zeros: zero point 0
    if not clip:
        return full, zero
    best, best_err = full, torch.full_like(full, float("inf"))
    z = zero.unsqueeze(1)
    for p in CLIP_RANGES:
        s = (p * full).unsqueeze(1)
        err = clip_error(w, (quantize_codes(w, s, 0, qmax, z) - z) * s, col_weight)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s.squeeze(1), best)
    return best, zero


def group_grid(w: torch.Tensor, config: QuantConfig,
               col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale, zero)`` of each row of ``w`` [N, g] on ``config``'s grid; zero is None when symmetric.
    ``col_weight``: the clip search's column weights (see :func:`clip_error`), broadcast against ``w``."""
    if config.sym:
        return group_scales(w, config.qmax, config.clip_search, col_weight, config.sym_grid), None
    return group_zero_scales(w, config.qmax, config.clip_search, col_weight)


def static_scales(W: torch.Tensor, group: int, qmax: int, clip: bool = False, grid: str = "half") -> torch.Tensor:
    """Symmetric scales of every group of ``W`` [N, K] in column order: [N, K // group]."""
    return group_scales(W.reshape(-1, group), qmax, clip, grid=grid).reshape(W.shape[0], -1)


def static_grid(W: torch.Tensor, group: int, config: QuantConfig,
                col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points (None when symmetric) of every group of ``W`` [N, K]: [N, K // group] each.
    ``col_weight`` [K]: the clip search's weight of each input column (see :func:`clip_error`)."""
    N, K = W.shape
    if col_weight is not None:
        col_weight = col_weight.reshape(1, K // group, group).expand(N, -1, -1).reshape(-1, group)
    scale, zero = group_grid(W.reshape(-1, group), config, col_weight)
    return scale.reshape(N, -1), None if zero is None else zero.reshape(N, -1)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
                   zero: torch.Tensor | None = None) -> torch.Tensor:
    """Codes (as float, integer valued) of ``w`` on the grid ``scale`` (+ ``zero``; broadcast against w)."""
    q = torch.round(w / scale)
    return torch.clamp(q if zero is None else q + zero, qmin, qmax)


# ----------------------------------------------------------------------------- the interface
class WeightCalibrator:
    """Base class: validates the layer, accumulates the token-weighted Hessian, reports errors.

    ``weight`` [N, K] is read, never modified (it is not copied either: do not change it in place
    before :meth:`solve`). All work happens on ``weight.device``.
    """

    def __init__(self, weight: torch.Tensor, config: QuantConfig, name: str = "") -> None:
        if weight.dim() != 2:
            raise ValueError(f"layer {name!r}: weight must be 2-D [out, in], got {tuple(weight.shape)}")
        self.weight = weight.detach()
        self.config = config
        self.name = name
        self.rows, self.columns = weight.shape
        self.group = config.group_for(self.columns)  # raises ValueError when K % group != 0
        self.device = weight.device
        self.H: torch.Tensor | None = None  # allocated on the first add_batch
        self.weight_sum = 0.0  # sum_i g_i over all tokens seen (the normaliser of H)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor, token_weight: torch.Tensor | None = None) -> None:
        """Accumulate inputs ``x`` [..., K] with per-token weights broadcastable to ``x.shape[:-1]``.

        ``token_weight=None`` means all ones (same code path). A trailing singleton dimension
        ([..., 1]) is accepted. Tokens with g_i = 0 contribute nothing.
        """
        if x.shape[-1] != self.columns:
            raise ValueError(f"layer {self.name!r}: input last dim {x.shape[-1]} != in_features {self.columns}")
        g = self._token_weights(x.shape[:-1], token_weight)
        x = x.detach().to(device=self.device, dtype=torch.float32).reshape(-1, self.columns)
        if not torch.isfinite(x).all():
            raise NumericalError(f"layer {self.name!r}: calibration inputs contain NaN or Inf")
        batch_sum = float(g.double().sum())
        if batch_sum == 0.0:
            return  # empty batch or every token weighted 0: nothing to add
        if self.H is None:
            self.H = torch.zeros(self.columns, self.columns, device=self.device, dtype=torch.float32)
        # Running normalisation (as in the reference GPTQ): H stays 2/sum(g) * sum g x x^T.
        self.H *= self.weight_sum / (self.weight_sum + batch_sum)
        self.weight_sum += batch_sum
        self.tokens += x.shape[0]
        xs = x * g.sqrt().unsqueeze(1)  # row i scaled by sqrt(g_i)
        xs = math.sqrt(2.0 / self.weight_sum) * xs
        self.H += xs.t() @ xs

    def _token_weights(self, lead: torch.Size, token_weight: torch.Tensor | None) -> torch.Tensor:
        """Per-token weights g, flattened to [T] in the order of ``x.reshape(-1, K)``."""
        if token_weight is None:
            return torch.ones(lead.numel(), device=self.device, dtype=torch.float32)
        g = torch.as_tensor(token_weight).detach().to(device=self.device, dtype=torch.float32)
        if g.dim() == len(lead) + 1 and g.shape[-1] == 1:
            g = g.squeeze(-1)
        try:
            g = torch.broadcast_to(g, lead).reshape(-1)
        except RuntimeError as e:
            raise ValueError(
                f"layer {self.name!r}: token_weight {tuple(g.shape)} does not broadcast to the "
                f"input's leading dims {tuple(lead)}"
            ) from e
        if not torch.isfinite(g).all():
            raise NumericalError(f"layer {self.name!r}: token weights contain NaN or Inf")
        if (g < 0).any():
            raise ValueError(f"layer {self.name!r}: token weights must be >= 0")
        return g

    def solve(self) -> QuantResult:
        raise NotImplementedError

    def free(self) -> None:
        """Drop the Hessian and the weight reference (the result is independent of them)."""
        self.H = None
        self.weight = None

    # -- shared helpers for subclasses
    def _weight_float(self) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError(f"layer {self.name!r}: calibrator already freed")
        W = self.weight.to(torch.float32, copy=True)
        if not torch.isfinite(W).all():
            raise NumericalError(f"layer {self.name!r}: weight contains NaN or Inf")
        return W

    def _require_data(self) -> torch.Tensor:
        if self.H is None:
            raise CalibrationDataError(
                f"layer {self.name!r}: no calibration data (add_batch was never called, or every "
                "token had weight 0); refusing to calibrate without data"
            )
        return self.H

    def _error(self, W: torch.Tensor, result: QuantResult) -> float:
        """``trace(dW H dW^T) / 2 = sum_i g_i ||dW x_i||^2 / sum_i g_i`` (NaN without data)."""
        if self.H is None:
            return math.nan
        dW = (W - result.dequantize()).double()
        return float(((dW @ self.H.double()) * dW).sum() / 2)
