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
    logits: list[np.ndarray] | None = None  # with keep_logits: the [V] logits each token was sampled from

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
        self._logits_to_keep: bool | None = None  # whether the llm graph takes logits_to_keep (read on first use)

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
        self._logits_to_keep = None

    # ------------------------------------------------------------------ graph calls
    def projector_outputs(self, prepared: Prepared) -> dict[str, np.ndarray]:
        """Every output of the projector graph for the images in ``prepared`` (``image_embeds``, and whatever
        else the family's projector emits)."""
        feats = self.runner("vision_encoder").infer(self.family.vision_feeds(prepared))["features"]
        return self.runner("projector").infer({"features": feats})

    def image_features(self, prepared: Prepared, projected: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """[n_image_tokens, hidden] for the images in ``prepared`` (from ``projected``, the projector's outputs,
        when given)."""
        projected = projected if projected is not None else self.projector_outputs(prepared)
        return self.family.pack_image_features(prepared, projected["image_embeds"])  # numpy; mostly the identity

    def prefill_inputs(self, prepared: Prepared) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(``inputs_embeds`` [1, S, hidden] with the image embeddings spliced in, the family's extra llm inputs
        for this prefill, ``Family.llm_prefill_feeds``)."""
        emb = self.runner("embed_tokens").infer({"input_ids": prepared.input_ids})["inputs_embeds"]
        projected = None
        if prepared.num_images:
            projected = self.projector_outputs(prepared)
            img = self.image_features(prepared, projected)
            mask = prepared.image_mask[0]
            if int(mask.sum()) != img.shape[0]:
                raise ValueError(f"{int(mask.sum())} image tokens in the prompt but {img.shape[0]} image embeddings")
            emb = emb.copy()
            emb[0, mask] = img.astype(emb.dtype)
        return emb, self.family.llm_prefill_feeds(prepared, projected)

    def embeddings(self, prepared: Prepared) -> np.ndarray:
        return self.prefill_inputs(prepared)[0]

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
            past: dict[str, np.ndarray] | SharedKV, extra: dict[str, np.ndarray] | None = None,
            logits_to_keep: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray] | SharedKV]:
        """(logits, the cache after this call). A :class:`SharedKV` is updated in place and returned. ``extra``:
        the family's further llm inputs (``Family.llm_prefill_feeds`` / ``llm_decode_feeds``). ``logits_to_keep``
        N > 0: only the last N positions' logits are needed; a graph that takes ``logits_to_keep`` (the ORT
        flavour) computes only those, any other returns all of them, so callers index from the end."""
        feeds = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids,
                 **(extra or {})}
        if self._takes_logits_to_keep:
            feeds["logits_to_keep"] = np.array([logits_to_keep], np.int64)
        if isinstance(past, SharedKV):
            past.reserve(attention_mask.shape[1])
            res = self.runner("llm").infer_bound(feeds, past.bindings(), ["logits"])
            past.length = attention_mask.shape[1]
            return res["logits"], past
        res = self.runner("llm").infer({**feeds, **past})
        present = {k.replace("present_", "past_"): v for k, v in res.items() if k.startswith("present_")}
        return res["logits"], present

    @property
    def _takes_logits_to_keep(self) -> bool:
        if self._logits_to_keep is None:
            self._logits_to_keep = "logits_to_keep" in self.runner("llm").input_metadata
        return self._logits_to_keep

    def prefill(self, prepared: Prepared, capacity: int | None = None, logits_to_keep: int = 0
                ) -> tuple[np.ndarray, dict[str, np.ndarray] | SharedKV]:
        """(logits [1, S, V], the cache) of ``prepared`` from an empty cache (:meth:`empty_past`'s ``capacity``):
        the one prefill of :meth:`prompt_logits`, :meth:`generate_prepared` and :class:`BatchDecoder`. With
        ``logits_to_keep`` (:meth:`llm`) the logits may be the last positions' only."""
        emb, extra = self.prefill_inputs(prepared)
        mask = np.ones((1, prepared.seq_len), np.int64)
        return self.llm(emb, mask, prepared.position_ids, self.empty_past(capacity=capacity), extra, logits_to_keep)

    def prompt_logits(self, prepared: Prepared) -> np.ndarray:
        """Logits [S, V] of a full prompt (prefill with empty past)."""
        return self.prefill(prepared)[0][0]

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
                          on_text: Callable[[str], None] | None = None,
                          keep_logits: bool = False) -> GenerationResult:
        """Generate from a prepared prompt. A prompt that fills the model's context raises a LimitError
        before any graph runs; ``max_new_tokens`` is clamped to the context left after the prompt."""
        row = _Row(self.family, prepared, fit_to_context(prepared.seq_len, max_new_tokens, self.context_length),
                   sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                   on_text=on_text, keep_logits=keep_logits)
        fam = self.family
        t0 = time.perf_counter()
        seq = prepared.seq_len
        logits, past = self.prefill(prepared, capacity=seq + row.max_new_tokens, logits_to_keep=1)
        row.prefill_s = time.perf_counter() - t0
        row.t_decode = time.perf_counter()
        embed = self.runner("embed_tokens")
        extra = fam.llm_decode_feeds(1)
        while not row.take(logits[0, -1]):
            ids = np.array([[row.tokens[-1]]], np.int64)
            e = embed.infer({"input_ids": ids})["inputs_embeds"]
            past_len = seq + len(row.tokens) - 1
            mask = np.ones((1, past_len + 1), np.int64)
            pos = fam.decode_position_ids(prepared.rope_delta, past_len)
            logits, past = self.llm(e, mask, pos, past, extra)
        return row.result

    def generate_batch(self, prepared: list[Prepared], params: list[dict] | None = None,
                       **common) -> list[GenerationResult]:
        """Generate from several prepared prompts at once (:class:`BatchDecoder`); row ``i`` takes
        :meth:`generate_prepared`'s keywords ``{**common, **params[i]}`` (sampling, seed, max_new_tokens, on_text,
        ...). Greedy rows give :meth:`generate_prepared`'s tokens at accuracy level 0 (logits within 1e-6); at level 4
        ONNX Runtime's INT8 MatMulNBits rounds one row and several rows differently (max logit difference 2.9 % on
        the testbed, about its distance from float), so a near-tie may go the other way."""
        params = params or [{}] * len(prepared)
        if len(params) != len(prepared):
            raise ValueError(f"{len(params)} parameter sets for {len(prepared)} prompts")
        dec = BatchDecoder(self)
        rows = [dec.add(p, **{**common, **kw}) for p, kw in zip(prepared, params)]
        while dec.rows:
            dec.step()
        return [r.result for r in rows]


