"""Integer grids for weights: pure functions, shapes in the docstrings.

A weight W [out, in] is cut into groups of ``group_size`` consecutive input columns (the last group
may be shorter). Each (row, group) has a scale s and an integer zero point z, and an entry is stored
as an unsigned code q in [0, 2^bits - 1] with  W ≈ (q - z) · s.  A symmetric grid fixes
z = 2^(bits-1), so q - z is a signed integer in [-2^(bits-1), 2^(bits-1) - 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgeq.config import PER_CHANNEL, WeightQuantConfig


@dataclass
class QuantizedWeight:
    """Integer weight of one linear layer.

    codes: uint8 [out, in], values in [0, 2^bits - 1]
    scale: float32 [out, n_groups]
    zero:  uint8 [out, n_groups]
    group_size: input columns per group (``in`` for per-channel)
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def grid(self) -> tuple[int, int, bool]:
        """(bits, group_size, symmetric): weights on the same grid can share one integer tensor."""
        return self.bits, self.group_size, self.symmetric

    @property
    def storage_bytes(self) -> int:
        """Bytes at the grid's own width: the codes at ``bits`` each, the float32 scales, and the
        zero points at ``bits`` each when asymmetric (what a mixed-precision budget is about; the
        ONNX containers round 3 bits up to 4)."""
        bits = self.codes.numel() * self.bits + (0 if self.symmetric else self.zero.numel() * self.bits)
        return math.ceil(bits / 8) + 4 * self.scale.numel()

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """The output rows start:stop."""
        return QuantizedWeight(self.codes[start:stop], self.scale[start:stop], self.zero[start:stop],
                               self.bits, self.group_size, self.symmetric)  # fmt: skip

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]: (q - z) · s, computed as ONNX DequantizeLinear computes it."""
        in_features = self.codes.shape[1]
        zero = expand_groups(self.zero, self.group_size, in_features).to(torch.int32)
        scale = expand_groups(self.scale, self.group_size, in_features)
        return (self.codes.to(torch.int32) - zero).to(torch.float32) * scale


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack the rows (outputs) of weights on the same grid: [out_i, in] → [Σ out_i, in]."""
    first = parts[0]
    if any(p.grid != first.grid for p in parts):
        raise ValueError("concat_rows needs weights on the same grid (bits, group size, symmetry)")
    return QuantizedWeight(
        torch.cat([p.codes for p in parts]),
        torch.cat([p.scale for p in parts]),
        torch.cat([p.zero for p in parts]),
        first.bits,
        first.group_size,
        first.symmetric,
    )


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def resolve_group_size(config: WeightQuantConfig, in_features: int) -> int:
    return in_features if config.group_size == PER_CHANNEL else config.group_size


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """[out, n_groups] -> [out, in]: each group's value repeated over its columns."""
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def grid_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid over the last axis. w [..., n] -> (scale [...] float32, zero [...] uint8).

    The range always contains 0 (as GPTQ's quantizer does) so zero-padding a short group changes
    nothing and exact zeros stay exact.
    """
    maxq = 2**bits - 1
    w = w.to(torch.float32)
    wmin = w.amin(dim=-1).clamp(max=0)
    wmax = w.amax(dim=-1).clamp(min=0)
    if symmetric:
        half = 2 ** (bits - 1)
        scale = torch.maximum(-wmin, wmax) / (half - 1)
        zero = torch.full_like(scale, half)
    else:
        scale = (wmax - wmin) / maxq
        zero = torch.zeros_like(scale)
    dead = scale == 0
    scale = torch.where(dead, torch.ones_like(scale), scale)
    if not symmetric:
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero.to(torch.uint8)


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to the grid. w [out, n], scale/zero [out, n] (already expanded) -> codes uint8 [out, n]."""
    q = torch.round(w.to(torch.float32) / scale) + zero.to(torch.float32)
    return q.clamp(0, 2**bits - 1).to(torch.uint8)


def group_grid_params(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) grid. w [out, in] -> (scale [out, n_groups], zero [out, n_groups])."""
    out_features, in_features = w.shape
    groups = num_groups(in_features, group_size)
    padded = torch.zeros(out_features, groups * group_size, dtype=torch.float32, device=w.device)
    padded[:, :in_features] = w
    return grid_params(padded.view(out_features, groups, group_size), bits, symmetric)


def rtn_quantize(w: torch.Tensor, config: WeightQuantConfig) -> QuantizedWeight:
    """Round-to-nearest on a min-max grid. w [out, in] -> QuantizedWeight."""
    in_features = w.shape[1]
    group_size = resolve_group_size(config, in_features)
    scale, zero = group_grid_params(w, config.bits, group_size, config.symmetric)
    codes = quantize_to_codes(
        w,
        expand_groups(scale, group_size, in_features),
        expand_groups(zero, group_size, in_features),
        config.bits,
    )
    return QuantizedWeight(codes, scale, zero, config.bits, group_size, config.symmetric)


@torch.no_grad()
def rtn_quantize_in_place(w: torch.Tensor, config: WeightQuantConfig, rows: int = 8192) -> QuantizedWeight:
    """Round-to-nearest of a large table w [out, in] (lm_head, the embedding), ``rows`` rows at a
    time, replacing w by its dequantized values. Rows are independent on these grids, so the result
    is ``rtn_quantize``'s; the temporaries are one slice's, not several copies of the table (a
    Llama-3.2 lm_head is 1.6 GB in float32)."""
    parts = []
    for start in range(0, w.shape[0], rows):
        part = rtn_quantize(w[start : start + rows], config)
        w[start : start + rows] = part.dequantize().to(w.dtype)
        parts.append(part)
    return concat_rows(parts)
