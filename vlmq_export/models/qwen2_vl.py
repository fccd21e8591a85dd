"""Qwen2-VL: an adapter over transformers' ``Qwen2VLForConditionalGeneration``.

Graphs (see ``base.py`` for the fixed roles):

``vision_encoder``  ``pixel_values`` float32 [L, C*T*p*p] (flattened patches as the image processor
                    gives them), ``vision_position_ids`` int64 [L, 2] (row/column of each patch, the
                    rotary ids), ``cu_seqlens`` int64 [N+1] (patch offsets of each image)
                    -> ``features`` float32 [L, embed_dim] (the last vision block's output, before the merger)
``projector``       ``features`` [L, embed_dim] -> ``image_embeds`` [L / merge², hidden] (``visual.merger``)
``embed_tokens``    ``input_ids`` int64 [B, S] -> ``inputs_embeds`` float32 [B, S, hidden]
``llm``             ``inputs_embeds`` [B, S, hidden], ``attention_mask`` int64 [B, P+S],
                    ``position_ids`` int64 [3, B, S], ``past_key_i``/``past_value_i`` [B, kv, P, hd]
                    -> ``logits`` [B, S, V], ``present_key_i``/``present_value_i`` [B, kv, P+S, hd]

The vision tower cannot be exported as transformers runs it (it splits attention per image with
data-dependent sizes), so the rotary ids and ``cu_seqlens`` are computed outside the graph (numpy
mirrors of ``transformers.vision_utils``, equal to them) and the wrapper runs every block's attention
as one SDPA with a block-diagonal mask built from ``cu_seqlens``. The wrappers call the model's own
submodules, so weights replaced on the model (quantization) are what gets exported. They live in
``qwen2_vl_torch.py``: this module (preprocessing, :class:`Qwen2VLImageProcessor`, the M-RoPE prefill
positions of :func:`mrope_position_ids`) imports neither torch nor transformers until the torch half runs.

Qwen2.5-VL (``qwen2_5_vl.py``) subclasses :class:`Qwen2VLFamily`: two more vision inputs
(``vision_inputs``, :meth:`Qwen2VLFamily._vision_example`, :meth:`Qwen2VLFamily._vision_dynamic_shapes`)
and its own vision wrapper.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import UnsupportedModelError
from .base import ExportSpec, Family, Prepared, Processor
from .processing import Config, Normalization, Tokenizer, chat_template_from_dir, image_processor_config, resize, rgb_array

# Qwen2-VL-Instruct's chat template; used when the tokenizer carries none (some checkpoints keep it
# only in the processor's chat_template.json, which is read first).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

VISION_INPUTS = ["pixel_values", "vision_position_ids", "cu_seqlens"]
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------------ image processor
def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """(height, width) divisible by ``factor``, with min_pixels <= h * w <= max_pixels, the aspect ratio kept as
    closely as possible (transformers' ``qwen2_vl.image_processing_pil_qwen2_vl.smart_resize``)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen2VLImageProcessor:
    """numpy and Pillow mirror of transformers' ``Qwen2VLImageProcessorPil``: each image resized by
    :func:`smart_resize` to multiples of patch x merge, rescaled and normalized, and cut into rows of
    C * T * p * p values (the frame repeated T times) in merge-block order; grid (1, h, w) per image."""

    def __init__(self, cfg: dict):
        self.config = dict(cfg)
        size = dict(cfg.get("size") or {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
        for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if cfg.get(key) is not None:
                size[edge] = cfg[key]
        self.min_pixels, self.max_pixels = int(size["shortest_edge"]), int(size["longest_edge"])
        self.patch_size = int(cfg.get("patch_size", 14))
        self.temporal_patch_size = int(cfg.get("temporal_patch_size", 2))
        self.merge_size = int(cfg.get("merge_size", 2))
        self.do_resize = bool(cfg.get("do_resize", True))
        self.resample = int(cfg.get("resample", 3))  # bicubic
        self.normalize = Normalization.from_config(cfg, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    @classmethod
    def from_dir(cls, path: Path) -> "Qwen2VLImageProcessor":
        return cls(image_processor_config(path))

    def to_dict(self) -> dict:
        return dict(self.config)

    def patchify(self, image: np.ndarray) -> tuple[np.ndarray, int, int]:
        c, h, w = image.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        patches = image.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, *patches.shape[5:]))
        return patches.reshape(gh * gw, c * t * p * p), gh, gw

    def __call__(self, images: list) -> tuple[np.ndarray, np.ndarray]:
        """``pixel_values`` float32 [L, C*T*p*p] and ``image_grid_thw`` int64 [N, 3] of N PIL images."""
        rows, grids = [], []
        for im in images:
            x = rgb_array(im)
            if self.do_resize:
                h, w = smart_resize(x.shape[0], x.shape[1], self.patch_size * self.merge_size,
                                    self.min_pixels, self.max_pixels)
                x = resize(x, h, w, self.resample)
            patches, gh, gw = self.patchify(self.normalize(x))
            rows.append(patches)
            grids.append([1, gh, gw])
        return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32), np.asarray(grids, dtype=np.int64)


# ------------------------------------------------------------------------------------------ numpy helpers
def vision_position_ids(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """[L, 2] int64 (row, column) of every patch, block-major over merge×merge blocks, repeated per frame.

    numpy mirror of ``transformers.vision_utils.get_vision_position_ids``.
    """
    out = []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).tolist():
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int64)


