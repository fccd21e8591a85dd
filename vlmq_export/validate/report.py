"""report/validation.json, report/report.md and report/report.html.

The report is built once as a list of sections (title, text, table), then written as markdown and as
HTML (with plots, ``html.py``). Its verdict comes from the gates in ``gates.py``.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import gates


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}"
    return str(v)


@dataclass
class Section:
    title: str
    level: int = 2
    text: list[str] = field(default_factory=list)  # markdown lines: inline `code`, **bold**, "- " bullets
    header: list[str] | None = None
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # below the table (footnotes)
    plot: str | None = None  # the HTML report's plot for this section


# ----------------------------------------------------------------------------- provenance
def measured(manifest: dict, report: dict) -> dict:
    """Who measured each section's numbers and when: the export (at the manifest's date) unless `validate`
    re-measured it (``report["measured"]``, written by ``validate_output``)."""
    present = [f"stages.{k}" for k in report.get("stages", {})]
    present += [k for k in ("task", "perplexity", "components", "components_fp16_vs_fp32", "saliency", "ort_fusion")
                if report.get(k)]
    present += ["int4_form"] if "int4_form_problems" in report else []
    export = {"by": "export", "at": manifest.get("created")}
    return {k: report.get("measured", {}).get(k, export) for k in present}


def _by(m: dict | None) -> str:
    if not m:
        return ""
    return f"{'export' if m['by'] == 'export' else '`validate`'}, {m['at']}"


# ----------------------------------------------------------------------------- layers
def layer_kind(name: str) -> tuple[int | None, str]:
    """(block index, layer type): ``model.layers.4.mlp.down_proj`` -> (4, ``mlp.down_proj``)."""
    m = re.search(r"\.(\d+)\.", name)
    return (int(m.group(1)), name[m.end():]) if m else (None, name)


def outlier_layers(layers: list[dict]) -> list[dict]:
    """Quantized layers whose reconstruction error is over ``gates.OUTLIER_RATIO`` times the median of their
    type (same component, same name past the block index), among types with at least three layers."""
    groups: dict[tuple, list[dict]] = {}
    for rec in layers:
        if rec.get("bits") and rec.get("error") is not None and math.isfinite(rec["error"]):
            groups.setdefault((rec.get("component", ""), layer_kind(rec["name"])[1]), []).append(rec)
    out = []
    for (comp, kind), recs in groups.items():
        errs = sorted(r["error"] for r in recs)
        n = len(errs)
        median = (errs[(n - 1) // 2] + errs[n // 2]) / 2
        if n < 3 or median <= 0:
            continue
        out += [{"name": r["name"], "component": comp, "type": kind, "block": layer_kind(r["name"])[0],
                 "error": r["error"], "median": median, "ratio": r["error"] / median}
                for r in recs if r["error"] > gates.OUTLIER_RATIO * median]
    return out


def _layers_section(layers: list[dict], outliers: list[dict]) -> Section:
    counts = Counter(r.get("note") for r in layers if r.get("note"))
    repeated = [n for n in counts if counts[n] > 1]  # each goes once, as a footnote
    flagged = {o["name"] for o in outliers}
    sec = Section("Layers", header=["layer", "component", "bits", "group", "error", "note"], plot="layers")
    for rec in layers:
        note = rec.get("note", "")
        err = _fmt(rec["error"]) if rec.get("error") is not None else ""
        sec.rows.append([rec["name"], rec.get("component", ""), str(rec["bits"] or "float"), str(rec["group_size"] or ""),
                         f"**{err}** (outlier)" if rec["name"] in flagged else err,
                         f"[{repeated.index(note) + 1}]" if note in repeated else note])
    sec.notes = [f"[{i + 1}] {n} ({counts[n]} layers)" for i, n in enumerate(repeated)]
    return sec


# ----------------------------------------------------------------------------- sections
def verdict(manifest: dict, report: dict) -> dict:
    rows = gates.evaluate(manifest.get("validation") or {})
    outliers = outlier_layers(manifest.get("layers", []))
    return {"result": gates.overall(rows, len(outliers)), "gates": rows, "outlier_layers": outliers}


def _verdict_section(v: dict, prov: dict) -> Section:
    sec = Section(f"Verdict: {v['result'].upper()}", header=["gate", "value", "threshold", "result", "measured by"])
    for r in v["gates"]:
        value = ("yes" if r["value"] else "no") if isinstance(r["value"], bool) else _fmt(r["value"])
        sec.rows.append([r["label"], value, r["threshold"], r["result"], _by(prov.get(r["section"]))])
    if not v["gates"]:
        sec.text.append("No gate measured (exported with `--no-validate`?).")
    for o in v["outlier_layers"]:
        sec.notes.append(f"- warning: outlier layer `{o['name']}` ({o['component']}, block {o['block']}): reconstruction "
                         f"error {_fmt(o['error'])}, {o['ratio']:.0f}x the median of its type {o['type']} "
                         f"({_fmt(o['median'])}; flagged above {gates.OUTLIER_RATIO:g}x)")
    return sec


def _header(manifest: dict, prov: dict) -> list[str]:
    r = manifest["recipe"]
    sym = r.get("symmetric", all(v.get("sym", True) for v in r["components"].values()))
    comps = ", ".join(f"{c} W{v['bits']} " + ("per-channel" if v["group_size"] == -1 else f"group {v['group_size']}")
                      + ("" if v.get("sym", sym) else " asymmetric") for c, v in r["components"].items())
    form = "symmetric" if sym else "asymmetric (UINT4 codes with zero points)"
    lines = [f"# vlmq-export report: {manifest['source']['model']}", "",
             f"- family: {manifest['source']['family']}; method {r['method']}: {comps}; {form} weight-only "
             f"Q/DQ (opset {manifest['opset']})",
             f"- graphs: {r.get('dtype', 'fp32').upper()} for target {r.get('target', 'onnxruntime')} (runtimes: "
             f"{', '.join(r.get('runtimes') or [])})"
             + (f"; {r['fp16_scales_clamped']} INT4 scales raised to FP16's smallest normal number"
                if r.get("fp16_scales_clamped") else ""),
             f"- calibration: {manifest['calibration']['samples']} samples from {manifest['calibration']['source']}",
             f"- numbers measured by the export ({manifest.get('created')})"]
    again = sorted({m["at"] for m in prov.values() if m["by"] == "validate"})
    if again:
        lines[-1] += f", except where marked: `vlmq-export validate` re-measured on {again[-1]} " + ", ".join(
            k for k, m in prov.items() if m["by"] == "validate")
    return lines + [""]


def _perplexity_section(ppl: dict, prov: dict | None) -> Section:
    from .perplexity import format_perplexity

    n = ppl.get("heldout_windows")
    sec = Section(f"Language-model perplexity (95 % interval: per-window bootstrap; {_by(prov)})",
                  header=["model", "english.txt", "held-out English" + (f" (first {n} windows)" if n else "")],
                  plot="perplexity")
    names = {"torch_full_precision": "full precision (torch)", "onnx_quantized": "exported ONNX (ONNX Runtime)"}
    for key, texts in ppl.items():
        if isinstance(texts, dict):
            sec.rows.append([names.get(key, key), *(format_perplexity(texts[t]) for t in ("english", "heldout"))])
    sec.notes.append("Windows of 512 tokens scored from scratch. Held-out: four State of the Union addresses "
                     "(`vlmq_export/assets/HELDOUT.md`)" + (f"; the export scores its first {n} windows, "
                                                           "`vlmq-export eval OUT` the whole text." if n else "."))
    few = min((t["windows"] for texts in ppl.values() if isinstance(texts, dict) for t in texts.values()), default=0)
    if few < 5:
        sec.notes.append(f"An interval from {few} windows is coarse (english.txt is 2 windows for SmolLM2's tokenizer): "
                         "compare models on the held-out text.")
    return sec


def sections(manifest: dict, report: dict, v: dict, prov: dict) -> list[Section]:
    out = [_verdict_section(v, prov)]
    files = Section("Files", header=["graph", "INT4 Q/DQ bytes", "float bytes", "ratio"])
    for c in manifest.get("components", {}).values():
        fb = c.get("float_bytes") or 0
        files.rows.append([c["file"], f"{c['bytes']:,}", f"{fb:,}" if fb else "", f"{c['bytes'] / fb:.2f}" if fb else ""])
    out += [files, Section("Fidelity (held-out prompts)")]
    names = {"float_onnx_vs_torch": "float ONNX vs torch (export correctness)",
             "qdq_onnx_vs_torch_fakequant": "Q/DQ ONNX (ORT, accuracy level {level}) vs torch with the same quantized "
                                            "weights{fp16}",
             "fp16_vs_fp32_export": "FP16 Q/DQ ONNX vs the FP32 Q/DQ ONNX of the same codes (ORT, accuracy level "
                                    "{level}): what FP16 costs the graphs",
             "torch_fakequant_fp16_vs_fp32": "torch fake-quant in float16 vs float32: what FP16 costs the model itself",
             "qdq_w8a8_layerwise": "W8A8 vision / projector layer by layer: Q/DQ ONNX vs torch fake-quant forced onto "
                                   "ONNX Runtime's activations at every W8A8 layer (rounding ties do not grow)",
             "quantized_vs_full_precision": "quantized ONNX (ORT, accuracy level {level}, as `run` serves it) vs "
                                            "full-precision torch (what quantization costs)"}
    for key, stage in report.get("stages", {}).items():
        title = names.get(key, key).format(level=stage.get("accuracy_level", "?"),
                                           fp16=", in float16" if stage.get("dtype") == "fp16" else "")
        out.append(Section(f"{title} — {_by(prov.get(f'stages.{key}'))}", level=3, header=["metric", "value"],
                           rows=[[k, _fmt(v)] for k, v in stage.items()]))
    task = report.get("task")
    if task:
        from ..testbed.evaluate import format_interval

        sec = Section(f"Task accuracy (ShapesVQA test split, {task['samples']} samples, exact match, 95 % Wilson "
                      f"intervals; {_by(prov.get('task'))})", header=["model", "overall", "per question type"],
                      plot="task")
        names = {"torch_full_precision": "full precision (torch)",
                 "onnx_quantized": "exported ONNX (ONNX Runtime, accuracy level {level})",
                 "recorded_full_precision": "full precision, recorded with the testbed's parts ({n} samples, meta.json)"}
        for key, res in task.items():
            if isinstance(res, dict):
                cis, ns = res.get("per_qtype_ci95", {}), res.get("n_per_qtype", {})
                per = ", ".join(f"{k} {_fmt(v)} {format_interval(cis.get(k))} (n={ns.get(k, '?')})".replace("  ", " ")
                                for k, v in res.get("per_qtype", {}).items())
                sec.rows.append([names.get(key, key).format(level=res.get("accuracy_level", "?"), n=res.get("n", "?")),
                                 f"{_fmt(res.get('accuracy'))} {format_interval(res.get('ci95'))}".rstrip(), per])
        out.append(sec)
    if report.get("perplexity"):
        out.append(_perplexity_section(report["perplexity"], prov.get("perplexity")))
    comp = report.get("components")
    if comp:
        out.append(Section(f"Per-component fidelity (each quantized graph alone, fed the float graph's inputs; "
                           f"{_by(prov.get('components'))})", header=["component", "metric", "value"], plot="components",
                           rows=[[c, k, _fmt(v)] for c, metrics in comp.items() for k, v in metrics.items()]))
    comp16 = report.get("components_fp16_vs_fp32")
    if comp16:
        out.append(Section(f"Per-component FP16 cost (each FP16 Q/DQ graph against its FP32 twin, fed the FP32 "
                           f"graph's inputs; {_by(prov.get('components_fp16_vs_fp32'))})",
                           header=["component", "metric", "value"],
                           rows=[[c, k, _fmt(v)] for c, metrics in comp16.items() for k, v in metrics.items()]))
    sal = report.get("saliency")
    if sal:
        out.append(Section(
            f"Token saliency by modality (decoder blocks; {_by(prov.get('saliency'))})", plot="saliency",
            header=["block", "vision tokens", "vision mean grad", "text mean grad", "other mean grad", "vision share of weight"],
            rows=[[site, str(s["vision_tokens"]), _fmt(s["vision_mean_grad"]), _fmt(s["text_mean_grad"]),
                   _fmt(s["other_mean_grad"]), _fmt(s["vision_weight_share"])] for site, s in sal.items()]))
    fusion = report.get("ort_fusion")
    if fusion and fusion.get("int4_dequantize"):  # no INT4 weights in the language model: nothing to fuse
        out.append(Section(f"ONNX Runtime fusion (llm.onnx; {_by(prov.get('ort_fusion'))})", text=[
            f"{fusion['int4_dequantize']} INT4 DequantizeLinear -> {fusion['matmulnbits']} MatMulNBits "
            f"({fusion['dequantize_left']} INT4 DequantizeLinear left after optimization)"]))
    probs = report.get("int4_form_problems")
    when = _by(prov.get("int4_form"))
    if report.get("int4_form_rules", "tensorrt") == "tensorrt":
        form = Section(f"Portable INT4 form (TensorRT rules; {when})")
    else:
        form = Section(f"INT4 form (ONNX Runtime rules; {when})", text=[
            "Asymmetric weights (UINT4 codes with zero points, `--asym`): ONNX Runtime only, TensorRT takes "
            "signed INT4 without zero points.", ""])
    form.text += ["all INT4 weights conform"] if not probs else [f"- {p}" for p in probs]
    out.append(form)
    if manifest.get("layers"):
        out.append(_layers_section(manifest["layers"], v["outlier_layers"]))
    return out


def to_markdown(header: list[str], secs: list[Section]) -> str:
    lines = list(header)
    for s in secs:
        lines += [f"{'#' * s.level} {s.title}", ""]
        lines += s.text + ([""] if s.text else [])
        if s.header:
            lines += ["| " + " | ".join(s.header) + " |", "|" + "---|" * len(s.header)]
            lines += ["| " + " | ".join(row) + " |" for row in s.rows]
            lines.append("")
        lines += s.notes + ([""] if s.notes else [])
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(out: Path, manifest: dict, report: dict) -> dict:
    """Write report/validation.json, report.md and report.html; returns the verdict."""
    from .html import render_html

    rdir = Path(out) / "report"
    rdir.mkdir(exist_ok=True)
    v = verdict(manifest, report)
    prov = measured(manifest, report)
    doc = {"source": manifest.get("source"), "recipe": manifest.get("recipe"),
           "summary": manifest.get("validation"), **report, "measured": prov, "verdict": v}
    header, secs = _header(manifest, prov), sections(manifest, report, v, prov)
    texts = {"validation.json": json.dumps(doc, indent=2, default=str), "report.md": to_markdown(header, secs),
             "report.html": render_html(header, secs, manifest, report, v)}
    for name, text in texts.items():  # all rendered before any is written
        (rdir / name).write_text(text)
    return v
