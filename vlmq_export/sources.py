"""Model specs: a local Hugging Face directory, a hub id, or a built-in model made offline."""
from __future__ import annotations

import os
from pathlib import Path

from .cache import cache_dir
from .errors import UnsupportedModelError, VlmqError


def _builtin_makers() -> dict:
    from .testing.tiny_gemma3 import make_tiny_gemma3
    from .testing.tiny_llava import make_tiny_llava, make_tiny_llava_next, make_tiny_llava_onevision
    from .testing.tiny_qwen2_5_vl import make_tiny_qwen2_5_vl
    from .testing.tiny_qwen2_vl import make_tiny_qwen2_vl
    from .testing.tiny_qwen3_vl import make_tiny_qwen3_vl
    from .testing.tiny_smolvlm import make_tiny_smolvlm
    from .testbed import make_shapes_smolvlm

    return {"tiny-qwen2-vl": make_tiny_qwen2_vl, "tiny-qwen2.5-vl": make_tiny_qwen2_5_vl,
            "tiny-qwen3-vl": make_tiny_qwen3_vl,
            "tiny-smolvlm": make_tiny_smolvlm, "shapes-smolvlm": make_shapes_smolvlm, "tiny-llava": make_tiny_llava,
            "tiny-llava-next": make_tiny_llava_next, "tiny-llava-onevision": make_tiny_llava_onevision,
            "tiny-gemma3": make_tiny_gemma3}


BUILTIN_MODELS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-smolvlm", "shapes-smolvlm", "tiny-llava",
                  "tiny-llava-next", "tiny-llava-onevision", "tiny-gemma3")


BUILT_FROM = ".vlmq-built-from"  # in a cached built-in model: what it was built from (builtin_version)


def builtin_version(name: str) -> str:
    """What a cached built-in model must have been built from to be reused: for ``shapes-smolvlm`` the digest of
    its committed parts' meta.json (a new training export changes it), so an upgraded package reassembles the
    testbed instead of serving the old one; the tiny random models are built from code alone ("1")."""
    if name != "shapes-smolvlm":
        return "1"
    import hashlib

    from .testbed import ASSETS

    meta = ASSETS / "meta.json"
    return hashlib.sha256(meta.read_bytes()).hexdigest()[:16] if meta.is_file() else "missing"


def _built_from(path: Path) -> str | None:
    try:
        return (path / BUILT_FROM).read_text().strip() if (path / "config.json").is_file() else None
    except OSError:
        return None


def resolve_model(spec: str) -> Path:
    """A local directory holding config.json (building or downloading it when needed)."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        makers = _builtin_makers()
        if name not in makers:
            raise UnsupportedModelError(f"unknown built-in model '{name}'; built-in: {', '.join(sorted(makers))}")
        path = cache_dir() / "builtin" / name
        version = builtin_version(name)
        if _built_from(path) != version:  # absent, or built from other parts (an older package)
            tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
            makers[name](tmp)
            (tmp / BUILT_FROM).write_text(version + "\n")
            import shutil

            path.parent.mkdir(parents=True, exist_ok=True)
            if _built_from(path) == version:  # another process (a test worker) published it meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
                return path
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        return path
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnsupportedModelError(f"{path}: no config.json, not a Hugging Face model directory")
        return path
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") != 1 or path.exists()
    if looks_local:
        raise VlmqError(f"model path not found: {spec}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                              "*.jinja", "*.py"]))
    except Exception as exc:  # offline, unknown repo, gated...
        raise VlmqError(f"model '{spec}' is not a local directory and could not be fetched from the "
                        f"Hugging Face hub ({type(exc).__name__})") from None
