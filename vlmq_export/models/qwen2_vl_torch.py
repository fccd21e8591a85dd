"""Qwen2-VL's torch half: the export wrappers (imported by ``Qwen2VLFamily.export_specs`` only, so that
``qwen2_vl.py`` and the runtime never import torch)."""
from __future__ import annotations

import torch
from torch import nn


def segment_mask(cu_seqlens, n):
    """[1, 1, n, n] bool block-diagonal mask: positions attend within their ``cu_seqlens`` segment."""
    seg = (torch.arange(n, device=cu_seqlens.device)[:, None] >= cu_seqlens[None, 1:]).sum(-1)
    return (seg[:, None] == seg[None, :])[None, None]


class Qwen2VLVisionWrapper(nn.Module):
    """patch_embed -> rotary -> blocks with one block-diagonal SDPA per block -> features [L, embed_dim]."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values, vision_position_ids, cu_seqlens):
        h = self.visual.patch_embed(pixel_values)
        cos, sin = self.visual.rotary_pos_emb(h, vision_position_ids)
        mask = segment_mask(cu_seqlens, h.shape[0])
        return self._blocks(h, cos, sin, [mask] * len(self.visual.blocks))

    def _blocks(self, h, cos, sin, masks):
        """The vision blocks, block i attending under ``masks[i]``."""
        for blk, mask in zip(self.visual.blocks, masks):
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


class ProjectorWrapper(nn.Module):
    def __init__(self, merger):
        super().__init__()
        self.merger = merger

    def forward(self, features):
        return self.merger(features)


class EmbedTokensWrapper(nn.Module):
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
