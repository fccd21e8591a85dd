"""W8A8 parity layer by layer, teacher-forced: the Q/DQ graphs against torch's fake-quant without rounding ties.

End to end, a W8A8 vision encoder cannot match torch's fake-quant to 1e-4: float noise of ~1e-7 between ONNX
Runtime and torch moves an activation that sits on a rounding tie to the next code, and each such step
grows through the following blocks (tiny Qwen2.5-VL, INT8: one tie in the first block's qkv input ends as
image features 0.076 apart). So each graph is also checked with torch *forced* onto ONNX Runtime's activations:
torch runs the graph's export wrapper (the module that was exported) on the graph's feeds, and at each W8A8
layer records the input it computed itself, then continues from the tensor ONNX Runtime fed that layer's
QuantizeLinear. Every layer input (and every graph output) torch computes this way must equal ONNX Runtime's to
float noise: a Q/DQ on another tensor than torch fake-quantizes, a wrong scale, a missing or extra Q/DQ or a
cast shows up at the first layer after it, a tie does not propagate.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..calibrators.activation import activation_fake_quant
from ..export.act_qdq import act_qdq_base

GRAPHS = ("vision_encoder", "projector")  # the graphs a W8A8 vision / projector lives in (the llm: end to end)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def _session(path: Path, acts) -> tuple[ort.InferenceSession, dict[str, str], list[str]]:
    """ONNX Runtime (no graph optimization, float compute) on ``path`` with each W8A8 layer's QuantizeLinear input
    as an extra output: (session, layer name -> that tensor's name, the graph's own outputs)."""
    m = onnx.load(str(path))
    producer = {o: n for n in m.graph.node for o in n.output}
    by_base = {act_qdq_base(a) + "_DequantizeLinear": a.name for a in acts}
    taps = {}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.name in by_base:
            taps[by_base[n.name]] = producer[n.input[0]].input[0]
    outputs = [o.name for o in m.graph.output]
    for t in sorted(set(taps.values()) - set(outputs)):
        m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]), taps, outputs


def w8a8_layerwise_stage(out: Path, family, model, acts, prepared: list) -> dict:
    """``{"qdq_w8a8_layerwise": forced_layer_parity(...)}``, or nothing without W8A8 layers in these graphs."""
    res = forced_layer_parity(out, family, model, acts, prepared)
    return {"qdq_w8a8_layerwise": res} if res else {}


def forced_layer_parity(out: Path, family, model, acts, prepared: list) -> dict | None:
    """The stage ``qdq_w8a8_layerwise``: the relative error of each W8A8 layer's input and each graph output, torch
    forced onto ONNX Runtime's activations, worst over the image samples of ``prepared``: ``max_rel`` the worst of
    all (``worst`` where), ``<graph>_max_rel`` per graph, ``layers`` the W8A8 layers found in the graphs (a layer
    torch never reached counts 1). ``model``: the quantized torch model (weights as the graphs dequantize them),
    ``acts``: its W8A8 layers (``name``, ``act_fmt``, ``act_amax``), all fake-quantized, so that a graph missing
    one's Q/DQ differs at the next. None without W8A8 layers in these graphs or images in ``prepared``."""
    acts = [a for a in acts if a.act_fmt]
    images = [p for p in prepared if p.num_images]
    if not acts or not images:
        return None
    specs = {s.name: s for s in family.export_specs(model)}
    sessions = {g: _session(Path(out) / f"{g}.onnx", acts) for g in GRAPHS}
    if not any(taps for _s, taps, _o in sessions.values()):
        return None
    worst: dict[str, dict[str, float]] = {g: {} for g in GRAPHS}
    for p in images:
        feeds = family.vision_feeds(p)
        for g in GRAPHS:
            sess, taps, outputs = sessions[g]
            names = list(dict.fromkeys([*outputs, *taps.values()]))
            got = dict(zip(names, sess.run(names, {i.name: feeds[i.name] for i in sess.get_inputs()})))
            own = {}

            def force(_m, args, name):
                own[name] = args[0].detach().float().numpy().copy()
                return (torch.from_numpy(got[taps[name]]).reshape(args[0].shape).to(args[0].dtype), *args[1:])

            hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: force(m, a, n)) for n in taps]
            try:
                with activation_fake_quant(model, acts), torch.no_grad():
                    res = specs[g].module(*(torch.from_numpy(feeds[i]) for i in specs[g].input_names))
            finally:
                for h in hooks:
                    h.remove()
            res = res if isinstance(res, (tuple, list)) else (res,)
            errs = {n: _rel(got[t], own[n].reshape(got[t].shape)) if n in own else 1.0 for n, t in taps.items()}
            errs.update({f"output {o}": _rel(got[o], r.float().numpy()) for o, r in zip(specs[g].output_names, res)})
            for k, v in errs.items():
                worst[g][k] = max(worst[g].get(k, 0.0), v)
            feeds = {**feeds, **{o: got[o] for o in outputs}}  # the next graph reads this one's outputs
    every = {k: v for w in worst.values() for k, v in w.items()}
    return {"samples": len(images), "layers": sum(len(t) for _s, t, _o in sessions.values()),
            "max_rel": max(every.values()), "worst": max(every, key=every.get),
            **{f"{g}_max_rel": max(worst[g].values(), default=None) for g in GRAPHS}}
