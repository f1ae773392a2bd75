"""Bit packing of integer codes as ONNX stores sub-byte tensors: 8 / bits elements per byte, the
first in the lowest bits, over the row-major flattening (ONNX IR ``INT4``/``UINT4``, two per byte
low nibble first; ``INT2``/``UINT2``, four per byte). MatMulNBits packs its 2- and 4-bit codes the
same way."""

from __future__ import annotations

import numpy as np

PACKED_BITS = (2, 4)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack ``bits``-wide values (unsigned 0..2^bits − 1 or signed two's complement, any shape) into
    bytes, first element in the lowest bits. A count that does not fill the last byte leaves its
    high bits zero."""
    if bits not in PACKED_BITS:
        raise ValueError(f"packing is for 2- and 4-bit values, got {bits}")
    per_byte = 8 // bits
    flat = (values.reshape(-1).astype(np.int16) & (2**bits - 1)).astype(np.uint8)
    if flat.size % per_byte:
        flat = np.concatenate([flat, np.zeros(per_byte - flat.size % per_byte, np.uint8)])
    lanes = flat.reshape(-1, per_byte)
    packed = np.zeros(lanes.shape[0], np.uint8)
    for lane in range(per_byte):
        packed |= lanes[:, lane] << (bits * lane)
    return packed.tobytes()


def unpack_bits(data: bytes, count: int, bits: int, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` values as int8 (signed) or uint8 (unsigned), flat."""
    if bits not in PACKED_BITS:
        raise ValueError(f"packing is for 2- and 4-bit values, got {bits}")
    per_byte, mask = 8 // bits, 2**bits - 1
    raw = np.frombuffer(data, dtype=np.uint8)
    flat = np.stack([(raw >> (bits * lane)) & mask for lane in range(per_byte)], axis=1).reshape(-1)[:count]
    if signed:
        half = 2 ** (bits - 1)
        return np.where(flat >= half, flat.astype(np.int16) - 2**bits, flat).astype(np.int8)
    return flat.astype(np.uint8)


def pack_int4(values: np.ndarray) -> bytes:
    """:func:`pack_bits` at 4 bits."""
    return pack_bits(values, 4)


def unpack_int4(data: bytes, count: int, signed: bool) -> np.ndarray:
    """:func:`unpack_bits` at 4 bits."""
    return unpack_bits(data, count, 4, signed)
