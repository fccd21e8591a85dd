"""Qwen3-VL: :class:`Qwen2VLFamily` with a learned vision position table, deepstack features and Qwen3's decoder.

What is shared with Qwen2-VL (and reused from ``qwen2_vl.py``): the image processor (transformers maps
``qwen3_vl`` to ``Qwen2VLImageProcessor``; only its config differs: patch 16, so images are resized to
multiples of 32, and mean/std 0.5), the token expansion, the vision rotary ids and ``cu_seqlens``, and the
M-RoPE prefill positions (Qwen3-VL's ``get_rope_index`` differs from Qwen2-VL's only for videos, whose
grids it splits frame by frame for the timestamps; images only here). What differs:

* the chat template (no default system turn);
* the vision tower adds a learned position embedding, a ``num_grid_per_side``² table bilinearly resampled
  (align_corners) to each image's grid; its gather indices and weights are computed here in numpy
  (:func:`pos_embed_interpolation`, a mirror of ``transformers.vision_utils.
  get_vision_interpolation_indices_and_weights``) and fed to the graph, as Qwen2.5-VL feeds its window index;
* deepstack: the outputs of the vision blocks in ``deepstack_visual_indexes`` go through their own mergers,
  and the decoder adds those rows to its hidden states at the image tokens after its first
  ``len(deepstack_visual_indexes)`` layers;
* the decoder (q/k RMSNorm, interleaved M-RoPE): transformers' own modules inside the same wrapper.

Graphs (see ``base.py``)::

    vision_encoder  pixel_values [L, C*T*p*p], vision_position_ids [L, 2], cu_seqlens [N+1],
                    pos_embed_index int64 [L, 4], pos_embed_weight float32 [L, 4]
                    -> features [1 + D, L, embed_dim]: the last block's output, then the D deepstack blocks'
    projector       features -> image_embeds [L / merge², hidden] (visual.merger of features[0]),
                                deepstack_embeds [D, L / merge², hidden] (deepstack merger j of features[1 + j])
    embed_tokens    as Qwen2-VL
    llm             inputs_embeds, attention_mask, position_ids [3, B, S], deepstack_embeds [D, B, S, hidden]
                    (zero rows off the image tokens; all zeros at decode), past_key_i / past_value_i -> as Qwen2-VL

Why the split lies there: the projector graph holds exactly the mergers (every Linear after the vision blocks,
what ``--projector`` quantizes) and the vision graph exactly the blocks (``--vision``); stacking the
intermediate block outputs into the one ``features`` tensor keeps the fixed ``features`` -> projector
contract that the runtime, the per-component validation and the TensorRT profiles rely on. The deepstack
rows become ``llm`` inputs in numpy (:meth:`Qwen3VLFamily.llm_prefill_feeds`). Torch-free at import.
"""
from __future__ import annotations

import numpy as np

from .base import Processor
from .processing import Config, Tokenizer
from .qwen2_vl import VISION_INPUTS, Qwen2VLFamily, Qwen2VLImageProcessor

