"""Second-moment accumulators for layer-wise quantization objectives."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running H = 2 E[x xᵀ] over calibration tokens (GPTQ's layer Hessian of ‖W X − Q X‖²).

    add(x, x_fp): x [..., n] — every leading index is one token — the layer input on the quantized
    stream; x_fp, when given, the same tokens' input in the unquantized model, for the correction
    term D = 2 E[(x_fp − x) xᵀ] (TurboBoA: target W X_fp instead of W X).
    dtype: accumulate in float64 to check float32 (the default) for drift; device: where the
    inputs arrive (the block's device).
    """

    def __init__(self, n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(n, n, dtype=dtype, device=device)
        self.cross: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        # float32 accumulation whatever the activations' dtype
        x = x.reshape(-1, x.shape[-1]).to(self.sum.dtype)
        self.sum.addmm_(x.T, x)
        if x_fp is not None:
            if self.cross is None:
                self.cross = torch.zeros_like(self.sum)
            self.cross.addmm_((x_fp.reshape(x.shape).to(x.dtype) - x).T, x)
        self.count += x.shape[0]

    @property
    def correction(self) -> torch.Tensor | None:
        """[n, n] = 2/N Σ (x_fp − x) xᵀ, or None when no FP inputs were given."""
        return None if self.cross is None else (2.0 / self.count * self.cross).to(torch.float32)

    @property
    def hessian(self) -> torch.Tensor:
        """[n, n] = 2/N Σ x xᵀ (float32)."""
        if self.count == 0:
            raise RuntimeError("no calibration tokens were seen")
        return (2.0 / self.count * self.sum).to(torch.float32)
