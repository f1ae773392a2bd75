"""Bit packing of integer codes as ONNX stores 4-bit tensors: two elements per byte, the first in
the low nibble, over the row-major flattening (ONNX IR ``INT4``/``UINT4``)."""

from __future__ import annotations

import numpy as np


def pack_int4(values: np.ndarray) -> bytes:
    """Pack 4-bit values (uint8 0..15 or int8 -8..7, any shape) into bytes, low nibble first.
    An odd element count leaves the last high nibble zero."""
    flat = (values.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def unpack_int4(data: bytes, count: int, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_int4`: ``count`` values as int8 (signed) or uint8 (unsigned), flat."""
    raw = np.frombuffer(data, dtype=np.uint8)
    flat = np.empty(raw.size * 2, dtype=np.uint8)
    flat[0::2] = raw & 0xF
    flat[1::2] = raw >> 4
    flat = flat[:count]
    if signed:
        return np.where(flat >= 8, flat.astype(np.int16) - 16, flat).astype(np.int8)
    return flat
