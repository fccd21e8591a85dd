"""LLaVA-NeXT ("llava_next") and LLaVA-OneVision ("llava_onevision"): LLaVA with anyres tiling.

Each image becomes a base image (the whole image squashed to one tile) plus the tiles of the resolution
``select_best_resolution`` picks from ``image_grid_pinpoints`` (the image resized into it, centred, zero
padded). The graphs are LLaVA-1.5's (``llava.py``) with one difference: the ``projector`` emits the
model's ``image_newline`` vector as one more, last, row of ``image_embeds`` ([tiles * P + 1, hidden]).

Packing -- what transformers' ``pack_image_features`` does between the projector and the embedding
splice -- lives in this torch-free half (:meth:`LlavaNextFamily.pack_image_features`, numpy, a mirror of
transformers): the tiles' features are put back into the image's grid, the padding is cut off
(``unpad_image``: the original aspect ratio), OneVision downscales grids with more than
``anyres_max_N`` tiles' worth of features (bilinear, as ``F.interpolate(align_corners=False)``),
``image_newline`` ends every row, and the base tile's features come first. An image of one tile
(OneVision's multi-image prompts: each image padded to a square, not tiled) is its features plus one
``image_newline``. The number of image tokens per image comes from the same geometry
(:meth:`LlavaNextFamily.packed_shape`), so prompt and features always agree.
"""
from __future__ import annotations

import math

import numpy as np

from .llava import ClipImageProcessor, LlavaFamily
from .processing import resize, rgb_array


def select_best_resolution(original_size, possible_resolutions) -> tuple[int, int]:
    """(height, width) of the pinpoint that keeps the most of the image and wastes the least (transformers'
    ``select_best_resolution``)."""
    oh, ow = (int(v) for v in original_size)
    best, best_eff, best_waste = None, 0, float("inf")
    for height, width in possible_resolutions:
        scale = min(width / ow, height / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = width * height - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(height), int(width)), eff, waste
    return best