QWEN3_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def pos_embed_interpolation(grid_thw: np.ndarray, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """``pos_embed_index`` int64 [L, 4] and ``pos_embed_weight`` float32 [L, 4]: the bilinear (align_corners)
    taps into the flattened ``side`` x ``side`` position table for every patch, patches in merge-block order,
    repeated per frame. numpy mirror of ``transformers.vision_utils.get_vision_interpolation_indices_and_weights``
    (mode "bilinear", align_corners=True), in the same float32 arithmetic."""
    index, weight = [], []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist():
        within = np.arange(h * w)
        row = (within // (merge * merge * (w // merge))) * merge + (within // merge) % merge
        col = ((within // (merge * merge)) % (w // merge)) * merge + within % merge

        def taps(pos, size):
            src = pos.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
            floor = np.floor(src)
            offsets = np.arange(2)
            wts = np.clip(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0, None)
            return np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1), wts.astype(np.float32)

        (ht, hw), (wt, ww) = taps(row, h), taps(col, w)
        index.append(np.tile((ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4), (t, 1)))
        weight.append(np.tile((hw[:, :, None] * ww[:, None, :]).reshape(-1, 4), (t, 1)))
    return np.concatenate(index).astype(np.int64), np.concatenate(weight).astype(np.float32)


class Qwen3VLFamily(Qwen2VLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    model_class_name = "Qwen3VLForConditionalGeneration"
    vision_inputs = VISION_INPUTS + ["pos_embed_index", "pos_embed_weight"]

    @classmethod
    def processor_from_dir(cls, path):
        return Processor(Config.from_dir(path), Tokenizer.from_dir(path, QWEN3_VL_CHAT_TEMPLATE),
                         Qwen2VLImageProcessor.from_dir(path))

    @classmethod
    def hf_from_dir(cls, path):
        """Qwen2-VL's, the chat template the torch-free half reads (Qwen3-VL's where the directory carries none)."""
        config, tokenizer, image_processor = super().hf_from_dir(path)
        tokenizer.chat_template = Tokenizer.from_dir(path, QWEN3_VL_CHAT_TEMPLATE).chat_template
        return config, tokenizer, image_processor

    @property
    def num_deepstack(self) -> int:
        return len(self.config.vision_config.deepstack_visual_indexes)

    def _pos_embed_interpolation(self, grid) -> tuple[np.ndarray, np.ndarray]:
        vc = self.config.vision_config
        return pos_embed_interpolation(grid, int(int(vc.num_position_embeddings) ** 0.5), self.merge_size)

    def vision_feeds(self, prepared):
        feeds = super().vision_feeds(prepared)
        feeds["pos_embed_index"], feeds["pos_embed_weight"] = self._pos_embed_interpolation(
            prepared.pixel["image_grid_thw"])
        return feeds

    def llm_prefill_feeds(self, prepared, projector_outputs):
        """``deepstack_embeds`` [D, 1, S, hidden]: the deepstack merger rows at the image tokens, zeros elsewhere."""
        out = np.zeros((self.num_deepstack, 1, prepared.seq_len, self.hidden_size), np.float32)
        if projector_outputs is not None and prepared.image_mask.any():
            out[:, prepared.image_mask] = projector_outputs["deepstack_embeds"]
        return {"deepstack_embeds": out}

    def llm_decode_feeds(self, batch):
        return {"deepstack_embeds": np.zeros((self.num_deepstack, batch, 1, self.hidden_size), np.float32)}

    # ------------------------------------------------------------------ torch half
    def projectors(self, model) -> list:
        """The projector component's modules, side by side (calibration quantizes each on its own inputs):
        ``visual.merger`` (``projector``, whose output the saliency factors are of) and the deepstack mergers
        (weighted by the same factors: their rows are the same image tokens)."""
        return [self.projector(model), *model.model.visual.deepstack_merger_list]

    def _vision_wrapper(self, model):
        from .qwen3_vl_torch import Qwen3VLVisionWrapper

        return Qwen3VLVisionWrapper(model.model.visual)

    def _vision_example(self):
        import torch

        index, weight = self._pos_embed_interpolation(self.EXAMPLE_GRID)
        return (*super()._vision_example(), torch.from_numpy(index), torch.from_numpy(weight))

    def _vision_dynamic_shapes(self):
        shapes = super()._vision_dynamic_shapes()
        return (*shapes, shapes[0], shapes[0])

    def export_specs(self, model):
        import dataclasses

        import torch

        from .qwen3_vl_torch import Qwen3VLDecoderWrapper, Qwen3VLProjectorWrapper

        vision, projector, embed, llm = super().export_specs(model)
        tokens = projector.dynamic_shapes[0][0]
        projector = dataclasses.replace(
            projector, module=Qwen3VLProjectorWrapper(model.model.visual).eval(),
            output_names=["image_embeds", "deepstack_embeds"], dynamic_shapes=({1: tokens},))
        batch, seq = llm.dynamic_shapes["inputs_embeds"][0], llm.dynamic_shapes["inputs_embeds"][1]
        b, s, h = llm.args[0].shape
        deepstack = torch.randn(self.num_deepstack, b, s, h, generator=torch.Generator().manual_seed(1))
        n_fixed = 3  # inputs_embeds, attention_mask, position_ids
        llm = dataclasses.replace(
            llm, module=Qwen3VLDecoderWrapper(model).eval(),
            args=(*llm.args[:n_fixed], deepstack, *llm.args[n_fixed:]),
            input_names=[*llm.input_names[:n_fixed], "deepstack_embeds", *llm.input_names[n_fixed:]],
            dynamic_shapes={**llm.dynamic_shapes, "deepstack_embeds": {1: batch, 2: seq}})
        return [vision, projector, embed, llm]
