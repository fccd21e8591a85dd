"""One interface for executing a graph, with ONNX Runtime and TensorRT behind it (as Polygraphy's runners share
``infer``): feeds in, outputs out, input metadata, activate/deactivate as a context manager.

    with make_runner(OUT, "llm", "tensorrt") as r:
        outputs = r.infer({"inputs_embeds": ..., "attention_mask": ..., ...})

Torch-free. TensorRT and Polygraphy are imported only when a :class:`TrtRunner` activates, so this module
imports on a machine with neither. Feeds are cast to the graph's float input dtype here (float32 KV caches and
embeddings into an FP16 graph), the one place that knows the inputs' dtypes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import VlmqError

BACKENDS = ("onnxruntime", "tensorrt")
BUILD_HINT = "build them on this machine with `vlmq-export build {out}`"

# ONNX Runtime's type strings -> numpy
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
               "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


class TensorMeta(NamedTuple):
    dtype: np.dtype
    shape: tuple  # a dynamic dimension is its name (str) or None


class Runner:
    """Executes one graph. Subclasses implement ``activate_impl``, ``deactivate_impl``, ``input_metadata_impl``
    and ``infer_impl``; callers use ``with runner:`` (or ``activate()``), ``input_metadata`` and ``infer``."""

    def __init__(self, name: str):
        self.name = name
        self.is_active = False
        self._meta: dict[str, TensorMeta] | None = None

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False
            self._meta = None

    @property
    def input_metadata(self) -> dict[str, TensorMeta]:
        """{input name: (numpy dtype, shape)}; the runner must be active."""
        self._check_active()
        if self._meta is None:
            self._meta = self.input_metadata_impl()
        return self._meta

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """All outputs by name for ``feeds`` (cast by :meth:`cast_feeds`). The arrays returned are the caller's
        (never a buffer the runner reuses)."""
        return self.infer_impl(self.cast_feeds(feeds))

    def cast_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` with every float array in its input's float dtype (float32 into an FP16 graph); integer
        feeds are left as they are (a wrong integer type is the caller's bug, not something to hide)."""
        meta = self.input_metadata
        cast = {}
        for name, value in feeds.items():
            value = np.asarray(value)
            want = np.dtype(meta[name].dtype) if name in meta else value.dtype
            cast[name] = value.astype(want) if value.dtype != want and value.dtype.kind == want.kind == "f" else value
        return cast

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """ONNX Runtime's ``InferenceSession.run`` signature over :meth:`infer`, for callers written against it."""
        outs = self.infer(feeds)
        return [outs[n] for n in output_names] if output_names else list(outs.values())

    def _check_active(self) -> None:
        if not self.is_active:
            raise RuntimeError(f"runner {self.name} is not active (use `with runner:` or activate())")

    def activate_impl(self) -> None:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        raise NotImplementedError

    def input_metadata_impl(self) -> dict[str, TensorMeta]:
        raise NotImplementedError

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class OrtRunner(Runner):
    """A graph in ONNX Runtime, through :func:`~vlmq_export.runtime.session.make_session` (its accuracy level,
    threads, providers and optimization options are ``session_opts``)."""

    def __init__(self, path: str | Path, name: str | None = None, **session_opts):
        super().__init__(name or Path(path).stem)
        self.path = Path(path)
        self.session_opts = session_opts
        self.session = None
        self._cached = None  # (inout, outputs, IO binding) of the last infer_bound call

    def activate_impl(self) -> None:
        from .session import make_session

        self.session = make_session(self.path, **self.session_opts)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def deactivate_impl(self) -> None:
        self.session = None
        self._cached = None

    def input_metadata_impl(self) -> dict[str, TensorMeta]:
        return {i.name: TensorMeta(np.dtype(_ORT_DTYPES.get(i.type, np.float32)), tuple(i.shape))
                for i in self.session.get_inputs()}

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    @property
    def metadata(self) -> dict[str, str]:
        """The graph's custom metadata (e.g. ``vlmq.flavour``)."""
        self._check_active()
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def infer_bound(self, feeds: dict[str, np.ndarray], inout: dict[str, tuple[str, object]],
                    outputs: list[str]) -> dict[str, np.ndarray]:
        """Run with IO binding: ``feeds`` (numpy, cast as :meth:`infer` casts them) as inputs; each
        ``inout[input] = (output, OrtValue)`` bound as that input *and* that output, so the graph updates the
        value in place and it never leaves ONNX Runtime (the ORT-flavour KV cache); only ``outputs`` come back,
        as numpy. Passing the same ``inout`` dict again reuses its binding (one call rebinds only the feeds).
        Concurrent calls must pass different ``inout`` dicts."""
        cached = self._cached  # one attribute, read once: safe with calls from other threads
        binding = cached[2] if cached is not None and cached[0] is inout and cached[1] == outputs else None
        if binding is None:  # the in-place values are bound once for as long as the caller passes the same dict
            binding = self.session.io_binding()
            for name in outputs:  # first: get_outputs() lists the outputs in the order they were first bound
                binding.bind_output(name, "cpu")
            for name, (out, value) in inout.items():
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(out, value)
            self._cached = (inout, list(outputs), binding)
        for name, value in self.cast_feeds(feeds).items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in outputs:  # rebound in place: a fresh buffer of this call's shape
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        # the C++ binding's list: the Python wrapper's get_outputs() wraps every bound output, the in-place KV
        # buffers included (2 per layer), which cost ~0.4 ms of a ~10 ms decode step on SmolLM2
        raw = getattr(binding, "_iobinding", None)
        values = raw.get_outputs() if raw is not None and hasattr(raw, "get_outputs") else binding.get_outputs()
        return {name: values[i].numpy() for i, name in enumerate(outputs)}


