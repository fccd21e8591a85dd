"""The torch-free half of preprocessing: config, tokenizer, chat template and image helpers.

Everything here reads a model directory or ``OUT/processor`` with numpy, Pillow, ``tokenizers`` and
``jinja2`` only, so ``run`` and ``serve`` work on a deployment machine without torch or transformers.
Each piece mirrors what transformers 5 does (the tests compare them on both tiny families):

* :class:`Config` is ``config.json`` with attribute access (``get_text_config()`` as transformers has it);
* :class:`Tokenizer` is ``tokenizer.json`` through the ``tokenizers`` library, the special tokens of
  ``tokenizer_config.json`` and the chat template rendered as ``apply_chat_template(tokenize=False)`` renders it;
* :func:`rgb_array`, :func:`resize` and :func:`rescale_normalize` are the steps of transformers' Pil image
  processors; each family's image processor (``qwen2_vl.py``, ``smolvlm.py``) composes them.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UnsupportedModelError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise UnsupportedModelError(f"{path}: not a JSON object")
    return data


# ------------------------------------------------------------------------------------------ config
class Config:
    """A ``config.json`` (or one of its sub-configs) with attribute access. ``OUT/processor/config.json`` is
    written by transformers' ``save_pretrained``, which writes every attribute, defaults included."""

    def __init__(self, data: dict):
        self._data = dict(data)

    @classmethod
    def from_dir(cls, path: Path) -> "Config":
        f = Path(path) / "config.json"
        if not f.is_file():
            raise UnsupportedModelError(f"{path}: no config.json (not a Hugging Face model directory)")
        return cls(read_json(f))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._data:
            raise AttributeError(f"config has no {name!r}")
        value = self._data[name]
        return Config(value) if isinstance(value, dict) else value

    def get_text_config(self) -> "Config":
        """The language model's config: ``text_config`` where the config nests one, else the config itself."""
        text = self._data.get("text_config")
        return Config(text) if isinstance(text, dict) else self

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self._data))


# ------------------------------------------------------------------------------------------ tokenizer
class Tokenizer:
    """The subset of a transformers fast tokenizer that the families and the runtime use, on ``tokenizers``."""

    def __init__(self, backend, config: dict, chat_template: str | None):
        self.backend = backend  # tokenizers.Tokenizer
        self.config = config  # tokenizer_config.json
        self.chat_template = chat_template
        self.special_tokens_map = {}
        for attr in SPECIAL_TOKENS:
            tok = config.get(attr)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                self.special_tokens_map[attr] = tok

    @classmethod
    def from_dir(cls, path: Path, default_chat_template: str | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise UnsupportedModelError(f"{path}: no tokenizer.json (the runtime reads fast tokenizers only)")
        try:
            backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises its own Exception type
            raise UnsupportedModelError(f"{path / 'tokenizer.json'}: unreadable ({exc})") from None
        config = {}  # special_tokens_map.json (older checkpoints) under tokenizer_config.json
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / name).is_file():
                config.update(read_json(path / name))
        template = chat_template_from_dir(path, config) or default_chat_template
        return cls(backend, config, template)

    def __getattr__(self, name: str) -> Any:  # bos_token_id, eos_token_id, unk_token_id, pad_token_id, ...
        if name.endswith("_token_id") and name[: -len("_id")] in SPECIAL_TOKENS:
            tok = self.special_tokens_map.get(name[: -len("_id")])
            return None if tok is None else self.convert_tokens_to_ids(tok)
        if name in SPECIAL_TOKENS:
            return self.special_tokens_map.get(name)
        raise AttributeError(name)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        tid = self.backend.token_to_id(token)
        if tid is None:
            unk = self.special_tokens_map.get("unk_token")
            return None if unk is None else self.backend.token_to_id(unk)
        return tid

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)
        # transformers cleans up spaces only where the config asks and the model is not BPE
        if self.config.get("clean_up_tokenization_spaces") and type(self.backend.model).__name__ != "BPE":
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            **kwargs) -> str | list[int]:
        if not self.chat_template:
            raise UnsupportedModelError("the tokenizer has no chat template")
        text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **{**self.special_tokens_map, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text


def chat_template_from_dir(path: Path, tokenizer_config: dict | None = None) -> str | None:
    """The chat template a directory carries: ``chat_template.jinja``, the tokenizer config's, then the processor's."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    tmpl = (tokenizer_config or {}).get("chat_template")
    if isinstance(tmpl, str) and tmpl:
        return tmpl
    for name in ("chat_template.json", "processor_config.json"):
        f = path / name
        if f.is_file():
            try:
                tmpl = json.loads(f.read_text()).get("chat_template")
            except (OSError, ValueError, AttributeError):
                tmpl = None
            if isinstance(tmpl, str) and tmpl:
                return tmpl
    return None


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    """The template compiled as transformers compiles it (``utils/chat_template_utils.py``): a sandboxed,
    immutable environment with trim_blocks, lstrip_blocks, loop controls and the same globals."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
    """``messages`` (plain dicts) rendered as ``tokenizer.apply_chat_template(messages, tokenize=False)`` renders them."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return _compiled_template(template).render(messages=messages, tools=None, documents=None,
                                               add_generation_prompt=add_generation_prompt, **kwargs)


# ------------------------------------------------------------------------------------------ images
def rgb_array(image) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image, transparency composited onto white (transformers' ``convert_to_rgb``)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return np.array(image.convert("RGB"))


def resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """uint8 [H, W, C] resized by Pillow (what transformers' Pil backend does to uint8 images)."""
    from PIL import Image

    return np.array(Image.fromarray(image).resize((int(width), int(height)), resample=int(resample)))


@dataclass
class Normalization:
    """The rescale and normalize steps of an image processor config."""

    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)

    @classmethod
    def from_config(cls, cfg: dict, mean, std) -> "Normalization":
        return cls(do_rescale=bool(cfg.get("do_rescale", True)), rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                   do_normalize=bool(cfg.get("do_normalize", True)), image_mean=tuple(cfg.get("image_mean") or mean),
                   image_std=tuple(cfg.get("image_std") or std))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, C] -> float32 [C, H, W], in transformers' arithmetic (rescale in float64, then float32)."""
        x = np.moveaxis(image, -1, 0)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32, copy=False)
            mean = np.asarray(self.image_mean, np.float32)[:, None, None]
            std = np.asarray(self.image_std, np.float32)[:, None, None]
            x = (x - mean) / std
        return np.ascontiguousarray(x, dtype=np.float32)


def image_processor_config(path: Path) -> dict:
    f = Path(path) / "preprocessor_config.json"
    if not f.is_file():
        raise UnsupportedModelError(f"{path}: no preprocessor_config.json (the image processor's settings)")
    return read_json(f)
