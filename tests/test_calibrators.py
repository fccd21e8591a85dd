"""Weight calibrators: RTN, GPTQ, and VLMQ (= GPTQ with per-token weights)."""
from __future__ import annotations

import math

import pytest
import torch

from vlmq_export.calibrators import (
    METHODS,
    GPTQCalibrator,
    QuantConfig,
    RTNCalibrator,
    make_calibrator,
)
from vlmq_export.calibrators import gptq as gptq_mod
from vlmq_export.errors import CalibrationDataError, NumericalError

from conftest import K, N, T, correlated


def out_error(W, W_hat, X, g=None) -> float:
    """sum_i g_i ||(W - W_hat) x_i||^2 / sum_i g_i, computed directly on the tokens."""
    per_token = (((W - W_hat).double() @ X.double().T) ** 2).sum(0)
    if g is None:
        return float(per_token.mean())
    g = g.double()
    return float((g * per_token).sum() / g.sum())


def calibrate(method, W, X, g=None, **cfg):
    cal = make_calibrator(method, W, QuantConfig(**cfg), name="blocks.0.mlp.up_proj")
    if X is not None:
        cal.add_batch(X, g)
    result = cal.solve()
    cal.free()
    return result


# ----------------------------------------------------------------------------- grid / RTN
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_codes_in_range_and_dequantize_is_codes_times_scales(W, bits):
    r = calibrate("rtn", W, None, bits=bits, group_size=32)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert r.codes.dtype == torch.int8 and r.codes.shape == (N, K)
    assert r.scales.dtype == torch.float32 and r.scales.shape == (N, K // 32)
    assert int(r.codes.min()) >= qmin and int(r.codes.max()) <= qmax
    # scale = 2·max|w| / (2^b - 1) (8 bits: max|w| / 127): the largest weight of each group lands on the
    # grid's edge, qmax or qmin
    top = r.codes.view(N, -1, 32).abs().amax(2)
    assert ((top == qmax) | (top == -qmin)).all()
    expected = r.codes.float() * r.scales.repeat_interleave(32, dim=1)
    assert torch.equal(r.dequantize(), expected)
    assert r.dequantize().dtype == torch.float32
    assert (r.dequantize() - W).abs().max() <= r.scales.max() / 2 + 1e-6  # nearest grid point
    assert math.isnan(r.error)  # no data: unknown, not 0


def test_rtn_ignores_data_and_error_decreases_with_bits(W, X):
    errors = []
    for bits in (2, 3, 4, 8):
        with_data = calibrate("rtn", W, X, bits=bits)
        without = calibrate("rtn", W, None, bits=bits)
        assert torch.equal(with_data.codes, without.codes) and torch.equal(with_data.scales, without.scales)
        errors.append(with_data.error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 1000, errors


def test_reported_error_is_the_weighted_output_error(W, X):
    g = torch.rand(T, generator=torch.Generator().manual_seed(2)) * 5
    for method in ("rtn", "vlmq"):
        r = calibrate(method, W, X, g, bits=3)
        assert r.error == pytest.approx(out_error(W, r.dequantize(), X, g), rel=1e-4)


def test_all_zero_group_gets_a_positive_scale():
    Wz = torch.randn(8, 64)
    Wz[:, :32] = 0
    for method in ("rtn", "gptq"):
        r = calibrate(method, Wz, correlated(128, seed=3, k=64), group_size=32)
        assert (r.scales > 0).all() and torch.isfinite(r.scales).all()
        assert (r.codes[:, :32] == 0).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clip_search_never_loses_per_group_and_wins_on_heavy_tails(bits):
    """Each group's clipped scale scores at most the full range's sum |err|^2.4 (p = 1 is a candidate);
    on heavy-tailed weights (Student t, 2 degrees of freedom) it clips and wins on the squared error too."""
    from vlmq_export.calibrators.base import CLIP_NORM, group_scales, quantize_codes

    gen = torch.Generator().manual_seed(5)
    normal = torch.randn(256, 64, generator=gen)
    chi = (torch.randn(256, 64, 2, generator=gen) ** 2).sum(-1) / 2
    w = normal / chi.sqrt()  # Student t with 2 degrees of freedom
    qmax = 2 ** (bits - 1) - 1

    def err(scale, norm):
        q = quantize_codes(w, scale.unsqueeze(1), -qmax - 1, qmax) * scale.unsqueeze(1)
        return (q - w).abs().pow(norm).sum(1)

    full, clipped = group_scales(w, qmax), group_scales(w, qmax, clip=True)
    assert (clipped <= full).all() and (clipped < full).float().mean() > 0.5
    assert (err(clipped, CLIP_NORM) <= err(full, CLIP_NORM) * (1 + 1e-6)).all()
    # measured median per-row squared-error ratio 0.69 / 0.82 / 0.90 at 2 / 3 / 4 bits
    assert (err(clipped, 2) / err(full, 2)).median() < 0.95


@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_with_column_weights_minimises_the_weighted_error(sym):
    """With ``col_weight`` the search scores sum_j c_j (w_j - w_hat_j)^2: its choice is never worse on that
    score than the unweighted choice, and when the heavy columns hold each row's outlier it keeps wider
    ranges than the unweighted search, which clips them."""
    from vlmq_export.calibrators.base import clip_error, group_scales, group_zero_scales, quantize_codes

    gen = torch.Generator().manual_seed(7)
    w = torch.randn(256, 64, generator=gen) / ((torch.randn(256, 64, 2, generator=gen) ** 2).sum(-1) / 2).sqrt()
    heavy = (w.abs() == w.abs().amax(1, keepdim=True)).float() * 1e3 + 1.0  # per element, broadcast against w

    def w_hat(scale, zero):
        s = scale.unsqueeze(1)
        if zero is None:
            return quantize_codes(w, s, -8, 7) * s
        z = zero.unsqueeze(1)
        return (quantize_codes(w, s, 0, 15, z) - z) * s

    if sym:
        (plain, z0), (weighted, z1) = (group_scales(w, 7, clip=True), None), (group_scales(w, 7, True, heavy), None)
    else:
        (plain, z0), (weighted, z1) = group_zero_scales(w, 15, clip=True), group_zero_scales(w, 15, True, heavy)
    score_w, score_p = clip_error(w, w_hat(weighted, z1), heavy), clip_error(w, w_hat(plain, z0), heavy)
    assert (score_w <= score_p * (1 + 1e-6)).all()
    assert (weighted > plain).float().mean() > 0.5 and (score_w < score_p).float().mean() > 0.5


def test_gptq_clip_search_weights_columns_by_the_hessian_diagonal(W, X):
    """GPTQ's static groups (act-order) come from the clip search weighted by diag(H), and rows that
    differ from the unweighted search exist on correlated data."""
    from vlmq_export.calibrators.base import static_grid

    cfg = QuantConfig(bits=3, group_size=32, act_order=True, clip_search=True)
    cal = GPTQCalibrator(W, cfg, "a")
    cal.add_batch(X)
    hdiag = torch.diag(gptq_mod.live_hessian(cal.H)[0])
    r = cal.solve()
    assert torch.equal(r.scales, static_grid(W.float(), 32, cfg, hdiag)[0])
    assert not torch.equal(r.scales, static_grid(W.float(), 32, cfg)[0])


def test_clip_search_off_is_the_default_and_reaches_rtn_and_gptq(W, X):
    assert QuantConfig().clip_search is False
    for method in ("rtn", "gptq"):
        plain, clipped = calibrate(method, W, X, bits=3), calibrate(method, W, X, bits=3, clip_search=True)
        if method == "rtn":  # same weights, narrower ranges (GPTQ's groups see updated weights)
            assert (clipped.scales <= plain.scales).all() and (clipped.scales < plain.scales).any()
        assert clipped.error < plain.error, (method, clipped.error, plain.error)


# ----------------------------------------------------------------------------- asymmetric grid (--asym)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_asym_rtn_codes_zeros_and_dequantize(W, bits):
    """Unsigned codes [0, 2^b - 1], an integer zero point per group; W_hat = (codes - zeros) * scales; each
    group's min and max land on the grid's ends (the range always includes 0)."""
    skewed = W + 0.6  # most weights positive: the symmetric grid wastes levels below -max|w|
    r = calibrate("rtn", skewed, None, bits=bits, group_size=32, sym=False)
    qmax = 2 ** bits - 1
    assert r.codes.dtype == torch.int8 and r.zeros is not None and r.zeros.dtype == torch.int8
    assert r.zeros.shape == r.scales.shape == (N, K // 32)
    assert int(r.codes.min()) == 0 and int(r.codes.max()) == qmax
    assert int(r.zeros.min()) >= 0 and int(r.zeros.max()) <= qmax
    expected = (r.codes.float() - r.zeros.float().repeat_interleave(32, 1)) * r.scales.repeat_interleave(32, 1)
    assert torch.equal(r.dequantize(), expected)
    groups = skewed.view(N, -1, 32)
    lo, hi = groups.amin(2).clamp(max=0), groups.amax(2).clamp(min=0)
    assert torch.allclose(r.scales, (hi - lo) / qmax)
    assert (r.dequantize() - skewed).abs().max() <= r.scales.max() * 0.5 + 1e-5  # nearest grid point
    sym = calibrate("rtn", skewed, None, bits=bits, group_size=32)
    assert ((r.dequantize() - skewed) ** 2).sum() < ((sym.dequantize() - skewed) ** 2).sum()
    assert sym.zeros is None


def test_asym_all_zero_group_and_8_bits_refused(W):
    w = W.clone()
    w[:, :32] = 0
    r = calibrate("rtn", w, None, bits=4, group_size=32, sym=False)
    assert (r.scales > 0).all() and (r.dequantize()[:, :32] == 0).all() and (r.zeros[:, 0] == 0).all()
    with pytest.raises(ValueError, match="asymmetric"):
        QuantConfig(bits=8, sym=False)


@pytest.mark.parametrize("act_order", [False, True])
def test_asym_gptq_beats_asym_rtn_and_g1_vlmq_is_gptq(W, X, act_order):
    cfg = dict(bits=3, group_size=32, sym=False, act_order=act_order)
    rtn, gptq = calibrate("rtn", W, X, **cfg), calibrate("gptq", W, X, **cfg)
    assert gptq.zeros is not None and int(gptq.codes.min()) >= 0 and int(gptq.codes.max()) <= 7
    assert gptq.error < 0.8 * rtn.error
    assert abs(gptq.error - out_error(W, gptq.dequantize(), X)) <= 1e-3 * gptq.error  # error is that of codes/zeros
    if act_order:  # static groups: the grid is RTN's, from the original weight
        assert torch.equal(gptq.scales, rtn.scales) and torch.equal(gptq.zeros, rtn.zeros)
    vlmq = calibrate("vlmq", W, X, torch.ones(len(X)), **cfg)
    assert torch.equal(vlmq.codes, gptq.codes) and torch.equal(vlmq.zeros, gptq.zeros)
    assert torch.equal(vlmq.scales, gptq.scales)


def test_asym_clip_search_never_loses_per_group():
    from vlmq_export.calibrators.base import CLIP_NORM, group_zero_scales, quantize_codes

    gen = torch.Generator().manual_seed(6)
    w = torch.randn(256, 64, generator=gen) / ((torch.randn(256, 64, 2, generator=gen) ** 2).sum(-1) / 2).sqrt() + 0.3

    def err(scale, zero):
        s, z = scale.unsqueeze(1), zero.unsqueeze(1)
        return ((quantize_codes(w, s, 0, 15, z) - z) * s - w).abs().pow(CLIP_NORM).sum(1)

    (full, z0), (clipped, z1) = group_zero_scales(w, 15), group_zero_scales(w, 15, clip=True)
    assert torch.equal(z0, z1) and (clipped <= full).all() and (clipped < full).float().mean() > 0.5
    assert (err(clipped, z1) <= err(full, z0) * (1 + 1e-6)).all()


# ----------------------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("group_size,act_order", [(128, False), (32, False), (-1, True)])
def test_gptq_unit_token_weights_are_bit_identical_to_none(W, X, group_size, act_order):
    cfg = QuantConfig(bits=3, group_size=group_size, act_order=act_order)
    plain, weighted = GPTQCalibrator(W, cfg, "a"), GPTQCalibrator(W, cfg, "a")
    batches = [X[:300].reshape(3, 100, K), X[300:]]  # several batches, any leading dims
    for b in batches:
        plain.add_batch(b)
    weighted.add_batch(batches[0], torch.ones(3, 100, 1))  # trailing singleton accepted
    weighted.add_batch(batches[1], torch.ones(len(batches[1])))
    assert torch.equal(plain.H, weighted.H)
    p, w = plain.solve(), weighted.solve()
    assert torch.equal(p.codes, w.codes) and torch.equal(p.scales, w.scales)
    assert p.error == w.error and p.damp_used == w.damp_used


@pytest.mark.parametrize("bits,group_size", [(3, 128), (4, 128), (4, -1), (4, 32)])
def test_gptq_output_error_much_lower_than_rtn(W, X, bits, group_size):
    rtn = calibrate("rtn", W, X, bits=bits, group_size=group_size)
    gptq = calibrate("gptq", W, X, bits=bits, group_size=group_size)
    ratio = out_error(W, gptq.dequantize(), X) / out_error(W, rtn.dequantize(), X)
    assert ratio < 0.65, ratio  # measured 0.47-0.51 on this data


def test_act_order_keeps_static_group_layout_and_helps(W):
    X = correlated(T, seed=4) * torch.linspace(0.1, 3.0, K)  # unequal column importance
    base = calibrate("gptq", W, X, bits=4, group_size=64)
    ao = calibrate("gptq", W, X, bits=4, group_size=64, act_order=True)
    assert ao.scales.shape == (N, K // 64)
    # static groups: scales come from the original weight in original column order
    assert torch.equal(ao.scales, W.view(N, -1, 64).abs().amax(2) / 7.5)
    assert ao.error < base.error


def test_block_size_does_not_change_the_solution(W, X):
    """Lazy batching is exact: group scales must see every update however the blocks fall."""
    a = calibrate("gptq", W, X, bits=3, group_size=32, block_size=32)
    b = calibrate("gptq", W, X, bits=3, group_size=32, block_size=128)
    c = calibrate("gptq", W, X, bits=3, group_size=32, block_size=48)  # rounded up to 64
    for r in (b, c):
        assert (r.codes != a.codes).float().mean() < 0.01
        assert r.error == pytest.approx(a.error, rel=0.01)


def test_token_weights_steer_the_solution(W):
    """Half the tokens g=10, half g=0.1, from different distributions."""
    Xa, Xb = correlated(T // 2, seed=5), correlated(T // 2, seed=6, scale=2.0)
    X = torch.cat([Xa, Xb])
    g = torch.cat([torch.full((T // 2,), 10.0), torch.full((T // 2,), 0.1)])
    vlmq = calibrate("vlmq", W, X, g, bits=3)
    gptq = calibrate("gptq", W, X, bits=3)
    w_v, w_g = out_error(W, vlmq.dequantize(), X, g), out_error(W, gptq.dequantize(), X, g)
    u_v, u_g = out_error(W, vlmq.dequantize(), X), out_error(W, gptq.dequantize(), X)
    # measured: weighted 0.56x, unweighted 2.1x
    assert w_v < 0.8 * w_g, (w_v, w_g)
    assert u_g < 0.8 * u_v, (u_g, u_v)


def test_zero_weight_tokens_are_ignored(W, X):
    noise = 100 * torch.randn(200, K, generator=torch.Generator().manual_seed(7))
    with_noise = calibrate("vlmq", W, torch.cat([X, noise]), torch.cat([torch.ones(T), torch.zeros(200)]))
    clean = calibrate("gptq", W, X)
    assert torch.equal(with_noise.codes, clean.codes)
    assert with_noise.error == pytest.approx(clean.error, rel=1e-5)


# ----------------------------------------------------------------------------- shapes and errors
@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("group_size,groups", [(-1, 1), (32, K // 32), (64, K // 64), (128, K // 128)])
def test_scale_shapes(W, X, method, group_size, groups):
    r = calibrate(method, W, X[:300], bits=4, group_size=group_size)
    assert r.scales.shape == (N, groups) and r.group_size == group_size and r.bits == 4
    assert r.dequantize().shape == (N, K)


@pytest.mark.parametrize("method", METHODS)
def test_in_features_not_divisible_by_group_is_refused(method):
    with pytest.raises(ValueError, match="divisible"):
        make_calibrator(method, torch.randn(8, 96), QuantConfig(group_size=64))
    make_calibrator(method, torch.randn(8, 96), QuantConfig(group_size=-1))  # per-channel: fine


def test_bad_config_is_refused():
    for kwargs in ({"bits": 5}, {"group_size": 0}, {"sym": False, "bits": 8}, {"damp": -1.0}):
        with pytest.raises(ValueError):
            QuantConfig(**kwargs)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_raise_naming_the_layer(W, X, bad):
    x = X[:10].clone()
    x[3, 7] = bad
    for method in METHODS:
        cal = make_calibrator(method, W, QuantConfig(), name="model.layers.3.mlp.down_proj")
        with pytest.raises(NumericalError, match=r"model\.layers\.3\.mlp\.down_proj"):
            cal.add_batch(x)
    cal = make_calibrator("vlmq", W, QuantConfig(), name="layers.5.q")
    with pytest.raises(NumericalError, match=r"layers\.5\.q"):
        cal.add_batch(X[:10], torch.tensor([1.0] * 9 + [bad]))
    with pytest.raises(ValueError, match="token weights"):
        cal.add_batch(X[:10], -torch.ones(10))


def test_gptq_without_data_is_refused(W):
    with pytest.raises(CalibrationDataError, match="no calibration data"):
        GPTQCalibrator(W, QuantConfig(), "lm.q").solve()


def test_rank_deficient_hessian_still_solves(W):
    few = correlated(16, seed=8)  # 16 tokens < K = 256: H has rank 16
    r = calibrate("gptq", W, few, bits=4)
    assert r.damp_used == 0.01 and torch.isfinite(r.scales).all() and math.isfinite(r.error)

    dup = correlated(T, seed=9)
    dup[:, 5] = dup[:, 3]  # duplicated input column
    dup[:, 7] = 0  # dead input column: weight irrelevant, set to 0 as in the reference
    r = calibrate("gptq", W, dup, bits=4, damp=0.0)  # singular: Cholesky must fail, damping rises
    assert r.damp_used > 0 and torch.isfinite(r.dequantize()).all() and math.isfinite(r.error)
    assert (r.codes[:, 7] == 0).all()


def test_damping_is_raised_tenfold_then_gives_up(W, X, monkeypatch):
    real = torch.linalg.cholesky_ex
    calls = {"n": 0}

    def failing(n_failures):
        def fake(A, *args, **kwargs):
            calls["n"] += 1
            L, info = real(A, *args, **kwargs)
            return (L, torch.ones_like(info)) if calls["n"] <= n_failures else (L, info)

        return fake

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing(2))
    r = calibrate("gptq", W, X, bits=4, damp=0.01)
    assert r.damp_used == pytest.approx(1.0)  # 0.01 -> 0.1 -> 1.0

    calls["n"] = 0
    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing(10**6))
    with pytest.raises(NumericalError, match=r"blocks\.0\.mlp\.up_proj"):
        calibrate("gptq", W, X)
    assert calls["n"] == gptq_mod.MAX_DAMP_STEPS + 1


def test_weight_is_not_modified_and_half_precision_is_accepted(W, X):
    w16 = W.half()
    before = w16.clone()
    r = calibrate("gptq", w16, X.half())
    assert torch.equal(w16, before) and r.scales.dtype == torch.float32


# ----------------------------------------------------------------------------- factory
def test_factory():
    w = torch.randn(4, 32)
    cfg = QuantConfig(group_size=32)
    assert set(METHODS) >= {"rtn", "gptq", "vlmq"}
    assert type(make_calibrator("rtn", w, cfg)) is RTNCalibrator
    assert type(make_calibrator("gptq", w, cfg)) is GPTQCalibrator
    assert type(make_calibrator("vlmq", w, cfg)) is GPTQCalibrator  # VLMQ is GPTQ + token weights
    with pytest.raises(ValueError) as e:
        make_calibrator("awq", w, cfg)
    assert all(m in str(e.value) for m in METHODS) and "awq" in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(W, X):
    g = torch.rand(T, generator=torch.Generator().manual_seed(10))
    cpu = calibrate("vlmq", W, X, g, bits=4)
    gpu = calibrate("vlmq", W.cuda(), X.cuda(), g.cuda(), bits=4)
    assert gpu.codes.device.type == "cuda" and gpu.scales.device.type == "cuda"
    assert (gpu.codes.cpu() != cpu.codes).float().mean() < 0.02
    assert gpu.error == pytest.approx(cpu.error, rel=0.02)
