"""Static checks of the exported graphs: the portable INT4 form and ONNX Runtime's fusion of it."""
from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from ..runtime.session import make_session

TENSORRT_BLOCKS = (64, 128)


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
    """Count INT4 DequantizeLinear nodes and the MatMulNBits ONNX Runtime makes of them (level ALL)."""
    path = Path(path)
    dq = len(int4_dequantize_nodes(onnx.load(str(path), load_external_data=False)))
    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        make_session(path, accuracy_level=0, providers=["CPUExecutionProvider"], optimized_model_path=opt)
        optimized = onnx.load(str(opt), load_external_data=False)
    ops = [n.op_type for n in optimized.graph.node]
    return {"int4_dequantize": dq, "matmulnbits": ops.count("MatMulNBits"),
            "dequantize_left": ops.count("DequantizeLinear")}
