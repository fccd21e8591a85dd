"""Export argument errors: one line, exit 2, before torch is imported or the model is loaded, nothing left behind."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmq_export import cli

# the CLI with torch and transformers unimportable: an argument check that needed them would fail with
# "internal error" (exit 1) instead of its own message
NO_TORCH = ("import sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
            "from vlmq_export.cli import main; sys.exit(main(sys.argv[1:]))")


def run_without_torch(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=60)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--group-size", "0"], "--group-size must be -1 (per output channel) or a power of two >= 16"),
    (["--group-size", "48"], "power of two >= 16"),
    (["--damp", "-1"], "--damp must be a finite number > 0, got -1.0"),
    (["--damp", "nan"], "--damp must be a finite number > 0"),
    (["--gptaq-alpha", "1.5"], "--gptaq-alpha must be between 0 and 1"),
    (["--sink-weight", "-1"], "--sink-weight must be a finite number >= 0"),
    (["--saliency-floor", "-0.5"], "--saliency-floor must be a finite number >= 0"),
    (["--saliency-exponent", "0"], "--saliency-exponent must be a finite number > 0"),
    (["--n-calib", "0"], "--n-calib must be at least 1"),
    (["--calib-prompt-tokens", "0"], "--calib-prompt-tokens must be at least 1"),
    (["--llm", "w4g8"], "the block of 'w4g8' must be -1"),
    (["--vision", "w5"], "bad component precision 'w5'"),
    (["--method", "awq"], "unknown --method 'awq'"),
    (["--device", "gpu"], "bad --device 'gpu'"),
])
def test_argument_errors_exit_2_before_torch_loads(tiny_dirs, tmp_path, flags, message):
    t0 = time.perf_counter()
    res = run_without_torch([str(tiny_dirs["smolvlm"]), "-o", str(tmp_path / "out"), *flags])
    assert (res.returncode, res.stdout) == (2, ""), res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmq-export: error: ") and message in lines[0], res.stderr
    assert time.perf_counter() - t0 < 15  # the interpreter's start and argparse, not a model load
    assert leftovers(tmp_path) == []


def test_output_errors_exit_2_before_torch_loads(tiny_dirs, tmp_path):
    (tmp_path / "a_file").write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = {str(tmp_path / "a_file" / "out"): "a_file is not a directory",  # a path under a file
             str(tmp_path / "a_file"): "exists and is not a directory",
             str(foreign): "exists and is not a vlmq-export output directory",
             "/proc/vlmq-test/out": "/proc is not writable"}  # nothing can be created there, root or not
    for out, message in cases.items():
        res = run_without_torch([str(tiny_dirs["smolvlm"]), "-o", out])
        assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, \
            (out, res.stderr)
    assert leftovers(tmp_path) == ["a_file", "foreign"] and leftovers(foreign) == ["notes.txt"]


def test_unwritable_output_parent(tiny_dirs, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        res = run_without_torch([str(tiny_dirs["smolvlm"]), "-o", str(locked / "sub" / "out")])
    finally:
        locked.chmod(0o700)
    assert res.returncode == 2 and "is not writable" in res.stderr
    assert leftovers(locked) == []


def test_cuda_device_without_cuda_is_a_user_error_before_the_model_loads(tiny_dirs, tmp_path, capsys, monkeypatch):
    import torch

    from vlmq_export.models.base import Family

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(Family, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--device", "cuda", "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmq-export: error: --device cuda: torch sees no CUDA device") and "\n" not in err
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_safetensors_file_is_named_in_one_line(tiny_dirs, tmp_path, capsys, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["smolvlm"], model)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2 if damage == "truncated" else 0)
    work = tmp_path / "work"
    work.mkdir()
    assert cli.main([str(model), "--method", "rtn", "-o", str(work / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vlmq-export: error: {weights}: not a readable safetensors weight file") and "\n" not in err
    assert leftovers(work) == []  # no OUT, no .out.partial-*, no .out.resume
