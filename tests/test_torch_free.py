"""Deployment without torch: the torch-free preprocessing equals transformers', and run, serve, inspect, lint and
build work with none of the quantize extra's packages importable (torch, transformers, ...); an export on such a
runtime-only install is one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmq_export import cli
from vlmq_export.models import load_family
from vlmq_export.models.processing import Config, Tokenizer
from vlmq_export.runtime.generate import OnnxVLM
from vlmq_export.testing.tiny_gemma3 import make_tiny_gemma3
from vlmq_export.testing.tiny_llava import make_tiny_llava_next, make_tiny_llava_onevision
from vlmq_export.testing.tiny_qwen2_5_vl import make_tiny_qwen2_5_vl
from vlmq_export.testing.tiny_qwen3_vl import make_tiny_qwen3_vl
from vlmq_export.testing.tiny_smolvlm import make_tiny_smolvlm

FAMILIES = ("qwen2_vl", "smolvlm")
RUN_FAMILIES = (*FAMILIES, "qwen2_5_vl", "qwen3_vl", "llava_next", "llava_onevision", "gemma3")  # exported and run without torch
PROMPT = "What is in the picture?"
# the quantize extra's packages: a runtime-only install has none of them
QUANTIZE_ONLY = ("torch", "transformers", "onnxscript", "onnx_ir", "safetensors", "matplotlib")
# startup of every torch-free subprocess: those packages cannot be imported, and none was at exit
NO_TORCH = (f"import sys, atexit; QUANTIZE_ONLY = {QUANTIZE_ONLY!r}\n"
            "sys.modules.update(dict.fromkeys(QUANTIZE_ONLY))\n"
            "atexit.register(lambda: [m for m in sys.modules if m.split('.')[0] in QUANTIZE_ONLY and "
            "sys.modules[m] is not None] and print('HEAVY IMPORTED', file=sys.stderr))\n")


def _image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256, (x * y) % 256], -1)
    img = Image.fromarray(((base + rng.integers(0, 64, (h, w, 4))) % 256).astype(np.uint8), "RGBA")
    return img if mode == "RGBA" else img.convert(mode)


# sizes and aspect ratios: landscape, portrait, tiny (upscaled), very wide, large; RGBA and grayscale inputs
IMAGES = {"90x120": _image(90, 120, 0), "200x60": _image(200, 60, 1), "40x40": _image(40, 40, 2),
          "33x250": _image(33, 250, 3), "300x220": _image(300, 220, 4), "rgba": _image(70, 50, 5, "RGBA"),
          "gray": _image(64, 96, 6, "L")}
CASES = [["90x120"], ["200x60"], ["40x40"], ["33x250"], ["300x220"], ["rgba"], ["gray"], ["90x120", "200x60"],
         ["33x250", "300x220"]]


@pytest.fixture(scope="module")
def model_dirs(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    split = make_tiny_smolvlm(tmp_path_factory.mktemp("tiny_smolvlm_split"), seed=0, image_splitting=True)
    return {**tiny_dirs, "smolvlm_split": split}


@pytest.fixture(scope="module")
def hf(model_dirs) -> dict:
    """transformers' tokenizer and image processor of each model directory."""
    from transformers import AutoImageProcessor, AutoTokenizer

    return {name: (AutoTokenizer.from_pretrained(d), AutoImageProcessor.from_pretrained(d))
            for name, d in model_dirs.items()}


