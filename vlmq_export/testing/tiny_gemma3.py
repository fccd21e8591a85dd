"""A tiny, random-weight Gemma3 (``model_type`` "gemma3") model directory, built offline for tests.

The layout of google/gemma-3-4b-it at test size, from transformers' own config classes: SigLIP vision tower
(hidden 128, 2 layers, image 56 / patch 14: 4x4 patches), ``Gemma3MultiModalProjector`` (average-pooled to
``mm_tokens_per_image`` 4 = 2x2 tokens, RMSNorm, a 128x128 projection matrix), a Gemma3 decoder of 3 layers,
sliding, sliding, global (the real models repeat 5 sliding + 1 global), ``sliding_window`` 8 (shorter than every
test prompt, longer than one image's 4 soft tokens), local and global RoPE bases 10^4 and 10^6, q/k norms, tied
embeddings scaled by sqrt(hidden); ``Gemma3ImageProcessorPil`` (56 x 56, bilinear, mean/std 0.5) and
``Gemma3Processor`` (``image_seq_length`` 4).

The tokenizer is SmolVLM's tiny byte-level BPE (``tiny_smolvlm.build_tokenizer``) with Gemma's special tokens
added (``<bos>``, ``<eos>``, ``<pad>``, ``<start_of_turn>``, ``<end_of_turn>``, ``<start_of_image>``,
``<end_of_image>``, ``<image_soft_token>``; the last three named ``boi_token`` / ``eoi_token`` / ``image_token``
as in the real tokenizer config) and Gemma 3's chat template.
"""
from __future__ import annotations

from pathlib import Path

from ..models.gemma3 import BOI_TOKEN, EOI_TOKEN, GEMMA3_CHAT_TEMPLATE, IMAGE_SOFT_TOKEN
from .tiny_llava import _write
from .tiny_smolvlm import build_tokenizer

TILE = 56
MM_TOKENS = 4
SLIDING_WINDOW = 8
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"]


def build_gemma3_tokenizer():
    """The tiny BPE with Gemma's special tokens (see the module doc)."""
    from transformers import PreTrainedTokenizerFast

    backend = build_tokenizer().backend_tokenizer
    backend.add_special_tokens(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", BOI_TOKEN, EOI_TOKEN,
                                IMAGE_SOFT_TOKEN])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<|endoftext|>",
        extra_special_tokens={"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": IMAGE_SOFT_TOKEN},
        clean_up_tokenization_spaces=False)
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    return tok


def make_tiny_gemma3(path, seed: int = 0) -> Path:
    """Write a tiny Gemma3 model directory at ``path``; returns it."""
    import transformers as tf

    tok = build_gemma3_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<bos>", "<eos>", "<pad>", BOI_TOKEN, EOI_TOKEN, IMAGE_SOFT_TOKEN)}
    text = tf.Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=SLIDING_WINDOW, layer_types=LAYER_TYPES, max_position_embeddings=4096,
        bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"])
    vision = tf.SiglipVisionConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
                                   image_size=TILE, patch_size=14, vision_use_head=False)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS,
                             boi_token_index=ids[BOI_TOKEN], eoi_token_index=ids[EOI_TOKEN],
                             image_token_index=ids[IMAGE_SOFT_TOKEN], tie_word_embeddings=True)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, k, getattr(text, k))
    ip = tf.Gemma3ImageProcessorPil(size={"height": TILE, "width": TILE})
    path = _write(path, seed, config, tf.Gemma3ForConditionalGeneration, tok, ip)
    tf.Gemma3Processor(ip, tok, chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=MM_TOKENS).save_pretrained(path)
    return path
