"""Weight calibrators: one interface (:class:`WeightCalibrator`) for every weight-only method.

``rtn``   round to nearest, data unused for the codes (RTNCalibrator)
``gptq``  GPTQ, every token weighted 1 (GPTQCalibrator)
``vlmq``  GPTQ with per-token importance factors g_i supplied by the caller through
          ``add_batch(x, token_weight=g)``: the same GPTQCalibrator, not a separate solver.
``gptaq`` GPTAQ, asymmetric calibration (GPTAQCalibrator, ``needs_float_inputs``): fed
          ``add_pair(x_quant, x_float)``, it matches the full-precision layer output from the
          quantized model's inputs (GPTQ on a corrected target weight).
"""
from __future__ import annotations

import torch

from .base import QuantConfig, QuantResult, WeightCalibrator
from .gptaq import GPTAQCalibrator
from .gptq import GPTQCalibrator
from .rtn import RTNCalibrator

METHODS = ("rtn", "gptq", "vlmq", "gptaq")

_CLASSES = {"rtn": RTNCalibrator, "gptq": GPTQCalibrator, "vlmq": GPTQCalibrator, "gptaq": GPTAQCalibrator}


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
    "GPTAQCalibrator",
    "GPTQCalibrator",
    "QuantConfig",
    "QuantResult",
    "RTNCalibrator",
    "WeightCalibrator",
    "make_calibrator",
]
