"""Second-moment accumulators for layer-wise quantization objectives."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running H = 2 E[x xᵀ] over calibration tokens (GPTQ's layer Hessian of ‖W X − Q X‖²).

    add(x): x [..., n] — every leading index is one token.
    dtype: accumulate in float64 to check float32 (the default) for drift.
    """

    def __init__(self, n: int, dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(n, n, dtype=dtype)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sum.dtype)
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    def add_weighted(self, xtx: torch.Tensor, tokens: int) -> None:
        """Add a precomputed Σ x xᵀ-shaped term [n, n] that stands for ``tokens`` tokens."""
        self.sum += xtx.to(self.sum.dtype)
        self.count += tokens

    @property
    def hessian(self) -> torch.Tensor:
        """[n, n] = 2/N Σ x xᵀ (float32)."""
        if self.count == 0:
            raise RuntimeError("no calibration tokens were seen")
        return (2.0 / self.count * self.sum).to(torch.float32)
