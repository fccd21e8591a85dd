"""--reduce-range: INT8 W8A8 weights in 7 bits (codes in [-64, 63], INT8 containers), as ONNX Runtime's quantizer's
``reduce_range``, so that its u8s8 kernels on x86 CPUs without VNNI cannot saturate their 16-bit pair sums
(255 x 64 x 2 < 32767). The graphs, the manifest, the smoothing's error model and the validation follow the 7 bits."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from vlmq_export import cli


@pytest.fixture(scope="module")
def reduced(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("reduce_range") / "out"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--components", "vision,projector", "--vision", "int8",
                     "--projector", "int8", "--method", "gptq", "--reduce-range", "--n-calib", "4", "-o", str(out),
                     "--quiet"]) == 0
    return out


def _int8_weights(path):
    m = onnx.load(str(path))
    return [numpy_helper.to_array(t) for t in m.graph.initializer
            if t.name.endswith("_q") and t.data_type == onnx.TensorProto.INT8]


def test_weights_are_7_bit_and_the_export_validates(reduced):
    manifest = json.loads((reduced / "manifest.json").read_text())
    for comp in ("vision", "projector"):
        assert manifest["recipe"]["components"][comp] == {"bits": 7, "group_size": -1, "sym": True, "act": "int8"}
    for graph in ("vision_encoder", "projector"):
        codes = _int8_weights(reduced / f"{graph}.onnx")
        assert codes and min(int(c.min()) for c in codes) >= -64 and max(int(c.max()) for c in codes) <= 63
        assert max(int(np.abs(c).max()) for c in codes) >= 60  # the 7-bit range is used, not a clipped 8-bit one
    verdict = json.loads((reduced / "report" / "validation.json").read_text())["verdict"]
    assert verdict["result"] == "pass", verdict  # the layer-by-layer W8A8 parity gate included
    assert cli.main(["lint", str(reduced), "--json"]) == 0


def test_optimized_onnx_runtime_matches_float_compute(reduced):
    """The reason for the option: ONNX Runtime's fused INT8 kernels give what the same graph computes in float.
    (Without it, on an AVX2 CPU without VNNI, the tiny model's image embeddings differed by cosine 0.99964,
    max 0.19; with it 0.999998, max 0.014. CPUs with VNNI are exact either way, so only this side is asserted.)"""
    import onnxruntime as ort

    from vlmq_export.models import load_family
    from vlmq_export.testbed import eval_samples

    def session(name, optimize):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else
                                       ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        return ort.InferenceSession(str(reduced / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])

    fam = load_family(reduced / "processor", torch_free=True)
    runs = {o: (session("vision_encoder", o), session("projector", o)) for o in (True, False)}
    for s in eval_samples(3):
        p = fam.prepare(s.images, s.prompt)
        emb = {o: pr.run(None, {"features": v.run(None, fam.vision_feeds(p))[0]})[0] for o, (v, pr) in runs.items()}
        a, b = (e.reshape(-1, e.shape[-1]) for e in (emb[True], emb[False]))
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        assert cos.min() > 0.9999, cos.min()


def test_smoothing_error_model_uses_the_7_bit_grid():
    from vlmq_export.calibrators.base import QuantConfig
    from vlmq_export.calibrators.rtn import RTNCalibrator
    from vlmq_export.calibrators.smooth import weight_fake_quant

    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    res = RTNCalibrator(w, QuantConfig(bits=7, group_size=-1)).solve()
    rtn = res.codes.float() * res.scales
    torch.testing.assert_close(weight_fake_quant(w, "int8", weight_bits=7), rtn)
    assert not torch.allclose(weight_fake_quant(w, "int8"), rtn)  # the 8-bit grid is another


def test_without_int8_components_it_is_a_one_line_error(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--vision", "fp8", "--reduce-range", "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmq-export: error:") and "--reduce-range" in err and "\n" not in err
    assert not out.exists()


def test_the_default_output_name_says_7_bit():
    from vlmq_export.recipe import ComponentRecipe, default_out

    assert "visionint8w7" in default_out("builtin:m", "gptq", {"vision": ComponentRecipe(7, -1, "int8")}, True).name
