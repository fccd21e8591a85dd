"""Activation calibrators: the per-tensor range of a Linear's input, for symmetric INT8 / FP8 Q/DQ.

One interface, in the spirit of ONNX Runtime's ``onnxruntime/quantization/calibrate.py``: feed the tensor
with :meth:`ActivationCalibrator.observe` (``x`` [..., K] and optionally one weight ``g_i >= 0`` per token,
the VLMQ saliency factors, as :meth:`WeightCalibrator.add_batch` takes them), then
:meth:`ActivationCalibrator.compute_range` returns ``amax > 0``: the activation Q/DQ's scale is
``amax / QMAX[fmt]`` (127 for INT8, 448 for FP8 E4M3), zero point 0.

Token weights. Every element of token ``i`` counts with weight ``g_i`` in the histograms (``np.histogram``'s
``weights``), so the percentile, KL and MSE ranges fit the tokens that matter; a token with ``g_i = 0`` is
dropped before anything else (it sets neither the histogram's range nor the maximum). ``token_weight=None``
means ones and goes through the very same code path, so g == 1 reproduces the unweighted method exactly.

``minmax``      ``amax = max |x|`` over the tokens with ``g_i > 0``. The *weighted max*: a maximum has no
                mass to weight, so the weights only gate (a padded or masked token, weight 0, never sets it).
``percentile``  ORT's symmetric percentile: a histogram of ``|x|`` (``num_bins``, its first batch spanning
                [min|x|, max|x|], later batches adding bins of the same width), ``amax`` the edge where the
                weighted CDF reaches ``percentile`` %, at most max|x|.
``entropy``     ORT's (TensorRT's) KL method: a histogram of ``x`` over [-t, t] (``num_bins``, grown
                symmetrically by later batches), the threshold whose ``num_quantized_bins``-level
                quantization of the weighted distribution has the smallest KL divergence. Counts are kept
                as floats; ORT truncates its expanded ``q`` to integers (``integer_q=True`` does too and
                reproduces ORT's threshold). The KL curve is flat near its minimum, so that truncation alone
                can move the chosen threshold by tens of bins.
``mse``         the histogram of ``|x|`` as ``percentile``; ``amax`` the candidate edge that minimizes the
                weighted squared error of fake-quantizing the bin centres on the format's grid.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import torch

from ..export.act_qdq import QMAX, act_scale  # noqa: F401 (the formats' grids live with the export)
from .base import WeightCalibrator

ACT_CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
ACT_FORMATS = tuple(QMAX)  # int8, fp8


def fake_quant(x: torch.Tensor, scale, fmt: str) -> torch.Tensor:
    """``DequantizeLinear(QuantizeLinear(x, scale))`` with zero point 0, as ONNX computes it: INT8 rounds half
    to even and saturates to [-128, 127]; FP8 E4M3FN rounds to nearest even and saturates to ±448."""
    y = x.float() / scale
    if fmt == "int8":
        q = torch.clamp(torch.round(y), -128, 127)
    else:
        q = torch.clamp(y, -QMAX["fp8"], QMAX["fp8"]).to(torch.float8_e4m3fn).float()
    return (q * scale).to(x.dtype)


def fp8_weight(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel FP8 E4M3 weights of ``w`` [N, K], rounded to nearest: codes float8_e4m3fn [N, K] and
    scales float32 [N, 1] = max|w_row| / 448 (1.0 for an all-zero row)."""
    w = w.detach().float().cpu()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX["fp8"], torch.ones_like(amax))
    codes = torch.clamp(w / scale, -QMAX["fp8"], QMAX["fp8"]).to(torch.float8_e4m3fn)
    return codes.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn), scale.numpy()


@contextlib.contextmanager
def activation_fake_quant(model: torch.nn.Module, layers):
    """Inside, the input of every layer of ``layers`` (``QuantizedLinear``s) with ``act_fmt`` set is
    fake-quantized as its graph's QuantizeLinear -> DequantizeLinear does: the torch reference of a W8A8 graph."""
    hooks = []
    for q in layers:
        if q.act_fmt:
            s = act_scale(q.act_amax, q.act_fmt)
            hooks.append(model.get_submodule(q.name).register_forward_pre_hook(
                lambda _m, args, s=s, f=q.act_fmt: (fake_quant(args[0], s, f), *args[1:])))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