def vision_cu_seqlens(grid_thw: np.ndarray) -> np.ndarray:
    """[num_frames + 1] int64 patch offsets of the attention segments (one per frame of each image).

    numpy mirror of ``transformers.vision_utils.get_vision_cu_seqlens`` (which returns int32).
    """
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    seqlens = np.repeat(g[:, 1] * g[:, 2], g[:, 0])
    return np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int64)


def mrope_position_ids(
    input_ids: np.ndarray, image_token_id: int, image_grid_thw: np.ndarray | None, merge: int
) -> tuple[np.ndarray, int]:
    """M-RoPE prefill positions [3, 1, S] and rope delta for one sequence (numpy ``get_rope_index``).

    Text runs get 1-D positions on all three axes; each run of image tokens gets (t, h, w) grid
    positions offset by the current position, which then advances by max(h, w) / merge. The decode
    position of absolute step ``t`` is ``t + rope_delta``.
    """
    ids = np.asarray(input_ids).reshape(-1)
    is_image = ids == image_token_id
    grids = iter(np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3).tolist()) if image_grid_thw is not None else iter(())
    pieces = []
    cur = 0
    start = 0
    n = len(ids)
    while start < n:
        end = start
        while end < n and is_image[end] == is_image[start]:
            end += 1
        if not is_image[start]:
            pieces.append(np.broadcast_to(np.arange(end - start) + cur, (3, end - start)))
            cur += end - start
        else:
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError("more image-token runs than image grids") from None
            gt, gh, gw = t, h // merge, w // merge
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh) + cur, np.arange(gw) + cur, indexing="ij")
            pos = np.stack([tt.reshape(-1) + cur, hh.reshape(-1), ww.reshape(-1)])
            if pos.shape[1] != end - start:
                raise ValueError(f"image-token run of {end - start} tokens does not match grid {t}x{h}x{w}")
            pieces.append(pos)
            cur += max(h, w) // merge
        start = end
    if not pieces:
        return np.zeros((3, 1, 0), np.int64), 0
    pos = np.concatenate(pieces, axis=1).astype(np.int64)
    return pos[:, None, :], int(pos.max() + 1 - n)


