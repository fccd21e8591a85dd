"""The held-out English text and perplexity with a per-window bootstrap interval (issue 25)."""
import json
import math

import numpy as np
import pytest

from vlmq_export.validate import perplexity as P


def _windows(n, seed=1):
    rng = np.random.default_rng(seed)
    count = np.full(n, 511)
    return rng.normal(3.2, 0.4, n) * count, count  # per-window NLL sums around exp(3.2) = 24.5


def test_bootstrap_interval_contains_the_estimate_and_is_deterministic():
    nll, count = _windows(40)
    s = P.summarize(nll, count, text="heldout")
    lo, hi = s["ci95"]
    assert lo < s["perplexity"] < hi
    assert s["perplexity"] == pytest.approx(math.exp(nll.sum() / count.sum()))
    assert (s["windows"], s["tokens"], s["text"]) == (40, 40 * 511, "heldout")
    assert P.summarize(nll, count)["ci95"] == [lo, hi]  # fixed seed
    assert P.bootstrap_interval(nll, count, seed=7) != (lo, hi)  # the seed is what fixes it


def test_bootstrap_interval_shrinks_with_more_windows():
    widths = [hi - lo for lo, hi in (P.bootstrap_interval(*_windows(n)) for n in (10, 40, 160))]
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.35)  # ~ 1/sqrt(windows)


def test_bootstrap_weights_windows_by_their_tokens():
    # a short last window with a high mean NLL must not count as much as a full one
    nll, count = np.array([3.0 * 511] * 20 + [6.0 * 10]), np.array([511] * 20 + [10])
    lo, hi = P.bootstrap_interval(nll, count)
    assert hi < math.exp(3.2)


def test_window_nlls_windows_context_and_bound():
    vocab, seen = 5, []

    def uniform(chunk):
        seen.append(len(chunk))
        return np.zeros((len(chunk), vocab), dtype=np.float32)

    ids = np.arange(1100) % vocab
    nll, count = P.window_nlls(uniform, ids, window=512)
    assert seen == [512, 512, 76] and count.tolist() == [511, 511, 75]  # the first token of each is context
    assert np.allclose(nll / count, math.log(vocab))
    seen.clear()
    assert P.window_nlls(uniform, ids, window=512, max_windows=2)[1].tolist() == [511, 511] and seen == [512, 512]


def test_the_texts_are_shipped_and_distinct():
    held, english = P.named_text("heldout"), P.named_text("english")
    assert 100_000 < len(held.encode()) < 150_000 and held.isascii()
    assert english[:200] not in held and "[Applause]" not in held
    with pytest.raises(KeyError):
        P.named_text("pydoc")


def test_heldout_text_is_at_least_20k_smollm2_tokens():
    import importlib

    from vlmq_export.errors import VlmqError

    try:  # vlmq_export.testing.smollm2 moves to vlmq_export.testbed.smollm2 (issue 22)
        smollm2 = importlib.import_module("vlmq_export.testbed.smollm2")
    except ImportError:
        smollm2 = importlib.import_module("vlmq_export.testing.smollm2")
    try:
        d = smollm2.smollm2_dir()
    except VlmqError as e:
        pytest.skip(f"SmolLM2 tokenizer not available: {e}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    assert len(P.text_ids(tok, P.named_text("heldout"), max_tokens=None)) >= 20_000
    assert len(P.text_ids(tok)) == 810  # english.txt, unchanged


@pytest.fixture(scope="module")
def rtn_calib_text_export(tiny_dirs, tmp_path_factory):
    """A tiny RTN export asked for --calib-text and a task evaluation, with text generation forbidden."""
    from vlmq_export import cli, pipeline

    def never(*a, **k):
        raise AssertionError("generated calibration text for RTN")

    out = tmp_path_factory.mktemp("rtn_calib_text") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "generated_text_samples", never)
        assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "--method", "rtn", "-o", str(out), "--n-calib", "2",
                         "--calib-text", "3", "--calib-text-tokens", "24", "--no-validate", "--eval-task", "1",
                         "--quiet"]) == 0
    return out


