"""The held-out English text and perplexity with a per-window bootstrap interval (issue 25)."""
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


def test_rtn_skips_calib_text_generation(tiny_dirs, tmp_path, monkeypatch):
    """RTN is data-free: --calib-text must not sample text from the model that nothing would read."""
    from vlmq_export import cli, pipeline
    from vlmq_export.outdir import check_complete

    def never(*a, **k):
        raise AssertionError("generated calibration text for RTN")

    monkeypatch.setattr(pipeline, "generated_text_samples", never)
    out = tmp_path / "out"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "--method", "rtn", "-o", str(out), "--n-calib", "2",
                     "--calib-text", "3", "--calib-text-tokens", "24", "--no-validate", "--quiet"]) == 0
    cal = check_complete(out)["calibration"]
    assert cal["data_pass"] is False and cal["generated_text"] is None and cal["samples"] == 2
