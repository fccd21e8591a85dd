"""The ONNX Runtime flavour of the llm graph (export/ort_flavour.py) and its in-place KV cache (runtime SharedKV):
the same greedy tokens and logits as the portable graph, float and Q/DQ; merged weights exact; the flag."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from vlmq_export import cli
from vlmq_export.export.ort_flavour import (FLAVOUR_ORT, FLAVOUR_PORTABLE, Weight, choose_llm_graph, merge,
                                            read_weights, write_ort_llm)
from vlmq_export.models import load_family
from vlmq_export.runtime.generate import SharedKV, OnnxVLM

PROMPT = "Write one sentence about the sea."
TOKENS = 40


@pytest.fixture(scope="module")
def dirs(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """One portable RTN export of the tiny SmolVLM (float graphs kept), and copies whose llm.onnx is the ORT flavour
    of its Q/DQ graph ("ort") and of its float graph ("ort_float", beside a "float" directory of float graphs)."""
    root = tmp_path_factory.mktemp("ort_flavour")
    out = root / "portable"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "--method", "rtn", "--no-validate", "--llm-graph",
                     "portable", "--keep-float", "--n-calib", "2", "-o", str(out), "--quiet"]) == 0
    text_config = load_family(out / "processor", torch_free=True).text_config
    dirs = {"portable": out}
    for name, src in (("ort", out), ("float", out / "float"), ("ort_float", out / "float")):
        d = root / name
        shutil.copytree(out, d, ignore=shutil.ignore_patterns("float"))
        for g in ("vision_encoder", "projector", "embed_tokens", "llm"):
            shutil.copy(src / f"{g}.onnx", d / f"{g}.onnx")
        if name.startswith("ort"):
            write_ort_llm(src / "llm.onnx", d / "llm.onnx", text_config)
        dirs[name] = d
    return dirs


def _step_logits(vlm: OnnxVLM, prepared, tokens: list[int]) -> list[np.ndarray]:
    """Last-row logits of the prefill and of each decode step fed ``tokens`` (teacher forcing)."""
    emb = vlm.embeddings(prepared)
    seq = prepared.seq_len
    logits, past = vlm.llm(emb, np.ones((1, seq), np.int64), prepared.position_ids,
                           vlm.empty_past(capacity=seq + len(tokens)))
    rows = [logits[0, -1]]
    for k, tok in enumerate(tokens):
        e = vlm.runner("embed_tokens").infer({"input_ids": np.array([[tok]], np.int64)})["inputs_embeds"]
        logits, past = vlm.llm(e, np.ones((1, seq + k + 1), np.int64), np.array([[seq + k]], np.int64), past)
        rows.append(logits[0, -1])
    return rows


@pytest.mark.parametrize("pair", [("portable", "ort"), ("float", "ort_float")], ids=["qdq", "float"])
def test_ort_flavour_gives_the_portable_graphs_tokens_and_logits(dirs, pair):
    portable, ort = (OnnxVLM(dirs[d], accuracy_level=0) for d in pair)
    assert (portable.llm_flavour, ort.llm_flavour) == (FLAVOUR_PORTABLE, FLAVOUR_ORT)
    prepared = portable.family.prepare([], PROMPT)
    want = portable.generate_prepared(prepared, max_new_tokens=TOKENS, stop=False)
    got = ort.generate_prepared(prepared, max_new_tokens=TOKENS, stop=False)
    assert len(want.token_ids) == TOKENS and got.token_ids == want.token_ids
    a, b = _step_logits(portable, prepared, want.token_ids[:33]), _step_logits(ort, prepared, want.token_ids[:33])
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) < 1e-3
    assert np.abs(portable.prompt_logits(prepared) - ort.prompt_logits(prepared)).max() < 1e-3  # every prompt row


def test_ort_flavour_with_an_image_and_at_the_served_accuracy_level(dirs):
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    portable, ort = OnnxVLM(dirs["portable"]), OnnxVLM(dirs["ort"])  # level 4, as `run` serves them
    prepared = portable.family.prepare([img], "Describe the image.")
    assert ort.generate_prepared(prepared, max_new_tokens=16, stop=False).token_ids == \
        portable.generate_prepared(prepared, max_new_tokens=16, stop=False).token_ids


def test_logits_to_keep_runs_the_head_on_the_last_positions_only(dirs):
    """The ORT flavour's ``logits_to_keep`` (HF's meaning: 0 keeps every position): N > 0 gives the last N rows of the
    full logits, and the portable graph, which lacks the input, still answers with every row."""
    ort, portable = OnnxVLM(dirs["ort"], accuracy_level=0), OnnxVLM(dirs["portable"], accuracy_level=0)
    prepared = ort.family.prepare([], PROMPT)
    seq, emb = prepared.seq_len, ort.embeddings(prepared)
    mask = np.ones((1, seq), np.int64)
    full, _ = ort.llm(emb, mask, prepared.position_ids, ort.empty_past())
    assert full.shape[:2] == (1, seq)
    for keep in (1, 3, seq + 5):
        got, _ = ort.llm(emb, mask, prepared.position_ids, ort.empty_past(), logits_to_keep=keep)
        assert got.shape[:2] == (1, min(keep, seq)) and np.abs(got - full[:, -min(keep, seq):]).max() < 1e-5
    got, _ = portable.llm(emb, mask, prepared.position_ids, portable.empty_past(), logits_to_keep=1)
    assert got.shape[:2] == (1, seq)


def test_the_kv_cache_stays_in_place_and_grows_when_needed(dirs):
    vlm = OnnxVLM(dirs["ort"], accuracy_level=0)
    prepared = vlm.family.prepare([], PROMPT)
    seq = prepared.seq_len
    cache = vlm.empty_past(capacity=seq)
    assert isinstance(cache, SharedKV)
    buffer = cache.arrays["past_key_0"]
    _, past = vlm.llm(vlm.embeddings(prepared), np.ones((1, seq), np.int64), prepared.position_ids, cache)
    assert past is cache and cache.arrays["past_key_0"] is buffer and cache.length == seq
    assert np.abs(buffer[:, :, :seq]).min(axis=-1).max() > 0  # GroupQueryAttention wrote the keys in place
    keys = buffer[:, :, :seq].copy()
    e = vlm.runner("embed_tokens").infer({"input_ids": np.array([[7]], np.int64)})["inputs_embeds"]
    vlm.llm(e, np.ones((1, seq + 1), np.int64), np.array([[seq]], np.int64), cache)  # one past the capacity
    assert cache.capacity == seq + 1 and np.array_equal(cache.arrays["past_key_0"][:, :, :seq], keys)
    assert np.abs(cache.arrays["past_key_0"][:, :, seq]).max() > 0


def test_plain_arrays_still_work_on_the_ort_graph(dirs):
    """Callers that feed numpy caches (0 positions, then the presents back) get the same logits from the ORT graph:
    ONNX Runtime's attention copies past into a new present when the two are not one buffer."""
    portable, ort = OnnxVLM(dirs["portable"], accuracy_level=0), OnnxVLM(dirs["ort"], accuracy_level=0)
    prepared = portable.family.prepare([], PROMPT)
    seq, emb = prepared.seq_len, portable.embeddings(prepared)
    outs = []
    for vlm in (portable, ort):
        past = vlm.empty_past()
        assert isinstance(past, dict) and past["past_key_0"].shape[2] == 0
        _, past = vlm.llm(emb, np.ones((1, seq), np.int64), prepared.position_ids, past)
        logits, past = vlm.llm(emb[:, -1:], np.ones((1, seq + 1), np.int64), np.array([[seq]], np.int64), past)
        assert past["past_key_0"].shape[2] == seq + 1
        outs.append(logits)
    assert np.abs(outs[0] - outs[1]).max() < 1e-3