def unpad_box(height: int, width: int, orig_height: int, orig_width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the part of a [height, width] grid that is the image of size
    (orig_height, orig_width), not padding (transformers' ``unpad_image``)."""
    if orig_width / orig_height > width / height:
        new_height = int(round(orig_height * (width / orig_width), 7))
        pad = (height - new_height) // 2
        return pad, height - pad, 0, width
    new_width = int(round(orig_width * (height / orig_height), 7))
    pad = (width - new_width) // 2
    return 0, height, pad, width - pad


def bilinear_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, H, W] float32 -> [C, height, width], as ``F.interpolate(mode="bilinear", align_corners=False)`` with
    an output size (float32 source coordinates, edge-clamped)."""
    def axis(n_in, n_out):
        scale = np.float32(n_in / n_out)
        src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
        i0 = src.astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        l1 = (src - i0).astype(np.float32)
        return i0, i1, np.float32(1) - l1, l1

    h0, h1, hl0, hl1 = axis(x.shape[1], height)
    w0, w1, wl0, wl1 = axis(x.shape[2], width)
    top = x[:, h0][:, :, w0] * wl0 + x[:, h0][:, :, w1] * wl1
    bottom = x[:, h1][:, :, w0] * wl0 + x[:, h1][:, :, w1] * wl1
    return (top * hl0[:, None] + bottom * hl1[:, None]).astype(np.float32)


class AnyresImageProcessor(ClipImageProcessor):
    """numpy and Pillow mirror of transformers' ``LlavaNextImageProcessorPil`` and
    ``LlavaOnevisionImageProcessorPil``: per image the base tile and the anyres tiles (or, not tiled, the
    image padded to a square with the mean colour), each through :meth:`ClipImageProcessor.process`;
    ``pixel_values`` [N, max tiles, 3, T, T] (zero tiles pad the shorter images) and ``image_sizes`` [N, 2]."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.pinpoints = [list(map(int, p)) for p in cfg.get("image_grid_pinpoints") or []]
        self.do_pad = bool(cfg.get("do_pad", True))

    def tiles(self, x: np.ndarray) -> list[np.ndarray]:
        """uint8 [H, W, 3] -> the base image and the anyres tiles (uint8, before ``process``)."""
        h, w = x.shape[:2]
        bh, bw = select_best_resolution((h, w), self.pinpoints)
        if bw / w < bh / h:  # get_patch_output_size
            nh, nw = min(math.ceil(h * bw / w), bh), bw
        else:
            nh, nw = bh, min(math.ceil(w * bh / h), bw)
        py, px = divmod(bh - nh, 2), divmod(bw - nw, 2)
        padded = np.pad(resize(x, nh, nw, self.resample),
                        ((py[0], py[0] + py[1]), (px[0], px[0] + px[1]), (0, 0)))
        t = self.crop
        tiles = [padded[i:i + t, j:j + t] for i in range(0, bh, t) for j in range(0, bw, t)]
        return [resize(x, *self.square, self.resample)] + tiles

    def pad_to_square(self, x: np.ndarray) -> np.ndarray:
        h, w = x.shape[:2]
        if h == w:
            return x
        side = max(h, w)
        out = np.empty((side, side, x.shape[2]), dtype=x.dtype)
        out[:] = np.asarray([int(m * 255) for m in self.normalize.image_mean], dtype=x.dtype)
        top, left = (side - h) // 2 if w > h else 0, (side - w) // 2 if h >= w else 0
        out[top:top + h, left:left + w] = x
        return out

    def __call__(self, images: list, tile: list[bool] | None = None) -> dict[str, np.ndarray]:
        arrays = [rgb_array(im) for im in images]
        tile = [True] * len(arrays) if tile is None else tile
        per_image = [np.stack([self.process(t) for t in (self.tiles(x) if tl else [self.pad_to_square(x)])])
                     for x, tl in zip(arrays, tile)]
        if self.do_pad:
            most = max(len(p) for p in per_image)
            per_image = [np.pad(p, ((0, most - len(p)), (0, 0), (0, 0), (0, 0))) for p in per_image]
        return {"pixel_values": np.stack(per_image).astype(np.float32),
                "image_sizes": np.asarray([x.shape[:2] for x in arrays], dtype=np.int64)}


class LlavaNextFamily(LlavaFamily):
    name = "llava_next"
    model_types = ("llava_next",)
    model_class_name = "LlavaNextForConditionalGeneration"
    image_processor_class = AnyresImageProcessor

    # ------------------------------------------------------------------ geometry (numpy)
    @property
    def pinpoints(self) -> list[list[int]]:
        return [list(map(int, p)) for p in self.config.image_grid_pinpoints]

    def tiled(self, num_images: int) -> list[bool]:
        """Which images of a prompt are tiled (LLaVA-NeXT: all)."""
        return [True] * num_images

    def tile_grid(self, image_size) -> tuple[int, int]:
        """(rows, columns) of anyres tiles of an image of (height, width)."""
        tile = int(self.config.vision_config.image_size)
        bh, bw = select_best_resolution(image_size, self.pinpoints)
        return bh // tile, bw // tile

    def downscaled(self, rows: int, cols: int) -> tuple[int, int]:
        """The packed grid's size after the family's downscale rule (LLaVA-NeXT: none)."""
        return rows, cols

    def packed_shape(self, image_size, tiled: bool) -> tuple[int, int]:
        """(rows, columns) of the packed, unpadded feature grid of one image ((0, 0) when not tiled)."""
        if not tiled:
            return 0, 0
        side = self.patch_side
        gh, gw = self.tile_grid(image_size)
        top, bottom, left, right = unpad_box(gh * side, gw * side, *(int(v) for v in image_size))
        return self.downscaled(bottom - top, right - left)

    def image_token_count(self, image_size, tiled: bool) -> int:
        rows, cols = self.packed_shape(image_size, tiled)
        return self.tokens_per_tile + (rows * (cols + 1) if tiled else 1)

    def tile_counts(self, prepared) -> list[int]:
        sizes = prepared.pixel["image_sizes"]
        return [1 + int(np.prod(self.tile_grid(s))) if t else 1 for s, t in zip(sizes, self.tiled(len(sizes)))]

    # ------------------------------------------------------------------ preprocessing
    def process_images(self, images):
        tiled = self.tiled(len(images))
        pixel = self.processor.image_processor(images, tiled)
        return pixel, [self.image_token_count(s, t) for s, t in zip(pixel["image_sizes"], tiled)]

    def vision_feeds(self, prepared):
        if "pixel_values" not in prepared.pixel:
            raise ValueError("this prompt has no images: there is nothing to feed the vision encoder")
        pv = prepared.pixel["pixel_values"]
        tiles = np.concatenate([pv[i, :n] for i, n in enumerate(self.tile_counts(prepared))])
        return {"pixel_values": np.ascontiguousarray(tiles, dtype=np.float32)}

    def downscale(self, grid: np.ndarray) -> np.ndarray:
        rows, cols = self.downscaled(*grid.shape[1:])
        return grid if (rows, cols) == grid.shape[1:] else bilinear_resize(grid, rows, cols)

    def pack_image_features(self, prepared, image_embeds):
        """The projector's rows (tiles' features, then ``image_newline``) -> one row per image token (module doc)."""
        hidden = image_embeds.shape[-1]
        newline, side = image_embeds[-1], self.patch_side
        tiles = image_embeds[:-1].reshape(-1, self.tokens_per_tile, hidden)
        sizes = prepared.pixel["image_sizes"]
        out, start = [], 0
        for size, tiled, n in zip(sizes, self.tiled(len(sizes)), self.tile_counts(prepared)):
            feats, start = tiles[start:start + n], start + n
            if not tiled:
                out += [feats[0], newline[None]]
                continue
            gh, gw = self.tile_grid(size)
            grid = feats[1:].reshape(gh, gw, side, side, hidden).transpose(4, 0, 2, 1, 3).reshape(hidden, gh * side, gw * side)
            top, bottom, left, right = unpad_box(gh * side, gw * side, *(int(v) for v in size))
            grid = self.downscale(np.ascontiguousarray(grid[:, top:bottom, left:right]))
            grid = np.concatenate([grid, np.broadcast_to(newline[:, None, None], (hidden, grid.shape[1], 1))], axis=-1)
            out += [feats[0], grid.reshape(hidden, -1).T]
        if start != tiles.shape[0]:
            raise ValueError(f"{tiles.shape[0]} tiles of image features for the {start} tiles of the prompt's images")
        return np.concatenate(out).astype(image_embeds.dtype, copy=False)


class LlavaOnevisionFamily(LlavaNextFamily):
    """OneVision: SigLIP tower, Qwen2 decoder; tiles only a prompt's single image (several images are each padded
    to a square and not tiled), downscales big grids (``vision_aspect_ratio`` "anyres_max_N")."""

    name = "llava_onevision"
    model_types = ("llava_onevision",)
    model_class_name = "LlavaOnevisionForConditionalGeneration"
    ANSWER_PREFIX = ""
    END_OF_TURN = "<|im_end|>"

    def tiled(self, num_images):
        return [num_images == 1] * num_images

    def downscaled(self, rows, cols):
        # int(vision_aspect_ratio.strip("anyres_max_")) as transformers reads it
        most = int(str(getattr(self.config, "vision_aspect_ratio", "anyres_max_9")).strip("anyres_max_"))
        ratio = math.sqrt(rows * cols / (most * self.patch_side**2))
        return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)

    def process_images(self, images):
        pixel, counts = super().process_images(images)
        pixel["batch_num_images"] = np.asarray([len(images)], dtype=np.int64)
        return pixel, counts
