"""One runner interface (ONNX Runtime, TensorRT): OrtRunner against the raw session, OnnxVLM's greedy text, the
engine profile selection, the Polygraphy Comparator wiring (ONNX Runtime on both sides here), `--backend tensorrt`."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from vlmq_export import cli
from vlmq_export.errors import VlmqError
from vlmq_export.runtime.generate import GRAPHS, OnnxVLM
from vlmq_export.engines.build import PROFILES
from vlmq_export.runtime.runners import OrtRunner, engine_profiles, make_runner, select_profile
from vlmq_export.runtime.session import make_session

FAMILIES = ("qwen2_vl", "smolvlm")
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT = ("tensorrt is not installed (its wheels come from NVIDIA's index, unreachable here): the TensorRT backend "
          "was not run")
polygraphy = pytest.importorskip("polygraphy", reason="polygraphy is not installed (the test extra has it)")


@pytest.fixture(scope="module")
def exported(rtn_exports) -> dict[str, Path]:
    return {fam: rtn_exports[fam] for fam in FAMILIES}


@pytest.fixture(scope="module")
def built(exported, tmp_path_factory) -> Path:
    """A Qwen2-VL copy after `vlmq-export build` (profiles.json; no engines without TensorRT)."""
    out = tmp_path_factory.mktemp("built") / "qwen2_vl"
    shutil.copytree(exported["qwen2_vl"], out)
    assert cli.main(["build", str(out), "--max-context", "256"]) == 0
    return out


def _image(seed: int = 0, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def _prepared(out: Path):
    vlm = OnnxVLM(out, accuracy_level=0)
    return vlm, [vlm.family.prepare([_image()], "Describe the image."), vlm.family.prepare([], "Hello there.")]


# ---------------------------------------------------------------- OrtRunner and OnnxVLM against the raw sessions
@pytest.mark.parametrize("level", [0, 4])
def test_ort_runner_gives_the_sessions_outputs(exported, level):
    from vlmq_export.validate.trt_compare import graph_feeds

    out = exported["qwen2_vl"]
    vlm, prepared = _prepared(out)
    feeds = graph_feeds(vlm, prepared)
    assert {g: len(f) for g, f in feeds.items()} == {"vision_encoder": 1, "projector": 1, "embed_tokens": 2, "llm": 4}
    for graph in GRAPHS:
        sess = make_session(out / f"{graph}.onnx", accuracy_level=level)
        names = [o.name for o in sess.get_outputs()]
        with make_runner(out, graph, accuracy_level=level) as runner:
            assert list(runner.input_metadata) == [i.name for i in sess.get_inputs()]
            for feed in feeds[graph]:
                got = runner.infer(feed)
                assert list(got) == names
                for name, ref in zip(names, sess.run(names, feed)):
                    assert np.array_equal(got[name], ref), (graph, name)


def test_runner_casts_float_feeds_to_the_graph_dtype_and_leaves_integers(exported):
    out = exported["smolvlm"]
    with OrtRunner(out / "embed_tokens.onnx") as emb, OrtRunner(out / "projector.onnx") as proj:
        assert emb.input_metadata["input_ids"].dtype == np.int64
        assert proj.input_metadata["features"].dtype == np.float32
        feats = np.random.default_rng(0).standard_normal((1, *[d if isinstance(d, int) else 4 for d in
                                                                proj.input_metadata["features"].shape[1:]]))
        ref = proj.infer({"features": feats.astype(np.float32)})
        got = proj.infer({"features": feats})  # float64: cast, where the raw session refuses it
        assert all(np.array_equal(got[k], ref[k]) for k in ref)
        assert emb.cast_feeds({"input_ids": np.array([[1, 2]], np.int32)})["input_ids"].dtype == np.int32
    with pytest.raises(RuntimeError, match="not active"):
        OrtRunner(out / "projector.onnx").infer({"features": feats})


def _greedy_with_sessions(out: Path, prepared, n: int) -> list[int]:
    """The generation loop written directly against ONNX Runtime sessions (what OnnxVLM did before runners)."""
    vlm = OnnxVLM(out)  # family and empty cache only
    fam = vlm.family
    s = {g: make_session(out / f"{g}.onnx", accuracy_level=0) for g in GRAPHS}
    emb = s["embed_tokens"].run(None, {"input_ids": prepared.input_ids})[0].copy()
    if prepared.num_images:
        feats = s["vision_encoder"].run(["features"], fam.vision_feeds(prepared))[0]
        emb[0, prepared.image_mask[0]] = s["projector"].run(["image_embeds"], {"features": feats})[0]
    names = [o.name for o in s["llm"].get_outputs()]
    seq, past, pos, tokens = prepared.seq_len, vlm.empty_past(), prepared.position_ids, []
    while True:
        res = dict(zip(names, s["llm"].run(names, {"inputs_embeds": emb, "position_ids": pos, **past,
                                                    "attention_mask": np.ones((1, seq + len(tokens)), np.int64)})))
        tokens.append(int(np.argmax(res["logits"][0, -1])))
        if len(tokens) == n:
            return tokens
        past = {k.replace("present_", "past_"): v for k, v in res.items() if k.startswith("present_")}
        emb = s["embed_tokens"].run(None, {"input_ids": np.array([[tokens[-1]]], np.int64)})[0]
        pos = fam.decode_position_ids(prepared.rope_delta, seq + len(tokens) - 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxvlm_greedy_tokens_equal_the_direct_session_loop(exported, family):
    vlm, prepared = _prepared(exported[family])
    for p in prepared:
        res = vlm.generate_prepared(p, max_new_tokens=8, stop=False)
        assert res.token_ids == _greedy_with_sessions(exported[family], p, 8)
        assert res.text == vlm.family.tokenizer.decode(res.token_ids, skip_special_tokens=True)
    vlm.close()
    assert not vlm._runners


# ---------------------------------------------------------------- engine profiles chosen by the call's shapes
def test_select_profile_prefill_decode_and_too_long(built):
    profiles = engine_profiles(built)
    llm = profiles["llm"]
    assert [p["name"] for p in llm] == ["prefill", "decode"]
    vlm, prepared = _prepared(built)
    from vlmq_export.validate.trt_compare import graph_feeds

    feeds = graph_feeds(vlm, prepared)
    assert [select_profile(llm, f, "llm") for f in feeds["llm"]] == [0, 1, 0, 1]  # prefill, decode per prompt
    one_token = {**feeds["llm"][2], "inputs_embeds": feeds["llm"][2]["inputs_embeds"][:, :1],
                 "attention_mask": np.ones((1, 1), np.int64), "position_ids": feeds["llm"][2]["position_ids"][..., :1]}
    assert select_profile(llm, one_token, "llm") == 0  # one token on an empty cache is still a prefill
    too_long = {**feeds["llm"][0], "inputs_embeds": np.zeros((1, 300, feeds["llm"][0]["inputs_embeds"].shape[2]))}
    with pytest.raises(VlmqError, match="no engine profile takes these shapes.*Rebuild the engines"):
        select_profile(llm, too_long, "llm")
    assert all(select_profile(profiles[g], f, g) == 0 for g in ("vision_encoder", "projector", "embed_tokens")
               for f in feeds[g])


# ---------------------------------------------------------------- the Comparator wiring, ONNX Runtime on both sides
def _ort(path: Path):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(path)))


def _perturbed_llm(src: Path, dest: Path) -> Path:
    """llm.onnx with noise on every float weight (the INT4 codes stay): a graph that must not match."""
    model = onnx.load(str(src))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        w = onnx.numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 1:
            noisy = w + 0.5 * rng.standard_normal(w.shape).astype(w.dtype)
            init.CopyFrom(onnx.numpy_helper.from_array(noisy, init.name))
    onnx.save(model, str(dest))
    return dest


def test_comparator_with_onnxruntime_on_both_sides_passes_every_graph_and_profile(built):
    from vlmq_export.validate.trt_compare import compare_engines

    _, prepared = _prepared(built)
    make = lambda graph, profile: _ort(built / f"{graph}.onnx")  # noqa: E731
    res = compare_engines(built, prepared, engine_profiles(built), make, make)
    assert res["passed"] is True and (res["atol"], res["rtol"], res["check_error_stat"]) == (1e-2, 1e-2, "mean")
    keys = {k.rsplit(".", 1)[0] for k in res if k.count(".") == 2}
    assert keys == {"vision_encoder.vision", "projector.vision", "embed_tokens.tokens", "llm.prefill", "llm.decode"}
    assert all(res[f"{k}.passed"] and res[f"{k}.max_abs_diff"] == 0.0 for k in keys)


def test_comparator_reports_a_mismatch_when_one_side_is_perturbed(built, tmp_path):
    from vlmq_export.validate.trt_compare import compare_engines, compare_runners, graph_feeds

    bad = _perturbed_llm(built / "llm.onnx", tmp_path / "llm.onnx")
    vlm, prepared = _prepared(built)
    feeds = graph_feeds(vlm, prepared)["llm"][:1]
    r = compare_runners(lambda: _ort(bad), lambda: _ort(built / "llm.onnx"), feeds)
    assert r["passed"] is False and r["max_abs_diff"] > 0.1 and r["iterations"] == 1
    make_b = lambda graph, profile: _ort(built / f"{graph}.onnx")  # noqa: E731
    make_a = lambda graph, profile: _ort(bad if graph == "llm" else built / f"{graph}.onnx")  # noqa: E731
    res = compare_engines(built, prepared, engine_profiles(built), make_a, make_b)
    assert res["passed"] is False and not res["llm.prefill.passed"] and not res["llm.decode.passed"]
    assert res["vision_encoder.vision.passed"] and res["embed_tokens.tokens.passed"]


def test_validate_backend_tensorrt_writes_the_comparison_to_the_report(built, tmp_path, monkeypatch, capsys):
    """`validate --backend tensorrt` end to end, with ONNX Runtime standing in for the engines (the wiring is the
    same; what TensorRT itself computes is the skipped test below)."""
    from vlmq_export.runtime import runners
    from vlmq_export.validate import trt_compare

    out = tmp_path / "out"
    shutil.copytree(built, out)
    monkeypatch.setattr(runners, "check_backend", lambda out, backend, graphs=None: None)
    monkeypatch.setattr(trt_compare, "trt_runner_factory", trt_compare.ort_runner_factory)
    rc = cli.main(["validate", str(out), "--n-val", "2", "--gen-tokens", "2", "--backend", "tensorrt", "--json"])
    assert rc in (0, 1)  # the tiny random model's gates are not the point here
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tensorrt_matches_onnxruntime"] is True
    stage = json.loads((out / "report" / "validation.json").read_text())["stages"]["tensorrt_vs_onnxruntime"]
    assert stage["passed"] is True and stage["llm.decode.max_abs_diff"] == 0.0 and stage["atol"] == 1e-2
    assert "tensorrt_vs_onnxruntime" in (out / "report" / "report.md").read_text()
    assert json.loads((out / "manifest.json").read_text())["validation"]["tensorrt_matches_onnxruntime"] is True


# ---------------------------------------------------------------- TensorRT: imports without it, refuses without it
def _imports(code: str) -> None:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_trt_runner_module_imports_with_polygraphy_and_without_tensorrt():
    # the runner module: no TensorRT, no torch; what TrtRunner and the comparator call exists in this Polygraphy
    _imports("import sys; import vlmq_export.runtime.runners as r; import polygraphy.backend.trt as t; "
             "import polygraphy.backend.common as c; import polygraphy.comparator as cmp; "
             "assert r.TrtRunner and hasattr(t.TrtRunner, 'set_profile') and hasattr(t, 'EngineFromBytes'); "
             "assert hasattr(c, 'BytesFromPath') and hasattr(cmp.Comparator, 'compare_accuracy'); "
             "assert 'tensorrt' not in sys.modules and 'torch' not in sys.modules")
    _imports("import sys, vlmq_export.validate.trt_compare; assert 'tensorrt' not in sys.modules")
    if not HAS_TRT:
        from vlmq_export.runtime.runners import tensorrt_missing

        assert tensorrt_missing().startswith("TensorRT is not importable here")


def _one_line_error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("vlmq-export: error: --backend tensorrt: ")
    return err


VERB_ARGS = {"run": ["--prompt", "hi"], "serve": ["--port", "0", "--quiet"], "eval": ["--n", "1"],
             "validate": ["--quiet"]}


@pytest.mark.parametrize("verb", VERB_ARGS)
def test_backend_tensorrt_without_tensorrt_is_one_line_exit_2(exported, monkeypatch, capsys, verb):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # unimportable, whether or not it is installed
    out = exported["smolvlm"]
    before = sorted(p.name for p in out.rglob("*"))
    err = _one_line_error([verb, str(out), *VERB_ARGS[verb], "--backend", "tensorrt"], capsys)
    assert "TensorRT is not importable here" in err and f"`vlmq-export build {out}`" in err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_backend_tensorrt_without_engines_names_them_and_how_to_build(built, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # as if TensorRT imported
    err = _one_line_error(["run", str(built), "--prompt", "hi", "--backend", "tensorrt"], capsys)
    assert "has no TensorRT engine for vision_encoder, projector, embed_tokens, llm" in err
    assert f"`vlmq-export build {built}`" in err


@pytest.mark.skipif(not HAS_TRT, reason=NO_TRT)
def test_tensorrt_backend_generates_and_matches_onnxruntime(exported, tmp_path):
    from vlmq_export.validate.trt_compare import compare_engines

    out = tmp_path / "out"
    shutil.copytree(exported["qwen2_vl"], out)
    assert cli.main(["build", str(out), "--max-context", "256"]) == 0
    assert set(json.loads((out / "manifest.json").read_text())["engines"]["built"]) == set(GRAPHS)
    ort_vlm, prepared = _prepared(out)
    trt_vlm = OnnxVLM(out, backend="tensorrt")
    for p in prepared:
        ref = ort_vlm.generate_prepared(p, max_new_tokens=8, stop=False)
        assert trt_vlm.generate_prepared(p, max_new_tokens=8, stop=False).token_ids[:2] == ref.token_ids[:2]
    trt_vlm.close()
    assert compare_engines(out, prepared, engine_profiles(out))["passed"]


def test_backend_tensorrt_finds_engines_that_build_engines_sh_wrote(built, monkeypatch, tmp_path):
    """On a Jetson the engines come from OUT/build_engines.sh (trtexec), which cannot record them in the manifest:
    the runner takes them where profiles.json names them."""
    from vlmq_export.runtime.runners import engines

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # as if TensorRT imported
    out = tmp_path / "out"
    shutil.copytree(built, out)
    planned = {g: spec["engine"] for g, spec in json.loads((out / PROFILES).read_text())["graphs"].items()}
    for rel in planned.values():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"plan")
    found = engines(out)
    assert {g: e["engine"] for g, e in found.items()} == {g: out / rel for g, rel in planned.items()}
    assert all(e["profiles"] for e in found.values())