class ActivationCalibrator:
    """Base: token weights, the zero-weight gate and the running max|x|; subclasses keep a histogram."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.amax = 0.0  # max |x| over the tokens with g > 0
        self.tokens = 0

    def observe(self, x: torch.Tensor, token_weight: torch.Tensor | None = None) -> None:
        """Add ``x`` [..., K] with per-token weights broadcastable to ``x.shape[:-1]`` (None: ones)."""
        shim = SimpleNamespace(device=torch.device("cpu"), name=self.name)  # WeightCalibrator's checks, reused
        g = WeightCalibrator._token_weights(shim, x.shape[:-1], token_weight).numpy()
        x = x.detach().float().cpu().reshape(-1, x.shape[-1]).numpy()
        keep = g > 0
        if not keep.any():
            return
        x, g = x[keep], g[keep]
        self.tokens += x.shape[0]
        self.amax = max(self.amax, float(np.abs(x).max()))
        self._add(x, np.repeat(g, x.shape[1]).astype(np.float64))

    def _add(self, x: np.ndarray, w: np.ndarray) -> None:
        """The kept tokens ``x`` [T, K] and each element's weight ``w`` [T*K]."""

    def compute_range(self) -> float:
        if not self.tokens:
            raise ValueError(f"activation {self.name!r}: nothing observed (every token had weight 0?)")
        return self._range()

    def _range(self) -> float:
        return self.amax


class MinMaxCalibrator(ActivationCalibrator):
    """``amax = max |x|`` over the tokens with weight > 0."""


class _AbsHistogram(ActivationCalibrator):
    """A weighted histogram of ``|x|``, built as ORT's ``HistogramCollector.collect_absolute_value``."""

    def __init__(self, name: str = "", num_bins: int = 2048) -> None:
        super().__init__(name)
        self.num_bins = num_bins
        self.hist: np.ndarray | None = None
        self.edges: np.ndarray | None = None

    def _add(self, x, w):
        a = np.abs(x).reshape(-1)
        if self.hist is None:
            self.hist, edges = np.histogram(a, bins=self.num_bins, weights=w)
        else:
            edges = self.edges
            if a.max() > edges[-1]:
                width = edges[1] - edges[0]
                edges = np.hstack((edges, np.arange(edges[-1] + width, a.max() + width, width)))
            hist, edges = np.histogram(a, bins=edges, weights=w)
            hist[: len(self.hist)] += self.hist
            self.hist = hist
        self.edges = edges.astype(np.float32)


class PercentileCalibrator(_AbsHistogram):
    def __init__(self, name: str = "", num_bins: int = 2048, percentile: float = 99.999) -> None:
        super().__init__(name, num_bins)
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        self.percentile = percentile

    def _range(self):
        cdf = np.cumsum(self.hist / self.hist.sum())
        edge = float(self.edges[np.searchsorted(cdf, self.percentile / 100.0)])
        return min(edge, self.amax)


