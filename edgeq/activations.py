"""Per-token dynamic activation quantization, and the linear wrapper that applies it.

A wrapped linear computes linear(fake_quant(rotation(x))): an optional online rotation (R4 on
down_proj's input), then a per-token int grid fitted to each row of x at run time.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeq.config import ActQuantConfig


def fake_quant_per_token(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float) -> torch.Tensor:
    """Quantize and dequantize each row (token) of x [..., d] on its own int grid.

    symmetric: codes in [−2^(b−1), 2^(b−1) − 1], scale = clip · max|x| / (2^(b−1) − 1).
    asymmetric: codes in [0, 2^b − 1], range [clip · min(x, 0), clip · max(x, 0)], integer zero point.
    A row of zeros stays zeros.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # half inputs: grid math in float32
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = xf.abs().amax(dim=-1, keepdim=True) * clip_ratio / qmax
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


class QuantInputLinear(nn.Module):
    """A block linear whose input goes through ``rotation`` (optional) and, when ``quantize_input`` is
    on, per-token fake quantization with ``bits`` before the unchanged ``linear``.

    Calibration of the weights runs with quantize_input off (Hessians of the rotated float
    activations); the pipeline turns it on once the weights are quantized.
    """

    def __init__(self, linear: nn.Linear, rotation: nn.Module | None = None):
        super().__init__()
        self.linear = linear
        self.rotation = rotation
        self.act = ActQuantConfig()
        self.bits = 16
        self.quantize_input = False

    def set_quantization(self, act: ActQuantConfig, bits: int) -> None:
        self.act, self.bits = act, bits
        self.quantize_input = bits < 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = self.rotation(x)
        if self.quantize_input:
            x = fake_quant_per_token(x, self.bits, self.act.symmetric, self.act.clip_ratio)
        return self.linear(x)
