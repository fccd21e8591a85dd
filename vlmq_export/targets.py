"""Deployment targets: one table of what each runtime takes, read by the export (before it calibrates), `lint`
(after) and `build`. The rules are in ../shared/notes/tensorrt.md and formats.md.

Torch-free on purpose: deployment machines import it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import VlmqError


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str  # "tensorrt" or "onnxruntime"
    dtype: str  # the graphs' default float type: "fp16" (TensorRT runs INT4 weight-only in FP16) or "fp32"
    int4_blocks: tuple[int, ...] | None  # INT4 blocks along K the runtime takes (None: any)
    symmetric_only: bool  # signed INT4 without zero points only
    fp8: bool  # FP8 (E4M3) Q/DQ supported by the hardware
    min_trt: tuple[int, int] | None  # oldest TensorRT the target ships (None: not TensorRT)
    what: str  # the machine, in words (messages, the build script's GPU check)
    opsets: tuple[int, int] | None = None  # ONNX opsets (lowest, highest) the oldest TensorRT's parser takes

    @property
    def tensorrt(self) -> bool:
        return self.runtime == "tensorrt"


# Opset ranges. The parser itself checks no upper bound (onnx/onnx-tensorrt ModelImporter.cpp only warns below
# opset 7) and dispatches on op type; the ranges below are what NVIDIA documents per release:
# - TensorRT 10.0 to 10.8: onnx-tensorrt docs/operators.md "TensorRT 10.0 supports operators in the inclusive
#   range of opset 9 to opset 20". Yet the same 10.0 release added INT4 quantization (docs/Changelog.md, 10.0 EA),
#   whose blockwise DequantizeLinear exists only from opset 21, and its Q/DQ importer infers the blocks from the
#   scale's shape (onnxOpImporters.cpp, "Only a single blocking dimension is allowed"): 21 is the highest here,
#   the opset of every INT4 weight-only graph that TensorRT 10 takes.
# - TensorRT 10.9: opset 9 to 22; 10.13: 9 to 24 (release summaries; docs/operators.md of 10.15 says 9 to 24 too).
# - TensorRT 11.x: 9 to 25 (docs.nvidia.com/deeplearning/tensorrt/latest/reference/onnx-opset-guide.html).
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("onnxruntime", "onnxruntime", "fp32", None, False, True, None, "ONNX Runtime (CPU or CUDA)"),
    Target("tensorrt", "tensorrt", "fp16", (64, 128), True, True, (10, 0),
           "an NVIDIA GPU of compute capability 8.0 or later (Ampere+)", (9, 21)),
    Target("jetson-orin", "tensorrt", "fp16", (64, 128), True, False, (10, 3),
           "a Jetson Orin (JetPack 6: TensorRT 10.3)", (9, 21)),
    Target("jetson-thor", "tensorrt", "fp16", (64, 128), True, True, (10, 13),
           "a Jetson Thor (JetPack 7: TensorRT 10.13+)", (9, 24)),
)}
TRT_TARGETS = tuple(n for n, t in TARGETS.items() if t.tensorrt)

# The weight recipe each runtime defaults to, measured on SmolLM2-135M (benchmarks/grid.md, issue 25); explicit
# export flags override it. Keys are the export options' argparse names; every option here defaults to None.
# The symmetric grid "extreme" (each block's extreme on a code) beat "half" (max|w| / (qmax + 1/2)) beyond the
# calibration-seed spread: GPTQ W4 held-out perplexity 26.81 [26.30-27.43] against 28.18 [27.82-28.54], 3 seeds each.
RECIPE_DEFAULTS = {
    # ONNX Runtime takes zero points: asymmetric, layer groups in turn, the attention sink weighted 10, clipped-range
    # group scales (held-out perplexity over 3 seeds in grid.md); --no-asym falls back to the best symmetric grid
    "onnxruntime": {"asym": True, "true_sequential": True, "sink_weight": 10.0, "clip_search": True,
                    "sym_grid": "extreme",
                    # the lm_head (--lm-head) where the decoder is quantized: blockwise INT8 kept SmolLM2-135M's
                    # perplexity (INT4 RTN decoder: held-out 27.03 against 27.05 with a float head, english +0.3 %,
                    # inside GPTQ's ~2 % seed spread) and decoded 1.9x faster (benchmarks/lm-head.md)
                    "lm_head": "w8g64"},
    # TensorRT takes signed symmetric INT4 only: the grid that puts each block's extreme on a code beat max|w| /
    # (qmax + 1/2) beyond the seed spread (GPTQ W4), and true-sequential + sink 10 + clip-search on that grid beat the
    # plain extreme grid beyond it (held-out perplexity over 3 seeds in grid.md)
    "tensorrt": {"asym": False, "true_sequential": True, "sink_weight": 10.0, "clip_search": True,
                 "sym_grid": "extreme"},
}


def recipe_defaults(target: str) -> dict:
    """:data:`RECIPE_DEFAULTS` of ``target``'s runtime (a copy)."""
    return dict(RECIPE_DEFAULTS[get_target(target).runtime])


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise VlmqError(f"unknown target '{name}'; targets: {', '.join(TARGETS)}") from None
