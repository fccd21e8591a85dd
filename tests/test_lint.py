"""`vlmq-export lint`: static target checks of an output directory, without the source model."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from vlmq_export import cli
from vlmq_export.validate.lint import lint_graph, lint_output


@pytest.fixture(scope="module")
def exports(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lint")
    # the portable llm graph: what TensorRT takes (the onnxruntime target's default is ONNX Runtime's fused flavour)
    # (the onnxruntime target's defaults are asymmetric: --no-asym asks for the symmetric, TensorRT-legal form)
    # and a float head (--lm-head none: the onnxruntime default's blockwise INT8 head is not TensorRT's form)
    flags = {"sym": ["--llm-graph", "portable", "--no-asym", "--lm-head", "none"], "asym": ["--asym"],
             "g32": ["--group-size", "32", "--llm-graph", "portable", "--no-asym", "--lm-head", "none"]}
    outs = {}
    for name, extra in flags.items():
        outs[name] = root / name
        assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "--method", "rtn", "--no-validate", "-o",
                         str(outs[name]), "--n-calib", "2", "--quiet", *extra]) == 0
    return outs


def test_symmetric_export_passes_both_targets(exports, capsys):
    assert cli.main(["lint", str(exports["sym"]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["targets"]) == {"tensorrt", "onnxruntime"} == set(res["runtimes_in_recipe"])
    ort = res["targets"]["onnxruntime"]["graphs"]
    n = sum(g["int4_dequantize"] for g in ort)
    assert n > 0 and sum(g["matmulnbits"] for g in ort if "matmulnbits" in g) == n


def test_asymmetric_export_fails_tensorrt_only(exports, capsys):
    assert cli.main(["lint", str(exports["asym"])]) == 0  # the recipe names ONNX Runtime alone
    assert capsys.readouterr().out.startswith("onnxruntime: ok")
    assert cli.main(["lint", str(exports["asym"]), "--target", "tensorrt", "--target", "onnxruntime"]) == 1
    text = capsys.readouterr().out
    assert "tensorrt: PROBLEMS" in text and "onnxruntime: ok" in text
    assert "unsigned INT4" in text and "has a zero point" in text


def test_jetson_orin_end_to_end(exports, capsys):
    """A symmetric INT4 export passes jetson-orin's rules; an FP32 one with the warning that names the cost."""
    assert cli.main(["lint", str(exports["sym"]), "--target", "jetson-orin", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert list(res["targets"]) == ["jetson-orin"] and res["ok"]
    graphs = {g["graph"]: g for g in res["targets"]["jetson-orin"]["graphs"]}
    llm = onnx.load(str(exports["sym"] / "llm.onnx"), load_external_data=False)
    dq = next(n for n in llm.graph.node if n.op_type == "DequantizeLinear")
    fp32 = next(i for i in llm.graph.initializer if i.name == dq.input[1]).data_type == onnx.TensorProto.FLOAT
    assert graphs["llm.onnx"]["int4_dequantize"] > 0
    assert any("runs the INT4 MatMuls in FP32: slow, unverified" in w for w in graphs["llm.onnx"]["warnings"]) == fp32
    assert cli.main(["lint", str(exports["sym"]), "--target", "jetson-orin"]) == 0
    assert capsys.readouterr().out.startswith("jetson-orin: ok (")
    assert cli.main(["lint", str(exports["asym"]), "--target", "jetson-orin"]) == 1
    text = capsys.readouterr().out
    assert text.startswith("jetson-orin: PROBLEMS") and "unsigned INT4" in text


def test_lint_runs_with_torch_and_transformers_unimportable(exports):
    """Deployment machines have neither: every target's rules run without them."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from vlmq_export import cli\n"
            f"rc = cli.main(['lint', {str(exports['sym'])!r}, '--json', '--target', 'onnxruntime', "
            "'--target', 'jetson-orin', '--target', 'jetson-thor', '--target', 'tensorrt'])\n"
            "assert not any(m == 'torch' or m.startswith(('torch.', 'transformers')) for m in sys.modules"
            " if sys.modules[m] is not None), 'torch was imported'\n"
            "sys.exit(rc)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout)["targets"]) == {"onnxruntime", "jetson-orin", "jetson-thor", "tensorrt"}


def test_block_32_is_onnxruntime_only(exports):
    res = lint_output(exports["g32"], ["tensorrt", "onnxruntime"])
    assert res["targets"]["onnxruntime"]["ok"] and not res["targets"]["tensorrt"]["ok"]
    problems = [p for g in res["targets"]["tensorrt"]["graphs"] for p in g["problems"]]
    assert problems and all("block 32 (TensorRT takes (64, 128))" in p for p in problems)


def test_a_dequantize_that_does_not_feed_matmul_directly_is_a_problem_for_both(exports, tmp_path):
    src = exports["sym"] / "llm.onnx"
    model = onnx.load(str(src))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    user = next(n for n in model.graph.node if dq.output[0] in n.input)
    user.input[list(user.input).index(dq.output[0])] = "dq_copy"
    model.graph.node.insert(list(model.graph.node).index(user),
                            onnx.helper.make_node("Identity", [dq.output[0]], ["dq_copy"], name="in_between"))
    path = tmp_path / "llm.onnx"
    onnx.save(model, str(path))
    for target in ("tensorrt", "onnxruntime"):
        res = lint_graph(path, target)
        assert any("does not feed a MatMul's input B directly" in p for p in res["problems"])
    assert lint_graph(src, "onnxruntime")["problems"] == []


def test_bad_input_is_one_line(exports, tmp_path, capsys):
    assert cli.main(["lint", str(tmp_path / "missing")]) == 2
    assert "no such output directory" in capsys.readouterr().err
    copy = tmp_path / "edited"
    shutil.copytree(exports["sym"], copy)
    with open(copy / "projector.onnx", "ab") as fh:
        fh.write(b"\0")  # a graph that is no longer the one the manifest recorded
    assert cli.main(["lint", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "projector.onnx" in err
