"""Graphs beyond protobuf's 2 GB limit keep their weights in ``<graph>.onnx.data``: every pass after the float
export (Q/DQ, the ORT flavour) must carry them over. Proven on a tiny model by lowering the threshold."""
from __future__ import annotations

import json

import numpy as np

from vlmq_export import cli
from vlmq_export.export import onnx_export


def test_external_data_graphs_survive_qdq_and_the_ort_flavour(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "_EXTERNAL_THRESHOLD", 10_000)  # every graph of the tiny model is "large"
    out = tmp_path / "out"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "--method", "rtn", "--no-validate", "-o", str(out),
                     "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["llm"]["flavour"] == "ort-gqa"
    assert any(p.name.endswith(".onnx.data") for p in out.iterdir())
    assert cli.main(["lint", str(out)]) == 0
    from vlmq_export.runtime.generate import OnnxVLM

    vlm = OnnxVLM(out)
    try:
        res = vlm.generate([], "Say something.", max_new_tokens=4)
        assert len(res.token_ids) >= 1 and np.all(np.asarray(res.token_ids) >= 0)
    finally:
        vlm.close()
