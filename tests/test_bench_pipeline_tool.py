"""tools/bench_pipeline.py: the issue's targets are judged at the runtime's default accuracy level."""
from conftest import load_tool

from vlmq_export.runtime.session import DEFAULT_ACCURACY_LEVEL


def _entry(level0: float, level4: float, ratio: float) -> dict:
    return {"sizes": {"llm_ratio": ratio},
            "decode": {"speedup_vs_float": {"int4_level0": {"decode_tokens_per_s": level0},
                                            "int4_level4": {"decode_tokens_per_s": level4}}}}


def test_targets_use_the_default_level():
    bench = load_tool("bench_pipeline")
    t = bench.targets(_entry(1.6, 2.1, 0.33))
    assert t["int4_decode_speedup_ge_2"] == {"value": 2.1, "met": True, "accuracy_level": DEFAULT_ACCURACY_LEVEL}
    assert not t["int4_level0_decode_speedup_ge_2"]["met"] and t["int4_level4_decode_speedup_ge_2"]["met"]
    assert t["int4_llm_size_ratio_le_0.35"]["met"]
    t = bench.targets(_entry(2.5, 1.9, 0.36))
    assert not t["int4_decode_speedup_ge_2"]["met"] and not t["int4_llm_size_ratio_le_0.35"]["met"]


def test_recipe_asym_flag():
    bench = load_tool("bench_pipeline")
    assert bench.bench_recipe(None).sym and not bench.bench_recipe(None, asym=True).sym
    assert bench.bench_recipe("w4", asym=True).sym_for("lm_head") is False
