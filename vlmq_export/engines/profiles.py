"""TensorRT optimization profiles derived from an output directory's manifest (pure functions, no TensorRT).

Every dynamic input of every graph gets min/opt/max shapes. The sizes come from the graphs' own dimension
names (as ``pipeline.graph_io`` recorded them in the manifest), bound by role:

- language model: two profiles in one engine. **prefill** (past 0, sequence 1..S) and **decode** (sequence 1,
  past 1..C-1); in both the attention mask is past + sequence at min, opt and max, or the build fails.
- vision encoder: one profile from the image processor's limits times the number of images N, capped so
  the image tokens fit in the context C (Qwen2-VL: flattened patches + one cu_seqlens entry per image;
  Qwen2.5-VL: also one window_index entry per merge block and at most one window per block; Qwen3-VL: also the
  position-table taps, one row per patch (its llm's deepstack_embeds take the batch and sequence); SmolVLM: image
  tiles; LLaVA-1.5, Gemma3: one square image each; LLaVA-NeXT / OneVision: the base tile + the largest pinpoint's
  tiles). Gemma3's extra ``llm`` input ``image_group_ids`` is [batch, seq], sized as ``inputs_embeds``.
- projector: the vision encoder's output sizes; embed_tokens: batch 1..B, sequence 1..S.

opt is the middle of each range (rounded to the step the family needs).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import VlmqError

DEFAULT_CONTEXT = 4096  # when --max-context is not given: this or the model's max_position_embeddings if smaller


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_limits(out: Path) -> dict:
    """The limits the profiles need, from OUT/processor/: context length and the image processor's sizes."""
    proc = Path(out) / "processor"
    config = _read_json(proc / "config.json")
    text = config.get("text_config") or {}
    ctx = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    image = _read_json(proc / "preprocessor_config.json")
    image.update({k: v for k, v in _read_json(proc / "processor_config.json").items() if k == "image_seq_len"})
    return {"max_position_embeddings": ctx, "image_processor": image}


