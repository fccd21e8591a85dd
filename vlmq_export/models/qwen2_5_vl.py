"""Qwen2.5-VL: :class:`Qwen2VLFamily` with the vision tower's window attention.

Qwen2.5-VL keeps Qwen2-VL's language model (M-RoPE), image processor, chat format and merger role; its
vision blocks are RMSNorm/SwiGLU and most of them attend only inside windows of
``window_size // merge // patch`` merge blocks per side (the blocks in ``fullatt_block_indexes`` attend
over the whole image). transformers permutes the merge blocks window by window before the blocks and
un-permutes the merger's output. Graphs as Qwen2-VL's, the vision encoder taking two more inputs:

``vision_encoder``  ``pixel_values``, ``vision_position_ids``, ``cu_seqlens`` (as Qwen2-VL),
                    ``window_index`` int64 [L / merge²] (the window order of the merge blocks),
                    ``cu_window_seqlens`` int64 [W+1] (patch offsets of the windows, in window order)
                    -> ``features`` [L, embed_dim] in the original (un-permuted) patch order, so the
                    ``projector`` (``visual.merger``) and everything after it is Qwen2-VL's.

``window_index`` and ``cu_window_seqlens`` are computed in numpy (:func:`vision_window_index`, a mirror
of ``transformers.vision_utils.get_vision_window_index``). Torch-free at import, like ``qwen2_vl.py``.
"""
from __future__ import annotations

import numpy as np

from .qwen2_vl import VISION_INPUTS, Qwen2VLFamily


def vision_window_index(grid_thw: np.ndarray, merge: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``window_index`` int64 [L / merge²] and ``cu_window_seqlens`` int64 [W+1] of the images of ``grid_thw``.

    numpy mirror of ``transformers.vision_utils.get_vision_window_index`` (which returns int32 offsets): the
    merge blocks of each frame are cut into windows of ``window_size // merge // patch_size`` blocks per
    side (the grid padded up, by a whole window where it divides evenly), read window by window; empty
    windows give repeated offsets, which are dropped.
    """
    win = window_size // merge // patch_size
    unit = merge**2
    index, cu, offset = [], [0], 0
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist():
        gh, gw = h // merge, w // merge
        pad_h, pad_w = win - gh % win, win - gw % win
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        padded = np.pad(np.arange(t * gh * gw).reshape(t, gh, gw), ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        seqlens = (padded != -100).sum((2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * gh * gw
    cu = np.asarray(cu, dtype=np.int64)
    cu = cu[np.concatenate([[True], cu[1:] != cu[:-1]])]
    return np.concatenate(index).astype(np.int64), cu


class Qwen2_5_VLFamily(Qwen2VLFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    vision_inputs = VISION_INPUTS + ["window_index", "cu_window_seqlens"]

    def _window_index(self, grid) -> tuple[np.ndarray, np.ndarray]:
        vc = self.config.vision_config
        return vision_window_index(grid, self.merge_size, int(vc.window_size), int(vc.patch_size))

    def vision_feeds(self, prepared):
        feeds = super().vision_feeds(prepared)
        feeds["window_index"], feeds["cu_window_seqlens"] = self._window_index(prepared.pixel["image_grid_thw"])
        return feeds

    # ------------------------------------------------------------------ torch half
    def _vision_wrapper(self, model):
        from .qwen2_5_vl_torch import Qwen2_5_VLVisionWrapper

        return Qwen2_5_VLVisionWrapper(model.model.visual)

    def _vision_example(self):
        import torch

        window_index, cu_window = self._window_index(self.EXAMPLE_GRID)
        return (*super()._vision_example(), torch.from_numpy(window_index), torch.from_numpy(cu_window))

    def _vision_dynamic_shapes(self):
        import torch

        Dim = torch.export.Dim
        blocks = Dim("num_merge_blocks")
        patches = self.merge_size**2 * blocks
        return ({0: patches}, {0: patches}, {0: Dim("num_images_plus_1")}, {0: blocks}, {0: Dim("num_windows_plus_1")})
