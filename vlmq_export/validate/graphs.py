"""Static checks of the exported graphs: the portable INT4 form, ONNX Runtime's fusion of it, and TensorRT's
rules for every Q/DQ (../shared/notes/tensorrt.md)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import numpy_helper

from ..targets import Target

TENSORRT_BLOCKS = (64, 128)
INT4_OPSET = 21  # INT4 types and DequantizeLinear's block_size
FP8_TYPES = (T.FLOAT8E4M3FN, T.FLOAT8E4M3FNUZ, T.FLOAT8E5M2, T.FLOAT8E5M2FNUZ)
FP32_INT4_COST = "TensorRT builds it but runs the INT4 MatMuls in FP32: slow, unverified (its INT4 path is FP16)"


def int4_dequantize_nodes(model: onnx.ModelProto) -> list[dict]:
    """Every DequantizeLinear with an INT4 input, with the properties the portable form requires."""
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for idx, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, idx))
    out = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        w = inits.get(node.input[0])
        if w is None or w.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        users = consumers.get(node.output[0], [])
        scale = inits.get(node.input[1])
        out.append({
            "name": node.name,
            "weight": w.name,
            "dtype": "int4" if w.data_type == onnx.TensorProto.INT4 else "uint4",
            "shape": list(w.dims),
            "axis": attrs.get("axis", 1),
            "block_size": attrs.get("block_size", 0),
            "zero_point": len(node.input) > 2 and bool(node.input[2]),
            "zero_point_constant": len(node.input) > 2 and node.input[2] in inits,
            "scale_constant": scale is not None,
            "feeds_matmul_b": len(users) == 1 and users[0][0].op_type == "MatMul" and users[0][1] == 1,
        })
    return out


def portable_int4_problems(model: onnx.ModelProto, tensorrt: bool = True) -> list[str]:
    """What in ``model`` breaks the portable INT4 form (empty list: none).

    ``tensorrt=False`` checks only what ONNX Runtime's fusion needs, the form of asymmetric exports:
    UINT4 codes with a constant zero point are allowed, and any block size (whether ONNX Runtime fuses
    the graph is measured by :func:`ort_fusion`)."""
    problems = []
    for dq in int4_dequantize_nodes(model):
        where = f"{dq['name']} ({dq['weight']})"
        if tensorrt and dq["dtype"] != "int4":
            problems.append(f"{where}: unsigned INT4 (TensorRT needs signed, symmetric)")
        if dq["axis"] != 0:
            problems.append(f"{where}: axis {dq['axis']} (needs 0)")
        if tensorrt and dq["zero_point"]:
            problems.append(f"{where}: has a zero point")
        if dq["zero_point"] and not dq["zero_point_constant"]:
            problems.append(f"{where}: zero point is not a constant initializer")
        if not dq["scale_constant"]:
            problems.append(f"{where}: scale is not a constant initializer")
        if not dq["feeds_matmul_b"]:
            problems.append(f"{where}: does not feed a MatMul's input B directly")
        if tensorrt and dq["block_size"] not in TENSORRT_BLOCKS:
            problems.append(f"{where}: block {dq['block_size']} (TensorRT takes {TENSORRT_BLOCKS})")
    return problems


def ort_fusion(path: str | Path) -> dict:
    """Count INT4 DequantizeLinear nodes, the MatMulNBits ONNX Runtime makes of them (level ALL) and the INT4
    DequantizeLinear it leaves unfused (INT8/FP8 ones, which ONNX Runtime keeps, are not counted)."""
    from ..runtime.session import make_session

    path = Path(path)
    dq = len(int4_dequantize_nodes(onnx.load(str(path), load_external_data=False)))
    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        make_session(path, accuracy_level=0, providers=["CPUExecutionProvider"], optimized_model_path=opt)
        optimized = onnx.load(str(opt), load_external_data=False)
    ops = [n.op_type for n in optimized.graph.node]
    return {"int4_dequantize": dq, "matmulnbits": ops.count("MatMulNBits"),
            "dequantize_left": len(int4_dequantize_nodes(optimized))}


def opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


class _Graph:
    """What the TensorRT rules look up: constants (loaded on demand, external data included), element types,
    producers and consumers."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | Path | None):
        self.base_dir = str(base_dir or "")
        self.consts = {i.name: i for i in model.graph.initializer}
        self.consts.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"
                            and len(n.attribute) == 1 and n.attribute[0].name == "value"})
        self.types = {v.name: v.type.tensor_type.elem_type
                      for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in model.graph.node:
            for idx, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, idx))

    def array(self, name: str) -> np.ndarray | None:
        t = self.consts.get(name)
        return None if t is None else numpy_helper.to_array(t, self.base_dir)

    def elem_type(self, name: str) -> int | None:
        if name in self.consts:
            return self.consts[name].data_type
        node = self.producer.get(name)
        if node is not None and node.op_type == "QuantizeLinear":
            return _quantized_type(self, node)
        return self.types.get(name)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _zero_point(node: onnx.NodeProto) -> str | None:
    return node.input[2] if len(node.input) > 2 and node.input[2] else None


