#!/usr/bin/env python
"""GPU smoke test: calibrate on CUDA and on CPU, compare what comes out, time both.

    python tools/gpu_smoke.py [--models builtin:tiny-qwen2-vl,builtin:shapes-smolvlm] [--methods gptq,vlmq]
                              [--devices cpu,cuda] [--work DIR] [--out gpu_smoke.json]

For each model and method, one full export per device (``vlmq-export MODEL --int4 --method M --device D
--no-validate``, a fresh subprocess each, timed), then:
- the INT4 codes of every quantized weight: the fraction equal between the CPU and the CUDA export, and the
  largest relative difference of the scales (floating-point order differs between devices, so a few codes
  on rounding boundaries may flip; a large fraction means a bug);
- the language model's perplexity on the built-in English text, through ONNX Runtime, for each export.

Without CUDA it still runs the CPU exports and says that CUDA was not available (exit 0), so the script can
be checked anywhere; the comparison needs both devices. ``tools/gpu_smoke.sh`` wraps it for a GPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def export(model: str, method: str, device: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "vlmq_export.cli", model, "--int4", "--method", method, "--device", device,
           "--no-validate", "--eval-task", "0", "--quiet", "-o", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"ok": False, "wall_s": round(wall, 2), "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return {"ok": True, "wall_s": round(wall, 2)}


def int4_weights(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (codes, scales) for every DequantizeLinear whose input is an INT4/UINT4 initializer."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        w = inits[node.input[0]]
        if w.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            continue
        out[w.name] = (numpy_helper.to_array(w).astype(np.int8), numpy_helper.to_array(inits[node.input[1]]))
    return out


def compare(a: Path, b: Path) -> dict:
    wa, wb = int4_weights(a / "llm.onnx"), int4_weights(b / "llm.onnx")
    if set(wa) != set(wb):
        return {"same_layers": False}
    equal = total = 0
    worst_scale = worst_code_layer = 0.0
    for name, (ca, sa) in wa.items():
        cb, sb = wb[name]
        same = float((ca == cb).mean())
        equal += int((ca == cb).sum())
        total += ca.size
        worst_code_layer = max(worst_code_layer, 1.0 - same)
        worst_scale = max(worst_scale, float(np.max(np.abs(sa - sb) / np.maximum(np.abs(sa), 1e-12))))
    return {"same_layers": True, "layers": len(wa), "codes_equal": equal / max(total, 1),
            "worst_layer_codes_differing": worst_code_layer, "scales_max_rel_diff": worst_scale}


def perplexity(out: Path) -> float:
    from vlmq_export.runtime.generate import OnnxVLM
    from vlmq_export.validate.perplexity import perplexity_onnx, text_ids

    vlm = OnnxVLM(out, accuracy_level=0)
    return round(float(perplexity_onnx(vlm, text_ids(vlm.family.tokenizer))), 4)


def export_dir(work: Path, model: str, method: str, device: str) -> Path:
    return work / f"{model.replace(':', '_').replace('/', '_')}-{method}-{device}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="builtin:tiny-qwen2-vl,builtin:shapes-smolvlm")
    p.add_argument("--methods", default="gptq,vlmq")
    p.add_argument("--devices", default="cpu,cuda")
    p.add_argument("--work", default=None, help="where the exports go (default: a temporary directory)")
    p.add_argument("--out", default="gpu_smoke.json")
    args = p.parse_args(argv)
    import tempfile

    import torch

    devices = [d for d in args.devices.split(",") if d]
    cuda = torch.cuda.is_available()
    if "cuda" in devices and not cuda:
        print("gpu_smoke: CUDA is not available here; running the CPU exports only", file=sys.stderr)
        devices = [d for d in devices if d != "cuda"]
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_smoke-"))
    result = {"cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
              "cpu_threads": torch.get_num_threads(), "runs": []}
    for model in args.models.split(","):
        for method in args.methods.split(","):
            run = {"model": model, "method": method}
            for dev in devices:
                out = export_dir(work, model, method, dev)
                print(f"gpu_smoke: {model} {method} on {dev} ...", file=sys.stderr, flush=True)
                run[dev] = export(model, method, dev, out)
                if run[dev]["ok"]:
                    run[dev]["perplexity"] = perplexity(out)
            if all(run.get(d, {}).get("ok") for d in ("cpu", "cuda")):
                run["cpu_vs_cuda"] = compare(export_dir(work, model, method, "cpu"),
                                             export_dir(work, model, method, "cuda"))
                run["cuda_speedup"] = round(run["cpu"]["wall_s"] / run["cuda"]["wall_s"], 2)
            print(json.dumps(run), file=sys.stderr, flush=True)
            result["runs"].append(run)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"gpu_smoke: wrote {args.out}", file=sys.stderr)
    failed = [r for r in result["runs"] for d in devices if not r[d]["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
