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
submodules, so weights replaced on the model (quantization) are what gets exported.

Qwen2.5-VL (window attention, RMSNorm/SwiGLU vision blocks) is not handled yet; it would subclass
:class:`Qwen2VLFamily`, add ``window_index`` / ``cu_window_seqlens`` to ``vision_feeds`` and override
:meth:`Qwen2VLFamily._vision_wrapper`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import ExportSpec, Family, Prepared

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

    IMAGE_TOKEN = "<|image_pad|>"
    END_OF_TURN = "<|im_end|>"
    END_OF_TEXT = "<|endoftext|>"

    # ------------------------------------------------------------------ preprocessing
    @classmethod
    def from_dir(cls, path):
        from transformers import AutoConfig, AutoTokenizer

        path = Path(path)
        config = AutoConfig.from_pretrained(path)
        if config.model_type not in cls.model_types:
            raise UnsupportedModelError(f"{path}: model_type '{config.model_type}' is not {cls.model_types}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = _processor_chat_template(path) or QWEN2_VL_CHAT_TEMPLATE
        return cls(config, tokenizer, _load_image_processor(path))

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise UnsupportedModelError(f"tokenizer has no {token} token")
        return int(tid)

    @property
    def stop_token_ids(self) -> list[int]:
        ids = [self._token_id(self.END_OF_TURN), self._token_id(self.END_OF_TEXT)]
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(int(eos))
        return ids

    def chat_text(self, num_images: int, prompt: str) -> str:
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def prepare(self, images, prompt, answer=None):
        images = list(images or [])
        text = self.chat_text(len(images), prompt)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        pad = self.image_token_id
        if sum(1 for i in ids if i == pad) != len(images):
            raise ValueError(
                f"chat template produced {sum(1 for i in ids if i == pad)} {self.IMAGE_TOKEN} tokens for {len(images)} images"
            )
        pixel: dict[str, np.ndarray] = {}
        grid = None
        if images:
            out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="np")
            pixel["pixel_values"] = np.ascontiguousarray(out["pixel_values"], dtype=np.float32)
            grid = np.asarray(out["image_grid_thw"], dtype=np.int64).reshape(-1, 3)
            pixel["image_grid_thw"] = grid
            counts = iter((grid.prod(-1) // self.merge_size**2).tolist())
            ids = [t for i in ids for t in ([pad] * next(counts) if i == pad else [i])]
        answer_len = 0
        if answer is not None:
            ans = list(self.tokenizer(answer, add_special_tokens=False)["input_ids"]) + [self._token_id(self.END_OF_TURN)]
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
        import transformers

        cls = getattr(transformers, self.model_class_name)
        model = cls.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation="sdpa")
        return model.eval()

    def hf_inputs(self, prepared):
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
        inputs = self.hf_inputs(prepared)
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)

    def _vision_wrapper(self, model):
        return Qwen2VLVisionWrapper(model.model.visual)

    def _vision_example(self):
        """Feeds for two images of different sizes (so neither L nor the image count is 1)."""
        vc = self.config.vision_config
        grid = np.array([[1, 6, 8], [1, 4, 4]], dtype=np.int64)
        L = int(grid.prod(-1).sum())
        dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        g = torch.Generator().manual_seed(0)
        return (
            torch.randn(L, dim, generator=g),
            torch.from_numpy(vision_position_ids(grid, self.merge_size)),
            torch.from_numpy(vision_cu_seqlens(grid)),
        )

    def export_specs(self, model):
        Dim = torch.export.Dim
        merge2 = self.merge_size**2
        patches = Dim("num_patches")
        batch, seq, past_len = Dim("batch"), Dim("seq"), Dim("past")
        feats = self._vision_example()
        vision = ExportSpec(
            name="vision_encoder",
            module=self._vision_wrapper(model).eval(),
            args=feats,
            input_names=list(VISION_INPUTS),
            output_names=["features"],
            dynamic_shapes=({0: patches}, {0: patches}, {0: Dim("num_images_plus_1")}),
        )
        with torch.no_grad():
            example_features = vision.module(*feats)
        projector = ExportSpec(
            name="projector",
            module=_Projector(self.projector(model)).eval(),
            args=(example_features,),
            input_names=["features"],
            output_names=["image_embeds"],
            dynamic_shapes=({0: merge2 * Dim("num_image_tokens")},),
        )
        B, S, P = 2, 5, 3
        embed = ExportSpec(
            name="embed_tokens",
            module=_EmbedTokens(model.get_input_embeddings()).eval(),
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


# ------------------------------------------------------------------------------------------ wrappers
def _processor_chat_template(path: Path) -> str | None:
    for name in ("chat_template.json", "processor_config.json"):
        f = path / name
        if f.is_file():
            try:
                tmpl = json.loads(f.read_text()).get("chat_template")
            except (OSError, ValueError):
                tmpl = None
            if isinstance(tmpl, str) and tmpl:
                return tmpl
    f = path / "chat_template.jinja"
    return f.read_text() if f.is_file() else None


def _load_image_processor(path: Path):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except Exception:  # e.g. an image_processor_type that needs torchvision
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(path)


class Qwen2VLVisionWrapper(nn.Module):
    """patch_embed -> rotary -> blocks with one block-diagonal SDPA per block -> features [L, embed_dim]."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values, vision_position_ids, cu_seqlens):
        visual = self.visual
        h = visual.patch_embed(pixel_values)
        cos, sin = visual.rotary_pos_emb(h, vision_position_ids)
        n = h.shape[0]
        seg = (torch.arange(n, device=h.device)[:, None] >= cu_seqlens[None, 1:]).sum(-1)
        mask = (seg[:, None] == seg[None, :])[None, None]  # [1, 1, L, L] bool, block-diagonal
        for blk in visual.blocks:
            h = h + self._attention(blk.attn, blk.norm1(h), cos, sin, mask)
            h = h + blk.mlp(blk.norm2(h))
        return h

    @staticmethod
    def _attention(attn, x, cos, sin, mask):
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, L, hd]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        return attn.proj(o.squeeze(0).transpose(0, 1).reshape(n, -1))


class _Projector(nn.Module):
    def __init__(self, merger):
        super().__init__()
        self.merger = merger

    def forward(self, features):
        return self.merger(features)


class _EmbedTokens(nn.Module):
    def __init__(self, embed):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids)


class Qwen2VLDecoderWrapper(nn.Module):
    """One graph for prefill (P = 0) and decode: flat past KV in, logits and flat present KV out.

    The attention mask is built here (additive, 0 / dtype min): key j is visible to query i iff j <= P + i and
    ``attention_mask[b, j] == 1``; every query also sees itself, so padded rows never go all-masked
    (their outputs are garbage but finite, and no real token attends to them).
    """

    def __init__(self, model):
        super().__init__()
        lm = model.model.language_model
        self.text_config = lm.config
        self.rotary_emb = lm.rotary_emb
        self.layers = lm.layers
        self.norm = lm.norm
        self.lm_head = model.lm_head

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        n = len(self.layers)
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n)], config=self.text_config)
        b, s, _ = inputs_embeds.shape
        total = attention_mask.shape[1]
        past_len = total - s
        q_pos = torch.arange(s, device=inputs_embeds.device) + past_len
        k_pos = torch.arange(total, device=inputs_embeds.device)
        causal = k_pos[None, :] <= q_pos[:, None]  # [S, T]
        mask = causal[None] & attention_mask.bool()[:, None, :]  # [B, S, T]
        mask = mask | (k_pos[None, :] == q_pos[:, None])[None]
        # additive form [B, 1, S, T]: eager attention (the export's) adds it, SDPA accepts it too
        mask = torch.zeros(mask.shape, dtype=inputs_embeds.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(inputs_embeds.dtype).min)[:, None]

        hidden = inputs_embeds
        pos_emb = self.rotary_emb(hidden, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=pos_emb, cache=cache, use_cache=True)
        logits = self.lm_head(self.norm(hidden))
        present = []
        for layer_cache in cache.layers:
            present += [layer_cache.keys, layer_cache.values]
        return (logits, *present)
