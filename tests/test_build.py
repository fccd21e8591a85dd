"""`vlmq-export build`: TensorRT profiles proven in ONNX Runtime, the trtexec script, the lazy Polygraphy build."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from vlmq_export import cli
from vlmq_export.models.qwen2_vl import vision_cu_seqlens, vision_position_ids

FAMILIES = ("qwen2_vl", "smolvlm")
LIMITS = ["--max-batch", "2", "--max-images", "2", "--max-context", "256"]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def exports(rtn_exports) -> dict[str, Path]:
    return {fam: rtn_exports[fam] for fam in FAMILIES}


@pytest.fixture(scope="module")
def built(exports, tmp_path_factory) -> dict[str, Path]:
    """A copy of each export after `build` with small limits (the exports themselves stay untouched)."""
    root = tmp_path_factory.mktemp("built")
    outs = {}
    for fam, src in exports.items():
        outs[fam] = root / fam
        shutil.copytree(src, outs[fam])
        assert cli.main(["build", str(outs[fam]), *LIMITS]) == 0
    return outs


def _profiles(out: Path) -> dict:
    return json.loads((out / "engines" / "profiles.json").read_text())


# ---------------------------------------------------------------- feeds at a profile's shapes
def _feeds(family: str, graph: str, shapes: dict, point: str, rng) -> dict[str, np.ndarray]:
    sess_shapes = {name: s[point] for name, s in shapes.items()}
    feeds = {}
    if graph == "vision_encoder" and family == "qwen2_vl":
        patches, images = sess_shapes["pixel_values"][0], sess_shapes["cu_seqlens"][0] - 1
        counts = [patches // images // 4 * 4] * images  # multiples of merge^2 = 4
        counts[-1] += patches - sum(counts)
        grid = np.array([[1, 2, c // 2] for c in counts])  # (t, h, w) in patches, h and w multiples of merge
        feeds["vision_position_ids"] = vision_position_ids(grid, 2)
        feeds["cu_seqlens"] = vision_cu_seqlens(grid)
    if graph == "llm":
        seq = sess_shapes["inputs_embeds"][1]
        past = sess_shapes["attention_mask"][1] - seq
        pos = np.arange(past, past + seq, dtype=np.int64)
        feeds["attention_mask"] = np.ones(sess_shapes["attention_mask"], np.int64)
        feeds["position_ids"] = np.broadcast_to(pos, sess_shapes["position_ids"]).copy()
    if graph == "embed_tokens":
        feeds["input_ids"] = rng.integers(0, 100, sess_shapes["input_ids"], dtype=np.int64)
    for name, shape in sess_shapes.items():
        if name not in feeds:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
        assert list(feeds[name].shape) == shape, (graph, name)
    return feeds


@pytest.mark.parametrize("family", FAMILIES)
def test_every_profile_runs_in_onnxruntime_at_min_opt_and_max(built, family):
    out = built[family]
    prof = _profiles(out)
    assert set(prof["graphs"]) == {"vision_encoder", "projector", "embed_tokens", "llm"}
    assert [p["name"] for p in prof["graphs"]["llm"]["profiles"]] == ["prefill", "decode"]
    rng = np.random.default_rng(0)
    runs = 0
    for graph, spec in prof["graphs"].items():
        sess = ort.InferenceSession(str(out / spec["file"]), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        for p in spec["profiles"]:
            for point in ("min", "opt", "max"):
                feeds = _feeds(family, graph, p["shapes"], point, rng)
                res = dict(zip(names, sess.run(names, feeds)))
                runs += 1
                if graph == "llm":  # the present KV really is past + sequence long
                    b, s = feeds["inputs_embeds"].shape[:2]
                    assert res["logits"].shape[:2] == (b, s)
                    assert res["present_key_0"].shape[2] == feeds["attention_mask"].shape[1]
    assert runs == 3 * 5


@pytest.mark.parametrize("family", FAMILIES)
def test_profile_sizes_follow_the_limits_and_mask_is_past_plus_sequence(built, family):
    prof = _profiles(built[family])
    assert prof["limits"]["max_context"] == 256 and prof["limits"]["max_seq"] == 256
    prefill, decode = prof["graphs"]["llm"]["profiles"]
    for p in (prefill, decode):
        s = p["shapes"]
        for point in ("min", "opt", "max"):
            assert s["attention_mask"][point][1] == s["past_key_0"][point][2] + s["inputs_embeds"][point][1]
            assert s["inputs_embeds"][point][0] <= 2
    assert prefill["shapes"]["past_key_0"]["max"][2] == 0 and prefill["shapes"]["inputs_embeds"]["max"][1] == 256
    assert decode["shapes"]["inputs_embeds"]["max"][1] == 1 and decode["shapes"]["attention_mask"]["max"][1] == 256
    vision = prof["graphs"]["vision_encoder"]["profiles"][0]["shapes"]["pixel_values"]
    if family == "qwen2_vl":  # max_pixels 25088 / 14^2 = 128 patches per image, two images
        assert (vision["min"][0], vision["max"][0]) == (16, 256)
        assert prof["graphs"]["vision_encoder"]["profiles"][0]["shapes"]["cu_seqlens"]["max"] == [3]
    else:  # no image splitting: one 64x64 tile per image
        assert (vision["min"], vision["max"]) == ([1, 3, 64, 64], [2, 3, 64, 64])
    projector = prof["graphs"]["projector"]["profiles"][0]["shapes"]["features"]
    assert projector["max"][0] == vision["max"][0]


# ---------------------------------------------------------------- the trtexec script
def _trtexec_lines(script: str) -> list[list[str]]:
    return [shlex.split(line)[2:] for line in script.splitlines() if line.startswith('run "$TRTEXEC"')]


def _script_profiles(args: list[str]) -> list[dict]:
    """[{input: {min, opt, max}}] per profile, parsed back from trtexec arguments."""
    profiles: list[dict] = []
    for a in args:
        if a.startswith("--profile=") or (not profiles and re.match(r"--(min|opt|max)Shapes=", a)):
            profiles.append({})
        m = re.match(r"--(min|opt|max)Shapes=(.*)", a)
        if m:
            for item in m.group(2).split(","):
                name, dims = item.split(":")
                profiles[-1].setdefault(name, {})[m.group(1)] = [int(d) for d in dims.split("x")]
    return profiles


@pytest.mark.parametrize("family", FAMILIES)
def test_script_is_valid_bash_strongly_typed_with_the_profiles_shapes(built, family):
    path = built[family] / "build_engines.sh"
    subprocess.run(["bash", "-n", str(path)], check=True)
    script = path.read_text()
    assert "set -euo pipefail" in script and "/usr/src/tensorrt/bin/trtexec" in script
    lines = _trtexec_lines(script)
    prof = _profiles(built[family])
    assert len(lines) == len(prof["graphs"]) == 4
    for args, (graph, spec) in zip(lines, prof["graphs"].items()):
        assert "--stronglyTyped" in args and f"--saveEngine=engines/{graph}.plan" in args
        assert any(a.startswith("--timingCacheFile=") for a in args)
        assert not {"--fp16", "--int8", "--best"} & set(args)
        assert _script_profiles(args) == [p["shapes"] for p in spec["profiles"]]


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("banner, fp8, multi, cc, error", [
    ("v100500", 0, True, "8.6", None),
    ("v8601", 0, True, "8.6", "TensorRT 8.6 is older than 10.0"),
    ("v100500", 1, True, "8.6", "FP8 graphs need compute capability 8.9"),
    ("v100300", 0, False, "8.6", "cannot put several optimization profiles in one engine"),
    ("v100500", 0, True, "7.5", "compute capability 7.5: INT4 weight-only needs 8.0"),
    ("v100500", 0, True, "", "cannot read a GPU's compute capability"),
])
def test_script_runs_each_trtexec_command_after_checking_version_and_gpu(built, tmp_path, banner, fp8, multi, cc,
                                                                          error):
    """With stand-ins for trtexec (TensorRT 10.5, 10.3 or 8.6) and nvidia-smi (an RTX 3090, SM 8.6: no FP8; a
    Turing card, SM 7.5; a driver that does not know the compute_cap field)."""
    out = tmp_path / "out"
    shutil.copytree(built["smolvlm"], out)
    script = (out / "build_engines.sh").read_text().replace("FP8=0", f"FP8={fp8}")
    (out / "build_engines.sh").write_text(script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "trtexec", f'echo "&&&& RUNNING TensorRT.trtexec [TensorRT {banner}] [b18] # trtexec $*"\n'
                              + ('echo "  --profile  Can be specified multiple times to create multiple profiles"\n'
                                 if multi else "") +
                              f'echo "$*" >> {tmp_path}/calls\n'
                              'for a in "$@"; do case $a in --saveEngine=*) touch "${a#--saveEngine=}";; esac; done\n')
    cap = f"echo {cc}" if cc else "echo 'Field \"compute_cap\" is not a valid field to query.' >&2; exit 2"
    _stub(bin_dir, "nvidia-smi", f'case "$*" in *compute_cap*) {cap};; *) echo "NVIDIA GeForce RTX 3090";; esac\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("TRTEXEC", None)
    res = subprocess.run(["bash", str(out / "build_engines.sh")], env=env, capture_output=True, text=True)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    builds = [c for c in calls if "--saveEngine" in c]
    if error is None:
        assert res.returncode == 0, res.stderr
        assert len(builds) == 4 and all((out / "engines" / f"{g}.plan").is_file() for g in _profiles(out)["graphs"])
        assert "RTX 3090" in res.stdout
    else:
        assert res.returncode != 0 and not builds and res.stderr.count("\n") == 1
        assert res.stderr.startswith("build_engines.sh: error: ") and error in res.stderr


# ---------------------------------------------------------------- without TensorRT, and without torch
@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: this checks the machine without it")
def test_build_without_tensorrt_writes_both_files_and_claims_no_engine(exports, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(exports["qwen2_vl"], out)
    (out / "engines").mkdir()
    (out / "engines" / "llm.plan").write_bytes(b"an engine of some earlier build")
    assert cli.main(["build", str(out), "--target", "jetson-orin"]) == 0
    text = capsys.readouterr().out
    assert text.count("\n") == 1 and text.startswith("engines not built: TensorRT is not importable")
    assert f"bash {out / 'build_engines.sh'}" in text
    assert (out / "engines" / "profiles.json").is_file() and os.access(out / "build_engines.sh", os.X_OK)
    eng = json.loads((out / "manifest.json").read_text())["engines"]
    assert eng["built"] == {} and eng["tensorrt"] is None and eng["target"] == "jetson-orin"
    assert "TARGET=jetson-orin" in (out / "build_engines.sh").read_text()
    assert not list(out.glob("**/.*tmp*"))  # the atomic writes left no temporary file


def test_build_runs_with_torch_and_transformers_unimportable(exports, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(exports["smolvlm"], out)
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from vlmq_export import cli\n"
            f"rc = cli.main(['build', {str(out)!r}, '--json'])\n"
            "assert not any(m == 'torch' or m.startswith(('torch.', 'transformers')) for m in sys.modules"
            " if sys.modules[m] is not None), 'torch was imported'\n"
            "sys.exit(rc)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["profiles"] == "engines/profiles.json"
    assert (out / "build_engines.sh").is_file() and (out / "engines" / "profiles.json").is_file()


def test_polygraphy_build_module_imports_without_tensorrt():
    pytest.importorskip("polygraphy", reason="polygraphy is not installed (the test extra has it)")
    import polygraphy.backend.trt as ptrt

    from vlmq_export.engines import build

    for name in ("NetworkFromOnnxPath", "EngineFromNetwork", "SaveEngine", "CreateConfig", "Profile"):
        assert hasattr(ptrt, name)  # what build_engines calls exists in this Polygraphy
    if not HAS_TRT:
        assert build.why_not_here("tensorrt", {"board": None, "gpu": "x"}).startswith("TensorRT is not importable")


@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not installed (its wheels come from NVIDIA's index, unreachable "
                                        "here): the in-process engine build was not run")
def test_in_process_build_makes_every_engine(exports, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(exports["qwen2_vl"], out)
    assert cli.main(["build", str(out), *LIMITS]) == 0
    eng = json.loads((out / "manifest.json").read_text())["engines"]
    assert set(eng["built"]) == {"vision_encoder", "projector", "embed_tokens", "llm"} and eng["tensorrt"]
    assert all((out / e["file"]).is_file() for e in eng["built"].values())


# ---------------------------------------------------------------- bad input: one line, nothing written
def _edit_manifest(out: Path, edit) -> None:
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))


BAD = {
    "incomplete": (lambda out: _edit_manifest(out, lambda m: m.update(status="calibrating")), [], "did not complete"),
    "tampered": (lambda out: open(out / "llm.onnx", "ab").write(b"\0"), [], "does not match its sha256"),
    "fp8-orin": (lambda out: _edit_manifest(out, lambda m: m["recipe"]["components"]["llm"].update(bits="fp8")),
                 ["--target", "jetson-orin"], "Orin has no FP8"),
    "ort-flavour": (lambda out: _edit_manifest(out, lambda m: m["components"]["llm"].update(flavour="ort-gqa")), [],
                    "ONNX Runtime's fused flavour"),
    "context": (lambda out: None, ["--max-context", "5000"], "beyond the model's context (max_position_embeddings 4096)"),
    "seq": (lambda out: None, ["--max-context", "64", "--max-seq", "65"], "--max-seq 65 is beyond --max-context 64"),
    "batch": (lambda out: None, ["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
    "context0": (lambda out: None, ["--max-context", "0"], "--max-context must be at least 2"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_writes_nothing(exports, tmp_path, capsys, case):
    spoil, flags, message = BAD[case]
    out = tmp_path / "out"
    shutil.copytree(exports["qwen2_vl"], out)
    spoil(out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    manifest = (out / "manifest.json").read_bytes()
    assert cli.main(["build", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vlmq-export: error: ") and message in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "manifest.json").read_bytes() == manifest


def test_fp8_graphs_are_refused_on_orin_by_the_script_too(exports, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(exports["qwen2_vl"], out)
    _edit_manifest(out, lambda m: m["recipe"]["components"]["llm"].update(bits="fp8"))
    assert cli.main(["build", str(out), "--target", "tensorrt"]) == 0  # a server GPU of SM 8.9+ takes FP8
    script = (out / "build_engines.sh").read_text()
    assert "FP8=1" in script and "Orin has no FP8" in script


def test_unknown_target_is_an_argparse_error(exports, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["build", str(exports["smolvlm"]), "--target", "jetson-nano"])
    assert exc.value.code == 2
    assert "invalid choice: 'jetson-nano'" in capsys.readouterr().err
    assert not (exports["smolvlm"] / "build_engines.sh").exists()


def test_smolvlm_image_splitting_sizes_tiles_per_image_and_caps_them_by_the_context(exports):
    from vlmq_export.engines.profiles import derive_profiles, model_limits

    out = exports["smolvlm"]
    manifest = json.loads((out / "manifest.json").read_text())
    limits = model_limits(out)
    limits["image_processor"].update(do_image_splitting=True, size={"longest_edge": 128})  # 2x2 tiles + global
    tiles = lambda **kw: derive_profiles(manifest, limits, **kw)["graphs"]["vision_encoder"]["profiles"][0][  # noqa: E731
        "shapes"]["pixel_values"]["max"][0]
    assert tiles(max_images=3) == 15
    assert tiles(max_images=3, max_context=40) == 10  # 4 tokens a tile: 10 tiles fill a context of 40


# ---------------------------------------------------------------- the newer families' vision profiles
NEW_FAMILIES = {"qwen2_5_vl": "builtin:tiny-qwen2.5-vl", "llava": "builtin:tiny-llava", "llava_next": "builtin:tiny-llava-next"}


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_newer_families_profiles_cover_real_images_and_run(family, tmp_path):
    """Qwen2.5-VL (window index feeds) and the LLaVA families (crops, anyres tiles): `build` sizes the vision
    encoder from the image processor; the feeds of real images (one and two, tall and wide) lie inside the
    profile, and the LLaVA tile profiles run in ONNX Runtime at min, opt and max."""
    from PIL import Image

    from vlmq_export.models import load_family

    out = tmp_path / "out"
    assert cli.main([NEW_FAMILIES[family], "--int4", "--method", "rtn", "--no-validate", "--llm-graph", "portable",
                     "-o", str(out), "--quiet"]) == 0
    assert cli.main(["build", str(out), "--max-images", "2", "--max-context", "2048"]) == 0
    vision = _profiles(out)["graphs"]["vision_encoder"]["profiles"]
    assert len(vision) == 1
    shapes = vision[0]["shapes"]
    fam = load_family(out / "processor", torch_free=True)
    images = [Image.new("RGB", (90, 40), (200, 30, 30)), Image.new("RGB", (36, 120), (20, 200, 30))]
    for imgs in (images[:1], images):
        feeds = fam.vision_feeds(fam.prepare(imgs, "What is this?"))
        for name, arr in feeds.items():
            lo, hi = shapes[name]["min"], shapes[name]["max"]
            assert len(lo) == arr.ndim and all(a <= d <= b for a, d, b in zip(lo, arr.shape, hi)), (name, arr.shape, lo, hi)
    if family.startswith("llava"):
        sess = ort.InferenceSession(str(out / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        for point in ("min", "opt", "max"):
            x = rng.standard_normal(shapes["pixel_values"][point]).astype(np.float32)
            (features,) = sess.run(None, {"pixel_values": x})
            assert features.shape[0] == x.shape[0] and np.isfinite(features).all()
