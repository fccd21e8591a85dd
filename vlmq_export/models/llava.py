"""LLaVA-1.5 (``model_type`` "llava"): CLIP vision tower, two-layer MLP projector, Llama decoder.

Graphs (roles fixed in ``base.py``):

``vision_encoder``  ``pixel_values`` float32 [N, 3, S, S] (one square crop per image) -> ``features``
                    [N, P, vision_hidden]: the hidden state after ``vision_feature_layer`` (-2 in the real
                    models; several layers are concatenated where the config lists several), without the
                    CLS row where ``vision_feature_select_strategy`` is "default"
``projector``       ``features`` -> ``image_embeds`` [N * P, hidden] (``multi_modal_projector``)
``embed_tokens``    as every family
``llm``             1-D ``position_ids`` [B, S], as SmolVLM's

The vision tower's layers after the last selected hidden state never reach the output, so
``load_model`` drops them (and rewrites ``vision_feature_layer`` as the same, non-negative indices): they are
neither calibrated nor exported. Each ``<image>`` of the prompt becomes P image tokens.

This module is torch-free at import (the preprocessing half, :class:`ClipImageProcessor` mirroring
transformers' ``CLIPImageProcessorPil``); the export wrappers are in ``llava_torch.py``. LLaVA-NeXT and
LLaVA-OneVision (``llava_next.py``) subclass :class:`LlavaFamily`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import PromptError, UnsupportedModelError
from .base import Family, Prepared, Processor
from .processing import Config, Normalization, Tokenizer, chat_template_from_dir, image_processor_config, resize, rgb_array
from .qwen2_vl import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

IMAGE_TOKEN = "<image>"

# llava-hf/llava-1.5-7b-hf's chat template (without the {% generation %} markers); used when the directory
# carries none.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------ image processor
def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """The shorter side to ``shortest``, the longer one scaled and truncated (transformers'
    ``get_resize_output_image_size(default_to_square=False)``)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] cropped around the centre as transformers' ``center_crop`` (zero padding where the image is smaller)."""
    h, w = image.shape[:2]
    if h < height or w < width:
        ph, pw = max(height - h, 0), max(width - w, 0)
        image = np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        h, w = image.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return image[top:top + height, left:left + width]


