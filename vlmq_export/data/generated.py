"""Data-free calibration text: sequences sampled from the full-precision model itself.

A model's own samples cover what it has learned to write rather than one domain. Mixed into a VLM's
calibration set (``--calib-text N``), they keep the language model's general text ability in the
Hessians next to the task's image prompts. On SmolLM2-135M (W4 g128, English evaluation text, FP 22.2)
GPTQ calibrated on 64 such samples reached perplexity 30.8 against 37.1 for 16 pydoc passages and 31.9
for RTN (``benchmarks/lm_quality.md``).

Reproducible for a seed whatever torch's thread count: on the CPU the sampling runs with torch at one
thread (set within :func:`one_thread`, restored after). The thread count changes how a matrix product's
sums are split, so at 1 and 2 threads SmolLM2-135M's logits for one decoding step differ in the last bits
(~6e-5); sampling draws a token by comparing a random number with cumulative probabilities, and one
draw that lands between the two runs' boundaries flips a token, after which the sequences diverge.
Rounding the logits (to a grid, to float16) before sampling does not remove that: it only moves the
boundaries (a logit near a rounding edge flips just as a near tie does), so the chance of a flip per token
stays of the same order. One thread makes the logits themselves identical. What it costs: generation
uses one core (on a GPU nothing changes: the model's device computes as it always does). Runs on
different CPU kinds (other vector instructions) or on a GPU may still sample different text.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .samples import Sample


def generated_text_samples(family, model, n: int, tokens: int = 400, prompt_tokens: int | None = None, seed: int = 0,
                           temperature: float = 1.0) -> list[Sample]:
    """``n`` text-only samples of ``tokens`` tokens sampled from ``model`` (from the BOS token, plain
    sampling at ``temperature``, seeded; the global RNG state is left as it was), each split into a prompt
    (the first ``prompt_tokens``, default ``min(64, tokens // 4)``) and an answer that continues it."""
    if prompt_tokens is None:
        prompt_tokens = min(64, tokens // 4)
    if n < 1 or tokens < 2 or not 0 < prompt_tokens < tokens:
        raise ValueError(f"generated text needs n >= 1 and 0 < prompt_tokens < tokens (got {n}, {prompt_tokens}, {tokens})")
    tok = family.tokenizer
    out = generated_token_ids(family, model, n, tokens, seed, temperature)
    samples = []
    for i, row in enumerate(out.tolist()):
        prompt = tok.decode(row[:prompt_tokens], skip_special_tokens=True)
        answer = tok.decode(row[prompt_tokens:], skip_special_tokens=True)
        samples.append(Sample([], prompt, answer, f"generated:{i}"))
    return samples


def generated_token_ids(family, model, n: int, tokens: int, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """The sampled token ids [n, tokens] (BOS left out) of :func:`generated_text_samples`."""
    tok = family.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start generated text from")
    device = next(model.parameters()).device
    start = torch.full((n, 1), int(bos), dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), one_thread(device.type == "cpu"):
        torch.manual_seed(seed)
        out = model.generate(input_ids=start, attention_mask=torch.ones_like(start), do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=tokens,
                             min_new_tokens=tokens, pad_token_id=int(bos))
    return out[:, 1:].cpu()


@contextmanager
def one_thread(active: bool = True):
    """torch at one intra-op thread inside (when ``active``), its thread count restored after."""
    n = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