class _Row:
    """One prompt's generation: its sampling parameters, tokens so far and streamed text. :meth:`take` consumes
    the logits of the next token (the one generation loop's rule for batch 1 and for :class:`BatchDecoder`)."""

    def __init__(self, family, prepared: Prepared, max_new_tokens: int, *, sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: bool = True, on_text: Callable[[str], None] | None = None, keep_logits: bool = False):
        self.family, self.prepared, self.max_new_tokens = family, prepared, max_new_tokens
        self.rng = np.random.default_rng(seed) if sample else None
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.stop_ids = set(family.stop_token_ids) if stop else set()
        self.on_text = on_text
        self.logits: list[np.ndarray] | None = [] if keep_logits else None
        self.tokens: list[int] = []
        self.text_so_far = ""
        self.count = prepared.seq_len  # positions in the KV cache
        self.stopped = False
        self.result: GenerationResult | None = None  # set when done
        self.prefill_s = 0.0
        self.t_decode = time.perf_counter()

    @property
    def room(self) -> int:
        """Cache positions this row may still need."""
        return self.max_new_tokens - len(self.tokens) + 1

    def take(self, logits: np.ndarray) -> bool:
        """Sample the next token from ``logits`` [V]; True when the generation is done (``result`` set), else
        ``tokens[-1]`` is the next token to feed."""
        if len(self.tokens) < self.max_new_tokens:
            tok = sample_token(logits, self.rng, self.temperature, self.top_k, self.top_p)
            if self.logits is not None:
                self.logits.append(np.array(logits, np.float32))
            if tok in self.stop_ids:
                self.stopped = True
            else:
                self.tokens.append(tok)
                if self.on_text is not None:
                    text = self.family.tokenizer.decode(self.tokens, skip_special_tokens=True)
                    if len(text) > len(self.text_so_far) and not text.endswith("\ufffd"):
                        self.on_text(text[len(self.text_so_far):])
                        self.text_so_far = text
        if not self.stopped and len(self.tokens) < self.max_new_tokens:
            return False
        t_decode = time.perf_counter() - self.t_decode
        text = self.family.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.on_text is not None and len(text) > len(self.text_so_far):
            self.on_text(text[len(self.text_so_far):])
        self.result = GenerationResult(self.tokens, text, self.prepared.seq_len, self.prefill_s, t_decode,
                                       self.stopped, logits=self.logits)
        return True