def select_profile(profiles: list[dict], feeds: dict[str, np.ndarray], graph: str = "graph") -> int:
    """The index of the first optimization profile (as in OUT/engines/profiles.json) whose min..max range holds
    every feed's shape: for the language model, prefill (0) for a prompt on an empty cache, decode (1) for one
    new token on a filled one."""
    for index, prof in enumerate(profiles):
        shapes = prof["shapes"]
        if all(name in shapes and len(value.shape) == len(shapes[name]["min"])
               and all(lo <= d <= hi for d, lo, hi in zip(value.shape, shapes[name]["min"], shapes[name]["max"]))
               for name, value in feeds.items()):
            return index
    got = ", ".join(f"{n}{list(np.shape(v))}" for n, v in feeds.items())
    ranges = "; ".join(f"{p['name']}: " + ", ".join(f"{n} {s['min']}..{s['max']}" for n, s in p["shapes"].items())
                       for p in profiles)
    raise VlmqError(f"{graph}: no engine profile takes these shapes ({got}); the profiles are {ranges}. "
                    "Rebuild the engines with larger --max-seq / --max-context / --max-images")


class TrtRunner(Runner):
    """An engine built by `vlmq-export build`, through Polygraphy's TensorRT backend (``EngineFromBytes`` ->
    ``TrtRunner``). Each call selects the engine's optimization profile that takes the feeds' shapes
    (:func:`select_profile`); ``inputs`` are the ONNX graph's inputs as the manifest records them (a strongly
    typed engine keeps the graph's dtypes)."""

    def __init__(self, engine: str | Path, profiles: list[dict], inputs: list[dict], name: str | None = None):
        super().__init__(name or Path(engine).stem)
        self.engine = Path(engine)
        self.profiles = profiles
        self.inputs = inputs
        self._runner = None
        self._profile = 0

    def activate_impl(self) -> None:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner

        self._runner = PolygraphyTrtRunner(EngineFromBytes(BytesFromPath(str(self.engine))), name=self.name,
                                           optimization_profile=0)
        self._runner.activate()
        self._profile = 0

    def deactivate_impl(self) -> None:
        self._runner.deactivate()
        self._runner = None

    def input_metadata_impl(self) -> dict[str, TensorMeta]:
        return {i["name"]: TensorMeta(np.dtype(i["dtype"]), tuple(i["shape"])) for i in self.inputs}

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = select_profile(self.profiles, feeds, self.name)
        if index != self._profile:
            self._runner.set_profile(index)
            self._profile = index
        outs = self._runner.infer(feeds)
        return {k: np.array(v, copy=True) for k, v in outs.items()}  # Polygraphy reuses its output buffers


