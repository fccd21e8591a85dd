"""quality_table's row cache (the real-weight files share their FP and plain GPTQ W4 rows through it)."""
from __future__ import annotations

import threading

from vlmq_export.data.samples import Sample
from vlmq_export.testing.lm_quality import _cached_row, samples_digest


def test_a_row_is_computed_once_per_key_and_a_concurrent_caller_waits_for_it(tmp_path):
    calls = []
    started = threading.Event()

    def compute(v):
        def f():
            calls.append(v)
            started.set()
            return {"perplexity": v}
        return f

    key = {"method": "gptq", "bits": 4, "samples": "abc"}
    rows = []
    t = threading.Thread(target=lambda: rows.append(_cached_row(tmp_path, key, compute(1.0))))
    t.start()
    started.wait(10)
    rows.append(_cached_row(tmp_path, dict(reversed(list(key.items()))), compute(2.0)))  # same key, other order
    t.join()
    assert calls == [1.0] and sorted(r["perplexity"] for r in rows) == [1.0, 1.0]
    assert _cached_row(tmp_path, {**key, "bits": 3}, compute(3.0))["perplexity"] == 3.0  # another key computes
    assert _cached_row(None, key, compute(4.0))["perplexity"] == 4.0  # no cache: always computed
    assert calls == [1.0, 3.0, 4.0]


def test_samples_digest_follows_the_text():
    a = [Sample([], "p", "a", "generated:0")]
    assert samples_digest(a) == samples_digest([Sample([], "p", "a", "generated:0")])
    assert samples_digest(a) != samples_digest([Sample([], "p", "b", "generated:0")])
