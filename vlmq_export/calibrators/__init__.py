"""Weight calibrators: one interface (:class:`WeightCalibrator`) for every weight-only method.

``rtn``   round to nearest, data unused for the codes (RTNCalibrator)
``gptq``  GPTQ, every token weighted 1 (GPTQCalibrator)
``vlmq``  GPTQ with per-token importance factors g_i supplied by the caller through
          ``add_batch(x, token_weight=g)``: the same GPTQCalibrator, not a separate solver.
"""
from __future__ import annotations

import torch

from .base import QuantConfig, QuantResult, WeightCalibrator
from .gptq import GPTQCalibrator
from .rtn import RTNCalibrator

METHODS = ("rtn", "gptq", "vlmq")

_CLASSES = {"rtn": RTNCalibrator, "gptq": GPTQCalibrator, "vlmq": GPTQCalibrator}


def make_calibrator(
    method: str, weight: torch.Tensor, config: QuantConfig | None = None, name: str = ""
) -> WeightCalibrator:
    """The calibrator for ``method`` (one of :data:`METHODS`) on ``weight`` [out, in]."""
    key = method.lower() if isinstance(method, str) else method
    if key not in _CLASSES:
        raise ValueError(f"unknown weight quantization method {method!r}; valid: {', '.join(METHODS)}")
    return _CLASSES[key](weight, config if config is not None else QuantConfig(), name)


__all__ = [
    "METHODS",
    "GPTQCalibrator",
    "QuantConfig",
    "QuantResult",
    "RTNCalibrator",
    "WeightCalibrator",
    "make_calibrator",
]
