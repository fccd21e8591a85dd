"""A tiny, random-weight Qwen2-VL model directory, built offline (no hub) for tests.

``make_tiny_qwen2_vl(path)`` writes config, safetensors weights, a byte-level BPE tokenizer with
Qwen2-VL's special tokens and chat template, and a ``Qwen2VLImageProcessorPil`` config, so the real
``from_pretrained(path)`` paths of config, model, tokenizer and image processor are exercised.

Sizes: LLM hidden 128 / intermediate 256 / 2 layers / 4 heads / 2 KV heads / head_dim 32
(mrope_section [4, 6, 6]); vision embed_dim 128 / depth 2 / 4 heads / mlp_ratio 2 / patch 14 /
spatial merge 2 / temporal patch 2 (merger in_features 512); vocab 300 with the special tokens inside.
Images are resized to between 56*56 and 112*112*2 pixels: 16..128 patches, 4..32 image tokens each.
"""
from __future__ import annotations

from pathlib import Path

from ..models.qwen2_vl import QWEN2_VL_CHAT_TEMPLATE

# The special tokens of Qwen2-VL (ids are assigned after the byte-level BPE vocab, as in Qwen).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
VOCAB_SIZE = 300
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112 * 2

_CORPUS = [
    "You are a helpful assistant.",
    "system user assistant",
    "Describe the image. What is in this picture? Describe these images.",
    "The image shows a cat sitting on a red chair next to the window.",
    "There is a dog in the picture, and the sky is blue.",
    "Answer the question about the photo in one short sentence.",
    "the the the and and in in is is of of a a to to",
]


def _make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)  # ids follow the BPE vocab, in Qwen's order
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    if len(fast) > VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {len(fast)} tokens > vocab {VOCAB_SIZE}")
    return fast


def make_tiny_qwen2_vl(path, seed: int = 0) -> Path:
    """Write a complete tiny Qwen2-VL model directory at ``path`` (created if missing); returns it."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _make_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6]},
            rms_norm_eps=1e-6,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            # larger than the 0.02 default so that activations (and any export error) are not tiny
            initializer_range=0.06,
        ),
        vision_config=dict(
            depth=2,
            embed_dim=128,
            hidden_size=128,
            mlp_ratio=2,
            num_heads=4,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=0.06,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]

    with torch.random.fork_rng():  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    image_processor.save_pretrained(path)
    return path
