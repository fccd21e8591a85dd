"""A tiny, random-weight Qwen2.5-VL model directory, built offline (no hub) for tests.

``make_tiny_qwen2_5_vl(path)`` starts from :func:`make_tiny_qwen2_vl` (the same tokenizer, chat template,
``Qwen2VLImageProcessorPil`` config and language-model sizes: Qwen2.5-VL shares them) and replaces config
and weights with a ``Qwen2_5_VLForConditionalGeneration``'s. Vision tower: hidden 128 / intermediate 256
(SwiGLU) / 4 blocks, blocks 1 and 3 with full attention / 4 heads / patch 14 / merge 2 / window 56
pixels (2x2 merge blocks, so a 6x8-patch image has 4 windows, padding included).
"""
from __future__ import annotations

import json
from pathlib import Path

from .tiny_qwen2_vl import make_tiny_qwen2_vl

FULLATT_BLOCK_INDEXES = [1, 3]
WINDOW_SIZE = 56


def make_tiny_qwen2_5_vl(path, seed: int = 0) -> Path:
    """Write a complete tiny Qwen2.5-VL model directory at ``path`` (created if missing); returns it."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path = make_tiny_qwen2_vl(path, seed=seed)
    base = json.loads((path / "config.json").read_text())
    keep = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    config = Qwen2_5_VLConfig(
        text_config=base["text_config"],
        vision_config=dict(
            depth=4,
            hidden_size=128,
            intermediate_size=256,
            num_heads=4,
            out_hidden_size=base["text_config"]["hidden_size"],
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=WINDOW_SIZE,
            fullatt_block_indexes=FULLATT_BLOCK_INDEXES,
            initializer_range=0.06,
        ),
        tie_word_embeddings=False,
        **{k: base[k] for k in keep},
    )
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, k, base["text_config"][k])
    with torch.random.fork_rng():  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    for f in path.glob("*.safetensors*"):
        f.unlink()
    model.save_pretrained(path)
    return path