def test_the_graph_is_fused_and_the_weights_merged_exactly(dirs):
    ort = onnx.load(str(dirs["ort"] / "llm.onnx"))
    ops = [n.op_type for n in ort.graph.node]
    layers = load_family(dirs["ort"] / "processor", torch_free=True).num_layers
    assert ops.count("GroupQueryAttention") == layers and "Concat" not in ops and "Expand" not in ops
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers  # every residual add but the embeddings'
    # q|k|v, o, gate|up, down and the INT8 lm_head (the onnxruntime default head, targets.RECIPE_DEFAULTS)
    assert ops.count("DequantizeLinear") == 4 * layers + 1
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in ort.graph.initializer}
    src = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(dirs["portable"] / "llm.onnx")).graph.initializer}
    base = "model_text_model_layers_1_self_attn_"
    for part in ("q", "scale"):
        merged = inits[f"layers.1.qkv_proj_{part}"]
        assert np.array_equal(merged, np.concatenate([src[f"{base}{p}_proj_{part}"] for p in "qkv"], axis=1))


def test_merge_refuses_weights_of_different_formats():
    w = Weight(np.zeros((4, 2), np.float32))
    assert merge([w, w]).value.shape == (4, 4)
    with pytest.raises(ValueError):
        merge([w, Weight(np.zeros((4, 2), np.int8), np.ones((1, 2), np.float32))])