# ------------------------------------------------------------------------------------------ the family
class Qwen2VLFamily(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    mrope = True
    model_class_name = "Qwen2VLForConditionalGeneration"
    vision_inputs = VISION_INPUTS
    EXAMPLE_GRID = np.array([[1, 6, 8], [1, 4, 4]], dtype=np.int64)  # the vision export's example images

    IMAGE_TOKEN = "<|image_pad|>"
    END_OF_TURN = "<|im_end|>"
    END_OF_TEXT = "<|endoftext|>"

    # ------------------------------------------------------------------ preprocessing
    @classmethod
    def processor_from_dir(cls, path):
        return Processor(Config.from_dir(path), Tokenizer.from_dir(path, QWEN2_VL_CHAT_TEMPLATE),
                         Qwen2VLImageProcessor.from_dir(path))

    @classmethod
    def hf_from_dir(cls, path):
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = chat_template_from_dir(path) or QWEN2_VL_CHAT_TEMPLATE
        try:
            image_processor = AutoImageProcessor.from_pretrained(path)
        except Exception:  # e.g. an image_processor_type that needs torchvision
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        return config, tokenizer, image_processor

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def _token_id(self, token: str) -> int:
        tok = self.processor.tokenizer
        tid = tok.convert_tokens_to_ids(token)
        if tid is None or tid == tok.unk_token_id:
            raise UnsupportedModelError(f"tokenizer has no {token} token")
        return int(tid)

    @property
    def stop_token_ids(self) -> list[int]:
        ids = [self._token_id(self.END_OF_TURN), self._token_id(self.END_OF_TEXT)]
        eos = self.processor.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(int(eos))
        return ids

    def chat_text(self, num_images: int, prompt: str) -> str:
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
        return self.processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def prepare(self, images, prompt, answer=None):
        images = list(images or [])
        text = self.chat_text(len(images), prompt)
        tok = self.processor.tokenizer
        ids = tok.encode(text, add_special_tokens=False)
        pad = self.image_token_id
        if sum(1 for i in ids if i == pad) != len(images):
            raise ValueError(
                f"chat template produced {sum(1 for i in ids if i == pad)} {self.IMAGE_TOKEN} tokens for {len(images)} images"
            )
        pixel: dict[str, np.ndarray] = {}
        grid = None
        if images:
            pixel["pixel_values"], grid = self.processor.image_processor([im.convert("RGB") for im in images])
            pixel["image_grid_thw"] = grid
            counts = iter((grid.prod(-1) // self.merge_size**2).tolist())
            ids = [t for i in ids for t in ([pad] * next(counts) if i == pad else [i])]
        answer_len = 0
        if answer is not None:
            ans = tok.encode(answer, add_special_tokens=False) + [self._token_id(self.END_OF_TURN)]
            ids += ans
            answer_len = len(ans)
        input_ids = np.asarray(ids, dtype=np.int64)[None, :]
        position_ids, rope_delta = mrope_position_ids(input_ids, pad, grid, self.merge_size)
        return Prepared(
            input_ids=input_ids,
            image_mask=input_ids == pad,
            position_ids=position_ids,
            rope_delta=rope_delta,
            pixel=pixel,
            answer_len=answer_len,
            num_images=len(images),
        )

    def vision_feeds(self, prepared):
        if "pixel_values" not in prepared.pixel:
            raise ValueError("no images in this sample")
        grid = prepared.pixel["image_grid_thw"]
        return {
            "pixel_values": np.ascontiguousarray(prepared.pixel["pixel_values"], dtype=np.float32),
            "vision_position_ids": vision_position_ids(grid, self.merge_size),
            "cu_seqlens": vision_cu_seqlens(grid),
        }

    # ------------------------------------------------------------------ torch half
    def load_model(self, path, dtype=None):
        import torch
        import transformers

        cls = getattr(transformers, self.model_class_name)
        model = cls.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation="sdpa")
        return model.eval()

    def hf_inputs(self, prepared):
        import torch

        ids = torch.from_numpy(prepared.input_ids).long()
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "pixel_values" in prepared.pixel:
            out["pixel_values"] = torch.from_numpy(prepared.pixel["pixel_values"]).float()
            out["image_grid_thw"] = torch.from_numpy(prepared.pixel["image_grid_thw"]).long()
            out["mm_token_type_ids"] = (ids == self.image_token_id).long()
        return out

    def decoder_layers(self, model):
        return model.model.language_model.layers

    def vision_layers(self, model):
        return model.model.visual.blocks

    def projector(self, model):
        return model.model.visual.merger

    def lm_head(self, model):
        return model.lm_head

    def image_features(self, model, prepared):
        import torch

        inputs = self.hf_inputs(prepared)
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)

    def _vision_wrapper(self, model):
        from .qwen2_vl_torch import Qwen2VLVisionWrapper

        return Qwen2VLVisionWrapper(model.model.visual)

    def _vision_example(self):
        """Feeds for two images of different sizes (so neither L nor the image count is 1)."""
        import torch

        vc = self.config.vision_config
        grid = self.EXAMPLE_GRID
        L = int(grid.prod(-1).sum())
        dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        g = torch.Generator().manual_seed(0)
        return (
            torch.randn(L, dim, generator=g),
            torch.from_numpy(vision_position_ids(grid, self.merge_size)),
            torch.from_numpy(vision_cu_seqlens(grid)),
        )

    def _vision_dynamic_shapes(self) -> tuple:
        """Dynamic shapes of ``vision_inputs``, in order."""
        import torch

        patches = torch.export.Dim("num_patches")
        return ({0: patches}, {0: patches}, {0: torch.export.Dim("num_images_plus_1")})

    def _vision_spec(self, model) -> ExportSpec:
        return ExportSpec(
            name="vision_encoder",
            module=self._vision_wrapper(model).eval(),
            args=self._vision_example(),
            input_names=list(self.vision_inputs),
            output_names=["features"],
            dynamic_shapes=self._vision_dynamic_shapes(),
        )

    def export_specs(self, model):
        import torch

        from .qwen2_vl_torch import Qwen2VLDecoderWrapper, EmbedTokensWrapper, ProjectorWrapper

        Dim = torch.export.Dim
        merge2 = self.merge_size**2
        batch, seq, past_len = Dim("batch"), Dim("seq"), Dim("past")
        vision = self._vision_spec(model)
        with torch.no_grad():
            example_features = vision.module(*vision.args)
        projector = ExportSpec(
            name="projector",
            module=ProjectorWrapper(self.projector(model)).eval(),
            args=(example_features,),
            input_names=["features"],
            output_names=["image_embeds"],
            dynamic_shapes=({0: merge2 * Dim("num_image_tokens")},),
        )
        B, S, P = 2, 5, 3
        embed = ExportSpec(
            name="embed_tokens",
            module=EmbedTokensWrapper(model.get_input_embeddings()).eval(),
            args=(torch.randint(0, int(self.text_config.vocab_size), (B, S)),),
            input_names=["input_ids"],
            output_names=["inputs_embeds"],
            dynamic_shapes=({0: batch, 1: seq},),
        )
        llm_module = Qwen2VLDecoderWrapper(model).eval()
        n = self.num_layers
        g = torch.Generator().manual_seed(0)
        past = []
        for _ in range(n):
            past += [torch.randn(B, self.num_kv_heads, P, self.head_dim, generator=g) for _ in range(2)]
        args = (
            torch.randn(B, S, self.hidden_size, generator=g),
            torch.ones(B, P + S, dtype=torch.long),
            (torch.arange(P, P + S).view(1, 1, S).expand(3, B, S) + 1).contiguous(),
            *past,
        )
        kv = {0: batch, 2: past_len}
        llm = ExportSpec(
            name="llm",
            module=llm_module,
            attention=(model.model.language_model, "eager"),
            args=args,
            input_names=["inputs_embeds", "attention_mask", "position_ids"]
            + [f"past_{kind}_{i}" for i in range(n) for kind in ("key", "value")],
            output_names=["logits"] + [f"present_{kind}_{i}" for i in range(n) for kind in ("key", "value")],
            dynamic_shapes={
                "inputs_embeds": {0: batch, 1: seq},
                "attention_mask": {0: batch, 1: Dim("past_plus_seq")},
                "position_ids": {1: batch, 2: seq},
                "past": tuple(kv for _ in range(2 * n)),
            },
        )
        return [vision, projector, embed, llm]
