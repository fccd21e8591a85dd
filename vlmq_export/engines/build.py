"""`vlmq-export build OUT`: profiles.json + build_engines.sh always, engines in-process where TensorRT imports.

The in-process build chains Polygraphy's lazy loaders (NetworkFromOnnxPath -> EngineFromNetwork -> SaveEngine):
nothing touches TensorRT until they are called, and tensorrt / polygraphy are imported only inside
``build_engines``, so this module imports (and ``build`` runs) on a machine without either, or without torch.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .. import outdir
from ..errors import VlmqError
from ..targets import TRT_TARGETS, get_target
from .profiles import derive_profiles, model_limits, uses_fp8
from .script import TIMING_CACHE, render_script

PROFILES = "engines/profiles.json"
SCRIPT = "build_engines.sh"
LOG = "engines/build.log"


def machine() -> dict:
    """What this machine is: the Jetson board (device tree) and the NVIDIA GPU (nvidia-smi), None where absent."""
    info = {"board": None, "gpu": None}
    try:
        info["board"] = Path("/proc/device-tree/model").read_text().strip("\0\n ") or None
    except OSError:
        pass
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        info["gpu"] = res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def tensorrt_missing() -> str | None:
    """Why TensorRT cannot be used in this process (None: it can): the build's and the TensorRT runner's check."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # not installed, or installed without its CUDA libraries
        return f"TensorRT is not importable here ({type(exc).__name__}: {exc})"
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return "polygraphy is not installed (pip install 'vlmq-export[trt]')"
    return None


def why_not_here(target: str, info: dict) -> str | None:
    """Why engines for ``target`` cannot be built in this process on this machine (None: they can)."""
    why = tensorrt_missing()
    if why:
        return why
    board = info.get("board") or ""
    want = {"jetson-orin": "Orin", "jetson-thor": "Thor"}.get(target)
    if want and want not in board:
        return f"this machine is not {get_target(target).what} (engines are built on the target)"
    if not want and not info.get("gpu"):
        return "no NVIDIA GPU found (nvidia-smi)"
    return None


def build_engines(out: Path, profiles: dict) -> str:
    """Build every graph's engine with its profiles; returns TensorRT's version. Logs to OUT/engines/build.log."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine
    from polygraphy.logger import G_LOGGER

    G_LOGGER.log_file = str(out / LOG)
    cache = out / TIMING_CACHE
    for graph in profiles["graphs"].values():
        trt_profiles = []
        for prof in graph["profiles"]:
            p = Profile()
            for name, s in prof["shapes"].items():
                p.add(name, min=s["min"], opt=s["opt"], max=s["max"])
            trt_profiles.append(p)
        config = CreateConfig(profiles=trt_profiles, load_timing_cache=str(cache) if cache.is_file() else None)
        engine = EngineFromNetwork(NetworkFromOnnxPath(str(out / graph["file"]), strongly_typed=True), config=config,
                                   save_timing_cache=str(cache))
        dest = out / graph["engine"]
        tmp = dest.with_name(dest.name + ".partial")
        SaveEngine(engine, str(tmp))()
        os.replace(tmp, dest)
    return trt.__version__


def _write_atomic(path: Path, text: str, mode: int | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def build_output(out: str | Path, target: str = "tensorrt", *, max_batch: int = 1, max_seq: int | None = None,
                 max_context: int | None = None, max_images: int = 1) -> dict:
    """Write OUT/engines/profiles.json and OUT/build_engines.sh, build the engines where TensorRT runs here,
    and record in the manifest what exists. Every input check comes before the first write."""
    if target not in TRT_TARGETS:
        raise VlmqError(f"unknown target '{target}'; targets: {', '.join(TRT_TARGETS)}")
    out = Path(out)
    manifest = outdir.check_complete(out, verify_hashes=True)
    flavour = manifest.get("components", {}).get("llm", {}).get("flavour", "portable")
    if flavour != "portable":
        raise VlmqError(f"{out}: its llm.onnx is ONNX Runtime's fused flavour ({flavour}: contrib operators TensorRT "
                        "does not have); export with --target tensorrt (or --llm-graph portable) to build engines")
    fp8 = uses_fp8(manifest)
    if fp8 and not get_target(target).fp8:
        raise VlmqError(f"{out}: FP8 graphs ({', '.join(fp8)}) cannot run on {target}: Orin has no FP8 "
                        "(INT8/INT4/FP16 only)")
    profiles = {"target": target, **derive_profiles(manifest, model_limits(out), max_batch=max_batch,
                                                    max_seq=max_seq, max_context=max_context, max_images=max_images)}
    script = render_script(profiles, target, bool(fp8))

    (out / "engines").mkdir(exist_ok=True)
    _write_atomic(out / PROFILES, json.dumps(profiles, indent=2) + "\n")
    _write_atomic(out / SCRIPT, script, mode=0o755)
    info = machine()
    reason = why_not_here(target, info)
    trt_version = error = None
    built = set()
    if reason is None:
        for graph in profiles["graphs"].values():  # an engine of an earlier build is not this build's
            (out / graph["engine"]).unlink(missing_ok=True)
        try:
            trt_version = build_engines(out, profiles)
        except Exception as exc:  # recorded; the engines that do exist are still listed
            error = f"{type(exc).__name__}: {exc}"
        built = {g for g, graph in profiles["graphs"].items() if (out / graph["engine"]).is_file()}
    engines = {g: {"file": graph["engine"], "bytes": (out / graph["engine"]).stat().st_size,
                   "sha256": outdir.sha256_file(out / graph["engine"])}
               for g, graph in profiles["graphs"].items() if g in built}
    record = {"target": target, "profiles": PROFILES, "script": SCRIPT, "built": engines,
              "tensorrt": trt_version if engines else None,
              "gpu": (info["gpu"] or info["board"]) if engines else None,
              "not_built": reason, "build_error": error, "log": LOG if reason is None else None}
    manifest = outdir.read_manifest(out)
    manifest["engines"] = record
    outdir.write_manifest(out, manifest)
    return {"output": str(out), **record}
