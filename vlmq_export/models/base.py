"""The model-family interface.

One module per family (``qwen2_vl.py``, ``smolvlm.py``) implements :class:`Family`. A family
object has two halves:

* a torch-free *preprocessing* half (:class:`Processor`: config, tokenizer and image processor read with
  numpy, Pillow, ``tokenizers`` and ``jinja2`` from a source model directory or from ``OUT/processor``,
  see ``processing.py``), which ``prepare`` uses in calibration, torch validation and the ONNX Runtime
  generation loop alike, so that every path sees identical token ids and pixels;
* a torch half: load the HF model, name its components, and build the four export wrappers (the
  wrappers live where importing the family module does not import torch).

``from_dir(path)`` also loads transformers' own config, tokenizer and image processor as ``config``,
``tokenizer`` and ``image_processor`` (what ``save_processor`` writes and the torch half reads);
``from_dir(path, torch_free=True)`` (the runtime) uses the :class:`Processor`'s objects there instead.

The four ONNX graphs every family exports (names and roles are fixed, see ``../shared/design.md``):

``vision_encoder``  family-specific pixel feeds (``Family.vision_feeds``) -> ``features``
``projector``       ``features`` -> ``image_embeds`` [num_image_tokens_total, hidden] (2-D)
``embed_tokens``    ``input_ids`` [B, S] int64 -> ``inputs_embeds`` [B, S, hidden]
``llm``             ``inputs_embeds`` [B,S,H], ``attention_mask`` [B, P+S] int64,
                    ``position_ids`` ([B,S] or [3,B,S] int64), ``past_key_i``/``past_value_i``
                    [B, kv_heads, P, head_dim] for i in range(num_layers)
                    -> ``logits`` [B,S,V], ``present_key_i``/``present_value_i`` [B, kv_heads, P+S, head_dim]

Image embeddings replace the embeddings of the image placeholder tokens, in order
(``Prepared.image_mask``), which is done by the caller (torch or numpy) between the graphs.

The contract between the graphs, at inference, without torch (``runtime/generate.py``)::

    features = vision_encoder(**family.vision_feeds(prepared))
    proj     = projector(features)                                          # every output, by name
    embeds   = family.pack_image_features(prepared, proj["image_embeds"])   # numpy, torch-free half
    inputs_embeds = embed_tokens(input_ids); inputs_embeds[image_mask] = embeds
    extra    = family.llm_prefill_feeds(prepared, proj)    # prefill; family.llm_decode_feeds(B) per decode step
    logits, presents = llm(inputs_embeds, attention_mask, position_ids, pasts, **extra)

``pack_image_features`` is the identity for families whose projector output is already one row per image
token (Qwen2-VL, SmolVLM, LLaVA-1.5). Families whose tokens are a data-dependent arrangement of the
projected tiles do it here in numpy, a mirror of transformers: LLaVA-NeXT / OneVision
(``llava_next.py``) cut the anyres tiles back into the image's grid, unpad it to the aspect ratio,
(OneVision) downscale it, and add ``image_newline`` (a weight, which their projector graph emits as
the last row of ``image_embeds``). What a family's torch reference ``image_features`` returns is the
packed result, so the validation compares the whole path.

Extra ``llm`` inputs (``llm_prefill_feeds`` / ``llm_decode_feeds``, numpy, torch-free): a family whose language
model needs more than embeddings, mask, positions and cache names them there, and the runtime feeds them at
prefill and at every decode step. Qwen3-VL's deepstack features are projector outputs that the family's numpy
half scatters onto the image tokens (one slice per deepstack layer, zero rows elsewhere and at decode; its
``features`` stack the deepstack blocks' outputs after the last block's, and its projector also emits
``deepstack_embeds``, see ``qwen3_vl.py``); Gemma3's
bidirectional attention among an image's tokens and its sliding/global layers stay inside the ``llm`` graph,
which builds each layer's mask from ``attention_mask`` and one more input the family computes from
``Prepared.image_mask`` (``image_group_ids``: which image each token belongs to, -1 for text; ``gemma3.py``).
Such families take the portable llm graph (``export/ort_flavour.py``).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import UnsupportedModelError, VlmqError


@dataclass
class Prepared:
    """One prompt (with its images) turned into model inputs; numpy only, batch 1."""

    input_ids: np.ndarray  # int64 [1, S]
    image_mask: np.ndarray  # bool [1, S]: positions that receive image embeddings
    position_ids: np.ndarray  # int64 prefill positions: [1, S] or [3, 1, S] (M-RoPE)
    rope_delta: int = 0  # decode position of absolute step t is t + rope_delta
    pixel: dict[str, np.ndarray] = field(default_factory=dict)  # HF forward kwargs (pixel_values, image_grid_thw, ...)
    answer_len: int = 0  # the last answer_len tokens of input_ids are the answer (labels), 0 if none
    num_images: int = 0

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class Processor:
    """The torch-free preprocessing objects (``processing.py`` and the family's image processor)."""

    config: Any  # processing.Config
    tokenizer: Any  # processing.Tokenizer
    image_processor: Any  # the family's numpy image processor


@dataclass
class ExportSpec:
    """What ``torch.onnx.export`` needs for one graph."""

    name: str  # vision_encoder | projector | embed_tokens | llm
    module: Any  # torch.nn.Module wrapper whose forward takes ``args`` positionally
    args: tuple  # example inputs (tensors; use batch >= 2 and non-1 dynamic dims)
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: Any  # as torch.onnx.export(dynamo=True) takes it (tuple aligned with args)
    # (HF model, attention implementation) switched for the trace and restored afterwards. The
    # decoders trace with "eager" (MatMul -> Add mask -> Softmax -> MatMul): the SDPA decomposition
    # carries Shape/Slice/Concat/Reshape juggling and an IsNaN/Where guard per layer, ~25 % more
    # nodes per decode step (measured on SmolLM2-135M: 2423 vs 1913 exported nodes).
    attention: tuple[Any, str] | None = None


class Family:
    """Base class of a model family. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str] = ""  # e.g. "qwen2_vl"
    model_types: ClassVar[tuple[str, ...]] = ()  # config.model_type values handled
    mrope: ClassVar[bool] = False  # position_ids are [3, B, S]

    def __init__(self, config, tokenizer, image_processor, processor: Processor | None = None):
        self.config = config  # the HF (composite) config, or processing.Config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.processor = processor or Processor(config, tokenizer, image_processor)  # what prepare() uses

    # ---------------------------------------------------------------- preprocessing (no torch needed)
    @classmethod
    def from_dir(cls, path: str | Path, torch_free: bool = False) -> "Family":
        """Build from a HF model directory or an ``OUT/processor`` directory (config + tokenizer + image processor).

        ``torch_free``: do not import transformers; ``config``, ``tokenizer`` and ``image_processor`` are then
        the :class:`Processor`'s (enough for ``prepare``, the runtime and the graphs' shapes)."""
        path = Path(path)
        proc = cls.processor_from_dir(path)
        model_type = getattr(proc.config, "model_type", "")
        if model_type not in cls.model_types:
            raise UnsupportedModelError(f"{path}: model_type '{model_type}' is not one of {cls.model_types}")
        if torch_free:
            return cls(proc.config, proc.tokenizer, proc.image_processor, proc)
        return cls(*cls.hf_from_dir(path), proc)

    @classmethod
    def processor_from_dir(cls, path: Path) -> Processor:
        """The torch-free :class:`Processor` of a directory."""
        raise NotImplementedError

    @classmethod
    def hf_from_dir(cls, path: Path) -> tuple:
        """transformers' (config, tokenizer, image processor) of a directory (the torch half)."""
        raise NotImplementedError

    def save_processor(self, out_dir: Path) -> None:
        """Write config, tokenizer, chat template and image-processor config so ``from_dir(out_dir)`` works."""
        self.config.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)

    def prepare(self, images: list, prompt: str, answer: str | None = None) -> Prepared:
        """Chat-format the prompt with one image placeholder per image, expand image tokens, process pixels.

        ``images`` are PIL images (RGB). With ``answer``, the assistant answer (plus end-of-turn token) is
        appended and ``answer_len`` set. Without, the prompt ends with the generation prompt.
        """
        raise NotImplementedError

    def vision_feeds(self, prepared: Prepared) -> dict[str, np.ndarray]:
        """Inputs of ``vision_encoder.onnx`` (names = its input names) computed from ``prepared.pixel``."""
        raise NotImplementedError

    def decode_position_ids(self, rope_delta: int, past_len: int, batch: int = 1) -> np.ndarray:
        """Position ids for one new token at absolute index ``past_len``: [B,1] or [3,B,1]."""
        pos = np.full((batch, 1), past_len + rope_delta, dtype=np.int64)
        return np.broadcast_to(pos, (3, batch, 1)).copy() if self.mrope else pos

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end generation (eos and end-of-turn)."""
        raise NotImplementedError

    @property
    def text_config(self):
        return self.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_kv_heads(self) -> int:
        tc = self.text_config
        return int(getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads)

    @property
    def head_dim(self) -> int:
        tc = self.text_config
        return int(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    # ---------------------------------------------------------------- torch half
    def load_model(self, path: str | Path, dtype=None):
        """Load the HF model (eval mode, float32 by default, an attention implementation that exports)."""
        raise NotImplementedError

    def load_checked(self, path: str | Path, dtype=None):
        """``load_model``, after :func:`check_weight_files`; a weight file that still fails to load is a
        one-line VlmqError naming the directory, not a traceback."""
        from safetensors import SafetensorError

        check_weight_files(path)
        try:
            return self.load_model(path, dtype)
        except (SafetensorError, OSError) as exc:
            raise VlmqError(f"{path}: cannot load the model's weights ({type(exc).__name__}: {exc})") from None

    def hf_inputs(self, prepared: Prepared) -> dict:
        """torch tensors for ``model(**hf_inputs)`` (input_ids, attention_mask, pixel kwargs, extra ids)."""
        raise NotImplementedError

    def decoder_layers(self, model):
        """The language model's decoder blocks (``nn.ModuleList``), in order."""
        raise NotImplementedError

    def vision_layers(self, model):
        """The vision encoder's transformer blocks (``nn.ModuleList``), in order."""
        raise NotImplementedError

    def projector(self, model):
        """The vision-to-LLM projector module."""
        raise NotImplementedError

    def lm_head(self, model):
        raise NotImplementedError

    def image_features(self, model, prepared: Prepared):
        """torch reference of vision_encoder + projector (+ ``pack_image_features``): [num_image_tokens_total, hidden]."""
        raise NotImplementedError

    def pack_image_features(self, prepared: Prepared, image_embeds: np.ndarray) -> np.ndarray:
        """numpy, torch-free: the ``projector`` graph's output -> one row per image token of ``prepared``, in
        order (see the module doc). The identity unless the family arranges its tiles' embeddings."""
        return image_embeds

    def llm_prefill_feeds(self, prepared: Prepared, projector_outputs: dict[str, np.ndarray] | None
                          ) -> dict[str, np.ndarray]:
        """numpy, torch-free: the ``llm`` graph's inputs beyond the fixed ones (``inputs_embeds``,
        ``attention_mask``, ``position_ids``, the cache) for a batch-1 prefill of ``prepared`` (S =
        ``prepared.seq_len``). ``projector_outputs``: every output of the ``projector`` graph by name, None when
        the prompt has no image. None for most families; e.g. deepstack features scattered onto the image tokens,
        or which tokens belong to one image (bidirectional attention)."""
        return {}

    def llm_decode_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """numpy, torch-free: :meth:`llm_prefill_feeds`' inputs for one decode step of ``batch`` rows (S = 1; a
        generated token is never an image token)."""
        return {}

    # ---------------------------------------------------------------- export spec helpers (torch)
    @staticmethod
    def export_spec(name, module, args, input_names, output_names, dynamic_shapes, attention=None) -> ExportSpec:
        return ExportSpec(name=name, module=module.eval(), args=tuple(args), input_names=list(input_names),
                          output_names=list(output_names), dynamic_shapes=dynamic_shapes, attention=attention)

    def embed_tokens_spec(self, module) -> ExportSpec:
        """``embed_tokens``: ``input_ids`` [B, S] -> ``inputs_embeds``, example batch 2."""
        import torch

        Dim = torch.export.Dim
        ids = torch.randint(0, int(self.text_config.vocab_size), (2, 5), generator=torch.Generator().manual_seed(0))
        return self.export_spec("embed_tokens", module, (ids,), ["input_ids"], ["inputs_embeds"],
                                ({0: Dim("batch"), 1: Dim("seq")},))

    def llm_spec(self, module, attention=None, batch: int = 2, seq: int = 5, past: int = 3) -> ExportSpec:
        """``llm`` for a ``module(inputs_embeds, attention_mask, position_ids, *flat_past)`` returning
        ``(logits, *flat_present)``; position ids [B, S] or, with ``mrope``, [3, B, S]."""
        import torch

        Dim = torch.export.Dim
        b, s, p = Dim("batch"), Dim("seq"), Dim("past")
        g = torch.Generator().manual_seed(0)
        n = self.num_layers
        kv = [torch.randn(batch, self.num_kv_heads, past, self.head_dim, generator=g) for _ in range(2 * n)]
        pos = (torch.arange(past, past + seq).view(1, seq).expand(batch, seq) + 1).contiguous()
        pos = pos[None].expand(3, batch, seq).contiguous() if self.mrope else pos
        args = (torch.randn(batch, seq, self.hidden_size, generator=g), torch.ones(batch, past + seq, dtype=torch.long),
                pos, *kv)
        names = [f"{{}}_{kind}_{i}" for i in range(n) for kind in ("key", "value")]
        return self.export_spec(
            "llm", module, args, ["inputs_embeds", "attention_mask", "position_ids"] + [x.format("past") for x in names],
            ["logits"] + [x.format("present") for x in names],
            {"inputs_embeds": {0: b, 1: s}, "attention_mask": {0: b, 1: Dim("past_plus_seq")},
             "position_ids": {1: b, 2: s} if self.mrope else {0: b, 1: s},
             "past": tuple({0: b, 2: p} for _ in kv)},
            attention=attention)

    def export_specs(self, model) -> list[ExportSpec]:
        """One :class:`ExportSpec` per graph, in the order vision_encoder, projector, embed_tokens, llm."""
        raise NotImplementedError


def check_weight_files(path: str | Path) -> None:
    """A one-line VlmqError naming the first ``*.safetensors`` file in ``path`` that is empty, truncated or
    has an unreadable header. Reads the headers only (the 8-byte length, the JSON, the last data offset
    against the file size): no weights are loaded."""
    for f in sorted(Path(path).glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8)) if size >= 8 else (None,)
                if n is None or n > size - 8:
                    raise ValueError(f"{size} bytes, shorter than its header")
                header = json.loads(fh.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise ValueError(f"truncated: {size} bytes, its header describes {8 + n + end}")
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError) as exc:
            raise VlmqError(f"{f}: not a readable safetensors weight file ({exc})") from None
