"""Image(s) + prompt -> text with the four ONNX graphs of an output directory."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..export.ort_flavour import FLAVOUR_KEY, FLAVOUR_PORTABLE
from ..models import Prepared, load_family
from .limits import context_length, fit_to_context
from .runners import Runner, check_backend, make_runner
from .session import DEFAULT_ACCURACY_LEVEL

GRAPHS = ("vision_encoder", "projector", "embed_tokens", "llm")


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    stopped: bool  # ended on a stop token (else max_new_tokens)
    timings: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        n = max(len(self.token_ids) - 1, 0)
        return n / self.decode_s if self.decode_s > 0 else float("nan")


class SharedKV:
    """The KV cache of an ORT-flavour llm graph (export/ort_flavour.py): per layer and kind one pre-allocated
    buffer [batch, kv_heads, capacity, head_dim], an OrtValue bound as both ``past_*`` and ``present_*`` so that
    GroupQueryAttention writes each step's keys and values in place; it never goes through numpy. ``length`` is
    how many positions hold tokens. :meth:`OnnxVLM.llm` grows the buffers when a call needs more room."""

    def __init__(self, family, batch: int = 1, capacity: int = 0):
        self.family, self.batch, self.length = family, batch, 0
        self._allocate(capacity)

    def _allocate(self, capacity: int, keep: dict[str, np.ndarray] | None = None) -> None:
        import onnxruntime as ort

        f = self.family
        self.capacity = capacity
        self.arrays = {}  # the memory behind the OrtValues (which do not own it)
        for i in range(f.num_layers):
            for kind in ("key", "value"):
                a = np.zeros((self.batch, f.num_kv_heads, capacity, f.head_dim), np.float32)
                if keep is not None:
                    a[:, :, :self.length] = keep[f"past_{kind}_{i}"][:, :, :self.length]
                self.arrays[f"past_{kind}_{i}"] = a
        self.values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.arrays.items()}
        self._bindings = {n: (n.replace("past_", "present_"), v) for n, v in self.values.items()}

    def reserve(self, capacity: int) -> None:
        """Room for ``capacity`` positions, keeping what the cache holds."""
        if capacity > self.capacity:
            self._allocate(capacity, keep=self.arrays)

    def bindings(self) -> dict[str, tuple[str, object]]:
        """{past name: (present name, OrtValue)}: one dict until the buffers grow (the runner keeps its binding)."""
        return self._bindings


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    e = np.exp(x)
    return e / e.sum()


def sample_token(logits: np.ndarray, rng: np.random.Generator | None, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0) -> int:
    """Greedy when ``rng`` is None, else temperature / top-k / top-p sampling."""
    if rng is None or temperature <= 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64) / temperature
    if 0 < top_k < logits.size:  # top_k >= the vocabulary keeps every token
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = _softmax(logits)
    if top_p < 1.0:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        cut = order[cum - probs[order] >= top_p]
        probs[cut] = 0.0
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


class OnnxVLM:
    """The exported model: vision encoder -> projector -> embeddings -> LLM with KV cache, each graph behind a
    :class:`~vlmq_export.runtime.runners.Runner` of ``backend`` ("onnxruntime", or "tensorrt" for the engines
    `vlmq-export build` made; checked here, before any graph loads). ``accuracy_level`` and ``providers`` are
    ONNX Runtime's; ``graphs`` other ONNX files to run (ONNX Runtime only)."""

    def __init__(self, out_dir: str | Path, *, accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL, providers=None,
                 graphs: dict[str, Path] | None = None, backend: str = "onnxruntime"):
        self.out_dir = Path(out_dir)
        check_backend(self.out_dir, backend, GRAPHS)
        self.backend = backend
        self.family = load_family(self.out_dir / "processor", torch_free=True)
        self.paths = graphs or {g: self.out_dir / f"{g}.onnx" for g in GRAPHS}
        self.accuracy_level = accuracy_level
        self._opts = dict(accuracy_level=accuracy_level, providers=providers) if backend == "onnxruntime" else {}
        self._runners: dict[str, Runner] = {}

    @property
    def context_length(self) -> int | None:
        """Prompt plus generated tokens may not exceed this (the model's ``max_position_embeddings``)."""
        return context_length(self.family)

    @property
    def vocab_size(self) -> int:
        return int(self.family.text_config.vocab_size)

    def runner(self, name: str) -> Runner:
        """The active runner of graph ``name`` (activated on first use, kept until :meth:`close`)."""
        if name not in self._runners:
            path = self.paths[name] if self.backend == "onnxruntime" else None
            r = make_runner(self.out_dir, name, self.backend, path=path, **self._opts)
            r.activate()
            self._runners[name] = r
        return self._runners[name]

    session = runner  # the older name; a runner also answers ONNX Runtime's ``run(output_names, feeds)``

    def close(self) -> None:
        """Deactivate every runner (frees the sessions or engines)."""
        for r in self._runners.values():
            r.deactivate()
        self._runners.clear()

    # ------------------------------------------------------------------ graph calls
    def image_features(self, prepared: Prepared) -> np.ndarray:
        """[n_image_tokens, hidden] for the images in ``prepared``."""
        feats = self.runner("vision_encoder").infer(self.family.vision_feeds(prepared))["features"]
        embeds = self.runner("projector").infer({"features": feats})["image_embeds"]
        return self.family.pack_image_features(prepared, embeds)  # numpy; the identity for most families

    def embeddings(self, prepared: Prepared) -> np.ndarray:
        emb = self.runner("embed_tokens").infer({"input_ids": prepared.input_ids})["inputs_embeds"]
        if prepared.num_images:
            img = self.image_features(prepared)
            mask = prepared.image_mask[0]
            if int(mask.sum()) != img.shape[0]:
                raise ValueError(f"{int(mask.sum())} image tokens in the prompt but {img.shape[0]} image embeddings")
            emb = emb.copy()
            emb[0, mask] = img.astype(emb.dtype)
        return emb

    @property
    def llm_flavour(self) -> str:
        """"ort-gqa" when the llm graph is ONNX Runtime's flavour (export/ort_flavour.py), else "portable"."""
        if self.backend != "onnxruntime":
            return FLAVOUR_PORTABLE
        return self.runner("llm").metadata.get(FLAVOUR_KEY, FLAVOUR_PORTABLE)

    def empty_past(self, batch: int = 1, capacity: int | None = None) -> dict[str, np.ndarray] | SharedKV:
        """An empty KV cache for :meth:`llm`. With ``capacity`` and an ORT-flavour graph: a :class:`SharedKV` with
        room for that many positions (it grows when a call needs more). Otherwise arrays with 0 positions, which
        both flavours take (ONNX Runtime's attention then copies past into a new present, as the portable graph's
        Concat does)."""
        f = self.family
        if capacity is not None and self.llm_flavour != FLAVOUR_PORTABLE:
            return SharedKV(f, batch, capacity)
        shape = (batch, f.num_kv_heads, 0, f.head_dim)
        past = {}
        for i in range(f.num_layers):
            past[f"past_key_{i}"] = np.zeros(shape, np.float32)
            past[f"past_value_{i}"] = np.zeros(shape, np.float32)
        return past

    def llm(self, embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: dict[str, np.ndarray] | SharedKV) -> tuple[np.ndarray, dict[str, np.ndarray] | SharedKV]:
        """(logits, the cache after this call). A :class:`SharedKV` is updated in place and returned."""
        if isinstance(past, SharedKV):
            past.reserve(attention_mask.shape[1])
            res = self.runner("llm").infer_bound({"inputs_embeds": embeds, "attention_mask": attention_mask,
                                                  "position_ids": position_ids}, past.bindings(), ["logits"])
            past.length = attention_mask.shape[1]
            return res["logits"], past
        res = self.runner("llm").infer({"inputs_embeds": embeds, "attention_mask": attention_mask,
                                        "position_ids": position_ids, **past})
        present = {k.replace("present_", "past_"): v for k, v in res.items() if k.startswith("present_")}
        return res["logits"], present

    def prompt_logits(self, prepared: Prepared) -> np.ndarray:
        """Logits [S, V] of a full prompt (prefill with empty past)."""
        emb = self.embeddings(prepared)
        mask = np.ones_like(prepared.input_ids)
        logits, _ = self.llm(emb, mask, prepared.position_ids, self.empty_past())
        return logits[0]

    # ------------------------------------------------------------------ generation
    def generate(self, images: list, prompt: str, *, max_new_tokens: int = 64, sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: bool = True, on_text: Callable[[str], None] | None = None) -> GenerationResult:
        return self.generate_prepared(self.family.prepare(images, prompt), max_new_tokens=max_new_tokens,
                                      sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                      seed=seed, stop=stop, on_text=on_text)

    def generate_prepared(self, prepared: Prepared, *, max_new_tokens: int = 64, sample: bool = False,
                          temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                          seed: int | None = None, stop: bool = True,
                          on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Generate from a prepared prompt. A prompt that fills the model's context raises a LimitError
        before any graph runs; ``max_new_tokens`` is clamped to the context left after the prompt."""
        max_new_tokens = fit_to_context(prepared.seq_len, max_new_tokens, self.context_length)
        fam = self.family
        rng = np.random.default_rng(seed) if sample else None
        stop_ids = set(fam.stop_token_ids) if stop else set()
        t0 = time.perf_counter()
        emb = self.embeddings(prepared)
        seq = prepared.seq_len
        mask = np.ones((1, seq), np.int64)
        logits, past = self.llm(emb, mask, prepared.position_ids, self.empty_past(capacity=seq + max_new_tokens))
        t_prefill = time.perf_counter() - t0
        tokens: list[int] = []
        text_so_far = ""
        stopped = False
        t1 = time.perf_counter()
        embed = self.runner("embed_tokens")
        while len(tokens) < max_new_tokens:
            tok = sample_token(logits[0, -1], rng, temperature, top_k, top_p)
            if tok in stop_ids:
                stopped = True
                break
            tokens.append(tok)
            if on_text is not None:
                text = fam.tokenizer.decode(tokens, skip_special_tokens=True)
                if len(text) > len(text_so_far) and not text.endswith("\ufffd"):
                    on_text(text[len(text_so_far):])
                    text_so_far = text
            if len(tokens) == max_new_tokens:
                break
            ids = np.array([[tok]], np.int64)
            e = embed.infer({"input_ids": ids})["inputs_embeds"]
            past_len = seq + len(tokens) - 1
            mask = np.ones((1, past_len + 1), np.int64)
            pos = fam.decode_position_ids(prepared.rope_delta, past_len)
            logits, past = self.llm(e, mask, pos, past)
        t_decode = time.perf_counter() - t1
        text = fam.tokenizer.decode(tokens, skip_special_tokens=True)
        if on_text is not None and len(text) > len(text_so_far):
            on_text(text[len(text_so_far):])
        return GenerationResult(tokens, text, seq, t_prefill, t_decode, stopped)
