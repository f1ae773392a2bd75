"""ONNX Runtime's native int2 / int4 / int8 weight format: MatMulNBits (the ``ort`` format).

Every int2, int4 (or int8) ``DequantizeLinear → MatMul`` of an edgeq QDQ graph becomes one
``com.microsoft::MatMulNBits`` with the same integers: codes [N, blocks, block_size · bits / 8]
(2- and 4-bit: packed, first element in the lowest bits), scales [N · blocks], zero points
[N · ceil(blocks · bits / 8)] (2- and 4-bit, packed) or [N · blocks] (8-bit) when the grid is
asymmetric (a symmetric grid uses the
kernel's implicit zero point 2^(bits-1)). Per-channel grids repeat the channel's scale over blocks
of PER_CHANNEL_BLOCK. Activation Q/DQ pairs in front stay.
A quantized embedding, ``DequantizeLinear → Gather``, becomes ``com.microsoft::GatherBlockQuantized``
(uint4 table and zero points, scales per row and block).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import EdgeqError
from edgeq.packing import pack_bits, pack_int4, unpack_bits
from exporters.onnx_qdq import OnnxExportInfo, write_model

PER_CHANNEL_BLOCK = 128
MS_DOMAIN = "com.microsoft"
DEFAULT_ACCURACY_LEVEL = 4  # int8 activations inside the kernel: ORT's fast CPU path


PACKED_TYPES = {TensorProto.INT2: 2, TensorProto.UINT2: 2, TensorProto.INT4: 4, TensorProto.UINT4: 4}
WEIGHT_TYPES = PACKED_TYPES | {TensorProto.INT8: 8, TensorProto.UINT8: 8}
SIGNED_TYPES = (TensorProto.INT2, TensorProto.INT4, TensorProto.INT8)


def _int_array(init: onnx.TensorProto) -> np.ndarray:
    """The integer values of an int2/uint2 or int4/uint4 (packed) or int8/uint8 initializer."""
    if init.data_type not in PACKED_TYPES:
        return numpy_helper.to_array(init)
    signed = init.data_type in SIGNED_TYPES
    count = math.prod(init.dims)
    bits = PACKED_TYPES[init.data_type]
    return unpack_bits(init.raw_data, count, bits, signed).reshape(tuple(init.dims))


def _pack_last_axis(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 0..2^bits − 1 along the last axis into bytes, first element in the lowest bits.
    The last axis is a multiple of 8 / bits long, so no byte spans two rows and the row-major
    ``pack_bits`` packs each row on its own."""
    packed = np.frombuffer(pack_bits(values, bits), np.uint8)
    return packed.reshape(*values.shape[:-1], values.shape[-1] * bits // 8)


def matmulnbits_inputs(
    codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, block_size: int, bits: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits' B, scales and zero points from a blocked Wᵀ.

    codes: uint8 [K, N] (0..2^bits − 1); scale: [blocks, N]; zero: uint8 [blocks, N] or None
    (symmetric, zero point 2^(bits−1)). Returns B uint8 [N, blocks, block_size · bits / 8], scales
    [N · blocks], zero points uint8 (2- and 4-bit: packed [N · ceil(blocks · bits / 8)]; 8-bit:
    [N · blocks]) or None.
    """
    k, n = codes.shape
    blocks = scale.shape[0]
    pad_value = zero if zero is not None else np.full((blocks, n), 2 ** (bits - 1), np.uint8)
    padded = np.empty((blocks * block_size, n), np.uint8)
    padded[:k] = codes
    padded[k:] = pad_value[-1]  # the ragged last block is padded with its zero point (weight 0)
    b = padded.T.reshape(n, blocks, block_size)
    scales = np.ascontiguousarray(scale.T).reshape(-1)
    if bits == 8:
        zp = None if zero is None else np.ascontiguousarray(zero.T).reshape(-1)
        return np.ascontiguousarray(b), scales, zp
    b = _pack_last_axis(b, bits)
    if zero is None:
        return b, scales, None
    zp = zero.T  # [N, blocks], each row's packed into whole bytes
    per_byte = 8 // bits
    if blocks % per_byte:
        zp = np.concatenate([zp, np.zeros((n, per_byte - blocks % per_byte), np.uint8)], axis=1)
    return b, scales, _pack_last_axis(zp, bits).reshape(-1)


def _int_grid(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto], in_axis: int):
    """(codes uint8 as stored, scale [blocks, outputs], zero uint8 [blocks, outputs] or None for a
    symmetric grid (the kernels' implicit zero point 2^(bits−1)), block_size, bits) of a weight
    DequantizeLinear (int2, int4 or int8 codes from an initializer) whose input (reduction) axis is
    ``in_axis``; None for anything else. A per-channel grid repeats each channel's scale over blocks
    of PER_CHANNEL_BLOCK."""
    if dq.input[0] not in inits or inits[dq.input[0]].data_type not in WEIGHT_TYPES:
        return None
    q_init = inits[dq.input[0]]
    bits = WEIGHT_TYPES[q_init.data_type]
    values = _int_array(q_init)
    width, outputs = values.shape[in_axis], values.shape[1 - in_axis]
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    zero = _int_array(inits[dq.input[2]]).astype(np.uint8) if len(dq.input) > 2 and dq.input[2] else None
    if q_init.data_type in SIGNED_TYPES:  # symmetric: shift to the kernels' zero point
        values = (values.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    attrs = {a.name: a.i for a in dq.attribute}
    if attrs.get("axis", 1) != in_axis:  # one scale per output channel
        block = PER_CHANNEL_BLOCK
        blocks = -(-width // block)
        scale = np.broadcast_to(scale.reshape(1, outputs), (blocks, outputs))
        zero = None if zero is None else np.broadcast_to(zero.reshape(1, outputs), (blocks, outputs))
    else:
        block = attrs["block_size"]
        if in_axis == 1:  # stored [outputs, blocks]
            scale, zero = scale.T, None if zero is None else zero.T
    return values.astype(np.uint8), np.asarray(scale), zero, block, bits


def _blocked(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]):
    """MatMulNBits' view of a weight Wᵀ [K, N]: (codes, scale [blocks, N], zero | None, block_size,
    bits)."""
    return _int_grid(dq, inits, in_axis=0)


def _table(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]):
    """GatherBlockQuantized's (data [rows, width], scales [rows, blocks], zero points [rows, blocks],
    block_size) from an int4 DequantizeLinear of a table W [rows, width], or None."""
    grid = _int_grid(dq, inits, in_axis=1)
    if grid is None or grid[4] != 4:
        return None
    values, scale, zero, block, _ = grid
    if zero is None:
        zero = np.full(scale.shape, 8, np.uint8)
    return values, np.ascontiguousarray(scale.T), np.ascontiguousarray(zero.T), block


def _gather_block_quantized(
    dq: onnx.NodeProto, gather: onnx.NodeProto, table, scale_dtype=np.float32
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    values, scale, zero, block = table
    base = dq.output[0]

    def uint4(name: str, array: np.ndarray) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.UINT4, list(array.shape), pack_int4(array), raw=True)

    scales = numpy_helper.from_array(scale.astype(scale_dtype), f"{base}_scales")
    tensors = [uint4(f"{base}_uint4", values), scales, uint4(f"{base}_zero_points", zero)]
    node = helper.make_node(
        "GatherBlockQuantized",
        [tensors[0].name, gather.input[1], tensors[1].name, tensors[2].name],
        list(gather.output),
        name=f"{base}_GatherBlockQuantized",
        domain=MS_DOMAIN,
        gather_axis=0, quantize_axis=1, block_size=block, bits=4,
    )  # fmt: skip
    return node, tensors


def _matmulnbits(
    dq: onnx.NodeProto, matmul: onnx.NodeProto, weight, accuracy_level: int, scale_dtype
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    codes, scale, zero, block, bits = weight
    k, n = codes.shape
    b, scales, zp = matmulnbits_inputs(codes, scale, zero, block, bits)
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
        K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level,
    )  # fmt: skip
    return node, tensors


def convert_to_matmulnbits(
    model: onnx.ModelProto, accuracy_level: int = DEFAULT_ACCURACY_LEVEL, scale_dtype=np.float32
) -> int:
    """Replace every int2/int4/int8 weight DequantizeLinear → MatMul of ``model`` by MatMulNBits (and
    an int4 embedding's DequantizeLinear → Gather by GatherBlockQuantized), in place. Returns how
    many; MatMulNBits scales stored as ``scale_dtype`` (float32 or float16)."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replacements = []  # (dq, the node it fed, the node taking both places, new initializers)
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        users = consumers.get(dq.output[0], [])
        user = users[0] if len(users) == 1 else None
        if user is not None and user.op_type == "Gather" and user.input[0] == dq.output[0]:
            table = _table(dq, inits)
            if table is not None:
                replacements.append((dq, user, *_gather_block_quantized(dq, user, table, scale_dtype)))
        elif user is not None and user.op_type == "MatMul" and user.input[1] == dq.output[0]:
            weight = _blocked(dq, inits)
            if weight is not None:
                replacements.append((dq, user, *_matmulnbits(dq, user, weight, accuracy_level, scale_dtype)))
    for dq, user, node, _ in replacements:
        graph.node.insert(list(graph.node).index(user), node)
        graph.node.remove(user)
        graph.node.remove(dq)
    dropped = {name for dq, *_ in replacements for name in dq.input}
    kept = [init for init in graph.initializer if init.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + [t for *_, tensors in replacements for t in tensors])
    if replacements and not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(replacements)


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
        raise EdgeqError(f"only {replaced} of {info.replaced_weights} integer weights became MatMulNBits")
    return write_model(model, info.path.parent, replaced, info.merged_nodes)