def tensorrt_missing() -> str | None:
    """Why the TensorRT backend cannot run in this process (None: it can)."""
    from ..engines.build import tensorrt_missing as missing

    return missing()


def engines(out: str | Path, graphs=None) -> dict[str, dict]:
    """{graph: {"engine": path, "profiles": [...], "inputs": [...]}} for the engines `vlmq-export build` recorded
    in OUT's manifest. Raises a one-line VlmqError saying what is missing (TensorRT here, or the engines) and how
    to build them; ``graphs`` (default: every graph of the manifest) are the ones needed."""
    from .. import outdir

    out = Path(out)
    why = tensorrt_missing()
    if why:
        raise VlmqError(f"--backend tensorrt: {why}; install TensorRT (pip install 'vlmq-export[trt]', or JetPack "
                        f"on a Jetson), then {BUILD_HINT.format(out=out)}")
    manifest = outdir.read_manifest(out)
    built = (manifest.get("engines") or {}).get("built") or {}
    graphs = list(graphs or manifest.get("components", {}))
    # engines the in-process build recorded in the manifest, else the ones OUT/build_engines.sh (trtexec, on the
    # target) wrote where profiles.json names them: that script cannot record them in the manifest
    planned = _planned_engines(out)
    files = {g: out / (built[g]["file"] if g in built else planned.get(g, f"engines/{g}.plan")) for g in graphs}
    missing = [g for g in graphs if not files[g].is_file()]
    if missing:
        raise VlmqError(f"--backend tensorrt: {out} has no TensorRT engine for {', '.join(missing)}; "
                        + BUILD_HINT.format(out=out))
    profiles = engine_profiles(out)
    return {g: {"engine": files[g], "profiles": profiles[g],
                "inputs": manifest["components"][g]["inputs"]} for g in graphs}


def _planned_engines(out: Path) -> dict[str, str]:
    """{graph: engine file relative to OUT} as OUT/engines/profiles.json names them (empty without the file)."""
    from ..engines.build import PROFILES

    path = out / PROFILES
    if not path.is_file():
        return {}
    return {g: spec["engine"] for g, spec in json.loads(path.read_text())["graphs"].items() if spec.get("engine")}


def engine_profiles(out: str | Path) -> dict[str, list[dict]]:
    """{graph: [optimization profile]} from OUT/engines/profiles.json, as `vlmq-export build` wrote it."""
    from ..engines.build import PROFILES

    path = Path(out) / PROFILES
    if not path.is_file():
        raise VlmqError(f"{out}: no {PROFILES}; run `vlmq-export build {out}`")
    return {g: spec["profiles"] for g, spec in json.loads(path.read_text())["graphs"].items()}


def check_backend(out: str | Path, backend: str, graphs=None) -> None:
    """Before any expensive work: the backend is known, and for TensorRT importable with OUT's engines built."""
    if backend not in BACKENDS:
        raise VlmqError(f"unknown backend '{backend}'; backends: {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        engines(out, graphs)


def make_runner(out: str | Path, graph: str, backend: str = "onnxruntime", *, path: str | Path | None = None,
                **opts) -> Runner:
    """A runner (not yet active) for ``graph`` of output directory ``out``. ONNX Runtime: ``path`` (default
    OUT/<graph>.onnx) with ``opts`` for :func:`make_session`; TensorRT: the engine `vlmq-export build` recorded."""
    if backend == "onnxruntime":
        return OrtRunner(path or Path(out) / f"{graph}.onnx", name=graph, **opts)
    if backend == "tensorrt":
        e = engines(out, [graph])[graph]
        return TrtRunner(e["engine"], e["profiles"], e["inputs"], name=graph)
    raise VlmqError(f"unknown backend '{backend}'; backends: {', '.join(BACKENDS)}")
