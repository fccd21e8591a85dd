"""``vlmq-export lint``: the static checks of an output directory's graphs against a deployment target's
rules, without the source model (so it runs on the deployment machine too: no torch, no transformers).

Targets are the names of ``vlmq_export.targets.TARGETS``; the rules are in ``../shared/notes/tensorrt.md`` and
``formats.md``:

TensorRT targets (``tensorrt``, ``jetson-orin``, ``jetson-thor``), every Q/DQ of the graph:
    scales constant, finite and > 0; zero points absent (INT4) or all zero, signed types (INT4, INT8, FP8 E4M3FN);
    INT4 weight-only: a [K, N] weight with an even element count straight into a MatMul's (or Gemm's) input B,
    nothing in between, blocks ``Target.int4_blocks`` along axis 0 and a [K/B, N] scale; INT8 / FP8: scalar
    activation scales, 1-D weight scales along axis 1 (MatMul) or 0 (Conv), no Cast after a DQ; no FP8 where
    ``Target.fp8`` is False; opset within ``Target.opsets``. An INT4 graph in FP32 (scales or activations) is a
    warning that names its cost.
``onnxruntime``  the portable INT4 form with zero points (UINT4) and any block allowed, and every INT4
                 DequantizeLinear actually fused into ``MatMulNBits`` by ONNX Runtime's optimizer (measured
                 by opening the graph, not assumed); opset >= 21.

A problem fails the target; a warning is a fact worth knowing that does not.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from ..targets import get_target
from .graphs import INT4_OPSET, int4_dequantize_nodes, opset, ort_fusion, portable_int4_problems, tensorrt_lint


def lint_graph(path: Path, target: str) -> dict:
    """Problems and warnings of one graph for one target (a name in ``TARGETS``)."""
    path = Path(path)
    rules = get_target(target)
    model = onnx.load(str(path), load_external_data=False)
    dqs = int4_dequantize_nodes(model)
    problems: list[str] = []
    warnings: list[str] = []
    if dqs and opset(model) < INT4_OPSET:
        problems.append(f"opset {opset(model)} < {INT4_OPSET}: INT4 DequantizeLinear with block_size needs {INT4_OPSET}")
    res = {"graph": path.name, "int4_dequantize": len(dqs)}
    if rules.tensorrt:
        trt_problems, warnings = tensorrt_lint(model, rules, path.parent)
        problems += trt_problems
    else:
        problems += portable_int4_problems(model, tensorrt=False)
    if not rules.tensorrt and dqs:
        fusion = ort_fusion(path)
        res["matmulnbits"] = fusion["matmulnbits"]
        if fusion["dequantize_left"] or fusion["matmulnbits"] < len(dqs):
            problems.append(f"ONNX Runtime fused {fusion['matmulnbits']} of {len(dqs)} INT4 DequantizeLinear into "
                            f"MatMulNBits ({fusion['dequantize_left']} INT4 DequantizeLinear left): those run unfused")
    if model.ir_version > 10:
        warnings.append(f"IR version {model.ir_version}: ONNX Runtime before 1.20 reads at most 10")
    return {**res, "problems": problems, "warnings": warnings}


def lint_output(out: str | Path, targets: list[str] | None = None) -> dict:
    """Every graph of a complete output directory against each target (default: the runtimes its
    manifest's recipe names). ``ok`` is True when no target has a problem."""
    from ..outdir import check_complete

    out = Path(out)
    manifest = check_complete(out)
    targets = list(targets or manifest.get("recipe", {}).get("runtimes") or ("tensorrt", "onnxruntime"))
    for t in targets:
        get_target(t)  # an unknown name is a one-line error
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
