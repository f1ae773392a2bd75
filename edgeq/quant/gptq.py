"""GPTQ (Frantar et al., 2022): column-by-column rounding with optimal compensation of the columns
not yet quantized, minimizing tr(ΔW H ΔWᵀ) with H = 2 E[x xᵀ].

Notation, following the paper: U is the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U). Quantizing column j
leaves the error e = (w_j − q_j) / U_jj, which is spread over the later columns as W[:, j:] −= e · U[j, j:].
Columns are processed in blocks of ``block_size`` with lazy batched updates of the rest.

H must be positive definite for U to exist. Dampening (H + λI, λ a fraction of mean diag H) makes a
rank-deficient H so, e.g. from fewer calibration tokens than inputs or duplicated inputs. Where
float32 rounding still leaves it indefinite, ``factor_dampened`` retries with 10× and 100× the
dampening and at last drops the off-diagonal (no compensation between columns: weighted RTN); each
such step is a ``DampingFallback`` warning, which the pipeline reports per block.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from edgeq.config import GPTQOptions, WeightQuantConfig
from edgeq.quant.grid import (
    QuantizedWeight,
    grid_params,
    num_groups,
    quantize_to_codes,
    resolve_group_size,
)


def dampen(h: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H [n, n] → (H + λI with dead columns set to 1 on the diagonal, dead mask [n]).
    A dead column (diag 0: the input is always 0) cannot affect the output."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    return h, dead


def inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """U upper triangular with Uᵀ U = H⁻¹. h [n, n] positive definite (dampen first)."""
    lower = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True)


class DampingFallback(UserWarning):
    """A Hessian that did not factor at the configured dampening; the message says what was used."""


DAMPING_RETRIES = (10.0, 100.0)  # multiples of the configured dampening tried after it


def factor_dampened(
    h: torch.Tensor, percdamp: float, perm: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, dampened H, dead mask) for H [n, n]: U [n, n] upper with Uᵀ U = H⁻¹, in ``perm`` order when
    given. Falls back to more dampening, then to diag H alone, warning ``DampingFallback``."""
    for multiple in (1.0, *DAMPING_RETRIES):
        damped, dead = dampen(h, percdamp * multiple)
        try:
            u = inverse_cholesky_upper(damped[perm][:, perm] if perm is not None else damped)
        except torch.linalg.LinAlgError:
            continue
        if bool(torch.isfinite(u).all()):
            if multiple > 1:
                warnings.warn(
                    f"Hessian not positive definite at dampening {percdamp:g}; used {percdamp * multiple:g}",
                    DampingFallback,
                    stacklevel=2,
                )
            return u, damped, dead
    warnings.warn(
        f"Hessian not positive definite even at dampening {percdamp * DAMPING_RETRIES[-1]:g}; its "
        "diagonal alone was used (no error compensation between columns)",
        DampingFallback,
        stacklevel=2,
    )
    damped, dead = dampen(torch.diag(torch.diag(h).clamp_min(0)), percdamp)
    diagonal = damped[perm][:, perm] if perm is not None else damped
    return torch.diag(diagonal.diagonal().rsqrt()), damped, dead


