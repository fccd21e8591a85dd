"""report/validation.json and report/report.md."""
from __future__ import annotations

import json
from pathlib import Path

# thresholds the report marks as passed / failed (the tests assert the same numbers)
PARITY_TOL = 1e-4


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}"
    return str(v)


def write_report(out: Path, manifest: dict, report: dict) -> None:
    rdir = Path(out) / "report"
    rdir.mkdir(exist_ok=True)
    doc = {"source": manifest.get("source"), "recipe": manifest.get("recipe"),
           "summary": manifest.get("validation"), **report}
    (rdir / "validation.json").write_text(json.dumps(doc, indent=2, default=str))
    lines = [f"# vlmq-export report: {manifest['source']['model']}", ""]
    r = manifest["recipe"]
    comps = ", ".join(f"{c} W{v['bits']} " + ("per-channel" if v["group_size"] == -1 else f"group {v['group_size']}")
                      for c, v in r["components"].items())
    lines += [f"- family: {manifest['source']['family']}; method {r['method']}: {comps}; symmetric weight-only "
              f"Q/DQ (opset {manifest['opset']})",
              f"- calibration: {manifest['calibration']['samples']} samples from {manifest['calibration']['source']}",
              ""]
    lines += ["## Files", "", "| graph | INT4 Q/DQ bytes | float bytes | ratio |", "|---|---|---|---|"]
    for name, c in manifest.get("components", {}).items():
        fb = c.get("float_bytes") or 0
        lines.append(f"| {c['file']} | {c['bytes']:,} | {fb:,} | {c['bytes'] / fb:.2f} |" if fb else
                     f"| {c['file']} | {c['bytes']:,} | | |")
    lines += ["", "## Fidelity (held-out prompts)", ""]
    names = {"float_onnx_vs_torch": "float ONNX vs torch (export correctness)",
             "qdq_onnx_vs_torch_fakequant": "Q/DQ ONNX (ORT, accuracy level {level}) vs torch with the same quantized weights",
             "quantized_vs_full_precision": "quantized ONNX (ORT, accuracy level {level}, as `run` serves it) vs "
                                            "full-precision torch (what quantization costs)"}
    for key, stage in report.get("stages", {}).items():
        title = names.get(key, key).format(level=stage.get("accuracy_level", "?"))
        lines += [f"### {title}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in stage.items()]
        lines.append("")
    task = report.get("task")
    if task:
        lines += [f"## Task accuracy (ShapesVQA test split, {task['samples']} samples, exact match)", "",
                  "| model | overall | per question type |", "|---|---|---|"]
        names = {"torch_full_precision": "full precision (torch)",
                 "onnx_quantized": "exported ONNX (ONNX Runtime, accuracy level {level})"}
        for key, res in task.items():
            if isinstance(res, dict):
                per = ", ".join(f"{k} {_fmt(v)}" for k, v in res.get("per_qtype", {}).items())
                name = names.get(key, key).format(level=res.get("accuracy_level", "?"))
                lines.append(f"| {name} | {_fmt(res.get('accuracy'))} | {per} |")
        lines.append("")
    comp = report.get("components")
    if comp:
        lines += ["## Per-component fidelity (each quantized graph alone, fed the float graph's inputs)", "",
                  "| component | metric | value |", "|---|---|---|"]
        for c, metrics in comp.items():
            lines += [f"| {c} | {k} | {_fmt(v)} |" for k, v in metrics.items()]
        lines.append("")
    sal = report.get("saliency")
    if sal:
        lines += ["## Token saliency by modality (decoder blocks)", "",
                  "| block | vision tokens | vision mean grad | text mean grad | other mean grad | vision share of weight |",
                  "|---|---|---|---|---|---|"]
        for site, v in sal.items():
            lines.append(f"| {site} | {v['vision_tokens']} | {_fmt(v['vision_mean_grad'])} | {_fmt(v['text_mean_grad'])} | "
                         f"{_fmt(v['other_mean_grad'])} | {_fmt(v['vision_weight_share'])} |")
        lines.append("")
    fusion = report.get("ort_fusion")
    if fusion:
        lines += ["## ONNX Runtime fusion (llm.onnx)", "",
                  f"{fusion['int4_dequantize']} INT4 DequantizeLinear -> {fusion['matmulnbits']} MatMulNBits "
                  f"({fusion['dequantize_left']} DequantizeLinear left after optimization)", ""]
    probs = report.get("int4_form_problems")
    if report.get("int4_form_rules", "tensorrt") == "tensorrt":
        lines += ["## Portable INT4 form (TensorRT rules)", ""]
    else:
        lines += ["## INT4 form (ONNX Runtime rules)", "",
                  "Asymmetric weights (UINT4 codes with zero points, `--asym`): ONNX Runtime only, TensorRT takes "
                  "signed INT4 without zero points.", ""]
    lines += ["all INT4 weights conform" if not probs else "\n".join(f"- {p}" for p in probs), ""]
    layers = manifest.get("layers", [])
    if layers:
        lines += ["## Layers", "", "| layer | component | bits | group | error | note |", "|---|---|---|---|---|---|"]
        for rec in layers:
            lines.append(f"| {rec['name']} | {rec.get('component', '')} | {rec['bits'] or 'float'} | {rec['group_size'] or ''} | "
                         f"{_fmt(rec['error']) if rec.get('error') is not None else ''} | {rec.get('note', '')} |")
    (rdir / "report.md").write_text("\n".join(lines) + "\n")
