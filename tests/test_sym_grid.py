"""Issue 25's symmetric grids (--sym-grid half|extreme|search): codes, scales, extremes, the export, the defaults."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlmq_export import cli
from vlmq_export.calibrators import QuantConfig, make_calibrator
from vlmq_export.calibrators.base import SEARCH_FACTORS, clip_error, group_scales, quantize_codes, sym_scale
from vlmq_export.export.qdq import fp16_scales
from vlmq_export.recipe import SYM_GRIDS


def groups(seed: int = 0) -> torch.Tensor:
    """Rows of one group each: heavy-tailed, one-sided, all-zero and one-element-dominated groups."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g) * torch.rand(64, 1, generator=g)
    w[:8] = torch.distributions.StudentT(2.0).sample((8, 128))  # outliers
    w[8] = w[8].abs()  # positive only
    w[9] = -w[9].abs()  # negative only
    w[10] = 0.0
    w[11, 5] = 40.0  # one positive giant
    w[12, 7] = -40.0  # one negative giant
    return w


@pytest.mark.parametrize("grid", SYM_GRIDS)
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_codes_in_range_and_scales_positive(grid, bits):
    cfg = QuantConfig(bits=bits, group_size=128, sym_grid=grid)
    w = groups()
    s = group_scales(w, cfg.qmax, grid=grid)
    assert s.shape == (64,) and bool((s > 0).all()) and bool(torch.isfinite(s).all())
    c = quantize_codes(w, s.unsqueeze(1), cfg.qmin, cfg.qmax)
    assert int(c.min()) >= cfg.qmin and int(c.max()) <= cfg.qmax
    r = make_calibrator("rtn", w, cfg).solve()  # the calibrator's codes: int8 within the signed range
    assert int(r.codes.min()) >= cfg.qmin and int(r.codes.max()) <= cfg.qmax and bool((r.scales > 0).all())


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_extreme_grid_reproduces_each_groups_extreme(bits):
    """The side of each group that sets the scale (max(w+) / qmax or max(w-) / (qmax + 1)) lands exactly on
    code qmax or qmin, and dequantizes to itself (to float32 rounding); the "half" grid misses it."""
    cfg = QuantConfig(bits=bits, sym_grid="extreme")
    w = groups(1)
    hi, lo = w.amax(1), w.amin(1)
    positive = hi / cfg.qmax >= -lo / (cfg.qmax + 1)
    extreme = torch.where(positive, hi, lo)
    live = extreme != 0
    want = torch.where(positive, cfg.qmax, cfg.qmin).float()
    for grid, exact in (("extreme", True), ("half", False)):
        s = sym_scale(w, cfg.qmax, grid)
        code = quantize_codes(extreme, s, cfg.qmin, cfg.qmax)
        rel = ((code * s - extreme).abs() / extreme.abs())[live]
        if exact:
            assert torch.equal(code[live], want[live]) and rel.max() <= 1e-6
            assert bool(((code * s - extreme)[~positive] == 0).all())  # qmax + 1 = 2^(b-1): bit-exact
        elif bits <= 4:
            assert rel.max() > 0.03  # half a step off: 1 / (2 qmax + 1) of the extreme


def test_half_grid_is_the_historical_one():
    w = groups(2)
    assert torch.equal(sym_scale(w, 7, "half")[:10], (w.abs().amax(1) / 7.5)[:10])
    assert torch.equal(sym_scale(w, 127, "half")[:10], (w.abs().amax(1) / 127)[:10])
    assert QuantConfig().sym_grid == "half"  # the bare calibrator API keeps its grid; the CLI resolves per target


@pytest.mark.parametrize("weighted", (False, True))
def test_search_never_worse_than_extreme_and_better_somewhere(weighted):
    w = groups(3)
    cw = torch.rand(1, 128, generator=torch.Generator().manual_seed(4)) * 10 if weighted else None
    err = {}
    for grid in ("extreme", "search"):
        s = group_scales(w, 7, col_weight=cw, grid=grid).unsqueeze(1)
        err[grid] = clip_error(w, quantize_codes(w, s, -8, 7) * s, cw)
    assert bool((err["search"] <= err["extreme"]).all()) and bool((err["search"] < err["extreme"]).any())
    assert SEARCH_FACTORS[0] == 1.0 and min(SEARCH_FACTORS) == pytest.approx(0.9) and max(SEARCH_FACTORS) == pytest.approx(1.1)


