"""aespa (Kim et al., NeurIPS 2024, arXiv 2402.08958): learned rounding of W_Q, W_K and W_V against
their attention-wise reconstruction loss, computed from precomputed statistics.

The loss of each projection is BoA's Kronecker-factored quadratic (``edgeq.quant.boa``):

    L(W̃) = Σ_h tr(H_row[h] · ΔW_h · H_col[h] · ΔW_hᵀ),   ΔW = W̃ − W,  ΔW_h [hd, d_in]

so one evaluation costs two small matrix products and never touches the model or its activations
(no backpropagation through the network). Its gradient is closed-form:

    ∂L/∂W̃_h = 2 · H_row[h] · ΔW_h · H_col[h]

The rounding is learned as in AdaRound (Nagel et al., 2020). The grid (s, z) of every (row, group)
is fixed first (the clipped range of least diag(H_col)-weighted rounding error, as GPTQ's grids).
Each weight then chooses between rounding down and up through a continuous variable V:

    W̃ = s · (clamp(⌊W/s⌋ + z + h(V), 0, 2^b − 1) − z),   h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1)

with ζ = 1.1, γ = −0.1 (the rectified sigmoid reaches 0 and 1 exactly). V starts where h(V) equals
the fractional part of W/s (W̃ = W), and Adam minimizes

    L(W̃) / L(W_nearest) + λ · mean(1 − |2h(V) − 1|^β)

The regularizer is off during a warm-up; then β anneals from ``beta_start`` to ``beta_end``. A large
β leaves h free in the middle and only pushes values already near 0 or 1; a small β pushes every
value to 0 or 1, so the relaxation ends on a hard rounding. The codes are ⌊W/s⌋ + z + [h(V) ≥ ½].

The regularizer's weight matters more than anything else here (``tests/test_aespa.py`` measures it
on random layers with correlated inputs): with AdaRound's λ = 0.01 after a warm-up the relaxation
settles on the continuous optimum, and its rounding ended 2.2-3.4 × above exact BoA's loss; with
λ = 4 from the first step it ended 0.80-0.90 × BoA's at 3 bits and 0.93-1.05 × at 4 bits.

On real layers it does not get there. SmolLM2-135M's q_proj of block 5 at 3 bits per channel
(its input Hessian from 4 × 256 tokens, identity row factors): GPTQ's loss 16.5, this rounding's
33.8 after 500 steps (12 s) and 30.0 after 1500 (44 s), nearest rounding 125. GPTQ's error
compensation leaves 6 % of its codes outside the nearest window, and the inputs' correlations are
far stronger than the test layers'; windows anchored at GPTQ's solution (each code free to move one
step back towards its weight) ended at 16.52, no gain. On the whole model (W3 per channel) aespa
reached perplexity 75.8 against GPTQ's 70.9 and BoA's 57.4 (``benchmarks/weight_only.py``).
"""

from __future__ import annotations

import torch

from edgeq.config import AespaOptions, GPTQOptions, WeightQuantConfig
from edgeq.quant.boa import kronecker_loss
from edgeq.quant.gptq import dampen, search_grid
from edgeq.quant.grid import QuantizedWeight, expand_groups, num_groups, resolve_group_size

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid


