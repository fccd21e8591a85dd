"""Gemma3's torch half: the vision and decoder export wrappers (imported by ``Gemma3Family.export_specs`` only).
The projector and embed wrappers are LLaVA's and Qwen2-VL's (see ``gemma3.py`` for the graphs and the masks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .llava_torch import LlavaVisionWrapper
from .qwen2_vl_torch import Qwen2VLDecoderWrapper


class Gemma3VisionWrapper(LlavaVisionWrapper):
    """pixel_values [N, 3, S, S] -> SigLIP's last hidden state after ``post_layernorm`` [N, P, vision_hidden]."""

    def __init__(self, vision_model):
        super().__init__(vision_model, [len(vision_model.encoder.layers)], drop_cls=False)

    def forward(self, pixel_values):
        return self.vision_model.post_layernorm(super().forward(pixel_values))


class Gemma3LinearProjector(nn.Module):
    """transformers' ``Gemma3MultiModalProjector`` (average pool of the patch grid, RMSNorm, projection) with its
    projection matrix (the Parameter ``mm_input_projection_weight`` [vision_hidden, hidden], used by ``torch.matmul``)
    held as the ``nn.Linear`` ``mm_input_projection`` (weight = its transpose), so that ``--projector`` can quantize
    it; the same function (``Gemma3Family.load_model`` swaps it in)."""

    def __init__(self, projector):
        super().__init__()
        self.mm_soft_emb_norm, self.avg_pool = projector.mm_soft_emb_norm, projector.avg_pool
        self.side = int(projector.patches_per_image)
        w = projector.mm_input_projection_weight.detach()
        self.mm_input_projection = nn.Linear(w.shape[0], w.shape[1], bias=False, device=w.device, dtype=w.dtype)
        self.mm_input_projection.weight.data = w.T.contiguous()

    def forward(self, vision_outputs):
        b, _, d = vision_outputs.shape
        grid = vision_outputs.transpose(1, 2).reshape(b, d, self.side, self.side)
        pooled = self.avg_pool(grid).flatten(2).transpose(1, 2)
        return self.mm_input_projection(self.mm_soft_emb_norm(pooled)).type_as(vision_outputs)


def gemma3_masks(attention_mask, group_ids, sliding_window: int, dtype) -> dict[str, torch.Tensor]:
    """Additive masks [B, 1, S, P+S] (0 / dtype min) by layer type, as transformers' ``create_masks_for_vision_model``:
    ``full_attention``: (causal OR same image) AND ``attention_mask``; ``sliding_attention``: that AND key > query -
    ``sliding_window``. ``group_ids`` [B, S] are the new tokens' image groups (-1: text); past keys count as text.
    Every query also sees itself, so padded rows never go all-masked (as in ``Qwen2VLDecoderWrapper``).

    The window counts a row's tokens (the columns whose ``attention_mask`` is 1), not cache columns: a batched
    cache may hold a row's tokens with padding columns between them (``runtime.generate.BatchDecoder``), and the
    row must see what it sees alone. Without padding the two are the same (transformers' index arithmetic)."""
    s, total = group_ids.shape[1], attention_mask.shape[1]
    q = torch.arange(s, device=group_ids.device) + (total - s)
    k = torch.arange(total, device=group_ids.device)
    key_groups = F.pad(group_ids, (total - s, 0), value=-1)
    same_image = (group_ids[:, :, None] == key_groups[:, None, :]) & (group_ids[:, :, None] >= 0)
    allowed = ((k[None, :] <= q[:, None])[None] | same_image) & attention_mask.bool()[:, None, :]
    itself = (k[None, :] == q[:, None])[None]
    token = torch.cumsum(attention_mask, dim=1) - 1  # [B, P+S]: each column's index among its row's tokens
    in_window = token[:, None, :] > token[:, total - s:, None] - sliding_window
    out = {}
    for kind, mask in (("full_attention", allowed | itself), ("sliding_attention", (allowed & in_window) | itself)):
        out[kind] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)[:, None]
    return out


class Gemma3DecoderWrapper(Qwen2VLDecoderWrapper):
    """``Qwen2VLDecoderWrapper``'s graph with ``image_group_ids`` [B, S] after ``position_ids``; each layer gets its
    type's mask and RoPE (local base for sliding layers). The cache is a full one in every layer (see ``gemma3.py``)."""

    def __init__(self, model):
        super().__init__(model)
        self.layer_types = list(self.text_config.layer_types)
        self.sliding_window = int(self.text_config.sliding_window)

    def forward(self, inputs_embeds, attention_mask, position_ids, image_group_ids, *past):
        from transformers import DynamicCache

        # no config: DynamicCache(config=...) would give the sliding layers a cache of sliding_window - 1 entries
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(len(self.layers))])
        masks = gemma3_masks(attention_mask, image_group_ids, self.sliding_window, inputs_embeds.dtype)
        hidden = inputs_embeds
        rope = {t: self.rotary_emb(hidden, position_ids, t) for t in sorted(set(self.layer_types))}
        for layer, kind in zip(self.layers, self.layer_types):
            hidden = layer(hidden, attention_mask=masks[kind], position_embeddings=rope[kind], cache=cache, use_cache=True)
        logits = self.lm_head(self.norm(hidden))
        present = []
        for layer_cache in cache.layers:
            present += [layer_cache.keys, layer_cache.values]
        return (logits, *present)