@pytest.mark.parametrize("grid", ("extreme", "search"))
def test_gptq_on_the_new_grids(grid):
    """GPTQ's groups take the grid too (scales from the updated weights), codes within range, lower error than RTN."""
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(32, 256, generator=g), torch.randn(512, 256, generator=g)
    cfg = QuantConfig(bits=3, group_size=128, sym_grid=grid, act_order=False)
    res = {}
    for method in ("rtn", "gptq"):
        c = make_calibrator(method, w, cfg)
        c.add_batch(x)
        res[method] = c.solve()
    r = res["gptq"]
    assert int(r.codes.min()) >= -4 and int(r.codes.max()) <= 3 and bool((r.scales > 0).all())
    assert r.error < res["rtn"].error
    half = make_calibrator("gptq", w, QuantConfig(bits=3, group_size=128, act_order=False))
    half.add_batch(x)
    assert not torch.equal(half.solve().scales, r.scales)  # the grid reaches the solver


def test_fp16_scales_keep_the_new_grid():
    """The FP16 scale path: scales cast to float16, codes untouched (no scale under fp16's normal range), the
    dequantized weight within float16's rounding of the float32 one."""
    r = make_calibrator("rtn", groups(6), QuantConfig(bits=4, sym_grid="extreme")).solve()
    codes, scales = r.codes.numpy(), r.scales.numpy()
    codes16, scales16, moved = fp16_scales(codes, scales, 4)
    assert moved == 0 and np.array_equal(codes16, codes) and scales16.dtype == np.float16
    w32 = codes * np.repeat(scales, 128, axis=1)
    w16 = codes16 * np.repeat(scales16.astype(np.float32), 128, axis=1)
    assert np.abs(w16 - w32).max() <= 1e-3 * np.abs(w32).max()
    tiny = scales * 1e-6  # under fp16's smallest normal: the codes are rescaled, still within INT4
    codes_t, _, moved = fp16_scales(codes, tiny, 4)
    assert moved == tiny.size and codes_t.min() >= -8 and codes_t.max() <= 7


# ----------------------------------------------------------------------------- command line and export
def test_recipe_defaults_by_target_and_explicit_flags_win():
    """Every option of targets.RECIPE_DEFAULTS is unset by the parser, filled from --target's row, and an
    explicit flag (either polarity) wins over the row."""
    from vlmq_export.targets import RECIPE_DEFAULTS, TARGETS, recipe_defaults

    parse = cli._export_parser().parse_args
    for target, t in TARGETS.items():
        args = parse(["m", "--int4", "--target", target])
        assert all(getattr(args, k) is None for k in RECIPE_DEFAULTS[t.runtime])
        assert cli.apply_target_defaults(args) == recipe_defaults(target) == RECIPE_DEFAULTS[t.runtime]
        assert args.sym_grid in SYM_GRIDS and (args.asym is False or not t.symmetric_only)
    explicit = ["--sym-grid", "half", "--no-asym", "--true-sequential", "--sink-weight", "3", "--no-clip-search",
                "--lm-head", "none"]
    for target in ("onnxruntime", "tensorrt"):
        args = parse(["m", "--int4", "--target", target, *explicit])
        assert cli.apply_target_defaults(args) == {}
        assert (args.sym_grid, args.asym, args.true_sequential, args.sink_weight, args.clip_search, args.lm_head) == \
            ("half", False, True, 3.0, False, "none")
    args = parse(["m", "--int4", "--asym", "--clip-search"])
    filled = cli.apply_target_defaults(args)
    assert args.asym is True and args.clip_search is True and "asym" not in filled and "clip_search" not in filled


def test_the_resolved_recipe_is_printed_and_recorded(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "--method", "rtn", "--no-validate", "-o", str(out),
                     "--target", "tensorrt", "--no-clip-search"]) == 0
    err = capsys.readouterr().err
    from vlmq_export.targets import recipe_defaults

    want = recipe_defaults("tensorrt")
    assert f"recipe: --target tensorrt defaults " in err and f"--sym-grid {want['sym_grid']}" in err
    assert "clip-search" not in err.split("recipe:")[1].splitlines()[0]  # given explicitly: not a default
    recipe = json.loads((out / "manifest.json").read_text())["recipe"]
    assert (recipe["sym_grid"], recipe["true_sequential"], recipe["sink_weight"], recipe["clip_search"]) == \
        (want["sym_grid"], want["true_sequential"], want["sink_weight"], False)