def _quantized_type(g: _Graph, node: onnx.NodeProto) -> int | None:
    """The integer / FP8 side of a Q or DQ: a DQ's input, a Q's zero point, else its output_dtype, else UINT8
    (ONNX's default for a QuantizeLinear with neither)."""
    if node.op_type == "DequantizeLinear":
        return g.elem_type(node.input[0])
    zp = _zero_point(node)
    return g.elem_type(zp) if zp else (_attrs(node).get("output_dtype") or T.UINT8)


def _type_name(t: int | None) -> str:
    return T.DataType.Name(t) if t else "unknown"


def _weight_axis(users: list[tuple[onnx.NodeProto, int]]) -> int | None:
    """The axis of a per-channel weight scale TensorRT takes for these consumers: 1 for a MatMul's (or an
    untransposed Gemm's) [K, N] weight, 0 for a Conv's [out, in, ...] one (None: not a weight input)."""
    axes = set()
    for node, idx in users:
        if node.op_type == "MatMul" and idx == 1:
            axes.add(1)
        elif node.op_type == "Gemm" and idx == 1:
            axes.add(0 if _attrs(node).get("transB", 0) else 1)
        elif node.op_type in ("Conv", "ConvTranspose") and idx == 1:
            axes.add(0)
        else:
            return None
    return axes.pop() if len(axes) == 1 else None


def _feeds_matmul_b(users: list[tuple[onnx.NodeProto, int]]) -> bool:
    return bool(users) and all((n.op_type == "MatMul" or (n.op_type == "Gemm" and not _attrs(n).get("transB", 0)))
                               and i == 1 for n, i in users)