class ClipImageProcessor:
    """numpy and Pillow mirror of transformers' ``CLIPImageProcessorPil`` (and of the per-tile steps of the
    LLaVA-NeXT / OneVision Pil processors): resize (shortest edge, or to height x width), centre crop,
    rescale, normalize. ``crop`` is the side of the square the vision tower takes."""

    def __init__(self, cfg: dict):
        self.config = dict(cfg)
        size, crop = cfg.get("size") or {"shortest_edge": 224}, cfg.get("crop_size") or {}
        # older configs give ints, which transformers reads as the shortest edge and a square crop
        self.size = {"shortest_edge": size} if isinstance(size, int) else dict(size)
        self.crop_size = {"height": crop, "width": crop} if isinstance(crop, int) else dict(crop)
        self.do_resize = bool(cfg.get("do_resize", True))
        self.do_center_crop = bool(cfg.get("do_center_crop", True)) and bool(self.crop_size)
        self.resample = int(cfg.get("resample", 3))  # bicubic
        self.normalize = Normalization.from_config(cfg, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        if cfg.get("do_pad") and "image_grid_pinpoints" not in cfg:
            raise UnsupportedModelError("LLaVA image processors with do_pad (pad to square) are not supported")

    @classmethod
    def from_dir(cls, path: Path):
        return cls(image_processor_config(path))

    def to_dict(self) -> dict:
        return dict(self.config)

    @property
    def square(self) -> tuple[int, int]:
        """(height, width) of the resize target as a square (the anyres base image and tile side)."""
        if self.size.get("height"):
            return int(self.size["height"]), int(self.size["width"])
        return int(self.size["shortest_edge"]), int(self.size["shortest_edge"])

    @property
    def crop(self) -> int:
        return int(self.crop_size["height"]) if self.crop_size.get("height") else self.square[0]

    def process(self, x: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> float32 [3, crop, crop]."""
        if self.do_resize:
            if self.size.get("height"):
                h, w = int(self.size["height"]), int(self.size["width"])
            else:
                h, w = shortest_edge_size(x.shape[0], x.shape[1], int(self.size["shortest_edge"]))
            x = resize(x, h, w, self.resample)
        if self.do_center_crop:
            x = center_crop(x, int(self.crop_size["height"]), int(self.crop_size["width"]))
        return self.normalize(x)

    def __call__(self, images: list) -> dict[str, np.ndarray]:
        """``pixel_values`` float32 [N, 3, crop, crop] of N PIL images."""
        return {"pixel_values": np.stack([self.process(rgb_array(im)) for im in images]).astype(np.float32)}


# ------------------------------------------------------------------------------------------ the family
class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)
    mrope = False
    model_class_name = "LlavaForConditionalGeneration"
    image_processor_class = ClipImageProcessor
    DEFAULT_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE
    ANSWER_PREFIX = " "  # between the generation prompt and the answer
    END_OF_TURN = None  # the token after an answer (None: the tokenizer's eos)

    # ------------------------------------------------------------------ preprocessing
    @classmethod
    def processor_from_dir(cls, path):
        return Processor(Config.from_dir(path), Tokenizer.from_dir(path, cls.DEFAULT_CHAT_TEMPLATE),
                         cls.image_processor_class.from_dir(path))

    @classmethod
    def hf_from_dir(cls, path):
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = chat_template_from_dir(path) or cls.DEFAULT_CHAT_TEMPLATE
        return config, tokenizer, AutoImageProcessor.from_pretrained(path, backend="pil")

    def save_processor(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        super().save_processor(out_dir)
        if self.tokenizer.chat_template and not (out_dir / "chat_template.jinja").exists():
            (out_dir / "chat_template.jinja").write_text(self.tokenizer.chat_template)

    @property
    def image_token_id(self) -> int:
        cfg = self.config
        tid = getattr(cfg, "image_token_id", None)
        return int(tid if tid is not None else cfg.image_token_index)

    @property
    def patch_side(self) -> int:
        """Patches per side of one vision-tower input (the tower's ``image_size // patch_size``)."""
        vc = self.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    @property
    def has_cls(self) -> bool:
        return self.config.vision_config.model_type == "clip_vision_model"

    @property
    def drop_cls(self) -> bool:
        return self.has_cls and self.config.vision_feature_select_strategy == "default"

    @property
    def tokens_per_tile(self) -> int:
        """Rows of ``features`` per vision-tower input (P)."""
        return self.patch_side**2 + int(self.has_cls and not self.drop_cls)

    @staticmethod
    def feature_layers(config, num_layers: int) -> list[int]:
        """``config.vision_feature_layer`` as non-negative hidden-state indices (0: the embeddings) of a vision
        tower of ``num_layers`` layers."""
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        return [i if i >= 0 else num_layers + 1 + i for i in layers]

    @property
    def stop_token_ids(self) -> list[int]:
        tok = self.processor.tokenizer
        ids = {tok.eos_token_id}
        for t in ("<|im_end|>", "</s>"):
            tid = tok.convert_tokens_to_ids(t)
            if tid is not None and tid != tok.unk_token_id:
                ids.add(tid)
        return sorted(int(i) for i in ids if i is not None)

    def _end_of_turn_id(self) -> int:
        tok = self.processor.tokenizer
        return int(tok.convert_tokens_to_ids(self.END_OF_TURN) if self.END_OF_TURN else tok.eos_token_id)

    def chat_text(self, num_images: int, prompt: str) -> str:
        if IMAGE_TOKEN in prompt:  # placeholders where the caller put them
            if prompt.count(IMAGE_TOKEN) != num_images:
                raise PromptError(f"prompt has {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders but "
                                  f"{num_images} images were given")
            content = [{"type": "text", "text": prompt}]
        else:
            content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
        return self.processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)

    def process_images(self, images: list) -> tuple[dict[str, np.ndarray], list[int]]:
        """HF's pixel kwargs for the images of one prompt and the number of image tokens of each."""
        return self.processor.image_processor(images), [self.tokens_per_tile] * len(images)

    def prepare(self, images, prompt, answer=None):
        images = list(images or [])
        tok = self.processor.tokenizer
        ids = tok.encode(self.chat_text(len(images), prompt), add_special_tokens=False)
        pad = self.image_token_id
        if sum(1 for i in ids if i == pad) != len(images):
            raise ValueError(f"chat template produced {sum(1 for i in ids if i == pad)} {IMAGE_TOKEN} tokens "
                             f"for {len(images)} images")
        pixel: dict[str, np.ndarray] = {}
        if images:
            pixel, counts = self.process_images(images)
            counts = iter(counts)
            ids = [t for i in ids for t in ([pad] * next(counts) if i == pad else [i])]
        answer_len = 0
        if answer is not None:
            ans = tok.encode(self.ANSWER_PREFIX + answer, add_special_tokens=False) + [self._end_of_turn_id()]
            ids += ans
            answer_len = len(ans)
        input_ids = np.asarray(ids, dtype=np.int64)[None, :]
        return Prepared(input_ids=input_ids, image_mask=input_ids == pad,
                        position_ids=np.arange(input_ids.shape[1], dtype=np.int64)[None, :],
                        pixel=pixel, answer_len=answer_len, num_images=len(images))

    def vision_feeds(self, prepared):
        if "pixel_values" not in prepared.pixel:
            raise ValueError("this prompt has no images: there is nothing to feed the vision encoder")
        return {"pixel_values": np.ascontiguousarray(prepared.pixel["pixel_values"], dtype=np.float32)}

    # ------------------------------------------------------------------ torch half
    def load_model(self, path, dtype=None):
        """The HF model with the vision layers after the last selected hidden state dropped (see the module doc)."""
        import torch
        import transformers

        cls = getattr(transformers, self.model_class_name)
        model = cls.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation="sdpa").eval()
        layers = self.vision_layers(model)
        keep = self.feature_layers(model.config, len(layers))
        del layers[max(keep):]
        fl = model.config.vision_feature_layer
        model.config.vision_feature_layer = keep[0] if isinstance(fl, int) else keep
        return model

    def hf_inputs(self, prepared):
        import torch

        ids = torch.from_numpy(prepared.input_ids).long()
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for k, v in prepared.pixel.items():
            out[k] = torch.from_numpy(np.asarray(v)).float() if k == "pixel_values" else torch.from_numpy(np.asarray(v))
        return out

    def decoder_layers(self, model):
        return model.model.language_model.layers

    @staticmethod
    def _vision_model(model):
        """The vision transformer (embeddings, encoder): the tower itself, or its ``vision_model``."""
        tower = model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    def vision_layers(self, model):
        return self._vision_model(model).encoder.layers

    def projector(self, model):
        return model.model.multi_modal_projector

    def lm_head(self, model):
        return model.lm_head

    def image_features(self, model, prepared):
        import torch

        inputs = self.hf_inputs(prepared)
        kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        with torch.no_grad():
            out = model.model.get_image_features(**kwargs, return_dict=True)
        feats = out.pooler_output
        feats = torch.cat(list(feats), dim=0) if isinstance(feats, (list, tuple)) else feats
        return feats.reshape(-1, feats.shape[-1])

    def _vision_example(self):
        """Example ``pixel_values``: 3 tiles (no dimension of the example is 1)."""
        import torch

        s = int(self.config.vision_config.image_size)
        return (torch.randn(3, 3, s, s, generator=torch.Generator().manual_seed(0)),)

    def export_specs(self, model):
        import torch

        from .llava_torch import LlavaProjectorWrapper, LlavaVisionWrapper
        from .qwen2_vl_torch import EmbedTokensWrapper, Qwen2VLDecoderWrapper

        tiles = torch.export.Dim("num_tiles")
        vision = self.export_spec("vision_encoder", LlavaVisionWrapper(self._vision_model(model),
                                                                       self.feature_layers(model.config, len(self.vision_layers(model))),
                                                                       self.drop_cls),
                                  self._vision_example(), ["pixel_values"], ["features"], ({0: tiles},))
        with torch.no_grad():
            features = vision.module(*vision.args)
        newline = getattr(model.model, "image_newline", None)
        projector = self.export_spec("projector", LlavaProjectorWrapper(self.projector(model), newline), (features,),
                                     ["features"], ["image_embeds"], ({0: tiles},))
        return [vision, projector, self.embed_tokens_spec(EmbedTokensWrapper(model.get_input_embeddings())),
                self.llm_spec(Qwen2VLDecoderWrapper(model), attention=(model.model.language_model, "eager"))]
