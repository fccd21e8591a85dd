"""`validate --backend tensorrt`: each TensorRT engine against ONNX Runtime on the same feeds, through Polygraphy's
Comparator (``Comparator.run`` + ``Comparator.compare_accuracy`` with FP16 tolerances).

The feeds are the real ones of the held-out prompts, recorded from ONNX Runtime: the vision encoder's pixels,
the projector's features, the token ids, and for the language model a prefill (empty cache) and one decode step
(the prefill's cache) per prompt, each compared under the engine profile that takes its shapes. The wiring,
:func:`compare_runners` and :func:`compare_engines`, takes any runner factories, so it is tested with ONNX Runtime
on both sides where TensorRT is absent. Polygraphy and TensorRT are imported only when a comparison runs.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtime.generate import GRAPHS, OnnxVLM
from ..runtime.runners import engines, select_profile
from ..runtime.session import PARITY_ACCURACY_LEVEL, make_session

ATOL = RTOL = 1e-2  # FP16 engines against ONNX Runtime; the mean error is checked
ERROR_STAT = "mean"


def _simple_compare_func(atol: float, rtol: float):
    """``CompareFunc.simple(atol, rtol, check_error_stat="mean")``; its class where Polygraphy has one (0.50+,
    where CompareFunc.simple is deprecated)."""
    from polygraphy import comparator

    make = getattr(comparator, "SimpleCompareFunc", None) or comparator.CompareFunc.simple
    return make(atol=atol, rtol=rtol, check_error_stat=ERROR_STAT)


def compare_runners(make_a: Callable, make_b: Callable, feeds: list[dict], *, atol: float = ATOL,
                    rtol: float = RTOL) -> dict:
    """Run two Polygraphy runners (``make_a()``, ``make_b()``) on ``feeds`` with ``Comparator.run`` and judge them
    with ``Comparator.compare_accuracy``. Returns {"passed", "iterations", "max_abs_diff", "mean_abs_diff",
    "worst_output"} (the diffs over every output and iteration)."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # Polygraphy logs to stdout; our verdict is the result
        results = Comparator.run([make_a(), make_b()], data_loader=feeds)
        accuracy = Comparator.compare_accuracy(results, compare_func=_simple_compare_func(atol, rtol))
    (_, iters_a), (_, iters_b) = list(results)
    worst, max_diff, means = None, 0.0, []
    for it_a, it_b in zip(iters_a, iters_b):
        for name in it_a.keys():
            diff = np.abs(np.asarray(it_a[name], np.float64) - np.asarray(it_b[name], np.float64))
            if diff.size:
                means.append(float(diff.mean()))
                if worst is None or diff.max() > max_diff:
                    worst, max_diff = name, float(diff.max())
    return {"passed": bool(accuracy), "iterations": len(iters_a), "max_abs_diff": max_diff,
            "mean_abs_diff": float(np.mean(means)) if means else 0.0, "worst_output": worst}


def graph_feeds(vlm: OnnxVLM, prepared: list) -> dict[str, list[dict]]:
    """{graph: [feeds]} for every graph, recorded from ``vlm`` on the prompts, in each graph's input dtypes."""
    feeds: dict[str, list[dict]] = defaultdict(list)

    def record(graph: str, feed: dict) -> dict:
        feeds[graph].append(vlm.runner(graph).cast_feeds(feed))
        return feeds[graph][-1]

    fam = vlm.family
    for p in prepared:
        if p.num_images:
            feats = vlm.runner("vision_encoder").infer(record("vision_encoder", fam.vision_feeds(p)))["features"]
            record("projector", {"features": feats})
        record("embed_tokens", {"input_ids": p.input_ids})
        seq = p.seq_len
        emb, extra = vlm.prefill_inputs(p)
        prefill = record("llm", {"inputs_embeds": emb, "attention_mask": np.ones((1, seq), np.int64),
                                 "position_ids": p.position_ids, **extra, **vlm.empty_past()})
        out = vlm.runner("llm").infer(prefill)
        ids = np.array([[int(np.argmax(out["logits"][0, -1]))]], np.int64)
        record("llm", {"inputs_embeds": vlm.runner("embed_tokens").infer({"input_ids": ids})["inputs_embeds"],
                       "attention_mask": np.ones((1, seq + 1), np.int64),
                       "position_ids": fam.decode_position_ids(p.rope_delta, seq), **fam.llm_decode_feeds(1),
                       **{k.replace("present_", "past_"): v for k, v in out.items() if k.startswith("present_")}})
    return dict(feeds)


def trt_runner_factory(out: Path) -> Callable:
    """(graph, profile index) -> a Polygraphy ``TrtRunner`` over OUT's engine, set to that profile."""
    built = engines(out)

    def make(graph: str, profile: int):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        return TrtRunner(EngineFromBytes(BytesFromPath(str(built[graph]["engine"]))), name=f"tensorrt:{graph}",
                         optimization_profile=profile)
    return make


def ort_runner_factory(out: Path, accuracy_level: int = PARITY_ACCURACY_LEVEL) -> Callable:
    """(graph, profile index) -> a Polygraphy ``OnnxrtRunner`` over our session of OUT/<graph>.onnx (float compute
    by default, as TensorRT computes the Q/DQ graphs)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    def make(graph: str, profile: int):
        return OnnxrtRunner(lambda: make_session(out / f"{graph}.onnx", accuracy_level=accuracy_level),
                            name=f"onnxruntime:{graph}")
    return make


def compare_engines(out: str | Path, prepared: list, profiles: dict[str, list[dict]], make_a: Callable | None = None,
                    make_b: Callable | None = None, *, atol: float = ATOL, rtol: float = RTOL) -> dict:
    """Every graph of OUT, TensorRT (``make_a``, default: OUT's engines) against ONNX Runtime (``make_b``) on the
    prompts' feeds, one comparison per engine profile the feeds use. ``profiles``: {graph: [profile]} as in
    OUT/engines/profiles.json. A flat dict for the report: the tolerances, "passed", and per graph and profile
    "<graph>.<profile>.passed", ".max_abs_diff", ".mean_abs_diff", ".worst_output"."""
    out = Path(out)
    make_a = make_a or trt_runner_factory(out)
    make_b = make_b or ort_runner_factory(out)
    vlm = OnnxVLM(out, accuracy_level=PARITY_ACCURACY_LEVEL)
    try:
        feeds = graph_feeds(vlm, prepared)
    finally:
        vlm.close()
    res: dict = {"compared": "tensorrt engines vs onnxruntime", "onnxruntime_accuracy_level": PARITY_ACCURACY_LEVEL,
                 "atol": atol, "rtol": rtol, "check_error_stat": ERROR_STAT}
    passed = True
    for graph in GRAPHS:
        by_profile: dict[int, list[dict]] = defaultdict(list)
        for feed in feeds.get(graph, []):
            by_profile[select_profile(profiles[graph], feed, graph)].append(feed)
        for index, group in sorted(by_profile.items()):
            r = compare_runners(lambda: make_a(graph, index), lambda: make_b(graph, index), group, atol=atol, rtol=rtol)
            key = f"{graph}.{profiles[graph][index]['name']}"
            res.update({f"{key}.{k}": v for k, v in r.items() if k != "iterations"})
            passed = passed and r["passed"]
    res["passed"] = passed
    return res
