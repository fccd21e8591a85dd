"""The quantized graph from a float one: the passes in their order (smoothing, activation Q/DQ, weight Q/DQ).

Kept apart from the passes themselves, which import ``qdq``'s layer type and key, so that no pass module imports
another's caller.
"""
from __future__ import annotations

import dataclasses

import onnx_ir as ir

from .act_qdq import ActQDQPass
from .onnx_export import save_model
from .qdq import QDQWeightPass, QuantizedLinear
from .smooth_pass import SmoothPass


def apply_qdq(model_path, out_path, layers: list[QuantizedLinear], smoothing: dict | None = None) -> tuple[list[str], int]:
    """Rewrite ``model_path`` into ``out_path``; returns the names of the layers written and how many float16
    scales were moved into float16's normal range (0 for a float32 graph). Smoothed W8A8 layers
    (``QuantizedLinear.smooth``) get their scales first (export/smooth_pass.py); ``smoothing``, when given, receives
    where each one's ``1/s`` went (layer name -> "Mul" or "folded into ...")."""
    model = ir.load(str(model_path))
    if any(q.smooth is not None for q in layers):
        spass = SmoothPass(layers)
        spass(model)
        layers = [dataclasses.replace(q, key=spass.rekey[q.prior_key]) if q.prior_key in spass.rekey else q
                  for q in layers]
        if smoothing is not None:
            smoothing.update(spass.placed)
    ActQDQPass([q for q in layers if q.act_fmt])(model)  # on the float weights' MatMuls, before they change
    qpass = QDQWeightPass(layers)
    qpass(model)
    ir.external_data.load_to_model(model)  # weights the passes left alone may still point at the float graph's .data
    save_model(ir.to_proto(model), out_path)
    return sorted(qpass.by_key[k].name for k in qpass.matched), qpass.clamped_scales
