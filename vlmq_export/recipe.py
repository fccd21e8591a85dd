"""The quantization recipe's plain parts: component precisions and the checks of every number in it.

Nothing here imports torch, so that the command line refuses bad arguments in a fraction of a second,
before the heavy imports and the model load (``calibrate.Recipe`` builds on these).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import VlmqError

METHODS = ("rtn", "gptq", "gptaq", "mbq", "vlmq")
COMPONENTS = ("vision", "projector", "llm", "lm_head")  # execution order
CALIB_PROMPT_TOKENS = 2048  # default budget of a calibration prompt's text, in tokens (calibrate.fit_prompts)


ACT_FORMATS = ("int8", "fp8")  # W8A8: per-channel 8-bit weights and per-tensor 8-bit activations


@dataclass
class ComponentRecipe:
    bits: int = 4
    group_size: int = 128  # -1: per output channel
    act: str | None = None  # "int8" / "fp8": W8A8 (weights per channel in that format, inputs per tensor)

    def label(self) -> str:
        if self.act:  # W8A8; "int8w7": 7-bit weights (--reduce-range)
            return self.act + ("w7" if self.bits == 7 else "")
        return f"w{self.bits}" + ("pc" if self.group_size == -1 else f"g{self.group_size}")


def check_group_size(group: int, what: str = "--group-size") -> int:
    """-1 (per output channel) or a power of two >= 16: the blocks ONNX Runtime's MatMulNBits takes."""
    if group != -1 and (group < 16 or group & (group - 1)):
        raise VlmqError(f"{what} must be -1 (per output channel) or a power of two >= 16 (16, 32, 64, 128, ...), "
                        f"got {group}")
    return group


def parse_component_recipe(text: str, default_group: int = 128) -> ComponentRecipe:
    """``w4``, ``w4g64``, ``w8pc`` (per-channel), ``w3g128`` ... (weight-only), or ``int8`` / ``fp8`` (W8A8)."""
    if text.strip().lower() in ACT_FORMATS:
        return ComponentRecipe(8, -1, text.strip().lower())
    m = re.fullmatch(r"w([2348])(?:g(\d+)|(pc))?", text.strip().lower())
    if not m:
        raise VlmqError(f"bad component precision '{text}': use w<bits>[g<group>|pc], bits 2, 3, 4 or 8 (e.g. w4, w8pc, "
                        "w4g64), or int8 / fp8 (W8A8: 8-bit weights and activations)")
    bits = int(m.group(1))
    group = -1 if m.group(3) else int(m.group(2)) if m.group(2) else (-1 if bits == 8 else default_group)
    return ComponentRecipe(bits, check_group_size(group, f"the block of '{text}'"))


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_recipe_values(method: str, components: dict, sym: bool, damp: float, gptaq_alpha: float,
                        sink_weight: float) -> None:
    """Every recipe value that can be wrong on its own, as a one-line VlmqError."""
    if method not in METHODS:
        raise VlmqError(f"unknown --method '{method}'; valid: {', '.join(METHODS)}")
    if not components:
        raise VlmqError("no component to quantize")
    for comp, c in components.items():
        if comp not in COMPONENTS:
            raise VlmqError(f"unknown component '{comp}'; components: {', '.join(COMPONENTS)}")
        check_group_size(c.group_size, f"the block of {comp}")
    if not (_finite(damp) and damp > 0):
        raise VlmqError(f"--damp must be a finite number > 0, got {damp}")
    if not (_finite(gptaq_alpha) and 0.0 <= gptaq_alpha <= 1.0):
        raise VlmqError(f"--gptaq-alpha must be between 0 and 1, got {gptaq_alpha}")
    if not (_finite(sink_weight) and sink_weight >= 0.0):
        raise VlmqError(f"--sink-weight must be a finite number >= 0, got {sink_weight}")
    w8a8 = [comp for comp, c in components.items() if c.act]
    if w8a8 and method == "rtn":
        raise VlmqError(f"{w8a8[0]} {components[w8a8[0]].act}: activation ranges need calibration data, and --method "
                        "rtn reads none; use --method gptq, vlmq or mbq")
    if not sym and all(c.bits > 4 for c in components.values()):
        raise VlmqError("--asym applies to 2- to 4-bit weights and no component has them (8-bit weights stay symmetric)")


SYM_GRIDS = ("half", "extreme", "search")  # the symmetric grid's scale (calibrators/base.py group_scales)


def check_sym_grid(grid: str) -> None:
    if grid not in SYM_GRIDS:
        raise VlmqError(f"unknown --sym-grid '{grid}'; valid: {', '.join(SYM_GRIDS)}")


DTYPES = ("fp16", "fp32")  # the exported graphs' float type (bf16: ONNX Runtime's CPU kernels barely take it)


def check_target(target: str, dtype: str | None, components: dict, sym: bool) -> tuple[str, list[str]]:
    """What ``target`` (a name in ``targets.TARGETS``) cannot take, as a one-line VlmqError: zero points or an
    INT4 block it does not run. Returns the graphs' dtype (``dtype``, else the target's default) and warnings."""
    from .targets import get_target

    t = get_target(target)
    dtype = dtype or t.dtype
    if dtype not in DTYPES:
        raise VlmqError(f"unknown --dtype '{dtype}'; valid: {', '.join(DTYPES)}")
    if t.symmetric_only and not sym:
        raise VlmqError(f"--asym cannot go to --target {t.name}: TensorRT takes signed symmetric INT4 without zero "
                        "points (use --target onnxruntime for --asym)")
    blocks = t.int4_blocks or ()
    for comp, c in components.items():
        if c.act == "fp8" and not t.fp8:
            raise VlmqError(f"{comp} fp8 cannot go to --target {t.name}: {t.what} has no FP8 (use int8)")
        if blocks and c.bits <= 4 and c.group_size not in blocks:
            block = "per channel" if c.group_size == -1 else str(c.group_size)
            raise VlmqError(f"INT4 block {block} ({comp}) cannot go to --target {t.name}: it takes blocks "
                            f"{' or '.join(map(str, blocks))} (--group-size {blocks[-1]})")
    warnings = []
    if t.tensorrt and dtype == "fp32":
        warnings.append(f"--dtype fp32 for --target {t.name}: the INT4 MatMuls run in FP32 (a DequantizeLinear outputs "
                        "its scale's type), a slow engine NVIDIA's INT4 paths never build; fp16 is the default")
    return dtype, warnings


def check_saliency_values(floor: float, exponent: float) -> None:
    if not (_finite(floor) and floor >= 0):
        raise VlmqError(f"--saliency-floor must be a finite number >= 0, got {floor}")
    if not (_finite(exponent) and exponent > 0):
        raise VlmqError(f"--saliency-exponent must be a finite number > 0, got {exponent}")


def check_device(device: str | None) -> None:
    """The syntax of a torch device name (whether it exists needs torch: ``calibrate.check_device_available``)."""
    if device is not None and not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", device):
        raise VlmqError(f"bad --device '{device}': use cpu, cuda, cuda:N or mps")


def default_out(model_spec: str, method: str, components: dict, sym: bool) -> Path:
    name = model_spec.rstrip("/").split(":")[-1].split("/")[-1] or "model"
    bits = "-".join(f"{c}{r.label()}" for c, r in components.items())
    return Path(f"{name}-{method}-{bits}" + ("" if sym else "-asym"))
