"""Task accuracy with confidence: 95 % Wilson intervals, overall and per question type, in the result dict,
`eval --json`, the report (markdown and the HTML plot) and format_accuracy."""
from __future__ import annotations

import json
import math

import pytest

from vlmq_export import cli
from vlmq_export.models import load_family
from vlmq_export.testbed import (eval_samples, evaluate_torch, format_accuracy, normalize_answer, paired_difference,
                                 wilson_interval)


def test_wilson_interval_known_values():
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 -> 0.2553 to 0.3662
    lo, hi = wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    # closed forms at the edges: 0/n -> [0, z^2 / (n + z^2)], n/n -> [n / (n + z^2), 1]
    z2 = 1.959963984540054 ** 2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0  # exactly: never inside the point
    for k, n in ((1, 1), (3, 3), (7, 7), (0, 3), (1, 3), (999, 1000)):
        lo, hi = wilson_interval(k, n)
        assert lo <= k / n <= hi
    # symmetric about 1/2 at p = 1/2; about +-0.031 at 1000 samples
    lo, hi = wilson_interval(500, 1000)
    assert lo + hi == pytest.approx(1.0) and hi - lo == pytest.approx(0.0619, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


class _AlwaysYes:
    """A model that answers 'Yes.' to everything (through the real tokenizer and stop token)."""

    def __init__(self, family):
        self.ids = family.tokenizer("Yes.", add_special_tokens=False)["input_ids"] + [family.stop_token_ids[0]]

    def eval(self):
        return self

    def generate(self, input_ids, **kwargs):
        import torch

        return torch.cat([input_ids, torch.tensor([self.ids])], dim=1)


def test_paired_difference():
    same = paired_difference("0110" * 50, "0110" * 50)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0] and same["only_this"] == same["only_baseline"] == 0
    # 30 of 200 samples right only here, 10 right only in the baseline: +0.10, the interval above 0 and narrower
    # than the two Wilson intervals would suggest
    a = "1" * 30 + "0" * 10 + "10" * 80
    b = "0" * 30 + "1" * 10 + "10" * 80
    res = paired_difference(a, b)
    assert res["diff"] == pytest.approx(0.1) and (res["only_this"], res["only_baseline"], res["n"]) == (30, 10, 200)
    lo, hi = res["ci95"]
    assert 0 < lo < 0.1 < hi < 0.2
    assert paired_difference(b, a)["ci95"] == pytest.approx([-hi, -lo], abs=0.02)
    assert paired_difference(a, b) == res  # seeded
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_difference("01", "011")


def test_result_has_intervals_per_question_type(tiny_dirs):
    family = load_family(tiny_dirs["smolvlm"])
    samples = eval_samples(40)
    res = evaluate_torch(family, _AlwaysYes(family), samples=samples)
    assert res["interval"] == "wilson 95%"
    assert res["ci95"] == list(wilson_interval(res["correct"], res["n"]))
    assert res["ci95"][0] <= res["accuracy"] <= res["ci95"][1]
    assert res["per_qtype_ci95"].keys() == res["per_qtype"].keys() == res["correct_per_qtype"].keys()
    for q, (lo, hi) in res["per_qtype_ci95"].items():
        want = sum(s.meta["qtype"] == q and normalize_answer(s.answer) == "yes" for s in samples)
        assert res["correct_per_qtype"][q] == want
        assert [lo, hi] == list(wilson_interval(want, res["n_per_qtype"][q]))
    assert sum(res["correct_per_qtype"].values()) == res["correct"]
    # one outcome per sample, in order: "yes" is right exactly where the answer is yes
    assert res["outcomes"] == "".join("1" if normalize_answer(s.answer) == "yes" else "0" for s in samples)
    json.dumps(res)  # plain JSON (lists, not tuples or numpy)
    line = format_accuracy(res)
    assert line.startswith(f"acc {res['accuracy']:.3f} [{res['ci95'][0]:.2f}, {res['ci95'][1]:.2f}] (")
    # results written before the intervals existed still format
    old = {k: res[k] for k in ("accuracy", "correct", "n", "per_qtype")}
    assert "[" not in format_accuracy(old)


