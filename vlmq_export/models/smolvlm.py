"""SmolVLM / Idefics3: SigLIP-style vision transformer + pixel-shuffle connector + Llama text model.

``model_type`` "smolvlm" (SmolVLM2) and "idefics3" (SmolVLM-256M/500M/2B, Idefics3-8B) share the
architecture, the image processor and the prompt layout, so one family serves both.

Token layout (what SmolVLMProcessor / Idefics3Processor produce). Per image, without splitting::

    <fake_token_around_image><global-img><image>*L<fake_token_around_image>

and with splitting into R x C tiles (plus the downscaled global tile, which comes last)::

    (<fake_token_around_image><row_r_col_c><image>*L for each c) "\\n"   for each r
    "\\n<fake_token_around_image><global-img><image>*L<fake_token_around_image>"

with ``L = (image_size // patch_size)**2 // scale_factor**2`` (``image_seq_len``). Every tile the Pil
image processor emits is a full ``max_image_size`` square, so the vision graph takes the tiles
alone (no pixel mask); all-zero padding tiles are dropped first, as HF's ``get_image_features`` does.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np

from ..errors import PromptError
from .base import ExportSpec, Family, Prepared, Processor
from .processing import Config, Normalization, Tokenizer, chat_template_from_dir, image_processor_config, resize, rgb_array

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"

# SmolVLM-Instruct's chat template (transformers' processing_smolvlm.DEFAULT_CHAT_TEMPLATE); used only
# when the directory carries none.
DEFAULT_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def image_prompt_string(rows: int, cols: int, image_seq_len: int) -> str:
    """The text that replaces one ``<image>`` (same as transformers' ``get_image_prompt_string``)."""
    tile = IMAGE_TOKEN * image_seq_len
    glob = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{tile}{FAKE_IMAGE_TOKEN}"
    if rows == 0 and cols == 0:
        return glob
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += f"{FAKE_IMAGE_TOKEN}<row_{r + 1}_col_{c + 1}>{tile}"
        text += "\n"
    return text + "\n" + glob


# ------------------------------------------------------------------------------------------ image processor
MAX_IMAGE_SIZE = 4096  # transformers' absolute maximum side


def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """The longer side to ``max_len``, the other by the aspect ratio, rounded up to even."""
    aspect_ratio = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = max_len
        width = int(height * aspect_ratio)
        width += width % 2
    return max(height, 1), max(width, 1)


def _scale_below_upper_bound(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect_ratio)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


class Idefics3ImageProcessor:
    """numpy and Pillow mirror of transformers' ``SmolVLMImageProcessorPil`` (= ``Idefics3ImageProcessorPil``):
    resize so the longest edge is ``size["longest_edge"]``; with splitting, resize up to multiples of the tile
    side ``max_image_size["longest_edge"]`` and cut R x C tiles, then append the whole image squashed to one
    tile (the global tile); without, squash it to one tile; rescale and normalize every tile."""

    def __init__(self, cfg: dict):
        self.config = dict(cfg)
        self.do_resize = bool(cfg.get("do_resize", True))
        self.size = dict(cfg.get("size") or {"longest_edge": 4 * 364})
        self.max_image_size = dict(cfg.get("max_image_size") or {"longest_edge": 364})
        self.do_image_splitting = bool(cfg.get("do_image_splitting", True))
        self.resample = int(cfg.get("resample", 1))  # Lanczos
        self.normalize = Normalization.from_config(cfg, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    @classmethod
    def from_dir(cls, path: Path) -> "Idefics3ImageProcessor":
        return cls(image_processor_config(path))

    def to_dict(self) -> dict:
        return dict(self.config)

    def _resize_longest(self, x: np.ndarray) -> np.ndarray:
        if self.size.get("longest_edge"):
            h, w = _rescale_to_max_len(x.shape[0], x.shape[1], int(self.size["longest_edge"]))
            h, w = _scale_below_upper_bound(h, w, MAX_IMAGE_SIZE)
        else:
            h, w = int(self.size["height"]), int(self.size["width"])
        return resize(x, h, w, self.resample)

    def _split(self, x: np.ndarray) -> tuple[list[np.ndarray], int, int]:
        tile = int(self.max_image_size["longest_edge"])
        height, width = x.shape[:2]
        aspect_ratio = width / height
        if width >= height:  # resize_for_vision_encoder: both sides up to multiples of the tile
            width = math.ceil(width / tile) * tile
            height = math.ceil(int(width / aspect_ratio) / tile) * tile
        else:
            height = math.ceil(height / tile) * tile
            width = math.ceil(int(height * aspect_ratio) / tile) * tile
        x = resize(x, height, width, self.resample)
        if height <= tile and width <= tile:
            return [x], 0, 0
        rows, cols = (height - tile) // tile + 1, (width - tile) // tile + 1
        frames = [x[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
        return frames + [resize(x, tile, tile, self.resample)], rows, cols

    def __call__(self, images: list) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
        """``pixel_values`` float32 [1, tiles, 3, T, T], ``pixel_attention_mask`` int64 [1, tiles, T, T], and the
        rows and columns of tiles of each image (0, 0 when it was not split) for the images of one prompt."""
        tiles, rows, cols = [], [], []
        tile = int(self.max_image_size["longest_edge"])
        for im in images:
            x = rgb_array(im)
            if self.do_resize:
                x = self._resize_longest(x)
            frames, r, c = self._split(x) if self.do_image_splitting else ([resize(x, tile, tile, self.resample)], 0, 0)
            tiles += [self.normalize(f) for f in frames]
            rows.append(r)
            cols.append(c)
        if len({t.shape for t in tiles}) != 1:
            raise ValueError(f"tiles of different sizes {sorted({t.shape for t in tiles})}")
        pixel_values = np.stack(tiles)[None]
        return pixel_values, np.ones((1, len(tiles), *tiles[0].shape[-2:]), np.int64), rows, cols


class SmolVLMFamily(Family):
    name = "smolvlm"
    model_types = ("smolvlm", "idefics3")
    mrope = False

    # ---------------------------------------------------------------- preprocessing (no torch needed)
    @classmethod
    def processor_from_dir(cls, path: Path) -> Processor:
        return Processor(Config.from_dir(path), Tokenizer.from_dir(path, DEFAULT_CHAT_TEMPLATE),
                         Idefics3ImageProcessor.from_dir(path))

    @classmethod
    def hf_from_dir(cls, path: Path) -> tuple:
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)  # the *Pil class where torchvision is absent
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = chat_template_from_dir(path) or DEFAULT_CHAT_TEMPLATE
        return config, tokenizer, image_processor

    def save_processor(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        super().save_processor(out_dir)
        proc_class = "Idefics3Processor" if self.config.model_type == "idefics3" else "SmolVLMProcessor"
        (out_dir / "processor_config.json").write_text(
            json.dumps({"processor_class": proc_class, "image_seq_len": self.image_seq_len}, indent=2) + "\n"
        )
        if self.tokenizer.chat_template and not (out_dir / "chat_template.jinja").exists():
            (out_dir / "chat_template.jinja").write_text(self.tokenizer.chat_template)

    @property
    def image_seq_len(self) -> int:
        """Image tokens per tile, as the model computes it (``SmolVLMModel.image_seq_len``)."""
        vc = self.config.vision_config
        return int(((vc.image_size // vc.patch_size) ** 2) / (self.config.scale_factor**2))

    @property
    def tile_size(self) -> int:
        """Side of the square tiles the image processor emits (and the vision graph takes)."""
        mis = self.processor.image_processor.max_image_size
        return int(mis.get("longest_edge") or self.config.vision_config.image_size)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def stop_token_ids(self) -> list[int]:
        tok = self.processor.tokenizer
        eou = tok.convert_tokens_to_ids(END_OF_UTTERANCE)
        ids = [eou if eou != tok.unk_token_id else None, tok.eos_token_id]
        return sorted({int(i) for i in ids if i is not None})

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.processor.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def prepare(self, images: list, prompt: str, answer: str | None = None) -> Prepared:
        images = list(images or [])
        if IMAGE_TOKEN in prompt:  # placeholders where the caller put them
            if prompt.count(IMAGE_TOKEN) != len(images):
                raise PromptError(
                    f"prompt has {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders but {len(images)} images were given"
                )
            content = [{"type": "text", "text": prompt}]
        else:  # SmolVLM's convention: images first, then the question
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        user = [{"role": "user", "content": content}]
        text = self._render(user, add_generation_prompt=True)

        pixel: dict[str, np.ndarray] = {}
        if images:
            # [1, tiles, 3, H, W], [1, tiles, H, W]
            pixel["pixel_values"], pixel["pixel_attention_mask"], rows, cols = self.processor.image_processor(images)
            parts = text.split(IMAGE_TOKEN)
            if len(parts) - 1 != len(images):
                raise ValueError(f"chat template produced {len(parts) - 1} image placeholders for {len(images)} images")
            text = parts[0] + "".join(
                image_prompt_string(rows[i], cols[i], self.image_seq_len) + parts[i + 1] for i in range(len(images))
            )
        tok = self.processor.tokenizer
        ids = tok.encode(text)

        answer_len = 0
        if answer is not None:
            full = self._render(
                user + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                add_generation_prompt=False,
            )
            gen_prompt = self._render(user, add_generation_prompt=True)
            if full.startswith(gen_prompt) and END_OF_UTTERANCE in full[len(gen_prompt):]:
                tail = full[len(gen_prompt):]
                tail = tail[: tail.index(END_OF_UTTERANCE) + len(END_OF_UTTERANCE)]
            else:
                tail = " " + answer + END_OF_UTTERANCE
            ans_ids = tok.encode(tail, add_special_tokens=False)
            ids += ans_ids
            answer_len = len(ans_ids)

        input_ids = np.asarray([ids], dtype=np.int64)
        seq = input_ids.shape[1]
        image_mask = input_ids == self.image_token_id
        expected = (pixel["pixel_values"].shape[1] if images else 0) * self.image_seq_len
        if int(image_mask.sum()) != expected:
            raise ValueError(f"{int(image_mask.sum())} image tokens for {expected} image features")
        return Prepared(
            input_ids=input_ids,
            image_mask=image_mask,
            position_ids=np.arange(seq, dtype=np.int64)[None, :],
            rope_delta=0,
            pixel=pixel,
            answer_len=answer_len,
            num_images=len(images),
        )

    def vision_feeds(self, prepared: Prepared) -> dict[str, np.ndarray]:
        if "pixel_values" not in prepared.pixel:
            raise ValueError("this prompt has no images: there is nothing to feed the vision encoder")
        pv = prepared.pixel["pixel_values"]
        pv = pv.reshape(-1, *pv.shape[-3:]).astype(np.float32, copy=False)
        # HF drops padding tiles (all zeros) before the vision model; so do we.
        real = ~np.all(pv == 0.0, axis=(1, 2, 3))
        if not real.any():
            real[0] = True
        pv = pv[real]
        pam = prepared.pixel.get("pixel_attention_mask")
        if pam is not None:
            pam = pam.reshape(-1, *pam.shape[-2:])[real]
            if not np.all(pam):
                raise ValueError("partially padded tiles are not supported (the Pil image processor never emits them)")
        if pv.shape[-1] != pv.shape[-2] or pv.shape[-1] != self.tile_size:
            raise ValueError(f"tiles are {pv.shape[-2]}x{pv.shape[-1]}, the vision graph takes {self.tile_size}x{self.tile_size}")
        return {"pixel_values": np.ascontiguousarray(pv)}

    # ---------------------------------------------------------------- torch half
    def load_model(self, path: str | Path, dtype=None):
        import torch
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype or torch.float32, attn_implementation="sdpa"
        )
        return model.eval()

    def hf_inputs(self, prepared: Prepared) -> dict:
        import torch

        out = {
            "input_ids": torch.from_numpy(prepared.input_ids.copy()),
            "attention_mask": torch.ones_like(torch.from_numpy(prepared.input_ids)),
        }
        if "pixel_values" in prepared.pixel:
            out["pixel_values"] = torch.from_numpy(prepared.pixel["pixel_values"].copy())
            out["pixel_attention_mask"] = torch.from_numpy(prepared.pixel["pixel_attention_mask"].copy())
        return out

    @staticmethod
    def _inner(model):
        return model.model

    def decoder_layers(self, model):
        return self._inner(model).text_model.layers

    def vision_layers(self, model):
        return self._inner(model).vision_model.encoder.layers

    def projector(self, model):
        return self._inner(model).connector

    def lm_head(self, model):
        return model.lm_head

    def image_features(self, model, prepared: Prepared):
        import torch

        inputs = self.hf_inputs(prepared)
        with torch.no_grad():
            out = model.get_image_features(
                pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"], return_dict=True
            )
        feats = out.pooler_output
        if isinstance(feats, (list, tuple)):
            feats = torch.cat(list(feats), dim=0)
        return feats.reshape(-1, feats.shape[-1])

    def export_specs(self, model) -> list[ExportSpec]:
        import torch

        W = _wrappers()
        inner = self._inner(model)
        vc = self.config.vision_config
        dtype = next(model.parameters()).dtype
        n_tiles, tile = 2, self.tile_size
        patches = (tile // vc.patch_size) ** 2
        g = torch.Generator().manual_seed(0)
        pixel_values = torch.randn(n_tiles, 3, tile, tile, generator=g).to(dtype)
        features = torch.randn(n_tiles, patches, vc.hidden_size, generator=g).to(dtype)
        input_ids = torch.randint(0, int(self.text_config.vocab_size), (2, 3), generator=g)

        batch, seq, past = 2, 3, 5
        inputs_embeds = torch.randn(batch, seq, self.hidden_size, generator=g).to(dtype)
        attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
        position_ids = torch.arange(past, past + seq, dtype=torch.int64)[None].expand(batch, seq).contiguous()
        kv = []
        for _ in range(self.num_layers):
            for _ in range(2):
                kv.append(torch.randn(batch, self.num_kv_heads, past, self.head_dim, generator=g).to(dtype))
        past_names = [f"past_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]
        present_names = [f"present_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]
        return [
            ExportSpec(
                name="vision_encoder",
                module=W["VisionEncoderWrapper"](inner.vision_model, vc.patch_size),
                args=(pixel_values,),
                input_names=["pixel_values"],
                output_names=["features"],
                dynamic_shapes=({0: "num_tiles"},),
            ),
            ExportSpec(
                name="projector",
                module=W["ProjectorWrapper"](inner.connector),
                args=(features,),
                input_names=["features"],
                output_names=["image_embeds"],
                dynamic_shapes=({0: "num_tiles"},),
            ),
            ExportSpec(
                name="embed_tokens",
                module=W["EmbedTokensWrapper"](inner.text_model.embed_tokens),
                args=(input_ids,),
                input_names=["input_ids"],
                output_names=["inputs_embeds"],
                dynamic_shapes=({0: "batch", 1: "sequence"},),
            ),
            ExportSpec(
                name="llm",
                module=W["LLMWrapper"](inner.text_model, model.lm_head, self.text_config),
                attention=(inner.text_model, "eager"),
                args=(inputs_embeds, attention_mask, position_ids, *kv),
                input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
                output_names=["logits", *present_names],
                dynamic_shapes={
                    "inputs_embeds": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "total_sequence"},
                    "position_ids": {0: "batch", 1: "sequence"},
                    "past": tuple({0: "batch", 2: "past_sequence"} for _ in kv),
                },
            ),
        ]


# -------------------------------------------------------------------- export wrappers (torch)
_WRAPPER_NAMES = ("VisionEncoderWrapper", "ProjectorWrapper", "EmbedTokensWrapper", "LLMWrapper")


@functools.lru_cache(maxsize=None)
def _wrappers() -> dict:
    """The wrapper classes, defined on first use so that importing this module does not import torch."""
    import torch
    from transformers.cache_utils import DynamicCache

    class VisionEncoderWrapper(torch.nn.Module):
        """pixel_values [N, 3, T, T] (full tiles) -> features [N, patches, vision_hidden] (post-layernorm)."""

        def __init__(self, vision_model, patch_size: int):
            super().__init__()
            self.vision_model = vision_model
            self.patch_size = int(patch_size)

        def forward(self, pixel_values):
            n, _, h, w = pixel_values.shape
            mask = torch.ones((n, h // self.patch_size, w // self.patch_size), dtype=torch.bool, device=pixel_values.device)
            out = self.vision_model(pixel_values=pixel_values, patch_attention_mask=mask, return_dict=True)
            return out.last_hidden_state

    class ProjectorWrapper(torch.nn.Module):
        """features [N, patches, vision_hidden] -> image_embeds [N * image_seq_len, hidden] (pixel shuffle + linear)."""

        def __init__(self, connector):
            super().__init__()
            self.connector = connector

        def forward(self, features):
            x = self.connector(features)
            return x.reshape(-1, x.shape[-1])

    class EmbedTokensWrapper(torch.nn.Module):
        def __init__(self, embed_tokens):
            super().__init__()
            self.embed_tokens = embed_tokens

        def forward(self, input_ids):
            return self.embed_tokens(input_ids)

    class LLMWrapper(torch.nn.Module):
        """The text model with its own decoder layers and lm_head, KV cache as flat tensors (P may be 0)."""

        def __init__(self, text_model, lm_head, text_config):
            super().__init__()
            self.text_model = text_model
            self.lm_head = lm_head
            self.text_config = text_config

        def forward(self, inputs_embeds, attention_mask, position_ids, *past):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            cache = DynamicCache(ddp_cache_data=pairs, config=self.text_config)
            out = self.text_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                return_dict=True,
            )
            logits = self.lm_head(out.last_hidden_state)
            presents = []
            for layer in out.cache.layers:
                presents += [layer.keys, layer.values]
            return (logits, *presents)

    return dict(zip(_WRAPPER_NAMES, (VisionEncoderWrapper, ProjectorWrapper, EmbedTokensWrapper, LLMWrapper)))


def __getattr__(name):  # ``from vlmq_export.models.smolvlm import LLMWrapper`` works, lazily
    if name in _WRAPPER_NAMES:
        return _wrappers()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
