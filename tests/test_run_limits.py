"""`run` (and `serve`, `eval`) refuse what they cannot run well, in one line and before any graph runs: empty
prompts, out-of-range sampling flags, prompts beyond the model's context, too many or too large images, a
graph that does not match its manifest hash."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from vlmq_export import cli
from vlmq_export.errors import OutputDirError
from vlmq_export.runtime import limits
from vlmq_export.runtime.generate import OnnxVLM


@pytest.fixture(scope="module")
def exported(rtn_exports) -> Path:
    return rtn_exports["smolvlm"]


@pytest.fixture(scope="module")
def vlm(exported) -> OnnxVLM:
    return OnnxVLM(exported, accuracy_level=0)


def _run(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["run", *map(str, args), "--quiet"])
    return code, capsys.readouterr().err


def _one_line_error(code: int, err: str, words: str) -> None:
    assert code == 2, err
    assert err.startswith("vlmq-export: error: ") and err.count("\n") == 1 and words in err, err


def _prompt_of(vlm: OnnxVLM, tokens: int) -> str:
    """A text prompt of exactly ``tokens`` tokens, chat template included (bisection on its length)."""
    lo, hi = 0, tokens
    while lo < hi:
        mid = (lo + hi) // 2
        if vlm.family.prepare([], "a " * mid).seq_len < tokens:
            lo = mid + 1
        else:
            hi = mid
    assert vlm.family.prepare([], "a " * lo).seq_len == tokens
    return "a " * lo


def _png(path: Path, size: tuple[int, int]) -> Path:
    Image.new("1", size).save(path)  # 1-bit and blank: a few KB for hundreds of megapixels
    return path


@pytest.mark.parametrize("args, words", [
    (("--prompt", ""), "the prompt is empty"),
    (("--prompt", "   "), "the prompt is empty"),
    (("--prompt", "Hi", "--max-new-tokens", "-1"), "--max-new-tokens must be >= 1, got -1"),
    (("--prompt", "Hi", "--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    (("--prompt", "Hi", "--sample", "--temperature", "nan"), "--temperature must be a finite number"),
    (("--prompt", "Hi", "--sample", "--top-p", "0"), "--top-p must be in"),
    (("--prompt", "Hi", "--sample", "--top-k", "1000000000"), "--top-k must be in [0, "),
    (("--prompt", "Hi", "--sample", "--seed", "-1"), "--seed must be in [0, "),
])
def test_run_refuses_bad_arguments_in_one_line(exported, capsys, args, words):
    _one_line_error(*_run(capsys, exported, *args), words)


def test_run_refuses_a_prompt_beyond_the_context(exported, vlm, capsys):
    ctx = vlm.context_length
    assert ctx == 2048  # the tiny SmolVLM's max_position_embeddings
    _one_line_error(*_run(capsys, exported, "--prompt", _prompt_of(vlm, ctx)), f"the prompt is {ctx} tokens")
    assert _run(capsys, exported, "--prompt", _prompt_of(vlm, ctx - 1), "--max-new-tokens", "4")[0] == 0


def test_generation_is_clamped_to_the_context_left(vlm):
    ctx = vlm.context_length
    res = vlm.generate_prepared(vlm.family.prepare([], _prompt_of(vlm, ctx - 3)), max_new_tokens=32, stop=False)
    assert len(res.token_ids) == 3  # not 32: prompt + answer fit the context
    with pytest.raises(limits.LimitError, match="no room for an answer"):
        vlm.generate_prepared(vlm.family.prepare([], _prompt_of(vlm, ctx + 5)))


def test_run_caps_images_per_prompt_and_pixels_per_image(exported, tmp_path, capsys):
    small = _png(tmp_path / "small.png", (32, 32))
    _one_line_error(*_run(capsys, exported, "--prompt", "Hi", *["--image", small] * 3, "--max-images", "2"),
                    "3 images, more than the limit of 2")
    big = _png(tmp_path / "big.png", (5000, 5000))  # 25 Mpx: over the default 4096 x 4096, under Pillow's limit
    _one_line_error(*_run(capsys, exported, "--prompt", "Hi", "--image", big), "over the limit of 16777216")
    for size in ((10_000, 10_000), (20_000, 20_000)):  # Pillow's DecompressionBombWarning, then its Error
        bomb = _png(tmp_path / f"bomb{size[0]}.png", size)
        _one_line_error(*_run(capsys, exported, "--prompt", "Hi", "--image", bomb, "--max-image-pixels", str(10**9)),
                        "decompression bomb")
    code, err = _run(capsys, exported, "--prompt", "Hi", "--image", small, "--max-new-tokens", "2")
    assert code == 0, err


def test_open_image_checks_the_header_before_decoding(monkeypatch):
    from vlmq_export.data.loader import open_image

    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="PNG")

    def no_decoding(self):
        raise AssertionError("decoded an image that its header already refuses")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(limits.LimitError, match="300x200 = 60000 pixels is over the limit of 59999"):
        open_image(io.BytesIO(buf.getvalue()), max_pixels=59_999, name="upload")


@pytest.fixture(scope="module")
def tampered(exported, tmp_path_factory) -> Path:
    """A copy of the export with one byte flipped inside the llm graph's largest weight."""
    out = tmp_path_factory.mktemp("tampered") / "smolvlm"
    shutil.copytree(exported, out)
    path = out / "llm.onnx"
    data = bytearray(path.read_bytes())
    raw = max((t.raw_data for t in onnx.load(str(path)).graph.initializer), key=len)
    at = data.find(raw) + len(raw) // 2
    assert at > len(raw) // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    return out


def test_a_tampered_graph_is_refused_by_run_serve_and_eval(tampered, capsys):
    _one_line_error(*_run(capsys, tampered, "--prompt", "Hi"), "llm.onnx does not match its sha256")
    code = cli.main(["eval", str(tampered), "--n", "1", "--quiet"])
    _one_line_error(code, capsys.readouterr().err, "llm.onnx does not match its sha256")
    from vlmq_export.runtime.server import make_server

    with pytest.raises(OutputDirError, match="llm.onnx does not match its sha256"):
        make_server(tampered, port=0)
    # --no-verify skips the check (and runs the tampered graph)
    code, err = _run(capsys, tampered, "--prompt", "Hi", "--max-new-tokens", "2", "--no-verify")
    assert code == 0, err


def test_limits_check_range_refuses_non_finite_numbers():
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(limits.LimitError, match="finite"):
            limits.check_range("temperature", bad, 0.0, 2.0)
    assert limits.check_range("temperature", 0.5, 0.0, 2.0) == 0.5
    assert np.isfinite(limits.check_range("top_p", 1.0, 1e-6, 1.0))


def test_run_refuses_placeholders_that_do_not_match_the_images(exported, tmp_path, capsys):
    """SmolVLM's explicit <image> placeholders against the images given: one line, exit 2 (was an internal error)."""
    from PIL import Image

    out = exported
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (9, 9, 9)).save(img)
    capsys.readouterr()
    assert cli.main(["run", str(out), "--image", str(img), "--prompt", "<image> and <image>?"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("vlmq-export: error: prompt has 2 <image> placeholders but 1 images")
