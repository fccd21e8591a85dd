"""``vlmq-export lint``: the static checks of an output directory's graphs against a deployment target's
rules, without the source model (so it runs on the deployment machine too).

Targets (the rules are in ``../shared/notes/formats.md``):

``tensorrt``     signed, symmetric INT4 (no zero point), blocks 64 / 128 along axis 0, constant scales,
                 each DequantizeLinear feeding a MatMul's input B; opset >= 21.
``onnxruntime``  the same form with zero points (UINT4) and any block allowed, and every INT4
                 DequantizeLinear actually fused into ``MatMulNBits`` by ONNX Runtime's optimizer (measured
                 by opening the graph, not assumed); opset >= 21.

A problem fails the target; a warning is a fact worth knowing that does not.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from .graphs import int4_dequantize_nodes, ort_fusion, portable_int4_problems

TARGETS = ("tensorrt", "onnxruntime")
INT4_OPSET = 21  # INT4 types and DequantizeLinear's block_size


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _float_activations(model: onnx.ModelProto) -> bool:
    return any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)


def lint_graph(path: Path, target: str) -> dict:
    """Problems and warnings of one graph for one target."""
    model = onnx.load(str(path), load_external_data=False)
    dqs = int4_dequantize_nodes(model)
    problems: list[str] = []
    warnings: list[str] = []
    if dqs and _opset(model) < INT4_OPSET:
        problems.append(f"opset {_opset(model)} < {INT4_OPSET}: INT4 DequantizeLinear with block_size needs {INT4_OPSET}")
    problems += portable_int4_problems(model, tensorrt=(target == "tensorrt"))
    res = {"graph": path.name, "int4_dequantize": len(dqs)}
    if target == "onnxruntime" and dqs:
        fusion = ort_fusion(path)
        res["matmulnbits"] = fusion["matmulnbits"]
        if fusion["dequantize_left"] or fusion["matmulnbits"] < len(dqs):
            problems.append(f"ONNX Runtime fused {fusion['matmulnbits']} of {len(dqs)} INT4 DequantizeLinear into "
                            f"MatMulNBits ({fusion['dequantize_left']} DequantizeLinear left): those run unfused")
    if target == "tensorrt" and _float_activations(model):
        warnings.append("float32 activations: TensorRT 10 needs --stronglyTyped (or the legacy --fp16) for the Q/DQ; "
                        "TensorRT 11 is always strongly typed and runs this graph in FP32")
    if model.ir_version > 10:
        warnings.append(f"IR version {model.ir_version}: ONNX Runtime before 1.20 reads at most 10")
    return {**res, "problems": problems, "warnings": warnings}


def lint_output(out: str | Path, targets: list[str] | None = None) -> dict:
    """Every graph of a complete output directory against each target (default: the runtimes its
    manifest's recipe names). ``ok`` is True when no target has a problem."""
    from ..errors import VlmqError
    from ..outdir import check_complete

    out = Path(out)
    manifest = check_complete(out)
    targets = list(targets or manifest.get("recipe", {}).get("runtimes") or TARGETS)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise VlmqError(f"unknown target {unknown[0]!r}; expected one of {', '.join(TARGETS)}")
    result = {"out": str(out), "runtimes_in_recipe": manifest.get("recipe", {}).get("runtimes"), "targets": {}}
    for target in targets:
        graphs = [lint_graph(out / comp["file"], target) for comp in manifest["components"].values()]
        result["targets"][target] = {"ok": not any(g["problems"] for g in graphs), "graphs": graphs}
    result["ok"] = all(t["ok"] for t in result["targets"].values())
    return result


def format_lint(result: dict) -> str:
    lines = []
    for target, res in result["targets"].items():
        n = sum(g["int4_dequantize"] for g in res["graphs"])
        fused = sum(g.get("matmulnbits", 0) for g in res["graphs"])
        detail = f"{n} INT4 DequantizeLinear" + (f", {fused} fused into MatMulNBits" if target == "onnxruntime" else "")
        lines.append(f"{target}: {'ok' if res['ok'] else 'PROBLEMS'} ({detail})")
        for g in res["graphs"]:
            for p in g["problems"][:20]:
                lines.append(f"  problem: {g['graph']}: {p}")
            if len(g["problems"]) > 20:
                lines.append(f"  ... and {len(g['problems']) - 20} more problems in {g['graph']}")
        for w in sorted({w for g in res["graphs"] for w in g["warnings"]}):
            graphs = ", ".join(g["graph"] for g in res["graphs"] if w in g["warnings"])
            lines.append(f"  warning: {w} ({graphs})")
    return "\n".join(lines)
