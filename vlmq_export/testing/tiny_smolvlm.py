"""A tiny, randomly initialised SmolVLM / Idefics3 model directory, built offline.

Layout of the real SmolVLM checkpoints (vision transformer + pixel-shuffle connector + Llama text
model), at test size: hidden 128 everywhere (so every Linear's in_features is a multiple of 128),
vision image 64 / patch 16 (4x4 patches per tile), scale factor 2 (4 image tokens per tile,
connector in_features 128 * 2**2 = 512), a byte-level BPE tokenizer of ~320 tokens with SmolVLM's
special tokens inside the vocab, SmolVLM's chat template and a Pil image processor config.

Everything loads back with the real ``from_pretrained`` paths (config, model, tokenizer, image
processor; ``AutoProcessor`` too for ``model_type="idefics3"``, and for ``"smolvlm"`` where
torchvision and num2words are installed, which SmolVLMProcessor's video half needs).
"""
from __future__ import annotations

import json
from pathlib import Path

# SmolVLM-Instruct's chat template (the tokenizer's; the processor carries the same one).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",  # unk
    "<|im_start|>",  # bos
    "<|im_end|>",  # eos / pad
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
] + [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]

_CORPUS = [
    "User: What is in this image? Assistant: A red circle on a white background.",
    "What color is the square? The square is blue. How many shapes are there? There are three shapes.",
    "Describe the picture. A small green triangle above a large yellow rectangle, next to a circle.",
    "Is there a cat? No, there is no cat in the image. Answer the question in one word.",
    "left right top bottom middle corner shape shapes color colors count number one two three four five",
]

VOCAB_SIZE = 320


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE (``tokenizers``) wrapped in ``PreTrainedTokenizerFast`` with SmolVLM's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_smolvlm(
    path: str | Path,
    seed: int = 0,
    model_type: str = "smolvlm",
    *,
    image_splitting: bool = False,
    image_size: int = 64,
    patch_size: int = 16,
    scale_factor: int = 2,
) -> Path:
    """Write a complete tiny SmolVLM (``model_type="smolvlm"``) or Idefics3 model directory to ``path``.

    ``image_splitting`` sets the image processor's ``do_image_splitting`` (off by default: one tile per
    image); with it on, images are resized to at most 2x2 tiles of ``image_size`` plus the global tile.
    """
    import torch

    if model_type not in ("smolvlm", "idefics3"):
        raise ValueError(f"model_type must be 'smolvlm' or 'idefics3', not {model_type!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = len(tokenizer)
    text_config = dict(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|im_end|>"],
        tie_word_embeddings=False,
    )
    vision_config = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    config, model_cls = smolvlm_config(model_type, text_config, vision_config, scale_factor=scale_factor,
                                       image_token_id=ids["<image>"], pad_token_id=ids["<|im_end|>"],
                                       tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Random init leaves some weights tiny/zero (norms at 1, biases at 0); perturb every parameter a
    # little so that each one matters in the comparisons.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(path)
    config.save_pretrained(path)

    save_smolvlm_processor(path, tokenizer, model_type, image_size=image_size, patch_size=patch_size,
                           scale_factor=scale_factor, image_splitting=image_splitting)
    return path


def smolvlm_config(model_type: str, text_config: dict, vision_config: dict, *, scale_factor: int,
                   image_token_id: int, pad_token_id: int, tie_word_embeddings: bool):
    """``(config, model class)`` of a SmolVLM (``model_type="smolvlm"``) or Idefics3 model."""
    import transformers as tf

    if model_type == "smolvlm":
        config_cls, model_cls = tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration
    else:
        config_cls, model_cls = tf.Idefics3Config, tf.Idefics3ForConditionalGeneration
    config = config_cls(text_config=text_config, vision_config=vision_config, scale_factor=scale_factor,
                        image_token_id=image_token_id, pad_token_id=pad_token_id,
                        tie_word_embeddings=tie_word_embeddings)
    return config, model_cls


def save_smolvlm_processor(path: Path, tokenizer, model_type: str, *, image_size: int, patch_size: int,
                           scale_factor: int, image_splitting: bool) -> None:
    """Write the processor side of a SmolVLM / Idefics3 directory: the tokenizer, the image processor
    (tiles of ``image_size``, up to 2x2 plus the global tile with ``image_splitting``),
    ``processor_config.json`` with the image's token count, and the chat template."""
    import transformers as tf

    ip_cls, proc_cls = ((tf.SmolVLMImageProcessorPil, "SmolVLMProcessor") if model_type == "smolvlm"
                        else (tf.Idefics3ImageProcessorPil, "Idefics3Processor"))
    tokenizer.save_pretrained(path)
    ip_cls(
        do_image_splitting=image_splitting,
        max_image_size={"longest_edge": image_size},
        size={"longest_edge": 2 * image_size if image_splitting else image_size},
    ).save_pretrained(path)
    image_seq_len = (image_size // patch_size) ** 2 // (scale_factor**2)
    (path / "processor_config.json").write_text(
        json.dumps({"processor_class": proc_cls, "image_seq_len": image_seq_len}, indent=2) + "\n"
    )
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