def _int4_layout(g: _Graph, node: onnx.NodeProto, target: Target) -> list[str]:
    """INT4 weight-only: a [K, N] weight straight into a MatMul's input B, blocks along K (axis 0), scale [K/B, N]."""
    users = g.consumers.get(node.output[0], [])
    out = []
    if not _feeds_matmul_b(users):
        fed = ", ".join(f"{n.op_type} {n.name or n.output[0]!r} input {i}" for n, i in users) or "nothing"
        out.append(f"does not feed a MatMul's input B directly (feeds {fed}): nothing may sit between an INT4 "
                   "DequantizeLinear and its MatMul")
    dims = list(g.consts[node.input[0]].dims)
    if int(np.prod(dims)) % 2:  # a legal block layout implies an even count, so this is the one problem to name
        return out + [f"4-bit tensor {dims} has an odd element count (TensorRT packs two per byte)"]
    attrs = _attrs(node)
    axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
    axis += len(dims) if axis < 0 else 0
    scale = g.consts.get(node.input[1])
    if len(dims) != 2:
        out.append(f"INT4 weight of rank {len(dims)} (TensorRT takes a [K, N] MatMul weight)")
    elif axis != 0:
        out.append(f"axis {axis} (needs 0: blocks along K)")
    elif block not in target.int4_blocks:
        out.append(f"block {block} (TensorRT takes {target.int4_blocks})")
    elif scale is not None and list(scale.dims) != [dims[0] // block, dims[1]]:
        out.append(f"scale shape {list(scale.dims)} (needs [K/B, N] = {[dims[0] // block, dims[1]]})")
    return out


def _int8_layout(g: _Graph, node: onnx.NodeProto) -> list[str]:
    """INT8 / FP8 Q/DQ: per-tensor (scalar) scales on activations, a scalar or 1-D per-channel scale along the
    weight's output axis on weights, and no Cast after a DQ."""
    scale = g.consts.get(node.input[1])
    size = None if scale is None else int(np.prod(scale.dims))
    users = g.consumers.get(node.output[0], [])
    is_weight = node.input[0] in g.consts
    if node.op_type == "DequantizeLinear" and any(n.op_type == "Cast" for n, _ in users):
        return ["a Cast after the DequantizeLinear (blocks TensorRT's Q/DQ fusion)"]
    if size is None or size == 1:
        return []
    if not is_weight:
        return [f"activation scale of shape {list(scale.dims)} (TensorRT takes one per-tensor scale)"]
    dq_users = users
    if node.op_type == "QuantizeLinear":  # a weight Q: the layout is its DQ's consumers'
        dq_users = [u for n, _ in users if n.op_type == "DequantizeLinear" for u in g.consumers.get(n.output[0], [])]
    want = _weight_axis(dq_users)
    dims = list(g.consts[node.input[0]].dims)
    axis = _attrs(node).get("axis", 1)
    axis += len(dims) if axis < 0 else 0
    if want is None or len(scale.dims) != 1 or axis != want or scale.dims[0] != dims[want]:
        need = "a MatMul, Gemm or Conv weight" if want is None else f"axis {want}, length {dims[want]}"
        return [f"weight scale of shape {list(scale.dims)} on axis {axis} (TensorRT takes a scalar or a 1-D "
                f"per-channel scale: {need}; axis 1 for a MatMul [K, N] weight, 0 for Conv)"]
    return []


def _qdq_problems(g: _Graph, node: onnx.NodeProto, target: Target) -> list[str]:
    qtype = _quantized_type(g, node)
    out = []
    scale = g.array(node.input[1])
    if scale is None:
        out.append("scale is not a constant initializer")
    else:
        bad = int((~np.isfinite(scale.astype(np.float64)) | (scale.astype(np.float64) <= 0)).sum())
        if bad:
            out.append(f"{bad} of {scale.size} scales are not finite and > 0")
    zp = _zero_point(node)
    if zp and qtype in (T.INT4, T.UINT4):
        out.append("has a zero point (TensorRT's INT4 is symmetric: none)")
    elif zp:
        values = g.array(zp)
        if values is None:
            out.append("zero point is not a constant initializer")
        elif np.any(values.astype(np.float64) != 0):
            out.append("non-zero zero point (TensorRT is symmetric: zero points all 0)")
    if qtype == T.UINT4:
        out.append("unsigned INT4 (TensorRT needs signed, symmetric)")
    elif qtype == T.UINT8:
        out.append("UINT8 (TensorRT takes signed INT8 with zero point 0)")
    elif qtype == T.INT32:
        out.append("INT32 Q/DQ (a bias): TensorRT quantizes none")
    elif qtype in FP8_TYPES and not target.fp8:
        out.append(f"FP8 ({_type_name(qtype)}) Q/DQ: {target.name} ({target.what}) has no FP8")
    elif qtype in FP8_TYPES and qtype != T.FLOAT8E4M3FN:
        out.append(f"{_type_name(qtype)} Q/DQ: TensorRT's FP8 is FLOAT8E4M3FN")
    if node.op_type == "DequantizeLinear" and qtype in (T.INT4, T.UINT4) and node.input[0] in g.consts:
        out += _int4_layout(g, node, target)
    else:
        out += _int8_layout(g, node)
    return out


def _dq_output_type(g: _Graph, node: onnx.NodeProto) -> int | None:
    return _attrs(node).get("output_dtype") or g.elem_type(node.input[1])


def tensorrt_lint(model: onnx.ModelProto, target: Target, base_dir: str | Path | None = None) -> tuple[list, list]:
    """(problems, warnings) of ``model`` for a TensorRT target; ``base_dir`` holds its external data (the
    scales are read to check them)."""
    g = _Graph(model, base_dir)
    problems, warnings = [], []
    lo, hi = target.opsets
    if not lo <= opset(model) <= hi:
        problems.append(f"opset {opset(model)} outside {lo}..{hi}, what the ONNX parser of TensorRT "
                        f"{'.'.join(map(str, target.min_trt))} ({target.name}) takes")
    int4, fp32_int4 = 0, 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        where = f"{node.name or node.output[0]} ({node.input[0]})"
        problems += [f"{where}: {p}" for p in _qdq_problems(g, node, target)]
        if node.op_type == "DequantizeLinear" and _quantized_type(g, node) in (T.INT4, T.UINT4):
            int4 += 1
            fp32_int4 += _dq_output_type(g, node) == T.FLOAT
    fp32_inputs = any(i.type.tensor_type.elem_type == T.FLOAT for i in model.graph.input if i.name not in g.consts)
    if int4 and (fp32_int4 or fp32_inputs):
        what = " and ".join(w for w, on in ((f"INT4 scales ({fp32_int4} DequantizeLinear)", fp32_int4),
                                            ("activations", fp32_inputs)) if on)
        warnings.append(f"float32 {what}: {FP32_INT4_COST}")
    elif fp32_inputs:
        warnings.append("float32 activations: a strongly typed TensorRT engine runs this graph in FP32")
    return problems, warnings
