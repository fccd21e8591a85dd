"""Gemma3 (``model_type`` "gemma3"): SigLIP vision tower, pooling projector, Gemma3 decoder with sliding and global layers.

Graphs (roles fixed in ``base.py``):

``vision_encoder``  ``pixel_values`` float32 [N, 3, S, S] (one square image each) -> ``features`` [N, P, vision_hidden]:
                    SigLIP's last hidden state, after its ``post_layernorm`` (transformers' ``last_hidden_state``)
``projector``       ``features`` -> ``image_embeds`` [N * T, hidden]: ``Gemma3MultiModalProjector`` (average pool of the
                    patch grid to T = ``mm_tokens_per_image`` tokens, RMSNorm, the projection matrix)
``embed_tokens``    as every family; Gemma's embedding scale sqrt(hidden) is inside (transformers'
                    ``Gemma3TextScaledWordEmbedding``); image embeddings are not scaled (spliced after it, as in HF)
``llm``             1-D ``position_ids`` [B, S], plus ``image_group_ids`` int64 [B, S]: k for the tokens of the k-th
                    image of the row, -1 elsewhere (:func:`image_group_ids`, transformers'
                    ``get_block_sequence_ids_for_mask`` of ``token_type_ids``), from ``llm_prefill_feeds`` /
                    ``llm_decode_feeds``

Attention in ``llm`` (``gemma3_torch.gemma3_masks``), as transformers' ``create_masks_for_vision_model``: global layers
see causal OR same-image keys (the soft tokens of one image attend to each other in both directions during the
prefill); sliding layers the same AND the row's last ``sliding_window`` tokens (padding columns of a batched cache
not counted); both AND ``attention_mask``. Sliding layers use the local RoPE base
(``rope_parameters["sliding_attention"]``), global layers the global one. The new token of a decode step is never an image token (group -1), and the keys of the past count as text: a prefill is
never split inside an image. **The KV cache keeps every position** in every layer (a full cache, not transformers'
sliding-window cache of ``sliding_window - 1`` entries): the sliding layers mask the older keys, which is exact, at
the price of memory that grows with the context in the sliding layers too.

Preprocessing mirrors transformers' ``Gemma3Processor`` and PIL ``Gemma3ImageProcessor``: each ``<start_of_image>``
of the rendered chat template becomes ``"\\n\\n<start_of_image>" + T x "<image_soft_token>" + "<end_of_image>\\n\\n"``
before tokenizing; images are resized to ``size`` (bilinear), rescaled and normalized. **Pan-and-scan is off** (as in
the processor's defaults); an image processor config that turns it on is refused.

The projector's projection is a Parameter in transformers (``mm_input_projection_weight``, applied by ``torch.matmul``),
not an ``nn.Linear``: ``load_model`` swaps in ``gemma3_torch.Gemma3LinearProjector``, the same function with that
matrix as an ``nn.Linear`` (``multi_modal_projector.mm_input_projection``), so ``--projector`` quantizes it like any
family's projector Linears.

This module is torch-free at import; the export wrappers are in ``gemma3_torch.py``.
"""
from __future__ import annotations

import numpy as np

from ..errors import PromptError, UnsupportedModelError
from .base import Prepared
from .llava import ClipImageProcessor, LlavaFamily

BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"
IMAGE_SOFT_TOKEN = "<image_soft_token>"
LLM_EXTRA_INPUT = "image_group_ids"

# google/gemma-3-4b-it's chat template (tokenizer_config.json); used when the directory carries none.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


def image_group_ids(image_mask: np.ndarray) -> np.ndarray:
    """int64 [B, S]: k for the tokens of the k-th run of image tokens of a row (from 0), -1 elsewhere (transformers'
    ``get_block_sequence_ids_for_mask`` of ``token_type_ids`` = ``image_mask``)."""
    m = np.asarray(image_mask, dtype=bool)
    start = m & ~np.pad(m, ((0, 0), (1, 0)))[:, :-1]
    return np.where(m, np.cumsum(start, axis=1) - 1, -1).astype(np.int64)


class Gemma3ImageProcessor(ClipImageProcessor):
    """numpy and Pillow mirror of transformers' ``Gemma3ImageProcessorPil`` without pan-and-scan: resize to ``size``
    (bilinear by default), rescale, normalize (mean and std 0.5 by default); no crop."""

    DEFAULTS = {"size": {"height": 224, "width": 224}, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}

    def __init__(self, cfg: dict):
        if cfg.get("do_pan_and_scan"):
            raise UnsupportedModelError("Gemma3 pan-and-scan (do_pan_and_scan in preprocessor_config.json) is not "
                                        "supported: set it to false")
        super().__init__({**cfg, **{k: v for k, v in self.DEFAULTS.items() if cfg.get(k) is None}, "crop_size": None})


