"""FP16 graphs (`--target tensorrt`, `--dtype fp16`): the dtypes in the graphs, parity with torch's FP16 fake-quant,
the cost against the FP32 twin, `run` / `serve` / `eval` / `validate` on an FP16 export, and what a target refuses."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from vlmq_export import cli
from vlmq_export.export.qdq import FP16_MIN_NORMAL, fp16_scales
from vlmq_export.runtime.generate import GRAPHS, OnnxVLM

FAMILIES = ("smolvlm", "qwen2_vl")
FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


@pytest.fixture(scope="module")
def exported(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """Each tiny family exported once for TensorRT (FP16 by default), validated, with its FP32 twin kept."""
    outs = {}
    for fam in FAMILIES:
        out = tmp_path_factory.mktemp("fp16") / fam
        assert cli.main([str(tiny_dirs[fam]), "--int4", "--method", "rtn", "--target", "tensorrt", "-o", str(out),
                         "--n-calib", "2", "--n-val", "3", "--gen-tokens", "12", "--keep-float", "--quiet"]) == 0
        outs[fam] = out
    return outs


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


@pytest.mark.parametrize("fam", FAMILIES)
def test_fp16_graphs_hold_fp16_scales_inputs_and_outputs(exported, fam, capsys):
    out = exported[fam]
    manifest = json.loads((out / "manifest.json").read_text())
    r = manifest["recipe"]
    assert (r["target"], r["dtype"], r["runtimes"], r["fp16_scales_clamped"]) == \
        ("tensorrt", "fp16", ["tensorrt", "onnxruntime"], 0)
    n_dq = 0
    for g in GRAPHS:
        model = onnx.load(str(out / f"{g}.onnx"))
        inits = _initializers(model)
        for v in [*model.graph.input, *model.graph.output]:
            t = v.type.tensor_type.elem_type
            assert t not in FLOATS or t == onnx.TensorProto.FLOAT16, (g, v.name, t)
        # the weights are FP16 (a half export), apart from small constants such as the rotary frequencies
        big32 = [t.name for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 1024]
        assert not big32, (g, big32)
        users = {}
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                users.setdefault(name, []).append((node.op_type, i))
        for dq in model.graph.node:
            if dq.op_type != "DequantizeLinear" or inits[dq.input[0]].data_type != onnx.TensorProto.INT4:
                continue
            n_dq += 1
            assert inits[dq.input[1]].data_type == onnx.TensorProto.FLOAT16, dq.name
            scale = onnx.numpy_helper.to_array(inits[dq.input[1]])
            assert np.isfinite(scale).all() and scale.min() >= FP16_MIN_NORMAL
            assert users[dq.output[0]] == [("MatMul", 1)], (dq.name, users[dq.output[0]])  # nothing in between
    assert n_dq == len([x for x in manifest["layers"] if x.get("onnx_weight")]) > 0
    # the size baseline is the float graph of the same dtype (the kept FP16 float export)
    assert manifest["components"]["llm"]["float_bytes"] == (out / "float16" / "llm.onnx").stat().st_size
    assert cli.main(["lint", str(out), "--target", "tensorrt", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    warnings = [w for gr in res["targets"]["tensorrt"]["graphs"] for w in gr["warnings"]]
    assert res["ok"] and not [w for w in warnings if "float32" in w.lower() or "fp32" in w.lower()], warnings
    # ONNX Runtime fuses the FP16 INT4 DequantizeLinear into MatMulNBits as it does the FP32 ones
    assert cli.main(["lint", str(out), "--target", "onnxruntime"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("fam", FAMILIES)
def test_fp16_parity_with_torch_fp16_fake_quant_and_cost_against_fp32(exported, fam):
    doc = json.loads((exported[fam] / "report" / "validation.json").read_text())
    st = doc["stages"]
    parity = st["qdq_onnx_vs_torch_fakequant"]
    assert parity["dtype"] == "fp16"
    # Two FP16 implementations (ONNX Runtime's kernels, torch's) round at different places: about one FP16 step
    # (2^-11 relative) per op, a few 1e-3 on these logits of magnitude ~1 (measured 1.2e-3 / 4.4e-3), against
    # 1e-7 in float32. A wrong dtype or scale anywhere would cost orders of magnitude more, so: cosine within
    # 1e-5 of 1, top-1 equal but for a near tie (measured 1.0, and 0.992 = one position of 123 on SmolVLM with the
    # extreme grid at cosine 0.9999996; Qwen2-VL with the TensorRT target's recipe gave 1.0 alone and 0.987 at
    # cosine 0.9999992 in a full-suite run beside another one), max abs diff under 2e-2.
    assert parity["logits_cosine"] > 1 - 1e-5 and parity["top1_agreement"] >= 0.98
    assert parity["logits_max_abs_diff"] < 2e-2 and parity["image_features_cosine"] > 1 - 1e-5
    cost = st["fp16_vs_fp32_export"]
    assert cost["logits_cosine"] > 1 - 1e-5 and cost["top1_agreement"] >= 0.99
    assert cost["greedy_token_agreement"] >= 0.75  # measured 1.0 on both tiny families
    assert "torch_fakequant_fp16_vs_fp32" in st
    comp = doc["components_fp16_vs_fp32"]
    assert {"vision", "projector", "llm"} <= set(comp)
    assert comp["llm"]["logits_max_abs_diff"] < 2e-2 and comp["vision"]["features_cosine"] > 1 - 1e-5
    s = doc["summary"]
    assert "qdq_max_abs_diff" not in s and s["qdq_fp16_logits_cosine"] == parity["logits_cosine"]
    gates = {g["gate"]: g["result"] for g in doc["verdict"]["gates"]}
    assert gates["qdq_fp16_logits_cosine"] == gates["fp16_vs_fp32_logits_cosine"] == "pass"
    assert gates["fp16_vs_fp32_top1_agreement"] == "pass"
    md = (exported[fam] / "report" / "report.md").read_text()
    assert "FP16 for target tensorrt" in md and "what FP16 costs the graphs" in md


@pytest.mark.parametrize("fam", FAMILIES)
def test_run_on_fp16_export_agrees_with_the_fp32_twin(exported, fam, capsys):
    out = exported[fam]
    assert cli.main(["run", str(out), "--prompt", "Say something.", "--max-new-tokens", "8", "--no-stop",
                     "--tokens"]) == 0
    assert capsys.readouterr().out.strip()
    prompt = "Write one sentence about the sea."
    fp16 = OnnxVLM(out, accuracy_level=0).generate([], prompt, max_new_tokens=16, stop=False)
    fp32 = OnnxVLM(out, accuracy_level=0, graphs={g: out / "fp32" / f"{g}.onnx" for g in GRAPHS}).generate(
        [], prompt, max_new_tokens=16, stop=False)
    assert len(fp16.token_ids) == 16 and fp16.text
    same = np.mean([a == b for a, b in zip(fp16.token_ids, fp32.token_ids)])
    assert same >= 0.75, (fp16.token_ids, fp32.token_ids)  # measured 1.0: random tiny logits are well separated


def test_serve_and_eval_on_fp16_export(exported, capsys):
    import http.client

    from vlmq_export.runtime.server import make_server

    out = exported["smolvlm"]
    srv = make_server(out, port=0, accuracy_level=0, max_tokens_limit=8)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=120)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(
            {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6}))
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200 and body["usage"]["completion_tokens"] >= 1, body
    finally:
        srv.shutdown()
        srv.server_close()
    assert cli.main(["eval", str(out), "--n", "2", "--heldout-windows", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(res["onnx"]["perplexity"])


def test_validate_rechecks_an_fp16_export_against_fp16_torch(exported, capsys):
    out = exported["smolvlm"]
    assert cli.main(["validate", str(out), "--n-val", "1", "--gen-tokens", "4", "--json"]) == 0
    capsys.readouterr()
    doc = json.loads((out / "report" / "validation.json").read_text())
    parity = doc["stages"]["qdq_onnx_vs_torch_fakequant"]
    assert parity["dtype"] == "fp16" and parity["samples"] == 2 and parity["logits_cosine"] > 1 - 1e-5
    assert doc["measured"]["stages.qdq_onnx_vs_torch_fakequant"]["by"] == "validate"
    assert doc["measured"]["stages.fp16_vs_fp32_export"]["by"] == "export"  # kept, not recomputed


NO_TORCH = ("import sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
            "from vlmq_export.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("flags, message", [
    (["--asym"], "--asym cannot go to --target tensorrt"),
    (["--group-size", "32"], "INT4 block 32 (llm) cannot go to --target tensorrt: it takes blocks 64 or 128"),
    (["--llm", "w4pc"], "INT4 block per channel (llm) cannot go to --target tensorrt"),
    (["--target", "jetson-orin", "--asym"], "--asym cannot go to --target jetson-orin"),
    (["--target", "tpu"], "unknown target 'tpu'"),
    (["--dtype", "bf16"], "unknown --dtype 'bf16'; valid: fp16, fp32"),
])
def test_what_a_target_cannot_take_is_refused_before_torch_loads(tiny_dirs, tmp_path, flags, message):
    if "--target" not in flags:
        flags = ["--target", "tensorrt", *flags]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", NO_TORCH, str(tiny_dirs["smolvlm"]), "-o", str(tmp_path / "out"),
                          *flags], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout) == (2, ""), res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmq-export: error: ") and message in lines[0], res.stderr
    assert time.perf_counter() - t0 < 15 and list(tmp_path.iterdir()) == []


def test_fp32_for_a_tensorrt_target_is_allowed_with_a_warning(tiny_dirs, tmp_path, capsys):
    args = cli._export_parser().parse_args([str(tiny_dirs["smolvlm"]), "--target", "jetson-thor", "--dtype", "fp32",
                                            "-o", str(tmp_path / "out")])
    cli._check_export_args(args)
    err = capsys.readouterr().err
    assert args.dtype == "fp32" and "warning: --dtype fp32 for --target jetson-thor" in err and "FP32" in err
    args = cli._export_parser().parse_args([str(tiny_dirs["smolvlm"]), "--target", "jetson-thor", "-o", str(tmp_path)])
    cli._check_export_args(args)
    assert args.dtype == "fp16" and capsys.readouterr().err == ""
    args = cli._export_parser().parse_args([str(tiny_dirs["smolvlm"]), "-o", str(tmp_path / "o")])
    cli._check_export_args(args)
    assert (args.target, args.dtype) == ("onnxruntime", "fp32")


def test_fp16_scales_under_the_smallest_normal_are_raised_and_their_codes_rescaled():
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, (4, 64)).astype(np.int8)
    scales = np.array([[1e-2, 2e-5], [3e-6, 1e-3], [1e-7, 0.5], [7e4, 1.0]], np.float32)  # [N, K/32]
    new_codes, s16, moved = fp16_scales(codes, scales, 4)
    assert s16.dtype == np.float16 and moved == 4 and (s16 > 0).all() and np.isfinite(s16).all()
    assert s16.min() == np.float16(FP16_MIN_NORMAL)
    w = codes.astype(np.float32) * np.repeat(scales, 32, axis=1)
    w16 = new_codes.astype(np.float32) * np.repeat(s16.astype(np.float32), 32, axis=1)
    low = np.repeat(scales < FP16_MIN_NORMAL, 32, axis=1)
    assert np.abs(w - w16)[low].max() <= FP16_MIN_NORMAL / 2 + 1e-12  # within half a step of the new scale
    normal = np.repeat((scales >= FP16_MIN_NORMAL) & (scales <= 65504), 32, axis=1)
    assert np.array_equal(new_codes[normal], codes[normal])
    same, s, n = fp16_scales(codes, np.full((4, 2), 0.01, np.float32), 4)
    assert n == 0 and same is codes and s.dtype == np.float16
    # asymmetric (unsigned codes with zero points, ONNX Runtime only): codes kept, scales only kept above 0
    ucodes = codes + 8
    same, s, n = fp16_scales(ucodes, np.array([[1e-9, 2e-5]] * 4, np.float32), 4, sym=False)
    assert same is ucodes and n == 4 and (s[:, 0] > 0).all() and s[0, 1] == np.float16(2e-5)
