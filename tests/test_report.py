"""The report (verdict, outlier layers, collapsed notes, HTML with plots) and `validate` keeping what it
does not recompute."""
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vlmq_export import cli, pipeline
from vlmq_export.validate import gates
from vlmq_export.validate.report import outlier_layers, write_report

IMG = '<img src="data:image/png;base64,'


@pytest.fixture(scope="module")
def exported(tiny_dirs, tmp_path_factory) -> Path:
    """A tiny SmolVLM with every report section: VLMQ saliency, a W8 vision tower, task accuracy."""
    out = tmp_path_factory.mktemp("report") / "out"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "--vision", "w8", "-o", str(out), "--n-calib", "4",
                     "--eval-task", "4", "--n-val", "2", "--gen-tokens", "4", "--quiet"]) == 0
    return out


@pytest.fixture
def copied(exported, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    return out


def read(out: Path) -> tuple[dict, dict, str]:
    return (json.loads((out / "manifest.json").read_text()), json.loads((out / "report" / "validation.json").read_text()),
            (out / "report" / "report.md").read_text())


def test_validate_keeps_what_it_does_not_recompute(copied, capsys):
    manifest0, doc0, md0 = read(copied)
    assert {"task", "components", "saliency", "layers"} <= doc0.keys()
    assert "task_accuracy_onnx_quantized" in manifest0["validation"]
    assert cli.main(["validate", str(copied), "--n-val", "2", "--gen-tokens", "4", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    manifest, doc, md = read(copied)
    assert manifest0.keys() <= manifest.keys()
    assert manifest0["validation"].keys() <= manifest["validation"].keys() <= printed.keys()
    assert doc0.keys() <= doc.keys() and doc0["stages"].keys() <= doc["stages"].keys()
    for kept in ("task", "components", "saliency", "layers"):
        assert doc[kept] == doc0[kept]
    assert manifest["validation"]["task_accuracy_drop"] == manifest0["validation"]["task_accuracy_drop"]
    for section in ("## Task accuracy", "## Per-component fidelity", "## Token saliency"):
        assert section in md0 and section in md
    # provenance: what this run recomputed is marked as such, with its date; the rest stays the export's
    assert doc["measured"]["stages.quantized_vs_full_precision"]["by"] == "validate"
    assert doc["measured"]["stages.quantized_vs_full_precision"]["at"] >= manifest["created"]
    assert doc["measured"]["task"] == {"by": "export", "at": manifest["created"]}
    task_title = next(line for line in md.splitlines() if line.startswith("## Task accuracy"))
    assert f"export, {manifest['created']}" in task_title
    q_title = next(line for line in md.splitlines() if line.startswith("### quantized ONNX"))
    assert "`validate`" in q_title and doc["measured"]["stages.quantized_vs_full_precision"]["at"] in q_title


def test_validate_exits_1_when_a_gate_fails(copied, monkeypatch, capsys):
    real = pipeline.compare

    def damaged(ref, test):  # what a quantization that wrecked the logits would measure
        return {**real(ref, test), "logits_cosine": 0.5}

    monkeypatch.setattr(pipeline, "compare", damaged)
    assert cli.main(["validate", str(copied), "--n-val", "2", "--gen-tokens", "4", "--quiet"]) == 1
    assert json.loads(capsys.readouterr().out)["gates"] == "fail"
    _, doc, md = read(copied)
    assert doc["verdict"]["result"] == "fail"
    assert any(r["gate"] == "logits_cosine" and r["result"] == "fail" for r in doc["verdict"]["gates"])
    assert "FAIL" in md.split("\n## ", 2)[1]  # in the verdict section, the first one


def test_html_report_of_an_export(exported):
    text = (exported / "report" / "report.html").read_text()

    class Parser(HTMLParser):
        def __init__(self):
            super().__init__()
            self.imgs, self.external = [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                self.imgs.append(a["src"])
            if tag in ("link", "script") or (tag == "img" and not a["src"].startswith("data:")):
                self.external.append(tag)

    p = Parser()
    p.feed(text)
    p.close()
    # layer errors, saliency by modality, per-component fidelity, task accuracy per question type, perplexity
    # (english.txt and the held-out text, with intervals)
    assert len(p.imgs) == text.count(IMG) == 5
    assert not p.external
    assert "Verdict" in text


# ----------------------------------------------------------------------------- synthetic reports
def synthetic(sym: bool = True) -> tuple[dict, dict]:
    layers = []
    for block in range(6):
        for kind, err in (("self_attn.q_proj", 0.01), ("mlp.down_proj", 0.002 * (1 + block % 3))):
            layers.append({"name": f"model.layers.{block}.{kind}", "component": "llm", "bits": 4,
                           "group_size": 64, "error": err, "note": "in_features 320: block 64" if "down" in kind else ""})
    layers[9]["error"] = 2584.0  # layers.4.mlp.down_proj, far above its neighbours
    layers[4]["note"] = "damping raised to 0.1"
    comp = {"bits": 4, "group_size": 64, "sym": sym}
    manifest = {"source": {"model": "m", "family": "smolvlm"}, "created": "2026-12-01T10:00:00Z", "opset": 21,
                "recipe": {"method": "gptq", "symmetric": sym, "components": {"llm": comp}},
                "calibration": {"samples": 4, "source": "builtin"}, "components": {}, "layers": layers,
                "validation": {"logits_cosine": 0.99, "top1_agreement": 0.9, "int4_form_ok": True, "ort_fused_all": True,
                               "task_accuracy_torch_full_precision": 0.5, "task_accuracy_onnx_quantized": 0.49,
                               "task_accuracy_drop": 0.01}}
    report = {"stages": {"quantized_vs_full_precision": {"logits_cosine": 0.99, "top1_agreement": 0.9}},
              "task": {"samples": 100, "torch_full_precision": {"accuracy": 0.5, "per_qtype": {"color": 0.6, "count": 0.3}},
                       "onnx_quantized": {"accuracy": 0.49, "per_qtype": {"color": 0.6, "count": 0.28}}},
              "int4_form_problems": [], "int4_form_rules": "tensorrt" if sym else "onnxruntime",
              "ort_fusion": {"int4_dequantize": 12, "matmulnbits": 12, "dequantize_left": 0}}
    return manifest, report


def verdict_line(md: str) -> str:
    return next(line for line in md.splitlines() if line.startswith("## Verdict"))


@pytest.mark.parametrize("key, bad", [("logits_cosine", 0.85), ("top1_agreement", 0.4), ("task_accuracy_drop", 0.2),
                                      ("int4_form_ok", False)])
def test_verdict_flips_to_fail_when_a_number_crosses_its_threshold(tmp_path, key, bad):
    manifest, report = synthetic()
    manifest["layers"][9]["error"] = 0.006  # no outlier: the verdict is the gates'
    write_report(tmp_path, manifest, report)
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## Files")  # at the top
    assert "PASS" in verdict_line(md)
    assert gates.failed(manifest["validation"]) == []
    manifest["validation"][key] = bad
    write_report(tmp_path, manifest, report)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "FAIL" in verdict_line(md)
    row = next(line for line in md.splitlines() if line.startswith("| ") and next(
        g.label for g in gates.GATES if g.key == key) in line)
    assert "fail" in row.lower()
    assert [r["gate"] for r in gates.failed(manifest["validation"])] == [key]


def test_outlier_layer_is_flagged(tmp_path):
    manifest, report = synthetic()
    flagged = outlier_layers(manifest["layers"])
    assert [f["name"] for f in flagged] == ["model.layers.4.mlp.down_proj"]
    write_report(tmp_path, manifest, report)
    md = (tmp_path / "report" / "report.md").read_text()
    verdict = md.split("\n## ", 2)[1]
    assert "WARN" in verdict_line(md) and "model.layers.4.mlp.down_proj" in verdict and "2584" in verdict
    assert json.loads((tmp_path / "report" / "validation.json").read_text())["verdict"]["result"] == "warn"


def test_repeated_notes_collapse_into_one_footnote(tmp_path):
    manifest, report = synthetic()
    write_report(tmp_path, manifest, report)
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.count("in_features 320: block 64") == 1  # six rows carry it
    assert "(6 layers)" in md
    assert md.count("damping raised to 0.1") == 1  # a note on one row stays in its row
    row = next(line for line in md.splitlines() if line.startswith("| model.layers.2.self_attn.q_proj"))
    assert "damping raised to 0.1" in row


@pytest.mark.parametrize("sym", [True, False])
def test_header_says_symmetric_or_asymmetric(tmp_path, sym):
    manifest, report = synthetic(sym)
    write_report(tmp_path, manifest, report)
    header = (tmp_path / "report" / "report.md").read_text().split("\n## ")[0]
    assert ("asymmetric" in header) == (not sym) and "symmetric" in header


def test_html_report_is_self_contained_with_plots(tmp_path):
    manifest, report = synthetic()
    report["saliency"] = {f"llm.{i}": {"vision_tokens": 16, "vision_mean_grad": 0.01, "text_mean_grad": 0.1,
                                       "other_mean_grad": 0.05, "vision_weight_share": 0.003, "vision_token_share": 0.04}
                          for i in range(3)}
    write_report(tmp_path, manifest, report)
    text = (tmp_path / "report" / "report.html").read_text()
    HTMLParser().feed(text)
    assert text.count(IMG) == 3  # layer errors, saliency, task accuracy (no per-component numbers here)
    assert "model.layers.4.mlp.down_proj" in text and "class=\"warn\"" in text
    del report["saliency"], report["task"]
    write_report(tmp_path, manifest, report)
    assert (tmp_path / "report" / "report.html").read_text().count(IMG) == 1


def test_tensorrt_comparison_is_a_gate():
    """`validate --backend tensorrt` records whether the engines match ONNX Runtime: a mismatch fails the verdict
    and validate's exit code like any other gate."""
    from vlmq_export.validate import gates

    assert [r["result"] for r in gates.evaluate({"tensorrt_matches_onnxruntime": True})] == ["pass"]
    assert [r["gate"] for r in gates.failed({"tensorrt_matches_onnxruntime": False})] == ["tensorrt_matches_onnxruntime"]


def test_export_names_failed_gates_and_validate_exits_1(tiny_dirs, tmp_path, monkeypatch, capsys):
    """A failed gate does not fail the export (it succeeded; a random tiny model's top-1 is noise), but it is named
    in one warning line, and `validate` on the same output exits 1."""
    from vlmq_export import cli
    from vlmq_export.outdir import check_complete
    from vlmq_export.validate import gates

    strict = tuple(gates.Gate(g.key, g.label, g.section, g.higher_is_better, warn=g.warn, fail=1.0)
                   if g.key == "logits_cosine" else g for g in gates.GATES)
    monkeypatch.setattr(gates, "GATES", strict)  # no quantized model reaches a logits cosine of 1.0
    out = tmp_path / "out"
    rc = cli.main([str(tiny_dirs["qwen2_vl"]), "--method", "rtn", "--n-val", "1", "--gen-tokens", "2", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and check_complete(out)["status"] == "complete"
    assert err[-1].startswith("vlmq-export: warning: validation failed: logits cosine vs full precision = ")
    assert cli.main(["validate", str(out), "--n-val", "1", "--gen-tokens", "2", "--quiet"]) == 1