def test_a_graph_that_quantizes_activations_is_refused():
    """W8A8 graphs carry activation QuantizeLinears that rebuilt MatMuls would silently drop."""
    from onnx import TensorProto, helper

    from vlmq_export.export.ort_flavour import build_llm

    node = helper.make_node("QuantizeLinear", ["x", "s"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT8, [2])],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [1.0])])
    with pytest.raises(ValueError, match="QuantizeLinear"):
        build_llm(helper.make_model(graph), num_heads=1, num_kv_heads=1, head_dim=2, hidden_size=2,
                  rms_norm_eps=1e-5, max_positions=4)


def test_the_flavour_choice(tiny_dirs):
    smol = load_family(tiny_dirs["smolvlm"]).text_config
    qwen = load_family(tiny_dirs["qwen2_vl"]).text_config
    assert choose_llm_graph(None, "onnxruntime", "fp32", smol) == FLAVOUR_ORT
    assert choose_llm_graph(None, "onnxruntime", "fp32", qwen) == FLAVOUR_ORT  # M-RoPE rotated before GQA
    assert choose_llm_graph(None, "tensorrt", "fp32", qwen) == FLAVOUR_PORTABLE
    assert choose_llm_graph(None, "tensorrt", "fp16", smol) == FLAVOUR_PORTABLE
    assert choose_llm_graph(None, "onnxruntime", "fp16", smol) == FLAVOUR_PORTABLE
    assert choose_llm_graph("portable", "onnxruntime", "fp32", smol) == FLAVOUR_PORTABLE


@pytest.mark.parametrize("change, why", [
    ({}, None),
    ({"rope_parameters": None, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}}, None),  # older form
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "no mrope_section"),
    ({"rope_parameters": {"rope_type": "yarn", "mrope_section": [4, 6, 6]}}, "RoPE type yarn"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"model_type": "qwen3"}, "not qwen3"),
])
def test_what_the_ort_flavour_takes_of_a_qwen_text_config(change, why):
    from vlmq_export.export.ort_flavour import unsupported
    from vlmq_export.models.processing import Config

    config = {"model_type": "qwen2_vl_text", "hidden_act": "silu", "use_sliding_window": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}}
    got = unsupported(Config({**config, **change}))
    assert got == why if why is None else why in got


