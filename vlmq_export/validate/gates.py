"""The validation gates: one table of thresholds, read by the report's verdict (report.md and report.html)
and by `vlmq-export validate`'s exit code (1 when a gate fails).

Each gate reads one key of the manifest's ``validation`` summary; a gate whose key is absent (no
task accuracy, no image in the prompts, `--no-validate`) is not part of the verdict.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gate:
    key: str  # key of the validation summary
    label: str
    section: str  # the report section the number comes from (for its provenance)
    higher_is_better: bool | None  # None: a yes/no check, True passes
    warn: float | None = None  # beyond this: warn
    fail: float | None = None  # beyond this: fail (None: the gate only warns)

    def result(self, value) -> str:
        if self.higher_is_better is None:
            return "pass" if value else "fail"
        worse = (lambda t: value < t) if self.higher_is_better else (lambda t: value > t)
        if self.fail is not None and worse(self.fail):
            return "fail"
        if self.warn is not None and worse(self.warn):
            return "warn"
        return "pass"

    def threshold(self) -> str:
        if self.higher_is_better is None:
            return "must hold"
        ok, bad = ("≥", "<") if self.higher_is_better else ("≤", ">")
        if self.fail is None:
            return f"pass {ok} {self.warn:g}, else warn"
        if self.warn is None:
            return f"fail {bad} {self.fail:g}"
        return f"pass {ok} {self.warn:g}, fail {bad} {self.fail:g}, warn between"


QUANTIZED = "stages.quantized_vs_full_precision"
GATES: tuple[Gate, ...] = (
    Gate("float_onnx_max_abs_diff", "float ONNX vs torch: max abs diff (export correctness)",
         "stages.float_onnx_vs_torch", False, warn=1e-3, fail=1e-2),
    Gate("qdq_max_abs_diff", "Q/DQ ONNX vs torch fake-quant: max abs diff", "stages.qdq_onnx_vs_torch_fakequant",
         False, warn=1e-3, fail=1e-2),
    # W8A8 vision / projector: float noise moves activations on a rounding tie to the next code and the step grows
    # through the blocks (0.076 end to end on the tiny Qwen2.5-VL), so their parity is gated layer by layer, torch
    # forced onto ONNX Runtime's activations (validate/act_parity.py: ~7e-7), the llm's on the text-only prompt
    Gate("qdq_w8a8_layer_max_rel", "W8A8 Q/DQ ONNX vs torch fake-quant, layer by layer on ONNX Runtime's activations: "
         "max relative error", "stages.qdq_w8a8_layerwise", False, warn=1e-4, fail=1e-3),
    Gate("qdq_text_max_abs_diff", "Q/DQ ONNX vs torch fake-quant, text-only prompt: logits max abs diff",
         "stages.qdq_onnx_vs_torch_fakequant", False, warn=1e-3, fail=1e-2),
    # FP16 graphs (--dtype fp16): parity against torch's FP16 fake-quant, and the FP16 cost against the FP32 twin.
    # Two FP16 implementations differ by accumulation order and rounding, about 1e-3 relative (max abs diff grows
    # with the logits' size), so the gate is on the cosine; thresholds from the tiny models and the testbed (README)
    Gate("qdq_fp16_logits_cosine", "FP16 Q/DQ ONNX vs torch FP16 fake-quant: logits cosine",
         "stages.qdq_onnx_vs_torch_fakequant", True, warn=0.9999, fail=0.999),
    Gate("fp16_vs_fp32_logits_cosine", "FP16 export vs its FP32 twin: logits cosine", "stages.fp16_vs_fp32_export",
         True, warn=0.9999, fail=0.999),
    Gate("fp16_vs_fp32_top1_agreement", "FP16 export vs its FP32 twin: top-1 agreement", "stages.fp16_vs_fp32_export",
         True, warn=0.98, fail=0.90),
    Gate("logits_cosine", "logits cosine vs full precision", QUANTIZED, True, warn=0.98, fail=0.90),
    Gate("top1_agreement", "top-1 agreement vs full precision", QUANTIZED, True, warn=0.85, fail=0.50),
    Gate("greedy_token_agreement", "greedy token agreement vs full precision", QUANTIZED, True, warn=0.50),
    Gate("image_features_cosine", "image features cosine vs full precision", QUANTIZED, True, warn=0.99, fail=0.90),
    Gate("task_accuracy_drop", "task accuracy drop (full precision minus exported ONNX)", "task", False,
         warn=0.03, fail=0.10),
    Gate("int4_form_ok", "INT4 form follows the target's rules", "int4_form", None),
    Gate("ort_fused_all", "ONNX Runtime fuses every INT4 DequantizeLinear into MatMulNBits", "ort_fusion", None),
    Gate("tensorrt_matches_onnxruntime", "TensorRT engines match ONNX Runtime (Polygraphy, atol = rtol = 1e-2, mean)",
         "stages.tensorrt_vs_onnxruntime", None),
)

# a quantized layer is flagged when its reconstruction error is this many times the median of its layer type
OUTLIER_RATIO = 10.0

_ORDER = ("pass", "warn", "fail")


def evaluate(summary: dict) -> list[dict]:
    """One row per gate whose number the summary holds."""
    return [{"gate": g.key, "label": g.label, "section": g.section, "value": summary[g.key],
             "threshold": g.threshold(), "result": g.result(summary[g.key])}
            for g in GATES if summary.get(g.key) is not None]


def overall(rows: list[dict], warnings: int = 0) -> str:
    """The worst gate's result; a pass with warnings (e.g. outlier layers) is a warn."""
    worst = max((_ORDER.index(r["result"]) for r in rows), default=0)
    return _ORDER[max(worst, 1 if warnings else 0)]


def failed(summary: dict) -> list[dict]:
    return [r for r in evaluate(summary) if r["result"] == "fail"]