class MSECalibrator(_AbsHistogram):
    """The candidate range (histogram edges, at most ``candidates`` of them) with the least weighted squared
    fake-quantization error of the bin centres on ``fmt``'s grid."""

    def __init__(self, name: str = "", num_bins: int = 2048, fmt: str = "int8", candidates: int = 256) -> None:
        super().__init__(name, num_bins)
        self.fmt, self.candidates = fmt, candidates

    def _range(self):
        centres = torch.from_numpy((self.edges[:-1] + self.edges[1:]) / 2).double()
        h = torch.from_numpy(self.hist).double()
        n = len(self.edges) - 1
        step = max(n // self.candidates, 1)
        best, best_err = self.amax, float("inf")
        for k in range(n, 0, -step):  # from the full range down: ties keep the larger range
            amax = min(float(self.edges[k]), self.amax)
            if amax <= 0:
                break
            err = float((h * (fake_quant(centres, act_scale(amax, self.fmt), self.fmt) - centres) ** 2).sum())
            if err < best_err:
                best, best_err = amax, err
        return best


class EntropyCalibrator(ActivationCalibrator):
    """ORT's entropy (KL) calibrator on a token-weighted histogram of ``x`` (``collect_value`` and
    ``get_entropy_threshold``, with float counts)."""

    def __init__(self, name: str = "", num_bins: int = 2048, num_quantized_bins: int = 128,
                 integer_q: bool = False) -> None:
        super().__init__(name)
        self.num_bins, self.nq = num_bins, num_quantized_bins
        self.integer_q = integer_q  # truncate the expanded q to integers, as ORT does (reproduces ORT exactly)
        self.hist: np.ndarray | None = None
        self.edges = None
        self.threshold = 0.0
        self.lo, self.hi = np.inf, -np.inf

    def _add(self, x, w):
        v = x.reshape(-1)
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        t = max(abs(float(v.min())), abs(float(v.max())))
        if self.hist is None:
            self.hist, self.edges = np.histogram(v, self.num_bins, range=(-t, t), weights=w)
            self.threshold = t
        elif t <= self.threshold:
            self.hist = self.hist + np.histogram(v, len(self.hist), range=(-self.threshold, self.threshold), weights=w)[0]
        elif self.threshold == 0:
            hist, self.edges = np.histogram(v, len(self.hist), range=(-t, t), weights=w)
            self.hist, self.threshold = hist + self.hist, t
        else:
            n = len(self.hist)
            stride = 2 * self.threshold / n
            half = int((t - self.threshold) // stride + 1)
            t = half * stride + self.threshold
            hist, self.edges = np.histogram(v, n + 2 * half, range=(-t, t), weights=w)
            hist[half: n + half] += self.hist
            self.hist, self.threshold = hist, t

    def _range(self):
        hist, edges, nq = self.hist, self.edges, self.nq
        n = hist.size
        zero = n // 2
        best, best_kl = None, np.inf
        for i in range(nq // 2, zero + 1):
            start, end = zero - i, min(zero + i + 1, n)
            sliced = hist[start:end]
            p = sliced.copy()
            p[0] += hist[:start].sum()
            p[-1] += hist[end:].sum()
            m = sliced.size // nq
            quantized = sliced[: nq * m].reshape(nq, m).sum(axis=1)
            quantized[-1] += sliced[nq * m:].sum()
            nonzero = (p[: nq * m] != 0).reshape(nq, m)
            norm = nonzero.sum(axis=1)
            q = np.zeros(p.size)
            q[: nq * m] = np.repeat(np.where(norm > 0, quantized / np.maximum(norm, 1), 0.0), m)
            kl = _kl(p, np.floor(q) if self.integer_q else q)
            if kl < best_kl:
                best, best_kl = (float(edges[start]), float(edges[end])), kl
        if best is None:  # every candidate degenerate: the full range
            return self.amax
        lo, hi = max(best[0], self.lo), min(best[1], self.hi)
        return max(-lo, hi)


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """ORT's ``smooth_distribution``: zeros become eps, taken off the non-zero entries."""
    zeros = p == 0
    nonzero = p.size - zeros.sum()
    if not nonzero:
        return None
    return p + np.where(zeros, eps, -eps * zeros.sum() / nonzero)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p, q = _smooth(p), _smooth(q)
    if p is None or q is None:
        return np.inf
    p, q = p / p.sum(), q / q.sum()
    if (q <= 0).any() and (p[q <= 0] > 0).any():
        return np.inf
    mask = p > 0
    return float((p[mask] * np.log(p[mask] / q[mask])).sum())


_CLASSES = {"minmax": MinMaxCalibrator, "percentile": PercentileCalibrator, "entropy": EntropyCalibrator,
            "mse": MSECalibrator}


def make_activation_calibrator(method: str, name: str = "", fmt: str = "int8", **kwargs) -> ActivationCalibrator:
    """The activation calibrator ``method`` (one of :data:`ACT_CALIBRATORS`); ``fmt`` matters to ``mse`` only."""
    if method not in _CLASSES:
        raise ValueError(f"unknown activation calibrator {method!r}; valid: {', '.join(ACT_CALIBRATORS)}")
    if method == "mse":
        kwargs["fmt"] = fmt
    return _CLASSES[method](name, **kwargs)