@pytest.mark.parametrize("fam, flags, message", [
    ("smolvlm", ["--target", "tensorrt"], "--llm-graph ort: --target tensorrt runs the portable graph"),
    ("smolvlm", ["--dtype", "fp16"], "--llm-graph ort: the ORT flavour is built for float32"),
    ("qwen2_vl", ["--target", "tensorrt"], "--llm-graph ort: --target tensorrt runs the portable graph"),
])
def test_an_ort_request_that_cannot_be_met_is_a_user_error(tiny_dirs, tmp_path, capsys, fam, flags, message):
    out = tmp_path / "out"
    assert cli.main([str(tiny_dirs[fam]), "--int4", "--method", "rtn", "--llm-graph", "ort", *flags,
                     "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmq-export: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_the_default_export_holds_the_ort_flavour_and_says_so(tiny_dirs, dirs, tmp_path):
    """The default onnxruntime export of a Llama decoder is the ORT flavour; the manifest says so and points each
    layer at its part of the merged weights, so `validate` reads back the same codes as from the portable graph."""
    from vlmq_export.pipeline import load_quantized_weights

    out = tmp_path / "default"
    assert cli.main([str(tiny_dirs["smolvlm"]), "--int4", "--method", "rtn", "--no-validate", "--n-calib", "2",
                     "-o", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["llm"]["flavour"] == FLAVOUR_ORT
    assert manifest["recipe"]["runtimes"] == ["onnxruntime"]  # TensorRT takes the portable graph only
    assert OnnxVLM(out).llm_flavour == FLAVOUR_ORT
    merged = [r for r in manifest["layers"] if r.get("onnx_columns")]
    assert {r["name"].rsplit(".", 1)[-1] for r in merged} >= {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    portable = json.loads((dirs["portable"] / "manifest.json").read_text())
    assert portable["components"]["llm"]["flavour"] == FLAVOUR_PORTABLE
    mine, theirs = load_quantized_weights(out, manifest), load_quantized_weights(dirs["portable"], portable)
    assert mine.keys() == theirs.keys() and len(mine) == len(manifest["layers"])
    for name, w in theirs.items():  # RTN: the same codes and scales, read from merged or separate weights
        assert np.array_equal(mine[name].numpy(), w.numpy()), name


def test_step_time_against_context(dirs, capsys):
    """Measured, not asserted (a loaded 2-core machine): the ORT flavour's step at a long context against a short
    one, and the portable graph's."""
    res = {}
    for name in ("portable", "ort"):
        vlm = OnnxVLM(dirs[name])
        prepared = vlm.family.prepare([], PROMPT)
        times = []
        for n in (16, 400):
            r = vlm.generate_prepared(prepared, max_new_tokens=n, stop=False)
            times.append(r.decode_s / max(len(r.token_ids) - 1, 1) * 1e3)
        res[name] = times
    with capsys.disabled():
        print("\nms/step at 16 and 400 new tokens (tiny SmolVLM): " +
              ", ".join(f"{k} {a:.3f} -> {b:.3f}" for k, (a, b) in res.items()))
    assert all(t > 0 for ts in res.values() for t in ts)


# ---------------------------------------------------------------------------------------- Qwen2-VL, Qwen2.5-VL
QWEN_PROMPT = "Describe the image."


def _qwen_model(src: Path, dst: Path, tie: bool) -> Path:
    """A copy of a tiny Qwen model directory with random q/k/v biases and RMSNorm weights (the makers leave them at
    0 and 1, which would test no bias, and which the exporter folds into shared initializers), and with ``tie`` the
    lm_head tied to the token embeddings (as Qwen2-VL-2B's)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    rng = np.random.default_rng(1)
    for name, w in weights.items():
        if "visual" not in name and name.endswith(("_proj.bias", "norm.weight")):
            base = 1.0 if name.endswith("norm.weight") else 0.0
            weights[name] = (base + 0.3 * rng.standard_normal(w.shape)).astype(w.dtype)
    config = json.loads((dst / "config.json").read_text())
    if tie:
        del weights["lm_head.weight"]
        config["tie_word_embeddings"] = True
        (dst / "config.json").write_text(json.dumps(config))
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def qwen_dirs(tiny_dirs, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per family (Qwen2-VL with its lm_head tied, Qwen2.5-VL untied), the model, a portable RTN export and a copy
    whose llm.onnx is the ORT flavour of the portable one (test_qwen2_5_vl_family exports the ORT flavour the
    default way)."""
    from vlmq_export.testing.tiny_qwen2_5_vl import make_tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("ort_qwen")
    models = {"qwen2_vl": _qwen_model(tiny_dirs["qwen2_vl"], root / "m_qwen2_vl", tie=True),
              "qwen2_5_vl": _qwen_model(make_tiny_qwen2_5_vl(root / "tiny_qwen2_5_vl"), root / "m_qwen2_5_vl",
                                        tie=False)}
    flags = ["--int4", "--method", "rtn", "--no-validate", "--n-calib", "2", "--lm-head", "none", "--quiet"]  # tied float
    out = {}
    for fam, model in models.items():
        d = {"model": model, "portable": root / f"{fam}_portable", "ort": root / f"{fam}_ort"}
        assert cli.main([str(model), *flags, "--llm-graph", "portable", "-o", str(d["portable"])]) == 0
        shutil.copytree(d["portable"], d["ort"])
        write_ort_llm(d["portable"] / "llm.onnx", d["ort"] / "llm.onnx",
                      load_family(d["portable"] / "processor", torch_free=True).text_config)
        out[fam] = d
    return out


def _images(n: int = 2, size: tuple[int, int] = (84, 56)):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.mark.parametrize("fam", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_ort_flavour_gives_the_portable_logits_with_mrope(qwen_dirs, fam):
    """Batch 2 (two images, one prompt length), prefill then 5 decode steps through the SharedKV cache: every
    logit row of the ORT flavour within 1e-4 (relative) of the portable graph's."""
    portable, ort = (OnnxVLM(qwen_dirs[fam][d], accuracy_level=0) for d in ("portable", "ort"))
    assert (portable.llm_flavour, ort.llm_flavour) == (FLAVOUR_PORTABLE, FLAVOUR_ORT)
    prepared = [portable.family.prepare([img], QWEN_PROMPT) for img in _images()]
    pos = np.concatenate([p.position_ids for p in prepared], axis=1)  # [3, 2, S]
    seq, delta = prepared[0].seq_len, prepared[0].rope_delta
    assert pos.shape == (3, 2, seq) and delta != 0 and all(p.rope_delta == delta for p in prepared)
    assert not np.array_equal(pos[1], pos[2]) and not np.array_equal(pos[0], pos[1])  # sections differ
    emb = np.concatenate([portable.embeddings(p) for p in prepared])
    assert not np.allclose(emb[0], emb[1])
    steps = 5
    caches = {"portable": portable.empty_past(batch=2), "ort": ort.empty_past(batch=2, capacity=seq + steps)}
    assert isinstance(caches["ort"], SharedKV)
    logits = {}
    for name, vlm in (("portable", portable), ("ort", ort)):
        logits[name], caches[name] = vlm.llm(emb, np.ones((2, seq), np.int64), pos, caches[name])
    assert _rel(logits["portable"], logits["ort"]) <= 1e-4  # every prompt row, both batch rows
    for k in range(steps):
        tok = logits["portable"][:, -1].argmax(-1)[:, None]
        e = portable.runner("embed_tokens").infer({"input_ids": tok.astype(np.int64)})["inputs_embeds"]
        step_pos = portable.family.decode_position_ids(delta, seq + k, batch=2)
        for name, vlm in (("portable", portable), ("ort", ort)):
            logits[name], caches[name] = vlm.llm(e, np.ones((2, seq + k + 1), np.int64), step_pos, caches[name])
        assert _rel(logits["portable"], logits["ort"]) <= 1e-4, f"decode step {k}"
    assert caches["ort"].length == seq + steps


@pytest.mark.parametrize("fam", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_ort_flavour_generates_the_portable_tokens(qwen_dirs, fam):
    img = _images(1, (112, 84))
    vlms = {d: OnnxVLM(qwen_dirs[fam][d]) for d in ("portable", "ort")}  # level 4, as `run` serves them
    assert vlms["ort"].llm_flavour == FLAVOUR_ORT
    got = {d: vlm.generate(img, QWEN_PROMPT, max_new_tokens=16, stop=False).token_ids for d, vlm in vlms.items()}
    assert len(got["ort"]) == 16 and got["ort"] == got["portable"]


def test_qwen_ort_graph_keeps_the_inputs_merges_the_biases_and_the_tied_head(qwen_dirs):
    d = qwen_dirs["qwen2_vl"]
    src, ort = (onnx.load(str(d[k] / "llm.onnx")) for k in ("portable", "ort"))

    def io(m):
        return [(v.name, v.type.tensor_type.elem_type, [x.dim_value or None for x in v.type.tensor_type.shape.dim])
                for v in m.graph.input]

    # inputs_embeds, attention_mask, position_ids [3, B, S], past_*: the runtime's feeds; plus logits_to_keep
    assert [v for v in io(ort) if v[0] != "logits_to_keep"] == io(src)
    assert ("logits_to_keep", onnx.TensorProto.INT64, [1]) in io(ort)
    ops = [n.op_type for n in ort.graph.node]
    layers = load_family(d["ort"] / "processor", torch_free=True).num_layers
    assert ops.count("GroupQueryAttention") == layers and ops.count("DequantizeLinear") == 4 * layers
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in ort.graph.initializer}
    from safetensors.numpy import load_file

    hf = load_file(d["model"] / "model.safetensors")
    want = np.concatenate([hf[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"])
    assert np.abs(want).min() > 0 and np.array_equal(inits["layers.1.qkv_proj.bias"], want)
    # tied: the portable graph's lm_head is the transposed token embedding, and so is the ORT flavour's
    embed = onnx.load(str(d["ort"] / "embed_tokens.onnx"))
    table = max((onnx.numpy_helper.to_array(t) for t in embed.graph.initializer), key=lambda a: a.size)
    assert np.array_equal(read_weights(src)["lm_head"].value, table.T)
    assert np.array_equal(inits["lm_head.weight"], table.T)


def test_onnx_runtime_folds_the_qkv_bias_into_matmulnbits(qwen_dirs, tmp_path):
    """At level ALL ONNX Runtime fuses DequantizeLinear -> MatMul -> Add(bias) into one MatMulNBits with its bias
    input: the merged bias costs no extra node."""
    from vlmq_export.runtime.session import make_session

    make_session(qwen_dirs["qwen2_vl"]["ort"] / "llm.onnx", optimized_model_path=tmp_path / "opt.onnx", threads=1)
    nodes = onnx.load(str(tmp_path / "opt.onnx")).graph.node
    fused = {n.output[0]: n for n in nodes if n.op_type == "MatMulNBits"}
    qkv = [n for out, n in fused.items() if ".qkv_proj" in out]
    assert len(fused) == 4 * len(qkv) and qkv and all(n.input[5].endswith("qkv_proj.bias") for n in qkv)
    assert not any(n.op_type == "Add" and set(n.input) & set(fused) for n in nodes)