def fixed_grid(
    w: torch.Tensor, col_weight: torch.Tensor, config: WeightQuantConfig, gptq: GPTQOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of every (row, group) of w [r, c]: the clipped range of least col_weight-weighted
    rounding error. col_weight [c] or [r, c] ≥ 0. Returns scale [r, groups], zero [r, groups] uint8."""
    rows, cols = w.shape
    group = resolve_group_size(config, cols)
    groups = num_groups(cols, group)
    weight = col_weight.expand(rows, cols)
    scale = torch.zeros(rows, groups)
    zero = torch.zeros(rows, groups, dtype=torch.uint8)
    for g in range(groups):
        lo, hi = g * group, min((g + 1) * group, cols)
        for r in _row_sets(weight[:, lo:hi]):  # rows sharing one column weighting are searched together
            bits, symmetric = config.bits, config.symmetric
            scale[r, g], zero[r, g] = search_grid(
                w[r, lo:hi], weight[r[0], lo:hi], bits, symmetric, gptq.clip_grid, gptq.max_shrink
            )
    return scale, zero


def _row_sets(weight: torch.Tensor) -> list[torch.Tensor]:
    """Indices of the runs of consecutive rows with the same column weighting (a head's rows)."""
    change = torch.ones(weight.shape[0], dtype=torch.bool)
    change[1:] = (weight[1:] != weight[:-1]).any(dim=1)
    starts = torch.nonzero(change).flatten().tolist() + [weight.shape[0]]
    return [torch.arange(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(rest: torch.Tensor) -> torch.Tensor:
    """V with h(V) = rest, for rest in (0, 1)."""
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def kronecker_gradient(delta: torch.Tensor, h_row: torch.Tensor, h_col: torch.Tensor) -> torch.Tensor:
    """∂/∂ΔW Σ_h tr(H_row[h] ΔW_h H_col[h] ΔW_hᵀ) = 2 H_row[h] ΔW_h H_col[h] (both factors symmetric).
    delta [heads·hd, d_in], h_row [heads, hd, hd], h_col [d_in, d_in] or [heads, d_in, d_in]."""
    heads, hd, _ = h_row.shape
    d3 = delta.view(heads, hd, -1)
    return (2 * h_row @ (d3 @ h_col)).reshape(delta.shape)


def learned_rounding(
    w: torch.Tensor,
    h_row: torch.Tensor,
    h_col: torch.Tensor,
    config: WeightQuantConfig,
    options: AespaOptions = AespaOptions(),
    gptq: GPTQOptions = GPTQOptions(),
) -> QuantizedWeight:
    """Minimize Σ_h tr(H_row[h] ΔW_h H_col[h] ΔW_hᵀ) over the rounding of every weight.

    w [heads·hd, d_in]; h_row [heads, hd, hd]; h_col [d_in, d_in] shared by all heads, or
    [heads, d_in, d_in]. Both factors are dampened as BoA dampens them.
    """
    heads, hd, _ = h_row.shape
    d_in = w.shape[1]
    w = w.detach().float()
    hc, dead = _dampen_col(h_col, gptq.percdamp, hd)
    hr = torch.stack([dampen(h, options.row_percdamp)[0] for h in h_row])
    w = torch.where(dead, torch.zeros_like(w), w)  # a dead input column cannot affect the loss
    col_weight = torch.diagonal(hc, dim1=-2, dim2=-1)
    if col_weight.dim() == 2:  # one weighting per head → per row
        col_weight = col_weight.repeat_interleave(hd, dim=0)
    scale, zero = fixed_grid(w, col_weight, config, gptq)
    group = resolve_group_size(config, d_in)
    s = expand_groups(scale, group, d_in)
    z = expand_groups(zero, group, d_in).float()
    low, rest = nearest_window(w / s + z)
    codes = optimize_rounding(w, low, rest, s, z, config.bits, hr, hc, options)
    return QuantizedWeight(codes, scale, zero, config.bits, group, config.symmetric)


def nearest_window(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaRound's windows: each code between ⌊u⌋ and ⌊u⌋ + 1, starting at u itself (W̃ = W).
    u [r, c] the weights in code units (W/s + z). Returns (low codes, starting h)."""
    low = torch.floor(u)
    return low, (u - low).clamp(0.01, 0.99)  # away from the flat ends of h


@torch.enable_grad()  # the methods run under no_grad; V is the only tensor that needs a gradient
def optimize_rounding(
    w: torch.Tensor,
    low: torch.Tensor,
    start: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    bits: int,
    h_row: torch.Tensor,
    h_col: torch.Tensor,
    options: AespaOptions,
) -> torch.Tensor:
    """AdaRound on the Kronecker loss: codes uint8 [r, c] = low + [h(V) ≥ ½], clamped to the grid.

    w [r, c] float weights; low [r, c] the lower code of each window; start [r, c] the starting
    h(V); s, z [r, c] the grid expanded over the columns; h_row, h_col dampened factors.
    """
    maxq = 2**bits - 1
    v = inverse_rectified_sigmoid(start).requires_grad_(True)

    def dequantized(h: torch.Tensor) -> torch.Tensor:
        return s * (torch.clamp(low + h, 0, maxq) - z)

    first = dequantized(torch.round(start))
    scale_loss = max(kronecker_loss(first - w, h_row, h_col), 1e-12)
    optimizer = torch.optim.Adam([v], lr=options.lr)
    warmup = int(options.warmup * options.iterations)
    for step in range(options.iterations):
        h = rectified_sigmoid(v)
        w_tilde = dequantized(h)
        with torch.no_grad():  # closed-form gradient of the quadratic: no autograd graph for L
            grad = kronecker_gradient(w_tilde - w, h_row, h_col) / scale_loss
        # Σ W̃ ⊙ stop_grad(∂L/∂W̃) has the gradient of L with respect to V
        objective = (w_tilde * grad).sum()
        if step >= warmup:
            beta = _annealed_beta(step - warmup, options.iterations - warmup, options)
            objective = objective + options.reg * (1 - (2 * h - 1).abs().pow(beta)).mean()
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
    with torch.no_grad():
        return torch.clamp(low + (rectified_sigmoid(v) >= 0.5).float(), 0, maxq).to(torch.uint8)


def _dampen_col(h_col: torch.Tensor, percdamp: float, rows_per_head: int) -> tuple[torch.Tensor, ...]:
    """Dampened column factor(s) and the dead-column mask broadcastable to w [heads·hd, d_in]."""
    if h_col.dim() == 2:
        h, dead = dampen(h_col, percdamp)
        return h, dead[None, :]
    parts = [dampen(h, percdamp) for h in h_col]
    dead = torch.stack([p[1] for p in parts]).repeat_interleave(rows_per_head, dim=0)
    return torch.stack([p[0] for p in parts]), dead


def _annealed_beta(step: int, steps: int, options: AespaOptions) -> float:
    """β from beta_start down to beta_end, linearly over the steps after the warm-up."""
    t = step / max(steps - 1, 1)
    return options.beta_end + (options.beta_start - options.beta_end) * (1 - t)


__all__ = ["fixed_grid", "kronecker_gradient", "learned_rounding"]