class Gemma3Family(LlavaFamily):
    name = "gemma3"
    model_types = ("gemma3",)
    model_class_name = "Gemma3ForConditionalGeneration"
    image_processor_class = Gemma3ImageProcessor
    DEFAULT_CHAT_TEMPLATE = GEMMA3_CHAT_TEMPLATE
    ANSWER_PREFIX = ""
    END_OF_TURN = "<end_of_turn>"

    # ------------------------------------------------------------------ preprocessing
    @property
    def image_sequence(self) -> str:
        """What each ``<start_of_image>`` of the rendered prompt becomes (transformers' ``full_image_sequence``)."""
        return f"\n\n{BOI_TOKEN}{IMAGE_SOFT_TOKEN * int(self.config.mm_tokens_per_image)}{EOI_TOKEN}\n\n"

    @property
    def stop_token_ids(self) -> list[int]:
        return sorted(set(super().stop_token_ids) | {self._end_of_turn_id()})

    def prepare(self, images, prompt, answer=None):
        images = list(images or [])
        text = self.chat_text(len(images), prompt)
        if text.count(BOI_TOKEN) != len(images):
            raise PromptError(f"the prompt has {text.count(BOI_TOKEN)} {BOI_TOKEN} placeholders for {len(images)} images")
        tok = self.processor.tokenizer
        ids = tok.encode(text.replace(BOI_TOKEN, self.image_sequence), add_special_tokens=False)
        answer_len = 0
        if answer is not None:
            ans = tok.encode(self.ANSWER_PREFIX + answer, add_special_tokens=False) + [self._end_of_turn_id()]
            ids += ans
            answer_len = len(ans)
        input_ids = np.asarray(ids, dtype=np.int64)[None, :]
        return Prepared(input_ids=input_ids, image_mask=input_ids == self.image_token_id,
                        position_ids=np.arange(input_ids.shape[1], dtype=np.int64)[None, :],
                        pixel=self.processor.image_processor(images) if images else {}, answer_len=answer_len,
                        num_images=len(images))

    def llm_prefill_feeds(self, prepared: Prepared, projector_outputs=None) -> dict[str, np.ndarray]:
        return {LLM_EXTRA_INPUT: image_group_ids(prepared.image_mask)}

    def llm_decode_feeds(self, batch: int) -> dict[str, np.ndarray]:
        return {LLM_EXTRA_INPUT: np.full((batch, 1), -1, dtype=np.int64)}

    # ------------------------------------------------------------------ torch half
    def load_model(self, path, dtype=None):
        import torch
        import transformers

        from .gemma3_torch import Gemma3LinearProjector

        cls = getattr(transformers, self.model_class_name)
        model = cls.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation="sdpa").eval()
        model.model.multi_modal_projector = Gemma3LinearProjector(model.model.multi_modal_projector)
        return model

    def hf_inputs(self, prepared):
        """As LLaVA's, plus ``token_type_ids`` (1 on image tokens): transformers' Gemma3 builds its bidirectional
        image attention from them."""
        import torch

        return {**super().hf_inputs(prepared), "token_type_ids": torch.from_numpy(prepared.image_mask.astype(np.int64))}

    def image_features(self, model, prepared):
        import torch

        with torch.no_grad():
            pixels = torch.from_numpy(np.asarray(prepared.pixel["pixel_values"])).float()
            feats = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        return feats.reshape(-1, feats.shape[-1])

    def export_specs(self, model):
        import torch

        from .gemma3_torch import Gemma3DecoderWrapper, Gemma3VisionWrapper
        from .llava_torch import LlavaProjectorWrapper
        from .qwen2_vl_torch import EmbedTokensWrapper

        images = torch.export.Dim("num_images")
        vision = self.export_spec("vision_encoder", Gemma3VisionWrapper(self._vision_model(model)),
                                  self._vision_example(), ["pixel_values"], ["features"], ({0: images},))
        with torch.no_grad():
            features = vision.module(*vision.args)
        projector = self.export_spec("projector", LlavaProjectorWrapper(self.projector(model)), (features,),
                                     ["features"], ["image_embeds"], ({0: images},))
        llm = self.llm_spec(Gemma3DecoderWrapper(model), attention=(model.model.language_model, "eager"))
        # the extra input after position_ids (the wrapper's 4th argument), sized like inputs_embeds' [batch, seq]
        batch, seq = llm.args[0].shape[:2]
        groups = torch.full((batch, seq), -1, dtype=torch.long)
        groups[0, 1:3], groups[0, 4:] = 0, 1  # two images' tokens in row 0 (the example's past holds text)
        llm.args = llm.args[:3] + (groups,) + llm.args[3:]
        llm.input_names.insert(3, LLM_EXTRA_INPUT)
        shapes = llm.dynamic_shapes  # in the wrapper's argument order (torch.onnx names the axes by it)
        llm.dynamic_shapes = {"inputs_embeds": shapes["inputs_embeds"], "attention_mask": shapes["attention_mask"],
                              "position_ids": shapes["position_ids"], LLM_EXTRA_INPUT: dict(shapes["inputs_embeds"]),
                              "past": shapes["past"]}
        return [vision, projector, self.embed_tokens_spec(EmbedTokensWrapper(model.get_input_embeddings())), llm]
