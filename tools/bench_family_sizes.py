#!/usr/bin/env python
"""Export one real configuration's shapes per family (random weights, fewer decoder layers), recording peak RSS,
wall time and the ONNX sizes against protobuf's 2 GB limit, into ``benchmarks/families.json``.

The configurations are written here by hand from the published ``config.json`` values (no hub):

* ``qwen2.5-vl-3b``: Qwen/Qwen2.5-VL-3B-Instruct (vision 32 blocks x 1280, window 112; text 2048 / 11008, 16 heads,
  2 kv heads, vocab 151936, tied embeddings);
* ``llava-1.5-7b``: llava-hf/llava-1.5-7b-hf (CLIP ViT-L/14-336: 24 layers x 1024, feature layer -2; Llama 4096 /
  11008, 32 heads, vocab 32064);
* ``qwen3-vl-2b``: Qwen/Qwen3-VL-2B-Instruct (vision 24 blocks x 1024, patch 16, a 48x48 position table, deepstack
  from blocks 5, 11, 17; text 2048 / 6144, 16 heads, 8 kv heads, head_dim 128, vocab 151936, interleaved M-RoPE
  [24, 20, 20], tied embeddings);
* ``gemma3-4b``: google/gemma-3-4b-it (SigLIP 27 layers x 1152 at 896 pixels, 256 soft tokens per image; Gemma3
  2560 / 10240, 8 heads, 4 kv heads, head_dim 256, vocab 262208, sliding window 1024, local / global RoPE 10^4 /
  10^6 linear x8, tied embeddings; the kept layers alternate sliding and global);
* ``llava-next-mistral-7b``: llava-hf/llava-v1.6-mistral-7b-hf (CLIP ViT-L/14-336 as LLaVA-1.5, anyres over five
  336-pixel pinpoints; Mistral 4096 / 14336, 32 heads, 8 kv heads, vocab 32064, no sliding window);
* ``llava-onevision-0.5b``: llava-hf/llava-onevision-qwen2-0.5b-ov-hf (SigLIP-so400m/14-384: 26 layers x 1152;
  Qwen2 896 / 4864, 14 heads, 2 kv heads, vocab 152000, tied embeddings; anyres_max_9 over the 384-pixel grid).

The vision towers and the vocabularies are the real ones; the language model keeps ``--layers`` of its decoder
layers (default 2). Tokenizer, chat template and image processor come from the family's tiny maker (the tiny
tokenizer's special-token ids go into the config), the image processor's tile size is the real one. Each export
(``--method rtn``, data-free, ``--no-validate``) runs as a child process, niced, at most 2 threads, one family at a
time; its peak RSS is the child's ``ru_maxrss`` (``os.wait4``).

    nice -n 5 python tools/bench_family_sizes.py [--family NAME ...] [--layers 2] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOBUF_LIMIT = 2 * 1024**3

CLIP_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's anyres grid
SIGLIP_PINPOINTS = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]

FAMILIES = {
    "qwen2.5-vl-3b": dict(
        maker="vlmq_export.testing.tiny_qwen2_5_vl:make_tiny_qwen2_5_vl", config_class="Qwen2_5_VLConfig",
        model_class="Qwen2_5_VLForConditionalGeneration",
        text=dict(model_type="qwen2_5_vl_text", hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                  hidden_act="silu", tie_word_embeddings=True),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, hidden_act="silu"),
        top=dict(tie_word_embeddings=True), image_processor={}),
    "llava-1.5-7b": dict(
        maker="vlmq_export.testing.tiny_llava:make_tiny_llava", config_class="LlavaConfig",
        model_class="LlavaForConditionalGeneration",
        text=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  tie_word_embeddings=False),
        vision=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                    num_hidden_layers=24, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
        top=dict(vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                 tie_word_embeddings=False),
        image_processor=dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})),
    "llava-next-mistral-7b": dict(
        maker="vlmq_export.testing.tiny_llava:make_tiny_llava_next", config_class="LlavaNextConfig",
        model_class="LlavaNextForConditionalGeneration",
        text=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32064, max_position_embeddings=32768, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, sliding_window=None,
                  tie_word_embeddings=False),
        vision=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                    num_hidden_layers=24, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
        top=dict(vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                 image_grid_pinpoints=CLIP_PINPOINTS, tie_word_embeddings=False),
        image_processor=dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                             image_grid_pinpoints=CLIP_PINPOINTS)),
    "llava-onevision-0.5b": dict(
        maker="vlmq_export.testing.tiny_llava:make_tiny_llava_onevision", config_class="LlavaOnevisionConfig",
        model_class="LlavaOnevisionForConditionalGeneration",
        text=dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=152000, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True),
        vision=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                    num_hidden_layers=26, image_size=384, patch_size=14, vision_use_head=False),
        top=dict(vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                 image_grid_pinpoints=SIGLIP_PINPOINTS, tie_word_embeddings=True),
        image_processor=dict(size={"height": 384, "width": 384}, image_grid_pinpoints=SIGLIP_PINPOINTS)),
    "qwen3-vl-2b": dict(
        maker="vlmq_export.testing.tiny_qwen3_vl:make_tiny_qwen3_vl", config_class="Qwen3VLConfig",
        model_class="Qwen3VLForConditionalGeneration",
        text=dict(model_type="qwen3_vl_text", hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                  rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True}),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17], in_channels=3, hidden_act="gelu_pytorch_tanh"),
        top=dict(tie_word_embeddings=True),
        image_processor=dict(size={"longest_edge": 16777216, "shortest_edge": 65536})),
    "gemma3-4b": dict(
        maker="vlmq_export.testing.tiny_gemma3:make_tiny_gemma3", config_class="Gemma3Config",
        model_class="Gemma3ForConditionalGeneration",
        text=dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, vocab_size=262208,
                  sliding_window=1024, max_position_embeddings=131072, rms_norm_eps=1e-6,
                  hidden_activation="gelu_pytorch_tanh",
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
                  layer_types=["sliding_attention", "full_attention"]),  # repeated over --layers (real: 5 + 1)
        vision=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                    num_hidden_layers=27, image_size=896, patch_size=14, vision_use_head=False),
        top=dict(mm_tokens_per_image=256, tie_word_embeddings=True),
        image_processor=dict(size={"height": 896, "width": 896})),
}


def make_model_dir(name: str, path: Path, layers: int) -> dict:
    """The family's tiny directory with the real configuration (``layers`` decoder layers) and random weights."""
    import importlib

    import torch
    import transformers as tf

    spec = FAMILIES[name]
    mod, fn = spec["maker"].split(":")
    path = getattr(importlib.import_module(mod), fn)(path)
    tiny = json.loads((path / "config.json").read_text())
    keep_ids = {k: tiny[k] for k in ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                                     "vision_end_token_id", "boi_token_index", "eoi_token_index") if k in tiny}
    text = {**spec["text"], "num_hidden_layers": layers,
            **{k: tiny["text_config"][k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    if "layer_types" in text:
        text["layer_types"] = [spec["text"]["layer_types"][i % len(spec["text"]["layer_types"])] for i in range(layers)]
    config = getattr(tf, spec["config_class"])(text_config=text, vision_config=spec["vision"], **spec["top"], **keep_ids)
    t0 = time.perf_counter()
    with torch.no_grad():
        model = getattr(tf, spec["model_class"])(config).eval()
    for f in path.glob("*.safetensors*"):
        f.unlink()
    model.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    if spec["image_processor"]:
        ip_file = path / "preprocessor_config.json"
        ip_file.write_text(json.dumps({**json.loads(ip_file.read_text()), **spec["image_processor"]}, indent=2))
    return {"params": n_params, "build_s": round(time.perf_counter() - t0, 1)}


def _rss_gib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 0.0


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return float("inf")


def run_export(model_dir: Path, out: Path, threads: int, max_rss_gib: float) -> dict:
    """The export as a child process; a watchdog (1 s samples) stops it when its RSS passes ``max_rss_gib`` (the
    machine is shared: better a recorded failure than the OOM killer picking another job)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "vlmq_export.cli", str(model_dir), "--int4", "--method", "rtn", "--no-validate",
           "-o", str(out), "--quiet"]
    t0 = time.perf_counter()
    log = out.with_name("export.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen(["nice", "-n", "5", *cmd], env=env, cwd=ROOT, stderr=fh)
    killed = threading.Event()

    def watch():
        while proc.poll() is None:
            if _rss_gib(proc.pid) > max_rss_gib:
                killed.set()
                proc.kill()
                return
            time.sleep(1)

    threading.Thread(target=watch, daemon=True).start()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    res = {"export_args": cmd[4:], "rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
           "peak_rss_gib": round(usage.ru_maxrss / 1024**2, 2), "rss_cap_gib": round(max_rss_gib, 1)}
    if killed.is_set():
        res["error"] = f"stopped: RSS above the {max_rss_gib:.1f} GiB cap"
    elif proc.returncode != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip() and "Writing" not in ln]
        res["error"] = lines[-1] if lines else "?"
    if proc.returncode != 0:
        return res
    graphs = {}
    for f in sorted(out.glob("*.onnx")):
        data = [d for d in out.glob(f.name + "*") if d != f]
        size = f.stat().st_size + sum(d.stat().st_size for d in data)
        graphs[f.stem] = {"bytes": size, "protobuf_bytes": f.stat().st_size, "external_data": [d.name for d in data],
                          "over_2gb_limit": size > PROTOBUF_LIMIT}
    manifest = json.loads((out / "manifest.json").read_text())
    res.update(graphs=graphs, total_bytes=sum(g["bytes"] for g in graphs.values()),
               llm_flavour=manifest["components"]["llm"].get("flavour", "portable"),
               timings_s=manifest.get("timings_s"))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", action="append", choices=list(FAMILIES), help="default: all, one after the other")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers kept (default 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_family_sizes"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "families.json")
    ap.add_argument("--keep", action="store_true", help="keep the model and export directories")
    ap.add_argument("--max-rss-gib", type=float, help="stop an export above this RSS (default: 85%% of the memory "
                    "available when it starts)")
    args = ap.parse_args(argv)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("families", {})
    for name in args.family or list(FAMILIES):
        work = args.work / name
        shutil.rmtree(work, ignore_errors=True)
        print(f"{name}: building the model directory ({args.layers} decoder layers)", flush=True)
        rec = {"decoder_layers": args.layers, **make_model_dir(name, work / "model", args.layers)}
        print(f"{name}: {rec['params'] / 1e6:.0f}M parameters; exporting", flush=True)
        rec.update(run_export(work / "model", work / "out", args.threads, args.max_rss_gib or 0.85 * available_gib()))
        results["families"][name] = rec
        results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                              "note": "2-core machine shared with other jobs; exports niced (nice -n 5)"}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({name: {k: v for k, v in rec.items() if k != "graphs"}}), flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
