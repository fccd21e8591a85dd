"""tools/quality_sweep.py on a tiny SmolVLM: paired differences against GPTQ and FP, saliency options in a method,
and a rerun that reads the finished rows back instead of measuring them again."""
from __future__ import annotations

import json

from conftest import load_tool


def test_sweep_pairs_rows_and_resumes(tiny_dirs, tmp_path, keep_torch_threads, monkeypatch):
    sweep = load_tool("quality_sweep")
    out = tmp_path / "q"
    argv = [f"--model={tiny_dirs['smolvlm']}", "--methods", "rtn,gptq,vlmq:exponent=2", "--bits", "4", "--scopes", "llm",
            "--n-eval", "6", "--n-calib", "2", "--n-val", "2", "--no-heldout", "--threads", "1", "--out", str(out)]
    assert sweep.main(argv) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["scope"], r["method"], r["bits"]): r for r in res["rows"]}
    assert set(rows) == {("-", "fp", 16), ("llm", "rtn", 4), ("llm", "gptq", 4), ("llm", "vlmq:exponent=2", 4)}
    for key in (("llm", "rtn", 4), ("llm", "vlmq:exponent=2", 4)):
        r, g = rows[key], rows[("llm", "gptq", 4)]
        assert len(r["outcomes"]) == 6
        want = (r["outcomes"].count("1") - g["outcomes"].count("1")) / 6
        assert abs(r["vs_gptq"]["diff"] - want) < 1e-9 and r["vs_gptq"]["ci95"][0] <= want <= r["vs_gptq"]["ci95"][1]
    assert "vs_gptq" not in rows[("llm", "gptq", 4)] and "vs_fp" in rows[("llm", "gptq", 4)]
    assert "| Δ GPTQ | Δ FP |" in out.with_suffix(".md").read_text()
    lines = out.with_suffix(".rows.jsonl").read_text().splitlines()
    assert len(lines) == 4

    # a rerun with the same settings measures nothing: calibrate would fail if it were called
    monkeypatch.setattr("vlmq_export.calibrate.calibrate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("calibrated")))
    assert sweep.main(argv) == 0
    assert out.with_suffix(".rows.jsonl").read_text().splitlines() == lines
    again = json.loads(out.with_suffix(".json").read_text())
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in res["rows"]]
    # other settings are other rows: W3 is measured (and calibrates)
    monkeypatch.undo()
    assert sweep.main(argv[:4] + ["3"] + argv[5:]) == 0
    assert len(out.with_suffix(".rows.jsonl").read_text().splitlines()) == 7