def search_grid(
    w: torch.Tensor, weight: torch.Tensor, bits: int, symmetric: bool, grid: int, max_shrink: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid of each row of w [r, n] whose clipped range minimizes Σ_j weight_j (w_j − ŵ_j)².
    weight [n] ≥ 0 (e.g. diag H). Returns scale [r], zero [r]."""
    best_scale, best_zero = grid_params(w, bits, symmetric)
    if grid <= 1:
        return best_scale, best_zero
    best_err = torch.full((w.shape[0],), float("inf"))
    for i in range(grid):
        shrink = 1.0 - max_shrink * i / grid
        scale, zero = grid_params(w * shrink, bits, symmetric)
        codes = quantize_to_codes(w, scale[:, None], zero[:, None], bits)
        err = ((codes.float() - zero[:, None].float()) * scale[:, None] - w).pow(2).mul(weight).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def gptq_sweep(
    w: torch.Tensor,
    u: torch.Tensor,
    config: WeightQuantConfig,
    h_diag: torch.Tensor,
    options: GPTQOptions,
    perm: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize w [r, c] against U [c, c] (upper Cholesky of H⁻¹, columns in ``perm`` order when given).

    Without act-order a group's grid is found when the sweep reaches its first column, from the
    already-compensated weights (as in GPTQ); with act-order all grids are fixed before the sweep.
    """
    rows, cols = w.shape
    group = resolve_group_size(config, cols)
    groups = num_groups(cols, group)
    scale = torch.zeros(rows, groups)
    zero = torch.zeros(rows, groups, dtype=torch.uint8)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)

    def fit(g: int, columns: torch.Tensor) -> None:
        lo, hi = g * group, min((g + 1) * group, cols)
        scale[:, g], zero[:, g] = search_grid(
            columns, h_diag[lo:hi], config.bits, config.symmetric, options.clip_grid, options.max_shrink
        )

    w = w.clone().float()
    if perm is not None:  # static groups, fitted on the original column order
        for g in range(groups):
            fit(g, w[:, g * group : min((g + 1) * group, cols)])
        w = w[:, perm]
    order = perm if perm is not None else torch.arange(cols)
    for b0 in range(0, cols, options.block_size):
        b1 = min(b0 + options.block_size, cols)
        errors = torch.zeros(rows, b1 - b0)
        for j in range(b0, b1):
            col = int(order[j])
            g = col // group
            if perm is None and col % group == 0:
                fit(g, w[:, col : min(col + group, cols)])
            q = quantize_to_codes(w[:, j : j + 1], scale[:, g : g + 1], zero[:, g : g + 1], config.bits)
            codes[:, col] = q[:, 0]
            dequant = (q[:, 0].float() - zero[:, g].float()) * scale[:, g]
            err = (w[:, j] - dequant) / u[j, j]
            w[:, j:b1] -= err[:, None] * u[j, j:b1][None, :]
            errors[:, j - b0] = err
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    return QuantizedWeight(codes, scale, zero, config.bits, group, config.symmetric)


class ColumnFactor(NamedTuple):
    """What a GPTQ sweep needs of one column Hessian."""

    u: torch.Tensor  # upper Cholesky of H⁻¹, in sweep order
    perm: torch.Tensor | None  # act-order permutation
    h_diag: torch.Tensor  # diag H (dampened), original order
    dead: torch.Tensor  # columns whose input is always 0


def column_factor(h_col: torch.Tensor, options: GPTQOptions) -> ColumnFactor:
    # act-order sorts by diag H, which dampening shifts uniformly: the first try's order serves all
    perm = None
    if options.act_order:
        perm = torch.argsort(torch.diag(dampen(h_col, options.percdamp)[0]), descending=True)
    u, h, dead = factor_dampened(h_col, options.percdamp, perm)
    return ColumnFactor(u, perm, torch.diag(h), dead)


def gptq_quantize(
    w: torch.Tensor, h: torch.Tensor, config: WeightQuantConfig, options: GPTQOptions = GPTQOptions()
) -> QuantizedWeight:
    """GPTQ of one weight w [r, c] with layer Hessian h [c, c]."""
    factor = column_factor(h, options)
    w = w.clone().float()
    w[:, factor.dead] = 0
    return gptq_sweep(w, factor.u, config, factor.h_diag, options, factor.perm)


def layer_loss(delta: torch.Tensor, h: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ): the layer-output error GPTQ minimizes. delta [r, c], h [c, c]."""
    return float(torch.einsum("ij,jk,ik->", delta, h, delta))


__all__ = [
    "ColumnFactor", "DampingFallback", "GPTQOptions", "column_factor", "factor_dampened", "gptq_quantize",
    "gptq_sweep", "layer_loss",
]  # fmt: skip
