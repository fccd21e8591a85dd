"""Tiny, random-weight LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision model directories, built offline for tests.

The layouts of the real checkpoints at test size, from transformers' own config classes:

* LLaVA-1.5 (``make_tiny_llava``): CLIP vision tower (hidden 128, 3 layers so that feature layer -2 leaves
  one unused, image 56 / patch 14: 4x4 patches + CLS), MLP projector, Llama decoder (2 layers, hidden 128),
  ``CLIPImageProcessor`` (shortest edge 56, centre crop 56);
* LLaVA-NeXT (``make_tiny_llava_next``): the same towers, anyres pinpoints scaled from the 336-pixel ones to
  56-pixel tiles (1x2, 2x1, 2x2, 3x1, 1x3 tiles), ``LlavaNextImageProcessor``;
* LLaVA-OneVision (``make_tiny_llava_onevision``): SigLIP tower (no CLS, feature layer -1, "full"), Qwen2
  decoder, pinpoints up to 6x6 tiles of 56 and ``anyres_max_9`` (a 4x4-tile image is downscaled).

The tokenizer is SmolVLM's tiny byte-level BPE (``tiny_smolvlm.build_tokenizer``: it has ``<image>``,
``<|im_start|>`` and ``<|im_end|>``) with each family's chat template.
"""
from __future__ import annotations

from pathlib import Path

from ..models.llava import LLAVA_CHAT_TEMPLATE
from .tiny_smolvlm import build_tokenizer

TILE = 56
NEXT_PINPOINTS = [[TILE * h, TILE * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
ONEVISION_PINPOINTS = [[TILE * h, TILE * w] for h in range(1, 7) for w in range(1, 7)]
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_VISION = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, image_size=TILE, patch_size=14)


def _text_config(model_type: str, tokenizer) -> dict:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return dict(model_type=model_type, vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rms_norm_eps=1e-5, bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"), eos_token_id=eos,
                pad_token_id=eos, tie_word_embeddings=False)


def _write(path, seed: int, config, model_cls, tokenizer, image_processor) -> Path:
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        # random init leaves norms at 1 and biases at 0: perturb every parameter so each one matters
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    (path / "chat_template.jinja").write_text(tokenizer.chat_template)
    return path


def _tokenizer(template: str):
    tok = build_tokenizer()
    tok.chat_template = template
    return tok


def make_tiny_llava(path, seed: int = 0) -> Path:
    """Write a tiny LLaVA-1.5 model directory at ``path``; returns it."""
    import transformers as tf

    tok = _tokenizer(LLAVA_CHAT_TEMPLATE)
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(num_hidden_layers=3, **_VISION), text_config=_text_config("llama", tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)
    ip = tf.CLIPImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE})
    return _write(path, seed, config, tf.LlavaForConditionalGeneration, tok, ip)


def make_tiny_llava_next(path, seed: int = 0) -> Path:
    """Write a tiny LLaVA-NeXT model directory at ``path``; returns it."""
    import transformers as tf

    tok = _tokenizer(LLAVA_CHAT_TEMPLATE)
    config = tf.LlavaNextConfig(
        vision_config=tf.CLIPVisionConfig(num_hidden_layers=3, **_VISION), text_config=_text_config("llama", tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_grid_pinpoints=NEXT_PINPOINTS, tie_word_embeddings=False)
    ip = tf.LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                       image_grid_pinpoints=NEXT_PINPOINTS)
    return _write(path, seed, config, tf.LlavaNextForConditionalGeneration, tok, ip)


def make_tiny_llava_onevision(path, seed: int = 0) -> Path:
    """Write a tiny LLaVA-OneVision model directory at ``path``; returns it."""
    import transformers as tf

    tok = _tokenizer(ONEVISION_CHAT_TEMPLATE)
    config = tf.LlavaOnevisionConfig(
        vision_config=tf.SiglipVisionConfig(num_hidden_layers=2, **_VISION), text_config=_text_config("qwen2", tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=ONEVISION_PINPOINTS, tie_word_embeddings=False)
    ip = tf.LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=ONEVISION_PINPOINTS,
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return _write(path, seed, config, tf.LlavaOnevisionForConditionalGeneration, tok, ip)