def _mid(lo: int, hi: int, step: int = 1) -> int:
    """The middle of [lo, hi] rounded down to a multiple of step (never below lo)."""
    return max(lo, (lo + hi) // 2 // step * step)


def _dim(inputs: dict, name: str, axis: int):
    shape = inputs[name]["shape"] if name in inputs else []
    return shape[axis] if axis < len(shape) else None


def _bind(sizes: dict, dim, triple: tuple[int, int, int]) -> None:
    if isinstance(dim, str):  # a fixed (int) dimension needs no binding
        sizes[dim] = triple


def _shapes(graph: str, inputs: dict, sizes: dict) -> dict:
    """{input: {"min": [...], "opt": [...], "max": [...]}} for every input, symbolic dims from ``sizes``."""
    out = {}
    for name, spec in inputs.items():
        points = {"min": [], "opt": [], "max": []}
        for d in spec["shape"]:
            if isinstance(d, int):
                triple = (d, d, d)
            elif d in sizes:
                triple = sizes[d]
            else:
                raise VlmqError(f"{graph}: input {name} has a dynamic dimension '{d}' that build cannot size")
            for point, v in zip(points, triple):
                points[point].append(int(v))
        out[name] = points
    return out


def _llm_profiles(inputs: dict, B: int, S: int, C: int) -> list[dict]:
    past_name = next((n for n in inputs if n.startswith("past_")), None)
    batch, seq = _dim(inputs, "inputs_embeds", 0), _dim(inputs, "inputs_embeds", 1)
    total, past = _dim(inputs, "attention_mask", 1), _dim(inputs, past_name, 2) if past_name else None
    batch_t = (1, B, B)
    s_opt, p_opt = _mid(1, S), _mid(1, C - 1)
    stages = {"prefill": ((1, s_opt, S), (0, 0, 0)), "decode": ((1, 1, 1), (1, p_opt, C - 1))}
    profiles = []
    for name, (seq_t, past_t) in stages.items():
        sizes: dict = {}
        _bind(sizes, batch, batch_t)
        _bind(sizes, seq, seq_t)
        _bind(sizes, past, past_t)
        _bind(sizes, total, tuple(s + p for s, p in zip(seq_t, past_t)))  # mask = past + sequence
        profiles.append({"name": name, "shapes": _shapes("llm", inputs, sizes)})
    return profiles


def _vision_sizes(family: str, inputs: dict, image: dict, N: int, C: int) -> dict:
    """Symbolic dims of the vision encoder's inputs -> (min, opt, max), from the image processor's limits."""
    sizes: dict = {}
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        patch, merge = int(image.get("patch_size", 14)), int(image.get("merge_size", 2))
        size = image.get("size") or {}
        # Qwen2-VL's own defaults where the config does not say
        max_pixels = int(image.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 16384)
        min_pixels = int(image.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
        unit = merge * merge  # patches per image token: every count is a multiple of it
        per_min = -(-min_pixels // (patch * patch * unit)) * unit  # ceil
        per_max = max_pixels // (patch * patch) // unit * unit
        total_max = min(N * per_max, C * unit)  # the image tokens must fit in the context
        if per_min > per_max or total_max < N * per_min:
            raise VlmqError(f"{N} image(s) of at least {per_min // unit} tokens each do not fit in a context of {C}")
        n_opt = _mid(1, N)
        p_opt = min(max(_mid(per_min, total_max, unit), n_opt * per_min), n_opt * per_max)
        _bind(sizes, _dim(inputs, "pixel_values", 0), (per_min, p_opt, total_max))
        _bind(sizes, _dim(inputs, "vision_position_ids", 0), (per_min, p_opt, total_max))
        _bind(sizes, _dim(inputs, "cu_seqlens", 0), (2, n_opt + 1, N + 1))
        if family == "qwen3_vl":  # the position-table taps: one row per patch
            for name in ("pos_embed_index", "pos_embed_weight"):
                _bind(sizes, _dim(inputs, name, 0), (per_min, p_opt, total_max))
        if family == "qwen2_5_vl":  # one window_index entry per merge block; at most one window per block
            blocks = (per_min // unit, p_opt // unit, total_max // unit)
            _bind(sizes, _dim(inputs, "window_index", 0), blocks)
            _bind(sizes, _dim(inputs, "cu_window_seqlens", 0), (2, _mid(2, blocks[1] + 1), blocks[2] + 1))
    elif family == "smolvlm":
        edge = int((image.get("max_image_size") or {}).get("longest_edge") or 0)
        longest = int((image.get("size") or {}).get("longest_edge") or edge)
        per_image = (-(-longest // edge)) ** 2 + 1 if image.get("do_image_splitting") and edge else 1
        tokens = int(image.get("image_seq_len") or 1)
        total_max = min(N * per_image, C // tokens)
        if total_max < 1:
            raise VlmqError(f"one image tile ({tokens} tokens) does not fit in a context of {C}")
        _bind(sizes, _dim(inputs, "pixel_values", 0), (1, _mid(1, total_max), total_max))
        for axis in (2, 3):
            _bind(sizes, _dim(inputs, "pixel_values", axis), (edge, edge, edge))
    elif family in ("llava", "llava_next", "llava_onevision", "gemma3"):
        crop, size = image.get("crop_size") or {}, image.get("size") or {}
        crop, size = ({"height": crop} if isinstance(crop, int) else crop), ({"height": size} if isinstance(size, int) else size)
        tile = int(crop.get("height") or size.get("height") or size.get("shortest_edge") or 0)
        if not tile:
            raise VlmqError(f"build cannot read the {family} image processor's tile size (crop_size / size)")
        per_image = 1  # LLaVA-1.5, Gemma3: one square image; NeXT / OneVision: the base tile + the largest pinpoint's tiles
        if family in ("llava_next", "llava_onevision"):
            per_image += max((int(h) // tile) * (int(w) // tile) for h, w in image.get("image_grid_pinpoints") or [[tile, tile]])
        total_max = N * per_image
        _bind(sizes, _dim(inputs, "pixel_values", 0), (1, _mid(1, total_max), total_max))
        for axis in (2, 3):
            _bind(sizes, _dim(inputs, "pixel_values", axis), (tile, tile, tile))
    else:
        raise VlmqError(f"build does not know the image limits of the {family} family")
    return sizes


def derive_profiles(manifest: dict, limits: dict, *, max_batch: int = 1, max_seq: int | None = None,
                    max_context: int | None = None, max_images: int = 1) -> dict:
    """Profiles for every graph of the manifest: {"limits": ..., "graphs": {graph: {file, engine, profiles}}}."""
    ctx_limit = limits.get("max_position_embeddings")
    C = min(DEFAULT_CONTEXT, ctx_limit or DEFAULT_CONTEXT) if max_context is None else max_context
    S = C if max_seq is None else max_seq
    if C < 2:
        raise VlmqError(f"--max-context must be at least 2 (a prompt token and a generated one), got {C}")
    for flag, v in (("--max-batch", max_batch), ("--max-images", max_images), ("--max-seq", S)):
        if v < 1:
            raise VlmqError(f"{flag} must be at least 1, got {v}")
    if ctx_limit and C > ctx_limit:
        raise VlmqError(f"--max-context {C} is beyond the model's context (max_position_embeddings {ctx_limit})")
    if S > C:
        raise VlmqError(f"--max-seq {S} is beyond --max-context {C}")
    comps = manifest.get("components", {})
    io = {g: {i["name"]: i for i in c["inputs"]} for g, c in comps.items()}
    graphs: dict = {}
    vision_values: dict = {}
    if "vision_encoder" in comps:
        sizes = _vision_sizes(manifest["source"]["family"], io["vision_encoder"], limits["image_processor"],
                              max_images, C)
        graphs["vision_encoder"] = [{"name": "vision", "shapes": _shapes("vision_encoder", io["vision_encoder"], sizes)}]
        vision_values = {o["name"]: o["shape"] for o in comps["vision_encoder"]["outputs"]}
    if "projector" in comps:  # its inputs are the vision encoder's outputs: the same sizes, position by position
        sizes = {}
        for name, spec in io["projector"].items():
            for mine, theirs in zip(spec["shape"], vision_values.get(name, [])):
                _bind(sizes, mine, _sizes_of(theirs, graphs["vision_encoder"][0]["shapes"],
                                             io["vision_encoder"]))
        graphs["projector"] = [{"name": "vision", "shapes": _shapes("projector", io["projector"], sizes)}]
    if "embed_tokens" in comps:
        sizes = {}
        _bind(sizes, _dim(io["embed_tokens"], "input_ids", 0), (1, max_batch, max_batch))
        _bind(sizes, _dim(io["embed_tokens"], "input_ids", 1), (1, _mid(1, S), S))
        graphs["embed_tokens"] = [{"name": "tokens", "shapes": _shapes("embed_tokens", io["embed_tokens"], sizes)}]
    if "llm" in comps:
        graphs["llm"] = _llm_profiles(io["llm"], max_batch, S, C)
    return {
        "limits": {"max_batch": max_batch, "max_seq": S, "max_context": C, "max_images": max_images,
                   "max_position_embeddings": ctx_limit},
        "graphs": {g: {"file": comps[g]["file"], "engine": f"engines/{g}.plan", "profiles": p}
                   for g, p in graphs.items()},
    }


def _sizes_of(dim, shapes: dict, inputs: dict):
    """(min, opt, max) of a vision-encoder dimension name, read from its input shapes (an int stays fixed)."""
    if isinstance(dim, int):
        return (dim, dim, dim)
    for name, spec in inputs.items():
        if dim in spec["shape"]:
            axis = spec["shape"].index(dim)
            return tuple(shapes[name][p][axis] for p in ("min", "opt", "max"))
    raise VlmqError(f"vision_encoder: output dimension '{dim}' is not one of its inputs' dimensions")


def uses_fp8(manifest: dict) -> list[str]:
    """Components whose recipe says FP8 (bits or format), e.g. {"llm": {"bits": "fp8"}}."""
    recipe = manifest.get("recipe") or {}
    fp8 = lambda v: isinstance(v, str) and "fp8" in v.lower()  # noqa: E731
    found = [c for c, r in (recipe.get("components") or {}).items()
             if isinstance(r, dict) and (fp8(r.get("bits")) or fp8(r.get("format")) or fp8(r.get("dtype")))]
    if fp8(recipe.get("format")) or fp8(recipe.get("dtype")):
        found.append("all graphs")
    return found
