"""Qwen2.5-VL's torch half: the vision wrapper with window attention (imported by the family's export
specs only)."""
from __future__ import annotations

from .qwen2_vl_torch import Qwen2VLVisionWrapper, segment_mask


class Qwen2_5_VLVisionWrapper(Qwen2VLVisionWrapper):
    """patch_embed -> merge blocks (and rotary) permuted into window order -> blocks (windowed or full
    block-diagonal SDPA, as ``fullatt_block_indexes`` says) -> un-permuted features [L, embed_dim]."""

    def forward(self, pixel_values, vision_position_ids, cu_seqlens, window_index, cu_window_seqlens):
        visual = self.visual
        unit = visual.spatial_merge_unit

        def to_windows(t):  # [L, D] rows regrouped merge block by merge block in window order
            return t.reshape(-1, unit, t.shape[-1])[window_index].reshape(-1, t.shape[-1])

        h = visual.patch_embed(pixel_values)
        cos, sin = (to_windows(t) for t in visual.rotary_pos_emb(h, vision_position_ids))
        h = to_windows(h)
        n = h.shape[0]
        # the window order keeps each image's patches inside its own cu_seqlens segment
        full, windowed = segment_mask(cu_seqlens, n), segment_mask(cu_window_seqlens, n)
        masks = [full if i in visual.fullatt_block_indexes else windowed for i in range(len(visual.blocks))]
        h = self._blocks(h, cos, sin, masks).reshape(-1, unit, h.shape[-1])
        return h.new_zeros(h.shape).index_put((window_index,), h).reshape(n, -1)
