"""A tiny, random-weight Qwen3-VL model directory, built offline (no hub) for tests.

``make_tiny_qwen3_vl(path)`` starts from :func:`make_tiny_qwen2_vl` (the same byte-level tokenizer and special
tokens: Qwen3-VL shares them) and replaces config, weights, chat template and image-processor config with a
``Qwen3VLForConditionalGeneration``'s. Vision: hidden 128 / intermediate 256 / 4 blocks / 4 heads / patch 16 /
merge 2 / a learned 8x8 position table (``num_position_embeddings`` 64, interpolated per image) / deepstack
from blocks 1 and 2. Text: hidden 128 / 3 layers / 4 heads / 2 KV heads / head_dim 32, interleaved M-RoPE
(mrope_section [6, 5, 5]), q/k norms; layers 0 and 1 receive the deepstack features. Images are resized to
between 64*64 and 128*128*2 pixels (mean/std 0.5, as Qwen3-VL's preprocessor config): 4..32 image tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..models.qwen3_vl import QWEN3_VL_CHAT_TEMPLATE
from .tiny_qwen2_vl import make_tiny_qwen2_vl

DEEPSTACK_VISUAL_INDEXES = [1, 2]
MIN_PIXELS = 64 * 64
MAX_PIXELS = 128 * 128 * 2


def make_tiny_qwen3_vl(path, seed: int = 0) -> Path:
    """Write a complete tiny Qwen3-VL model directory at ``path`` (created if missing); returns it."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = make_tiny_qwen2_vl(path, seed=seed)
    base = json.loads((path / "config.json").read_text())
    tc = base["text_config"]
    keep = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=tc["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [6, 5, 5],
                             "mrope_interleaved": True},
            rms_norm_eps=1e-6, initializer_range=0.06,
            bos_token_id=tc["bos_token_id"], eos_token_id=tc["eos_token_id"], pad_token_id=tc["pad_token_id"],
        ),
        vision_config=dict(
            depth=4, hidden_size=128, intermediate_size=256, num_heads=4, in_channels=3, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=64,
            deepstack_visual_indexes=DEEPSTACK_VISUAL_INDEXES, initializer_range=0.06,
        ),
        tie_word_embeddings=False,
        **{k: base[k] for k in keep},
    )
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, k, tc[k])
    with torch.random.fork_rng():  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config).eval()
        with torch.no_grad():  # the default init leaves the learned position table at N(0, 0.02): make it count
            model.model.visual.pos_embed.weight.normal_(0.0, 0.5)
    for f in path.glob("*.safetensors*"):
        f.unlink()
    model.save_pretrained(path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=16, temporal_patch_size=2,
                             merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    return path
