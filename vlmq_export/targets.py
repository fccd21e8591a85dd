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

    @property
    def tensorrt(self) -> bool:
        return self.runtime == "tensorrt"


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("onnxruntime", "onnxruntime", "fp32", None, False, True, None, "ONNX Runtime (CPU or CUDA)"),
    Target("tensorrt", "tensorrt", "fp16", (64, 128), True, True, (10, 0),
           "an NVIDIA GPU of compute capability 8.0 or later (Ampere+)"),
    Target("jetson-orin", "tensorrt", "fp16", (64, 128), True, False, (10, 3),
           "a Jetson Orin (JetPack 6: TensorRT 10.3)"),
    Target("jetson-thor", "tensorrt", "fp16", (64, 128), True, True, (10, 13),
           "a Jetson Thor (JetPack 7: TensorRT 10.13+)"),
)}
TRT_TARGETS = tuple(n for n, t in TARGETS.items() if t.tensorrt)


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise VlmqError(f"unknown target '{name}'; targets: {', '.join(TARGETS)}") from None