def test_bad_sym_grid_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["m", "--int4", "--sym-grid", "exact"])
    assert e.value.code == 2 and "invalid choice: 'exact'" in capsys.readouterr().err
    from vlmq_export.calibrate import Recipe
    from vlmq_export.errors import VlmqError

    with pytest.raises(VlmqError, match="unknown --sym-grid 'exact'"):
        Recipe(sym_grid="exact").check()


@pytest.fixture(scope="module")
def grid_exports(tiny_dirs, tmp_path_factory):
    """Tiny SmolVLM exports with validation: GPTQ on the extreme grid for TensorRT (FP16 graphs), RTN on the
    search grid for ONNX Runtime."""
    root = tmp_path_factory.mktemp("sym_grid")
    runs = {"extreme-trt": ["--method", "gptq", "--sym-grid", "extreme", "--target", "tensorrt"],
            "search-ort": ["--method", "rtn", "--sym-grid", "search", "--no-asym"]}  # onnxruntime's default is asym
    for name, extra in runs.items():
        assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "-o", str(root / name), "--n-calib", "2", "--n-val", "2",
                         "--gen-tokens", "4", "--quiet", *extra]) == 0
    return {k: root / k for k in runs}


@pytest.mark.parametrize("name,grid", [("extreme-trt", "extreme"), ("search-ort", "search")])
def test_export_matches_fake_quant_and_records_the_grid(grid_exports, name, grid):
    out = grid_exports[name]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["sym_grid"] == grid and manifest["recipe"]["symmetric"] is True
    stages = json.loads((out / "report" / "validation.json").read_text())["stages"]
    qdq = stages["qdq_onnx_vs_torch_fakequant"]  # the int4 zero-point-free Q/DQ graph against torch fake-quant
    if name.endswith("trt"):  # FP16 graphs against torch FP16 fake-quant: test_fp16's bounds (rounding order only;
        # one near-tie top-1 flip in the ~90 validated positions is FP16 rounding, as in test_fp16)
        assert qdq["dtype"] == "fp16" and qdq["logits_cosine"] > 1 - 1e-5 and qdq["top1_agreement"] >= 0.98
        assert qdq["logits_max_abs_diff"] < 2e-2
    else:
        assert qdq["logits_max_abs_diff"] <= 1e-4
    assert manifest["validation"]["ort_fused_all"]  # every block fused into MatMulNBits


def test_extreme_grid_export_passes_tensorrt_lint(grid_exports, capsys):
    assert cli.main(["lint", str(grid_exports["extreme-trt"]), "--target", "tensorrt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["targets"]["tensorrt"]["ok"]


def test_bench_grid_reports_mean_and_spread_over_seeds():
    from conftest import load_tool

    tool = load_tool("bench_grid")
    ppl = lambda p, tokens=100: {"perplexity": p, "ci95": [p - 1, p + 1], "windows": 1, "tokens": tokens}  # noqa: E731
    base = {"method": "gptq", "bits": 4, "grid": "extreme", "asym": False, "true_sequential": False,
            "sink_weight": 1.0, "clip_search": False, "commit": "abc", "calib_s": 10.0}
    rows = [{**base, "seed": s, "english": ppl(e), "heldout": ppl(h)} for s, e, h in ((0, 26, 30), (1, 27, 31), (2, 28, 35))]
    rows.append({**base, "method": "rtn", "grid": "half", "seed": None, "english": ppl(40), "heldout": ppl(44)})
    md = tool.render({"fp": {"english": ppl(20, 808), "heldout": ppl(22, 2044)}, "n_calib": 16, "rows": rows})
    assert "| gptq W4 sym extreme | 0,1,2 | 27.00 [26.00–28.00] ± 1.00 | 32.00 [30.00–35.00] ± 2.65 | +45.5% | 10 |" in md
    assert "| rtn W4 sym half | — | 40.00 [39.00–41.00] | 44.00 [43.00–45.00] | +100.0% | 10 |" in md
    assert tool.label({**base, "asym": True, "true_sequential": True, "sink_weight": 10.0, "clip_search": True}) == \
        "gptq W4 asym true-seq sink 10 clip"
