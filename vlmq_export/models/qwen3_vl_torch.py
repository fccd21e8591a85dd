"""Qwen3-VL's torch half: the export wrappers (imported by the family's export specs only)."""
from __future__ import annotations

import torch
from torch import nn

from .qwen2_vl_torch import Qwen2VLDecoderWrapper, Qwen2VLVisionWrapper, segment_mask


class Qwen3VLVisionWrapper(Qwen2VLVisionWrapper):
    """patch_embed + the interpolated learned position embedding -> 2-D rotary -> blocks (one block-diagonal SDPA
    each) -> features [1 + D, L, embed_dim]: the last block's output, then those of the deepstack blocks."""

    def forward(self, pixel_values, vision_position_ids, cu_seqlens, pos_embed_index, pos_embed_weight):
        visual = self.visual
        h = visual.patch_embed(pixel_values)
        h = h + (visual.pos_embed(pos_embed_index) * pos_embed_weight[:, :, None]).sum(1).to(h.dtype)
        cos, sin = visual.rotary_pos_emb(h, vision_position_ids)
        mask = segment_mask(cu_seqlens, h.shape[0])
        deepstack = []
        for i, blk in enumerate(visual.blocks):
            h = h + self._attention(blk.attn, blk.norm1(h), cos, sin, mask)
            h = h + blk.mlp(blk.norm2(h))
            if i in visual.deepstack_visual_indexes:
                deepstack.append(h)
        return torch.stack([h, *deepstack])


class Qwen3VLProjectorWrapper(nn.Module):
    """features [1 + D, L, embed_dim] -> image_embeds [L / merge², hidden] (``visual.merger``) and
    deepstack_embeds [D, L / merge², hidden] (``visual.deepstack_merger_list``)."""

    def __init__(self, visual):
        super().__init__()
        self.merger = visual.merger
        self.deepstack_mergers = visual.deepstack_merger_list

    def forward(self, features):
        deepstack = [m(features[1 + j]) for j, m in enumerate(self.deepstack_mergers)]
        return self.merger(features[0]), torch.stack(deepstack)


class _DeepstackLayer(nn.Module):
    """A decoder layer followed by the addition of deepstack row ``index`` (zeros off the image tokens, so adding
    everywhere is HF's masked addition exactly)."""

    def __init__(self, layer, index: int, feed: dict):
        super().__init__()
        self.layer, self.index, self.feed = layer, index, feed

    def forward(self, hidden, **kwargs):
        return self.layer(hidden, **kwargs) + self.feed["deepstack_embeds"][self.index]


class Qwen3VLDecoderWrapper(Qwen2VLDecoderWrapper):
    """Qwen2-VL's decoder graph (Qwen3's layers: q/k norms; its rotary: interleaved M-RoPE) with one more input,
    ``deepstack_embeds`` [D, B, S, hidden], added to the hidden states after decoder layers 0..D-1."""

    def __init__(self, model):
        super().__init__(model)
        self._feed: dict = {}
        n = len(model.config.vision_config.deepstack_visual_indexes)
        self.layers = nn.ModuleList([_DeepstackLayer(layer, i, self._feed) if i < n else layer
                                     for i, layer in enumerate(self.layers)])

    def forward(self, inputs_embeds, attention_mask, position_ids, deepstack_embeds, *past):
        self._feed["deepstack_embeds"] = deepstack_embeds
        try:
            return super().forward(inputs_embeds, attention_mask, position_ids, *past)
        finally:
            self._feed.clear()