def test_rtn_skips_calib_text_generation(rtn_calib_text_export):
    """RTN is data-free: --calib-text must not sample text from the model that nothing would read."""
    from vlmq_export.outdir import check_complete

    cal = check_complete(rtn_calib_text_export)["calibration"]
    assert cal["data_pass"] is False and cal["generated_text"] is None and cal["samples"] == 2


def test_export_report_has_bounded_heldout_perplexity(rtn_calib_text_export):
    """The export's evaluation (testbeds, --eval-task) scores both texts in torch and ONNX Runtime; the held-out
    text only its first REPORT_HELDOUT_WINDOWS windows."""
    doc = json.loads((rtn_calib_text_export / "report" / "validation.json").read_text())
    ppl = doc["perplexity"]
    assert ppl["heldout_windows"] == P.REPORT_HELDOUT_WINDOWS
    for key in ("torch_full_precision", "onnx_quantized"):
        assert ppl[key]["heldout"]["windows"] == P.REPORT_HELDOUT_WINDOWS
        assert ppl[key]["english"]["ci95"][0] <= ppl[key]["english"]["perplexity"] <= ppl[key]["english"]["ci95"][1]
    # RTN on a random tiny model: the quantized model is measurably not the float one, on the same windows
    assert ppl["onnx_quantized"]["heldout"]["perplexity"] != ppl["torch_full_precision"]["heldout"]["perplexity"]
    md = (rtn_calib_text_export / "report" / "report.md").read_text()
    assert f"held-out English (first {P.REPORT_HELDOUT_WINDOWS} windows)" in md


def _ppl(p, lo, hi, windows=16, tokens=16 * 511):
    return {"perplexity": p, "ci95": [lo, hi], "windows": windows, "tokens": tokens}


def test_report_shows_both_texts_with_intervals(tmp_path):
    from test_report import IMG, synthetic  # the synthetic manifest and report of tests/test_report.py

    from vlmq_export.validate.report import write_report

    manifest, report = synthetic()
    write_report(tmp_path, manifest, report)
    plots_before = (tmp_path / "report" / "report.html").read_text().count(IMG)
    report["perplexity"] = {"heldout_windows": 16,
                            "torch_full_precision": {"english": _ppl(22.21, 20.5, 24.0, 2, 809),
                                                     "heldout": _ppl(14.87, 13.9, 15.8)},
                            "onnx_quantized": {"english": _ppl(25.43, 23.4, 27.6, 2, 809),
                                               "heldout": _ppl(16.02, 15.0, 17.1)}}
    write_report(tmp_path, manifest, report)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Language-model perplexity (95 % interval: per-window bootstrap; export" in md
    assert "| exported ONNX (ONNX Runtime) | 25.43 [23.40, 27.60] (2 windows, 809 tokens) | 16.02 [15.00, 17.10]" in md
    assert "held-out English (first 16 windows)" in md and "`vlmq-export eval OUT` the whole text" in md
    assert "An interval from 2 windows is coarse" in md
    assert (tmp_path / "report" / "report.html").read_text().count(IMG) == plots_before + 1
    doc = json.loads((tmp_path / "report" / "validation.json").read_text())
    assert doc["perplexity"]["onnx_quantized"]["heldout"]["ci95"] == [15.0, 17.1] and "perplexity" in doc["measured"]


def test_eval_reports_both_texts_with_intervals(rtn_exports, capsys):
    from vlmq_export import cli

    out = rtn_exports["smolvlm"]
    assert cli.main(["eval", str(out), "--n", "1", "--heldout-windows", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["onnx"]
    texts = res["perplexity_texts"]
    assert res["perplexity"] == texts["english"]["perplexity"]  # the number eval always gave
    assert texts["heldout"]["windows"] == 2 and texts["heldout"]["tokens"] == 2 * 511
    for t in texts.values():
        assert t["ci95"][0] <= t["perplexity"] <= t["ci95"][1]
    assert cli.main(["eval", str(out), "--heldout-windows", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vlmq-export: error: eval: --heldout-windows must be at least 1"]
