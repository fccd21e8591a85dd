"""Model families: one module each, registered here."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UnsupportedModelError
from .base import ExportSpec, Family, Prepared

__all__ = ["ExportSpec", "Family", "Prepared", "family_classes", "family_for_model_type", "load_family"]


def family_classes() -> list[type[Family]]:
    from .gemma3 import Gemma3Family
    from .llava import LlavaFamily
    from .llava_next import LlavaNextFamily, LlavaOnevisionFamily
    from .qwen2_5_vl import Qwen2_5_VLFamily
    from .qwen2_vl import Qwen2VLFamily
    from .qwen3_vl import Qwen3VLFamily
    from .smolvlm import SmolVLMFamily

    return [Qwen2VLFamily, Qwen2_5_VLFamily, Qwen3VLFamily, SmolVLMFamily, LlavaFamily, LlavaNextFamily,
            LlavaOnevisionFamily, Gemma3Family]


def supported_model_types() -> list[str]:
    return sorted(t for cls in family_classes() for t in cls.model_types)


def family_for_model_type(model_type: str) -> type[Family]:
    for cls in family_classes():
        if model_type in cls.model_types:
            return cls
    raise UnsupportedModelError(
        f"unsupported architecture '{model_type}'; supported model types: {', '.join(supported_model_types())}"
    )


def load_family(path: str | Path, torch_free: bool = False) -> Family:
    """The family object for a local model directory or an ``OUT/processor`` directory (``torch_free``: see
    :meth:`Family.from_dir`)."""
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UnsupportedModelError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type", "")
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{cfg}: unreadable config ({exc})") from None
    return family_for_model_type(model_type).from_dir(path, torch_free=torch_free)