@pytest.fixture(scope="module")
def exports(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("torch_free")
    sources = {**tiny_dirs, "qwen2_5_vl": make_tiny_qwen2_5_vl(root / "tiny_qwen2_5_vl"),
               "qwen3_vl": make_tiny_qwen3_vl(root / "tiny_qwen3_vl"),
               "llava_next": make_tiny_llava_next(root / "tiny_llava_next"),
               "llava_onevision": make_tiny_llava_onevision(root / "tiny_llava_onevision"),
               "gemma3": make_tiny_gemma3(root / "tiny_gemma3")}
    for fam in RUN_FAMILIES:
        assert cli.main([str(sources[fam]), "--int4", "--method", "rtn", "--no-validate", "-o", str(root / fam),
                         "--n-calib", "2", "--quiet"]) == 0
    return {fam: root / fam for fam in RUN_FAMILIES}


def _messages(n_images: int, prompt: str = PROMPT, answer: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def _qwen2_vl_reference(tok, ip, images: list, prompt: str) -> dict:
    """What Qwen2VLProcessor does (it needs torchvision for its video half, so its steps are spelled out)."""
    text = tok.apply_chat_template(_messages(len(images), prompt), tokenize=False, add_generation_prompt=True)
    out = ip(images=[im.convert("RGB") for im in images], return_tensors="np")
    counts = iter((out["image_grid_thw"].prod(-1) // ip.merge_size**2).tolist())
    parts = text.split("<|image_pad|>")
    text = parts[0] + "".join("<|image_pad|>" * next(counts) + p for p in parts[1:])
    return {"input_ids": np.asarray([tok(text, add_special_tokens=False)["input_ids"]]), **out}


def _smolvlm_reference(tok, ip, images: list, prompt: str, image_seq_len: int) -> dict:
    from transformers import Idefics3Processor  # SmolVLMProcessor's video half needs torchvision

    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=image_seq_len,
                             chat_template=tok.chat_template)
    text = proc.apply_chat_template(_messages(len(images), prompt), add_generation_prompt=True)
    return dict(proc(images=images, text=text, return_tensors="np"))


# ---------------------------------------------------------------------------------- against transformers
@pytest.mark.parametrize("name", ["qwen2_vl", "smolvlm", "smolvlm_split"])
def test_chat_template_and_tokenizer_match_transformers(model_dirs, hf, name):
    tok, _ = hf[name]
    light = load_family(model_dirs[name], torch_free=True).tokenizer
    assert isinstance(light, Tokenizer)
    for n, answer, gen in ((0, None, True), (1, None, True), (2, None, False), (1, "Two red squares.", False)):
        msgs = _messages(n, answer=answer)
        assert light.apply_chat_template(msgs, add_generation_prompt=gen) == tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen)
    text = tok.apply_chat_template(_messages(2, "Ünïcode, digits 12345 and  spaces?\n"), tokenize=False)
    for special in (True, False):
        ids = light.encode(text, add_special_tokens=special)
        assert ids == tok(text, add_special_tokens=special)["input_ids"]
        for skip in (True, False):
            assert light.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(light, attr) == getattr(tok, attr), attr


@pytest.mark.parametrize("case", CASES, ids=["+".join(c) for c in CASES])
@pytest.mark.parametrize("name", ["qwen2_vl", "smolvlm", "smolvlm_split"])
def test_prepare_matches_transformers(model_dirs, hf, name, case):
    fam = load_family(model_dirs[name], torch_free=True)
    assert isinstance(fam.config, Config)  # nothing from transformers in a torch-free family
    images = [IMAGES[k] for k in case]
    p = fam.prepare(images, PROMPT)
    tok, ip = hf[name]
    if name == "qwen2_vl":
        ref = _qwen2_vl_reference(tok, ip, images, PROMPT)
        np.testing.assert_array_equal(p.pixel["image_grid_thw"], ref["image_grid_thw"])
    else:
        ref = _smolvlm_reference(tok, ip, images, PROMPT, fam.image_seq_len)
        np.testing.assert_array_equal(p.pixel["pixel_attention_mask"], ref["pixel_attention_mask"])
        if name == "smolvlm_split" and case == ["300x220"]:  # split into tiles: the <row_r_col_c> layout
            assert "<row_2_col_2>" in tok.decode(p.input_ids[0]) and p.pixel["pixel_values"].shape[1] > 1
    np.testing.assert_array_equal(p.input_ids, ref["input_ids"])
    assert p.pixel["pixel_values"].shape == ref["pixel_values"].shape
    np.testing.assert_allclose(p.pixel["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(p.image_mask, p.input_ids == fam.image_token_id)


def test_qwen2_vl_mrope_positions_match_transformers(model_dirs, hf):
    import torch

    from vlmq_export.models.qwen2_vl import Qwen2VLFamily

    fam = load_family(model_dirs["qwen2_vl"], torch_free=True)
    model = Qwen2VLFamily.from_dir(model_dirs["qwen2_vl"]).load_model(model_dirs["qwen2_vl"])
    for case in (["90x120"], ["33x250", "300x220"], []):
        p = fam.prepare([IMAGES[k] for k in case], PROMPT, answer="Shapes.")
        ids = torch.from_numpy(p.input_ids)
        grid = torch.from_numpy(p.pixel["image_grid_thw"]) if case else None
        pos, delta = model.model.get_rope_index(ids, (ids == fam.image_token_id).long(), image_grid_thw=grid,
                                                attention_mask=torch.ones_like(ids))
        np.testing.assert_array_equal(p.position_ids, pos.numpy())
        assert p.rope_delta == int(delta.reshape(-1)[0])


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_greedy_tokens_unchanged(exports, model_dirs, hf, name):
    """Greedy tokens of the torch-free family equal those of the same graphs fed transformers' preprocessing."""
    vlm = OnnxVLM(exports[name], accuracy_level=0)
    images = [IMAGES["90x120"], IMAGES["200x60"]]
    got = vlm.generate(images, PROMPT, max_new_tokens=8, stop=False)
    tok, ip = hf[name]
    p = vlm.family.prepare(images, PROMPT)
    if name == "qwen2_vl":
        ref = _qwen2_vl_reference(tok, ip, images, PROMPT)
        p.pixel = {"pixel_values": ref["pixel_values"].astype(np.float32), "image_grid_thw": ref["image_grid_thw"]}
    else:
        ref = _smolvlm_reference(tok, ip, images, PROMPT, vlm.family.image_seq_len)
        p.pixel = {k: ref[k] for k in ("pixel_values", "pixel_attention_mask")}
    p.input_ids = ref["input_ids"].astype(np.int64)
    want = vlm.generate_prepared(p, max_new_tokens=8, stop=False)
    assert len(got.token_ids) == 8 and got.token_ids == want.token_ids
    assert got.text == tok.decode(want.token_ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------- torch unimportable
def _no_torch(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-c", NO_TORCH + code], capture_output=True, text=True, timeout=timeout)
    assert "HEAVY IMPORTED" not in res.stderr, res.stderr
    return res


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return _no_torch(f"from vlmq_export.cli import main\nsys.exit(main({args!r}))")


@pytest.mark.parametrize("name", RUN_FAMILIES)
def test_run_without_torch(exports, tmp_path, name):
    img = tmp_path / "photo.png"
    IMAGES["300x220"].convert("RGB").save(img)
    res = _cli(["run", str(exports[name]), "--image", str(img), "--prompt", PROMPT, "--max-new-tokens", "6",
                "--no-stop", "--accuracy-level", "0", "--json"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    want = OnnxVLM(exports[name], accuracy_level=0).generate([Image.open(img)], PROMPT, max_new_tokens=6, stop=False)
    assert out["token_ids"] == want.token_ids and len(want.token_ids) == 6


@pytest.mark.parametrize("verb", ["inspect", "lint"])
def test_inspect_and_lint_without_torch(exports, verb):
    res = _cli([verb, str(exports["qwen2_vl"]), "--json"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)


def test_build_without_torch(rtn_exports, tmp_path):
    out = tmp_path / "out"  # the portable llm graph (build refuses ONNX Runtime's fused flavour, the default)
    shutil.copytree(rtn_exports["qwen2_vl"], out)
    res = _cli(["build", str(out), "--json"])
    assert res.returncode == 0, res.stderr
    assert (out / "build_engines.sh").is_file() and (out / "engines" / "profiles.json").is_file()


def test_serve_without_torch_answers_a_request(exports):
    code = f"""
import http.client, json, threading
from vlmq_export.runtime.server import make_server
srv = make_server({str(exports['smolvlm'])!r}, port=0, accuracy_level=0, max_tokens_limit=8)
threading.Thread(target=srv.serve_forever, daemon=True).start()
conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=120)
conn.request("POST", "/v1/chat/completions", body=json.dumps({{"messages": [{{"role": "user", "content": "Hi"}}],
             "max_tokens": 4}}), headers={{"Content-Type": "application/json"}})
resp = conn.getresponse()
print(resp.status, resp.read().decode())
srv.shutdown()
"""
    res = _no_torch(code)
    assert res.returncode == 0, res.stderr
    status, body = res.stdout.split(" ", 1)
    assert status == "200", body
    assert json.loads(body)["usage"]["completion_tokens"] >= 1


def test_export_on_a_runtime_only_install_says_install_quantize(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    res = _cli([str(tiny_dirs["smolvlm"]), "--int4", "-o", str(out)])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmq-export: error: ") and "vlmq-export[quantize]" in lines[0]
    assert not out.exists()
