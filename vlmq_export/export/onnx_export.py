"""torch -> ONNX for one graph (the dynamo exporter, opset 21, IR version 10)."""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import onnx
import torch

from ..models.base import ExportSpec
from .passes import canonicalize

OPSET = 21
IR_VERSION = 10  # older ONNX Runtime builds reject IR 11; opset 21 needs IR >= 10
_EXTERNAL_THRESHOLD = 1_800_000_000  # bytes: beyond this the graph keeps weights in <name>.onnx.data


def export_graph(spec: ExportSpec, path: str | Path, opset: int = OPSET, half: bool = False) -> Path:
    """Export ``spec`` to ``path`` and check it; returns the path.

    ``half``: ``spec.module`` is in float16 (``model.half()``) and its float example inputs are cast to match,
    so every float input, activation and output of the graph is FP16 except where the model's own code computes
    in float32 (transformers' RMSNorm variance, the eager softmax, the rotary frequencies), which the trace keeps.
    """
    path = Path(path)
    args = tuple(a.half() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in spec.args) \
        if half else spec.args
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad(), _attention(spec):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            spec.module,
            args,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=spec.dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    model = canonicalize(program.model_proto)
    model.ir_version = IR_VERSION
    save_model(model, path)
    return path


@contextlib.contextmanager
def _attention(spec: ExportSpec):
    """Trace with ``spec.attention``'s implementation, restoring the model's own afterwards."""
    if spec.attention is None:
        yield
        return
    module, impl = spec.attention
    before = module.config._attn_implementation
    module.set_attn_implementation(impl)
    try:
        yield
    finally:
        module.set_attn_implementation(before)


def model_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: str | Path) -> None:
    """Save, with external data only when protobuf's 2 GB limit requires it, then run the full checker."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if model_bytes(model) > _EXTERNAL_THRESHOLD:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save_model(model, path)
    onnx.checker.check_model(str(path), full_check=True)
