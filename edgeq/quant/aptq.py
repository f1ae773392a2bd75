"""APTQ (Guan et al., 2024, arXiv 2402.14866): weight widths allocated by Hessian-trace sensitivity
under an average-bits budget.

APTQ ranks layers by the average trace of their Hessian (HAWQ-v2's sensitivity, Dong et al.
2020): with H ≈ (tr H / n) · I, the second-order loss of a rounding error ΔW is

    P_l(b) = tr(H_l) / d_in · ‖ΔW_l(b)‖²_F,    ΔW_l(b) = RTN_b(W_l) − W_l

the predicted loss of putting linear l on a b-bit grid (the configured group size and symmetry).
The widths b_l ∈ ``bit_choices`` then solve

    minimize Σ_l P_l(b_l)   subject to   Σ_l n_l · b_l ≤ B · Σ_l n_l      (n_l: parameters of l)

a multiple-choice knapsack, solved by its Lagrangian: for a price λ per parameter-bit each linear
picks argmin_b P_l(b) + λ n_l b independently; bisection finds the cheapest λ that fits the budget,
and the budget left over then buys the upgrades of best loss decrease per parameter-bit that still
fit.

Which Hessian: the sensitivities of all linears must be in one unit to be ranked together. OAC's
output-adaptive Hessians (``edgeq.quant.oac``) measure every linear's effect on the model's
cross-entropy, q/k/v included (their gradients reach them through the attention, so the attention
is in them). BoA's Kronecker Hessians of q/k/v measure the attention output's squared error, a
different unit from any other linear's, so they decide how q/k/v are rounded but not how wide.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from edgeq.config import QuantConfig, WeightQuantConfig
from edgeq.errors import EdgeqError
from edgeq.quant.grid import rtn_quantize


def predicted_losses(
    w: torch.Tensor, hessian: torch.Tensor, config: WeightQuantConfig, choices: tuple[int, ...]
) -> dict[int, float]:
    """P(b) = tr(H)/d_in · ‖RTN_b(W) − W‖²_F for each width b. w [out, in], hessian [in, in]."""
    w = w.detach().float()
    average_trace = float(torch.diagonal(hessian).sum()) / w.shape[1]
    losses = {}
    for bits in choices:
        q = rtn_quantize(w, dataclasses.replace(config, bits=bits))
        losses[bits] = average_trace * float((q.dequantize() - w).pow(2).sum())
    return losses


def allocate_widths(
    losses: dict[str, dict[int, float]], sizes: dict[str, int], avg_bits: float
) -> dict[str, int]:
    """Widths {name: b} minimizing Σ losses[name][b] with Σ sizes[name]·b ≤ avg_bits · Σ sizes.

    losses: {name: {bits: predicted loss}}, the same widths for every name; sizes: parameters.
    """
    names = sorted(losses)
    choices = sorted(next(iter(losses.values())))
    budget = avg_bits * sum(sizes.values())
    if choices[0] * sum(sizes.values()) > budget + 1e-6:
        raise EdgeqError(f"--avg-bits {avg_bits:g} is below the smallest width {choices[0]}")

    def pick(price: float) -> dict[str, int]:
        return {n: min(choices, key=lambda b, n=n: (losses[n][b] + price * sizes[n] * b, b)) for n in names}

    def cost(widths: dict[str, int]) -> float:
        return sum(sizes[n] * b for n, b in widths.items())

    high = 1.0
    while cost(pick(high)) > budget:
        high *= 2
    low = 0.0
    if cost(pick(low)) <= budget:
        return pick(low)
    for _ in range(60):  # bisection on the price of a parameter-bit
        mid = (low + high) / 2
        low, high = (low, mid) if cost(pick(mid)) <= budget else (mid, high)
    widths = pick(high)
    while True:  # spend what the price left over on the best upgrades that still fit
        left = budget - cost(widths)
        upgrades = [
            ((losses[n][widths[n]] - losses[n][b]) / (sizes[n] * (b - widths[n])), n, b)
            for n in names
            for b in choices
            if b > widths[n] and sizes[n] * (b - widths[n]) <= left + 1e-6
        ]
        upgrades = [u for u in upgrades if u[0] > 0]
        if not upgrades:
            return widths
        _, name, bits = max(upgrades)
        widths[name] = bits


def aptq_widths(
    model: nn.Module, adapter, config: WeightQuantConfig, avg_bits: float, choices: tuple[int, ...],
    output_hessians: dict[str, torch.Tensor],
) -> dict[str, int]:  # fmt: skip
    """The width of every decoder-block linear of a float model (by module name), from OAC's Hessians
    (by the same names)."""
    linears = adapter.named_linears(model)
    losses = {n: predicted_losses(m.weight, output_hessians[n], config, choices) for n, m in linears.items()}
    return allocate_widths(losses, linear_sizes(model, adapter), avg_bits)


def linear_sizes(model: nn.Module, adapter) -> dict[str, int]:
    """Parameters of every decoder-block linear's weight, by module name (meta tensors count too)."""
    return {name: m.weight.numel() for name, m in adapter.named_linears(model).items()}


def with_widths(
    config: QuantConfig, model: nn.Module, adapter, output_hessians: dict[str, torch.Tensor]
) -> QuantConfig:
    """``config`` with its mixed-precision widths allocated (unchanged without an ``avg_bits``)."""
    mixed = config.mixed
    if not mixed.enabled:
        return config
    widths = aptq_widths(model, adapter, config.weights, mixed.avg_bits, mixed.bit_choices, output_hessians)
    return dataclasses.replace(config, mixed=dataclasses.replace(mixed, widths=widths))


def average_bits(widths: dict[str, int], sizes: dict[str, int]) -> float:
    """Parameter-weighted average width."""
    return sum(sizes[n] * b for n, b in widths.items()) / sum(sizes[n] for n in widths)


__all__ = [
    "allocate_widths",
    "aptq_widths",
    "average_bits",
    "linear_sizes",
    "predicted_losses",
    "with_widths",
]