def test_eval_json_has_intervals(rtn_exports, capsys):
    capsys.readouterr()
    assert cli.main(["eval", str(rtn_exports["smolvlm"]), "--n", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["onnx"]
    assert res["n"] == 3 and res["interval"] == "wilson 95%"
    assert res["ci95"] == pytest.approx(list(wilson_interval(res["correct"], 3)))
    assert res["per_qtype_ci95"].keys() == res["per_qtype"].keys()


@pytest.mark.parametrize("n", ["0", "-5"])
def test_eval_n_below_one_is_a_one_line_error(tmp_path, capsys, n):
    # checked before the output directory is even read
    assert cli.main(["eval", str(tmp_path / "nowhere"), "--n", n]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmq-export: error: eval: --n must be at least 1") and err.count("\n") == 1


def test_eval_defaults_to_1000_samples(rtn_exports, monkeypatch, capsys):
    import vlmq_export.testbed as testbed
    import vlmq_export.validate.perplexity as perplexity

    seen = []
    monkeypatch.setattr(testbed, "evaluate_onnx", lambda out, n, **kw: seen.append(n) or {"n": n})
    monkeypatch.setattr(perplexity, "perplexity_onnx", lambda *a, **kw: 1.0)
    assert cli.main(["eval", str(rtn_exports["smolvlm"]), "--json"]) == 0
    assert seen == [1000] and json.loads(capsys.readouterr().out)["onnx"]["n"] == 1000


def _manifest_and_report(with_ci: bool) -> tuple[dict, dict]:
    res = {"accuracy": 0.5, "per_qtype": {"color": 0.6, "count": 0.3}, "n": 100, "n_per_qtype": {"color": 50, "count": 50}}
    if with_ci:
        res |= {"ci95": list(wilson_interval(50, 100)),
                "per_qtype_ci95": {"color": list(wilson_interval(30, 50)), "count": list(wilson_interval(15, 50))}}
    manifest = {"source": {"model": "m", "family": "smolvlm"}, "created": "2026-12-01T10:00:00Z", "opset": 21,
                "recipe": {"method": "rtn", "components": {"llm": {"bits": 4, "group_size": 64, "sym": True}}},
                "calibration": {"samples": 4, "source": "builtin"}, "components": {}, "layers": [], "validation": {}}
    return manifest, {"stages": {}, "task": {"samples": 100, "torch_full_precision": res}}


def test_report_shows_intervals(tmp_path):
    from vlmq_export.validate.html import task_plot
    from vlmq_export.validate.report import write_report

    manifest, report = _manifest_and_report(with_ci=True)
    write_report(tmp_path, manifest, report)
    md = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| full precision (torch)"))
    assert "0.5000 [0.40, 0.60]" in row and "color 0.6000 [0.46, 0.72] (n=50)" in row, row
    assert "95 % Wilson intervals" in md
    plain = _manifest_and_report(with_ci=False)[1]["task"]
    assert task_plot(report["task"]) != task_plot(plain)  # the error bars are drawn
    perfect = {"samples": 4, "onnx": {"accuracy": 1.0, "ci95": list(wilson_interval(4, 4)), "per_qtype": {"color": 1.0},
                                      "per_qtype_ci95": {"color": list(wilson_interval(4, 4))}}}
    assert task_plot(perfect)  # an interval that ends at the accuracy itself (all right) draws too
    # a report without intervals (written before them) still renders, without brackets
    write_report(tmp_path, *_manifest_and_report(with_ci=False))
    md = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| full precision (torch)"))
    assert "[" not in row and "color 0.6000 (n=50)" in row, row


def test_the_testbeds_recorded_test_accuracy_reaches_the_report(tmp_path):
    """meta.json's full-precision test accuracy (tools/train_shapes_vlm.py --export-assets, 1000 samples) travels
    through testbed.json into the report beside the export's own smaller evaluation."""
    from vlmq_export.testbed import testbed_recorded_test
    from vlmq_export.validate.report import write_report

    recorded = {"accuracy": 0.93, "ci95": list(wilson_interval(930, 1000)), "n": 1000, "per_qtype": {"color": 0.95},
                "per_qtype_ci95": {"color": list(wilson_interval(238, 250))}, "n_per_qtype": {"color": 250}}
    model = tmp_path / "model"
    model.mkdir()
    assert testbed_recorded_test(model) is None  # not a testbed
    (model / "testbed.json").write_text(json.dumps({"data": {"layout": "grid"}}))
    assert testbed_recorded_test(model) is None  # a testbed whose parts were exported without it
    (model / "testbed.json").write_text(json.dumps({"data": {"layout": "grid"}, "test": recorded}))
    assert testbed_recorded_test(model) == recorded
    manifest, report = _manifest_and_report(with_ci=True)
    report["task"]["recorded_full_precision"] = {**recorded, "source": "the testbed's meta.json"}
    write_report(tmp_path, manifest, report)
    md = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| full precision, recorded"))
    assert "(1000 samples, meta.json)" in row and "0.9300 [0.91, 0.94]" in row, row


@pytest.mark.parametrize("fam", ["smolvlm", "qwen2_vl"])
def test_teacher_forced_batches_like_single_samples(tiny_dirs, fam):
    """The sweep's fast evaluation: right-padded batches (Qwen2-VL's per-token mm_token_type_ids padded too, its
    pixels concatenated) give every sample the arg-max tokens it gets alone; the result has the greedy
    evaluation's fields. Its equivalence to greedy generation is checked on the real testbed (test_testbed.py)."""
    from vlmq_export.models import load_family
    from vlmq_export.testbed import eval_samples, evaluate_torch_teacher_forced

    family = load_family(tiny_dirs[fam])
    model = family.load_model(tiny_dirs[fam])
    samples = eval_samples(7, image_size=64)
    one = evaluate_torch_teacher_forced(family, model, samples=samples, batch_size=1)
    three = evaluate_torch_teacher_forced(family, model, samples=samples, batch_size=3)
    assert one["n"] == three["n"] == 7 and one["outcomes"] == three["outcomes"]
    assert [m["prediction"] for m in one["mistakes"]] == [m["prediction"] for m in three["mistakes"]]
    assert one["backend"] == "torch (teacher-forced)" and one["per_qtype"].keys() == one["per_qtype_ci95"].keys()
