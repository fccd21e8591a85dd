"""Activation calibrators (calibrators/activation.py): g == 1 is the unweighted method, the unweighted
methods match ONNX Runtime's calibrators, and token weights move the range toward the weighted tokens."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnxruntime.quantization.calibrate import (CalibrationDataReader, CalibrationMethod, HistogramCollector,
                                                create_calibrator)

from vlmq_export.calibrators.activation import (ACT_CALIBRATORS, act_scale, fake_quant,
                                                make_activation_calibrator)

BINS = 512  # ORT's entropy loop is slow in pure Python: a smaller histogram keeps the test fast


def batches(seed=0, n=3):
    """Heavy-tailed activations [tokens, K] in a few batches of growing range (the histograms must grow)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 32, generator=gen) * (1 + i) * torch.exp(0.5 * torch.randn(64, 32, generator=gen))
            for i in range(n)]


def fit(method, xs, weights=None, **kw):
    cal = make_activation_calibrator(method, "x", **kw)
    for i, x in enumerate(xs):
        cal.observe(x, None if weights is None else weights[i])
    return cal.compute_range()


@pytest.mark.parametrize("method", ACT_CALIBRATORS)
def test_unit_weights_are_the_unweighted_method(method):
    xs = batches()
    kw = {} if method == "minmax" else {"num_bins": BINS}
    assert fit(method, xs, **kw) == fit(method, xs, [torch.ones(x.shape[0]) for x in xs], **kw)
    # and zero-weight tokens are dropped, not counted
    pad = [torch.cat([x, 100 * torch.ones(2, x.shape[1])]) for x in xs]
    gates = [torch.cat([torch.ones(x.shape[0]), torch.zeros(2)]) for x in xs]
    assert fit(method, pad, gates, **kw) == fit(method, xs, **kw)


def ort_histogram_amax(method, xs, **kw):
    col = HistogramCollector(method, symmetric=True, num_bins=BINS, num_quantized_bins=128, scenario="same", **kw)
    for x in xs:
        col.collect({"x": x.numpy().astype(np.float32)})
    lo, hi = col.compute_collection_result()["x"][:2]
    return max(abs(float(lo)), abs(float(hi)))


def test_percentile_matches_onnxruntime():
    xs = batches(1)
    for pct in (99.0, 99.9, 99.999):
        ours = fit("percentile", xs, num_bins=BINS, percentile=pct)
        assert ours == pytest.approx(ort_histogram_amax("percentile", xs, percentile=pct), rel=1e-6)
    assert fit("percentile", xs, num_bins=BINS, percentile=99.0) < max(float(x.abs().max()) for x in xs)


@pytest.mark.parametrize("seed", [1, 2, 5])
def test_entropy_matches_onnxruntime(seed):
    """With ORT's integer truncation of q the threshold is ORT's to float32 rounding; the default (float q)
    picks another point of the flat KL curve, still clipping the tail."""
    xs = batches(seed)
    theirs = ort_histogram_amax("entropy", xs, percentile=99.999)
    assert fit("entropy", xs, num_bins=BINS, integer_q=True) == pytest.approx(theirs, rel=1e-5)
    t = max(float(x.abs().max()) for x in xs)
    assert fit("entropy", xs, num_bins=BINS) < 0.9 * t


class _Reader(CalibrationDataReader):
    def __init__(self, xs):
        self.it = iter([{"x": x.numpy()} for x in xs])

    def get_next(self):
        return next(self.it, None)


def test_minmax_matches_onnxruntime(tmp_path):
    xs = batches(3)
    w = helper.make_tensor("w", TensorProto.FLOAT, [32, 4], np.ones(128, dtype=np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 4])], [w])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    cal = create_calibrator(path, ["MatMul"], augmented_model_path=str(tmp_path / "aug.onnx"),
                            calibrate_method=CalibrationMethod.MinMax, extra_options={"symmetric": True})
    cal.collect_data(_Reader(xs))
    lo, hi = cal.compute_data()["x"].range_value
    assert fit("minmax", xs) == pytest.approx(np.abs(np.ravel([lo, hi])).max(), rel=1e-7)


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_heavily_weighted_subset_dominates(method):
    """Half the tokens are wide (std 8), half narrow (std 1): weighting the narrow half 1000x shrinks the
    range toward the narrow tokens' own, weighting the wide half never narrows it."""
    gen = torch.Generator().manual_seed(4)
    narrow, wide = torch.randn(64, 32, generator=gen), 8 * torch.randn(64, 32, generator=gen)
    x = torch.cat([narrow, wide])
    kw = {"num_bins": BINS} | ({"percentile": 99.0} if method == "percentile" else {})
    plain = fit(method, [x], **kw)
    favour_narrow = fit(method, [x], [torch.cat([torch.full((64,), 1000.0), torch.ones(64)])], **kw)
    favour_wide = fit(method, [x], [torch.cat([torch.ones(64), torch.full((64,), 1000.0)])], **kw)
    only_narrow = fit(method, [narrow], **kw)
    assert favour_narrow < 0.9 * plain <= 0.9 * favour_wide
    if method == "percentile":  # the 99th weighted percentile is all but the narrow tokens' own
        assert favour_narrow < 1.1 * only_narrow


def test_minmax_weights_only_gate():
    x = torch.tensor([[1.0, -5.0], [2.0, 3.0]])
    assert fit("minmax", [x], [torch.tensor([0.01, 1.0])]) == 5.0
    assert fit("minmax", [x], [torch.tensor([0.0, 1.0])]) == 3.0


def test_nothing_observed_and_bad_weights_are_errors():
    cal = make_activation_calibrator("percentile", "x")
    cal.observe(torch.ones(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="nothing observed"):
        cal.compute_range()
    with pytest.raises(ValueError, match=">= 0"):
        cal.observe(torch.ones(2, 4), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="unknown activation calibrator"):
        make_activation_calibrator("max", "x")


def test_fake_quant_grids():
    x = torch.tensor([0.5, 1.5, -2.5, 1000.0, -1000.0])
    assert fake_quant(x, 1.0, "int8").tolist() == [0.0, 2.0, -2.0, 127.0, -128.0]  # half to even, saturating
    assert fake_quant(x, 1.0, "fp8").tolist() == [0.5, 1.5, -2.5, 448.0, -448.0]
    assert act_scale(254.0, "int8") == 2.0 and act_scale(0.0, "fp8") == 1.0
