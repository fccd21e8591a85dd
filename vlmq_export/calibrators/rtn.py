"""Round to nearest: every group rounded on its own grid, calibration data unused for the codes.

RTN is data-free (``data_free``): an export quantizes each Linear from its weight alone
(:func:`calibrators.sequential.quantize_weights`), with no calibration sample and no forward pass; the
codes and scales are the same as with data (``--clip-search`` scores clipped ranges by the weights too).
Data given through ``add_batch`` is still accumulated so that ``QuantResult.error`` is the same
measure as GPTQ's (the token-weighted output error); without data ``error`` is NaN (unknown, not
zero). RTN does not damp, so ``damp_used`` is NaN.
"""
from __future__ import annotations

import math

import torch

from .base import QuantResult, WeightCalibrator, quantize_codes, static_grid


class RTNCalibrator(WeightCalibrator):
    data_free = True  # solve() reads the weight alone: exports skip the calibration data pass

    def solve(self) -> QuantResult:
        cfg = self.config
        W = self._weight_float()
        N, K, g = self.rows, self.columns, self.group
        scales, zeros = static_grid(W, g, cfg)  # [N, K // g]
        codes = quantize_codes(W.reshape(N, K // g, g), scales.unsqueeze(2), cfg.qmin, cfg.qmax,
                               None if zeros is None else zeros.unsqueeze(2)).reshape(N, K)
        result = QuantResult(
            codes=codes.to(torch.int8),
            scales=scales,
            bits=cfg.bits,
            group_size=cfg.group_size,
            error=math.nan,
            damp_used=math.nan,
            zeros=None if zeros is None else zeros.to(torch.int8),
        )
        result.error = self._error(W, result)
        return result
