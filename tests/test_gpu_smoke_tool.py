"""tools/gpu_smoke.py / .sh: the GPU readiness check, exercised on CPU (its CUDA half runs only on a GPU)."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from conftest import load_tool


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_smoke")
    mod = load_tool("gpu_smoke")
    rc = mod.main(["--models", "builtin:tiny-qwen2-vl", "--methods", "rtn", "--work", str(root / "work"),
                   "--out", str(root / "smoke.json")])
    return mod, rc, root


def test_runs_without_cuda_and_reports(smoke, monkeypatch):
    import torch

    mod, rc, root = smoke
    res = json.loads((root / "smoke.json").read_text())
    assert rc == 0 and res["cuda"] == torch.cuda.is_available()
    run = res["runs"][0]
    assert run["cpu"]["ok"] and run["cpu"]["wall_s"] > 0 and np.isfinite(run["cpu"]["perplexity"])
    if not torch.cuda.is_available():
        assert "cuda" not in run and "cpu_vs_cuda" not in run


def test_compare_counts_flipped_codes(smoke, monkeypatch):
    mod, _, root = smoke
    out = mod.export_dir(root / "work", "builtin:tiny-qwen2-vl", "rtn", "cpu")
    weights = mod.int4_weights(out / "llm.onnx")
    lo, hi = (-8, 7) if json.loads((out / "manifest.json").read_text())["recipe"]["symmetric"] else (0, 15)
    assert weights and all(c.min() >= lo and c.max() <= hi for c, _ in weights.values())
    same = mod.compare(out, out)
    assert same["same_layers"] and same["codes_equal"] == 1.0 and same["scales_max_rel_diff"] == 0.0
    # one code flipped in one layer and one scale 10 % off: the comparison must see both
    flipped = {k: (c.copy(), s.copy()) for k, (c, s) in weights.items()}
    name = next(iter(flipped))
    flipped[name][0].flat[0] = (flipped[name][0].flat[0] + 1) % 8
    flipped[name][1].flat[0] *= 1.1
    total = sum(c.size for c, _ in weights.values())
    monkeypatch.setattr(mod, "int4_weights", lambda path: weights if path.parent == out else flipped)
    diff = mod.compare(out, root)
    assert diff["codes_equal"] == pytest.approx(1 - 1 / total)
    assert diff["worst_layer_codes_differing"] == pytest.approx(1 / weights[name][0].size)
    assert diff["scales_max_rel_diff"] == pytest.approx(0.1, rel=1e-3)


def test_shell_wrapper_parses():
    assert subprocess.run(["bash", "-n", "tools/gpu_smoke.sh"]).returncode == 0