class BatchDecoder:
    """Decodes several prompts at once: each :meth:`add` prefills one prompt (batch 1, images included) and its
    row joins the batch; each :meth:`step` feeds every row's last token as one batch [B, 1] and samples each row's
    next token with its own parameters; a row that is done (stop token, its max_new_tokens) leaves the batch at
    once, so the others go on unchanged. Rows may join and leave between steps (``serve`` batches this way).

    Each row has its own positions (``decode_position_ids`` with its own count and ``rope_delta``: [B,1], or
    [3,B,1] for M-RoPE) and its own attention-mask row. The padding each llm flavour needs:

    - portable graph (past and present concatenated): the cache is [B, kv_heads, W, head_dim] with any layout
      per row, since the graph masks every column whose ``attention_mask`` is 0. A row that joins is written
      left-aligned ([0, n) of its prompt, zeros after, mask 0 there); every step appends one column for all
      rows. Columns no row uses any more (after a row leaves) are dropped.
    - ORT flavour (GroupQueryAttention on a :class:`SharedKV`): the graph reads only the mask's row sums
      (``seqlens_k`` = sum - 1: the row's tokens sit at [0, sum) of its buffer and the new token is written at
      slot sum - 1) and its width (``total_sequence_length``). So each row's cache is right-padded, left-aligned
      and contiguous, each row writes at its own length, and the mask is ``arange(W) <= count`` with W the
      longest row's count + 1. The buffers have room for every row's remaining tokens; they are rebuilt when a
      row joins or leaves.
    """

    def __init__(self, vlm: "OnnxVLM"):
        self.vlm, self.family = vlm, vlm.family
        self.shared = vlm.llm_flavour != FLAVOUR_PORTABLE
        self.rows: list[_Row] = []
        self.kv: dict[str, np.ndarray] | SharedKV | None = None
        self.mask: np.ndarray | None = None  # portable graph: [B, W]
        self.steps = 0  # decode steps run
        self.max_rows = 0  # the largest batch a step ran

    def add(self, prepared: Prepared, *, max_new_tokens: int = 64, keep_logits: bool = False,
            **sampling) -> _Row:
        """Prefill ``prepared`` and add its row (``sampling``: generate_prepared's sample, temperature, top_k,
        top_p, seed, stop, on_text). The row is returned; its ``result`` is set once it is done (which may be
        at once: a stop token first, or max_new_tokens 1). A prompt that fills the context raises a LimitError
        before any graph runs."""
        vlm = self.vlm
        row = _Row(self.family, prepared, fit_to_context(prepared.seq_len, max_new_tokens, vlm.context_length),
                   keep_logits=keep_logits, **sampling)
        t0 = time.perf_counter()
        # the prefill generate_prepared runs (the same cache kind), so its logits are batch 1's to the bit
        logits, present = vlm.prefill(prepared, capacity=prepared.seq_len + row.max_new_tokens, logits_to_keep=1)
        row.prefill_s = time.perf_counter() - t0
        row.t_decode = time.perf_counter()
        if not row.take(logits[0, -1]):
            parts = [(self.kv, i, self._mask_row(i)) for i in range(len(self.rows))]
            self._rebuild(self.rows + [row], parts + [(present, 0, np.ones(prepared.seq_len, np.int64))])
        return row

    def cancel(self, row: _Row) -> None:
        """Drop ``row`` from the batch (e.g. its client went away); its ``result`` stays None."""
        if row in self.rows:
            self._keep([r for r in self.rows if r is not row])

    def step(self) -> list[_Row]:
        """One decode step of every row; returns the rows that are done (they have left the batch)."""
        rows, vlm = self.rows, self.vlm
        ids = np.array([[r.tokens[-1]] for r in rows], np.int64)
        emb = vlm.runner("embed_tokens").infer({"input_ids": ids})["inputs_embeds"]
        counts = np.array([r.count for r in rows])
        if self.shared:
            mask = (np.arange(counts.max() + 1)[None, :] <= counts[:, None]).astype(np.int64)
        else:
            mask = np.concatenate([self.mask, np.ones((len(rows), 1), np.int64)], axis=1)
        pos = np.concatenate([self.family.decode_position_ids(r.prepared.rope_delta, r.count) for r in rows],
                             axis=-2)
        logits, self.kv = vlm.llm(emb, mask, pos, self.kv, self.family.llm_decode_feeds(len(rows)))
        self.mask = None if self.shared else mask
        self.steps += 1
        self.max_rows = max(self.max_rows, len(rows))
        done = []
        for i, r in enumerate(rows):
            r.count += 1
            if r.take(logits[i, -1]):
                done.append(r)
        if done:
            self._keep([r for r in rows if r.result is None])
        return done

    # ------------------------------------------------------------------ the cache
    def _mask_row(self, i: int) -> np.ndarray:
        """Row ``i``'s columns of the cache (1: a token), as the mask shows them."""
        return np.ones(self.rows[i].count, np.int64) if self.shared else self.mask[i]

    def _keep(self, rows: list[_Row]) -> None:
        index = {id(r): i for i, r in enumerate(self.rows)}
        parts = [(self.kv, index[id(r)], self._mask_row(index[id(r)])) for r in rows]
        self._rebuild(rows, parts)

    def _rebuild(self, rows: list[_Row], parts: list[tuple]) -> None:
        """Make ``rows`` the batch: row i's cache copies row ``j`` of cache ``src`` for ``(src, j, mask_row)`` =
        ``parts[i]`` (its columns ``[0, len(mask_row))``)."""
        if not parts:
            self.rows, self.kv, self.mask = [], None, None
            return
        f = self.family
        width = max(len(m) for _, _, m in parts)
        if self.shared:
            kv = SharedKV(f, len(parts), max(r.count + r.room for r in rows))
            kv.length = width
            dst = kv.arrays
        else:
            shape = (len(parts), f.num_kv_heads, width, f.head_dim)
            dst = {f"past_{kind}_{i}": np.zeros(shape, np.float32)
                   for i in range(f.num_layers) for kind in ("key", "value")}
            mask = np.zeros((len(parts), width), np.int64)
        for i, (src, j, m) in enumerate(parts):
            arrays = src.arrays if isinstance(src, SharedKV) else src
            for name, a in dst.items():
                a[i, :, :len(m)] = arrays[name][j, :, :len(m)]
            if not self.shared:
                mask[i, :len(m)] = m
        self.rows = rows
        if self.shared:
            self.kv = kv
        else:
            used = mask.any(axis=0)  # columns every row masks carry nothing
            self.kv = {name: a[:, :, used] for name, a in dst.items()} if not used.all() else dst
            self.mask = mask[:, used]
