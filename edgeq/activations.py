"""Per-token dynamic activation quantization, and the linear wrapper that applies it.

A wrapped linear computes linear(fake_quant(rotation(x))): an optional online rotation (R4 on
down_proj's input), then a per-token int grid fitted to each row of x at run time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from onnx import TensorProto
from torch import nn

from edgeq.config import ActQuantConfig


def fake_quant_per_token(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float) -> torch.Tensor:
    """Quantize and dequantize each row (token) of x [..., d] on its own int grid.

    symmetric: codes in [−2^(b−1), 2^(b−1) − 1], scale = clip · max|x| / (2^(b−1) − 1).
    asymmetric: codes in [0, 2^b − 1], range [clip · min(x, 0), clip · max(x, 0)], integer zero point.
    A row of zeros stays zeros.
    """
    # half inputs: grid math in float32. Not ``x.to(float32)`` on a float32 x: that returns x itself,
    # and when the ONNX exporter traces this forward, the tracer then records every later use of x
    # (the next linear reading the same input) as reading a Cast made here, so q/k/v's quantizers
    # read three different tensors and ``exporters.onnx_qdq.merge_duplicate_nodes`` cannot merge them
    wide = torch.promote_types(x.dtype, torch.float32)
    xf = x if x.dtype == wide else x.to(wide)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = xf.abs().amax(dim=-1, keepdim=True) * (clip_ratio / qmax)  # ONNX graphs: same order
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        out = torch.clamp(torch.round(xf / safe), -qmax - 1, qmax) * scale
    else:
        qmax = 2**bits - 1
        hi = xf.amax(dim=-1, keepdim=True).clamp_min(0) * clip_ratio
        lo = xf.amin(dim=-1, keepdim=True).clamp_max(0) * clip_ratio
        scale = (hi - lo) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / safe)
        out = (torch.clamp(torch.round(xf / safe) + zero, 0, qmax) - zero) * scale
    return out.to(x.dtype)


class PerTokenFakeQuant(torch.autograd.Function):
    """fake_quant_per_token, exported to ONNX as a dynamic QuantizeLinear → DequantizeLinear pair:
    the scale (and zero point) computed from the row at run time, one block over the last axis.

    PyTorch's ONNX exporter knows no 4-bit types, so a 4-bit pair is emitted in an 8-bit container
    with the 4-bit range made explicit, Q(int8) → Clip(−8, 7) → DQ (Clip(0, 15) when asymmetric),
    which computes the same; ``exporters.onnx_qdq.narrow_activation_qdq`` rewrites it to int4 Q → DQ.
    """

    @staticmethod
    def forward(ctx, x, bits: int, symmetric: bool, clip_ratio: float, width: int):  # noqa: ARG004
        return fake_quant_per_token(x, bits, symmetric, clip_ratio)

    @staticmethod
    def backward(ctx, grad):  # noqa: ARG004
        """Straight through (∂Q(x)/∂x = I): what learning rotations through the grid uses."""
        return grad, None, None, None, None

    @staticmethod
    def symbolic(g, x, bits: int, symmetric: bool, clip_ratio: float, width: int):
        """``width``: the size of x's last axis (one quantization block), static in the graph. A
        float16 x is quantized in float32 and the result cast back, as ``fake_quant_per_token`` does."""
        half = x.type().scalarType() == "Half"
        if half:
            x = g.op("Cast", x, to_i=TensorProto.FLOAT)
        axes = g.op("Constant", value_t=torch.tensor([-1]))
        zero = g.op("Constant", value_t=torch.tensor(0.0))
        one = g.op("Constant", value_t=torch.tensor(1.0))
        if symmetric:
            qmin, qmax, container = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, torch.int8
            amax = g.op("ReduceMax", g.op("Abs", x), axes, keepdims_i=1)
            scale = g.op("Mul", amax, g.op("Constant", value_t=torch.tensor(clip_ratio / qmax)))
        else:
            qmin, qmax, container = 0, 2**bits - 1, torch.uint8
            clip = g.op("Constant", value_t=torch.tensor(clip_ratio))
            hi = g.op("Mul", g.op("Max", g.op("ReduceMax", x, axes, keepdims_i=1), zero), clip)
            lo = g.op("Mul", g.op("Min", g.op("ReduceMin", x, axes, keepdims_i=1), zero), clip)
            scale = g.op("Div", g.op("Sub", hi, lo), g.op("Constant", value_t=torch.tensor(float(qmax))))
        safe = g.op("Where", g.op("Greater", scale, zero), scale, one)
        dtype = {torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8}[container]
        zp: tuple = ()
        if not symmetric:
            zp = (g.op("Cast", g.op("Round", g.op("Div", g.op("Neg", lo), safe)), to_i=dtype),)
        attrs = {"axis_i": -1, "block_size_i": width}
        q = g.op("QuantizeLinear", x, safe, *zp, output_dtype_i=dtype, **attrs)
        if bits < 8:
            low = g.op("Constant", value_t=torch.tensor(qmin, dtype=container))
            high = g.op("Constant", value_t=torch.tensor(qmax, dtype=container))
            q = g.op("Clip", q, low, high)
        out = g.op("DequantizeLinear", q, safe, *zp, **attrs)
        return g.op("Cast", out, to_i=TensorProto.FLOAT16) if half else out


class QuantInputLinear(nn.Module):
    """A block linear whose input goes through ``rotation`` (optional) and, when ``quantize_input`` is
    on, per-token fake quantization on a ``bits``-wide grid (``symmetric``, ``clip_ratio``) before
    the unchanged ``linear``. Linears that read one input (q/k/v, gate/up) carry equal settings, so
    an exported graph quantizes that input once.

    ``shift`` (a buffer [in_features], or None): a static offset taken out of the input before the
    grid and added back after it, Q(x − shift) + shift, so only the part of each token that differs
    from it is rounded (``ActQuantConfig.shift``, ``edgeq.activation_ranges.fit_block_shifts``).

    Calibration of the weights runs with quantize_input off (Hessians of the rotated float
    activations) unless ``ActQuantConfig.calibrate_quantized``; the pipeline sets the grid.
    """

    def __init__(self, linear: nn.Linear, rotation: nn.Module | None = None):
        super().__init__()
        self.linear = linear
        self.rotation = rotation
        self.bits = 16
        self.symmetric = True
        self.clip_ratio = 1.0
        self.quantize_input = False
        self.register_buffer("shift", None)

    def set_quantization(self, act: ActQuantConfig, bits: int, clip_ratio: float | None = None) -> None:
        """The grid of ``act`` at ``bits`` (16 = off), with its clip ratio unless one is given (a
        searched one, ``edgeq.activation_ranges``)."""
        self.bits, self.symmetric = bits, act.symmetric
        self.clip_ratio = act.clip_ratio if clip_ratio is None else clip_ratio
        self.quantize_input = bits < 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = self.rotation(x)
        if self.quantize_input:
            x = self._fake_quant(x)
        return self.linear(x)

    def _fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        grid = (self.bits, self.symmetric, self.clip_ratio, self.linear.in_features)
        return shifted_fake_quant(x, self.shift, *grid)


def shifted_fake_quant(
    x: torch.Tensor, shift: torch.Tensor | None, bits: int, symmetric: bool, clip_ratio: float, width: int
) -> torch.Tensor:
    """Q(x − shift) + shift with PerTokenFakeQuant's grid over x's last axis (``width`` wide);
    ``shift`` broadcasts against x (None = no shift: Q(x))."""
    if shift is None:
        return PerTokenFakeQuant.apply(x, bits, symmetric, clip_ratio, width)
    # the shift in float32, as the grid math (fake_quant_per_token) and the exported graphs do
    wide = torch.promote_types(x.dtype, torch.float32)
    xf = x if x.dtype == wide else x.to(wide)
    shift = shift.to(wide)
    out = PerTokenFakeQuant.apply(xf - shift, bits, symmetric, clip_ratio, width) + shift
    return out if out.dtype == x.dtype else out.to(x.dtype)


@contextlib.contextmanager
def float_activations(module: nn.Module) -> Iterator[None]:
    """Run ``module`` with every activation and KV cache quantizer in it switched off (the FP stream
    of a calibration that corrects toward the unquantized model)."""
    saved: list[tuple[object, str, object]] = []
    for m in module.modules():
        if isinstance(m, QuantInputLinear):
            saved.append((m, "quantize_input", m.quantize_input))
            m.quantize_input = False
        spec = getattr(m, "edgeq_kv", None)  # edgeq.kv_cache.KVQuant
        if spec is not None:
            saved.append((spec, "bits", spec.bits))
            spec.bits = 16
    try:
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)
