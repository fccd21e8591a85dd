"""ONNX Runtime session factory."""
from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

ACCURACY_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"

# What ``run``, ``eval`` and the report's quantized-vs-full-precision numbers use: ONNX Runtime's own
# default for the MatMulNBits it fuses from Q/DQ (int8 activations, blockwise). On 2 CPU cores it decodes
# SmolLM2-135M INT4 2.2x float, against 1.7x at level 0 (benchmarks/pipeline.json), for +0.5 %
# perplexity and the same task accuracy on the testbed. Level 0 (float compute) is what the parity checks
# use: it matches torch fake-quant to ~1e-7. The CUDA provider ignores the level.
DEFAULT_ACCURACY_LEVEL = 4
PARITY_ACCURACY_LEVEL = 0


def default_providers() -> list[str]:
    """CUDA when onnxruntime-gpu is installed (the `gpu` extra), else CPU."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(
    path: str | Path,
    *,
    accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL,
    providers: list[str] | None = None,
    optimization: str = "all",
    threads: int | None = None,
    optimized_model_path: str | Path | None = None,
) -> ort.InferenceSession:
    """An inference session for one graph.

    ``accuracy_level`` is the compute type of the fused INT4 ``MatMulNBits`` kernel: 4 (the default,
    as in ONNX Runtime itself) uses int8 activations (faster, ~0.7 % relative error per MatMul), 0
    computes in float (matches torch fake-quant to ~1e-7; parity checks use it). ``None`` leaves the
    session's config alone. ``optimization``: "all" (default), "basic" or "disable"; "extended" is refused because
    ONNX Runtime 1.32 miscomputes fp16 INT4 Q/DQ graphs at that level.
    """
    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {', '.join(levels)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = 3
    if accuracy_level is not None:
        so.add_session_config_entry(ACCURACY_LEVEL_KEY, str(int(accuracy_level)))
    threads = threads or int(os.environ.get("VLMQ_ORT_THREADS", "0"))
    if threads:
        so.intra_op_num_threads = threads
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return ort.InferenceSession(str(path), sess_options=so, providers=providers or default_providers())
