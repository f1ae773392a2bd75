"""ONNX Runtime's native int4 format: MatMulNBits (the ``ort`` format).

Every int4 ``DequantizeLinear → MatMul`` of an edgeq QDQ graph becomes one
``com.microsoft::MatMulNBits`` with the same integers: codes packed [N, blocks, block_size / 2]
(uint4, low nibble first), scales [N · blocks], zero points packed [N · ceil(blocks / 2)] when the
grid is asymmetric (a symmetric grid uses the kernel's implicit zero point 8). Per-channel grids
repeat the channel's scale over blocks of PER_CHANNEL_BLOCK. Activation Q/DQ pairs in front stay.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import EdgeqError
from edgeq.packing import unpack_int4
from exporters.onnx_qdq import OnnxExportInfo, write_model

PER_CHANNEL_BLOCK = 128
MS_DOMAIN = "com.microsoft"
DEFAULT_ACCURACY_LEVEL = 4  # int8 activations inside the kernel: ORT's fast CPU path


def _int4_array(init: onnx.TensorProto) -> np.ndarray:
    signed = init.data_type == TensorProto.INT4
    count = math.prod(init.dims)
    return unpack_int4(init.raw_data, count, signed).reshape(tuple(init.dims))


def _nibbles(values: np.ndarray) -> np.ndarray:
    """Pack uint8 0..15 along the last axis (even length) into bytes, low nibble first."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def matmulnbits_inputs(
    codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits' B, scales and zero points from a blocked int4 Wᵀ.

    codes: uint8 [K, N] (0..15); scale: [blocks, N]; zero: uint8 [blocks, N] or None (symmetric,
    zero point 8). Returns B uint8 [N, blocks, block_size / 2], scales [N · blocks], packed zero
    points uint8 [N · ceil(blocks / 2)] or None.
    """
    k, n = codes.shape
    blocks = scale.shape[0]
    pad_value = zero if zero is not None else np.full((blocks, n), 8, np.uint8)
    padded = np.empty((blocks * block_size, n), np.uint8)
    padded[:k] = codes
    padded[k:] = pad_value[-1]  # the ragged last block is padded with its zero point (weight 0)
    b = _nibbles(padded.T.reshape(n, blocks, block_size))
    scales = np.ascontiguousarray(scale.T).reshape(-1)
    if zero is None:
        return b, scales, None
    zp = zero.T  # [N, blocks]
    if blocks % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
    return b, scales, _nibbles(zp).reshape(-1)


def _blocked(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]):
    """(codes uint8 [K, N], scale [blocks, N], zero uint8 [blocks, N] | None, block_size) of an int4
    weight DequantizeLinear, or None for anything else."""
    if dq.input[0] not in inits or inits[dq.input[0]].data_type not in (TensorProto.INT4, TensorProto.UINT4):
        return None
    q_init = inits[dq.input[0]]
    values = _int4_array(q_init)
    k, n = values.shape
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    zero = _int4_array(inits[dq.input[2]]).astype(np.uint8) if len(dq.input) > 2 and dq.input[2] else None
    attrs = {a.name: a.i for a in dq.attribute}
    if q_init.data_type == TensorProto.INT4:  # symmetric: shift to the kernel's zero point 8
        values = (values.astype(np.int16) + 8).astype(np.uint8)
    if attrs.get("axis", 1) == 1:  # per output channel: repeat over fixed blocks
        block = PER_CHANNEL_BLOCK
        blocks = -(-k // block)
        scale = np.broadcast_to(scale.reshape(1, n), (blocks, n))
        zero = None if zero is None else np.broadcast_to(zero.reshape(1, n), (blocks, n))
    else:
        block = attrs["block_size"]
    return values.astype(np.uint8), np.asarray(scale), zero, block


def convert_to_matmulnbits(
    model: onnx.ModelProto, accuracy_level: int = DEFAULT_ACCURACY_LEVEL, scale_dtype=np.float32
) -> int:
    """Replace every int4 weight DequantizeLinear → MatMul of ``model`` by MatMulNBits, in place.
    Returns how many; scales stored as ``scale_dtype`` (float32 or float16)."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    drop_nodes, drop_inits, new_inits, replaced = [], set(), [], 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        weight = _blocked(dq, inits)
        users = consumers.get(dq.output[0], [])
        matmul = users[0] if len(users) == 1 else None
        if weight is None or matmul is None or matmul.op_type != "MatMul" or matmul.input[1] != dq.output[0]:
            continue
        codes, scale, zero, block = weight
        k, n = codes.shape
        b, scales, zp = matmulnbits_inputs(codes, scale, zero, block)
        base = dq.output[0]
        tensors = [numpy_helper.from_array(b, f"{base}_B"),
                   numpy_helper.from_array(scales.astype(scale_dtype), f"{base}_scales")]  # fmt: skip
        if zp is not None:
            tensors.append(numpy_helper.from_array(zp, f"{base}_zero_points"))
        node = helper.make_node(
            "MatMulNBits",
            [matmul.input[0], *(t.name for t in tensors)],
            list(matmul.output),
            name=f"{base}_MatMulNBits",
            domain=MS_DOMAIN,
            K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level,
        )  # fmt: skip
        new_inits += tensors
        drop_inits.update(dq.input)
        drop_nodes.append((dq, matmul, node))
        replaced += 1
    for dq, matmul, node in drop_nodes:
        graph.node.insert(list(graph.node).index(matmul), node)
        graph.node.remove(matmul)
        graph.node.remove(dq)
    kept = [init for init in graph.initializer if init.name not in drop_inits]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if replaced and not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return replaced


def set_accuracy_level(model: onnx.ModelProto, level: int) -> int:
    """Set every MatMulNBits' accuracy_level (0 = float32 compute, 4 = int8 activations); how many."""
    count = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
            count += 1
    if count and level not in (0, 1, 2, 3, 4):
        raise EdgeqError(f"MatMulNBits accuracy level must be 0-4, got {level}")
    return count


def to_matmulnbits(info: OnnxExportInfo, accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> OnnxExportInfo:
    """Rewrite an exported QDQ ``model.onnx`` into the ort format, in its folder."""
    model = onnx.load(str(info.path))
    replaced = convert_to_matmulnbits(model, accuracy_level)
    if replaced != info.replaced_weights:
        raise EdgeqError(f"only {replaced} of {info.replaced_weights} int4 weights could become MatMulNBits")
    return write_model(model, info.path.parent, replaced)
