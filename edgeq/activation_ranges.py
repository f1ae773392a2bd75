"""Per-input clip ratios of the per-token activation grids, searched on calibration data.

A per-token grid of b bits spends its 2^b levels on [−c·max|x|, c·max|x|] (or c·[min, max] when
asymmetric). c = 1 keeps every value in range but rounds the bulk coarsely; c < 1 clips the largest
entry of each token and rounds the rest finer. Which c is best depends on the input's shape and on
which of its errors the consumers amplify, so each input is searched on its own: for an input X
[T, d] read by linears W_1 … W_n (q/k/v share one input, gate/up another), with E(c) = Q_c(X) − X,

    err(c) = Σ_i ‖E(c) W_iᵀ‖²_F = tr(E(c) M E(c)ᵀ),    M = Σ_i W_iᵀ W_i  [d, d],

the squared output error the grid causes in the float linears, and c = argmin over CLIP_CANDIDATES.
(The product goes through M when d < Σ out_i, through the stacked W otherwise: the cheaper one.)

The inputs of a block are searched in the order the block reads them (attention input, o_proj's,
MLP input, down_proj's), each with the inputs before it already quantized at their chosen ratios,
so every search sees the activations the exported graph will feed it.

Shifts (``ActQuantConfig.shift``). A per-token grid adapts to each token's range, not to a direction
that every token shares. After an RMSNorm and R1, SmolLM2's tokens do share one: the mean μ of the
attention and MLP inputs over the calibration tokens has norm ≈ 17-18 against each token's √576 = 24,
so about half of every token's energy is μ, and a grid fitted to the token spends most of its levels
on it. Quantizing X − μ instead and adding μ back in float, Q(X − μ) + μ, leaves the float function
unchanged and rounds only what differs from token to token (as Outlier Suppression+'s channel-wise
shift, arXiv 2304.09145, there folded into a LayerNorm's bias, which an RMSNorm does not have: the
exported graphs subtract and add it, two ops per quantized input). μ is each input's mean over
the first SEARCH_WINDOWS calibration windows, fitted before the clip search, which then searches
the grid of X − μ. The KV cache's keys and values get shifts of the same form, one per head and
channel (``ActQuantConfig.kv_shift``, ``fit_kv_shift``, derivation in ``edgeq.kv_cache``), fitted
first, so the attention output the linear shifts and the clip search see is the exported one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from edgeq.activations import QuantInputLinear, fake_quant_per_token, float_activations
from edgeq.config import ActQuantConfig
from edgeq.kv_cache import KVQuant, set_kv_shift
from edgeq.models.adapters import INPUT_GROUPS, Adapter
from edgeq.quant.block import block_forward, to_device

# 1.0, 0.95, …, 0.6: below 0.6 no input of the models measured (SmolLM2, tiny Llamas) was better
CLIP_CANDIDATES = tuple(round(1.0 - 0.05 * i, 2) for i in range(9))
# tokens per input the error is measured on, sampled evenly from the first SEARCH_WINDOWS
# calibration windows (the search runs the block once per input over them)
SEARCH_TOKENS = 2048
SEARCH_WINDOWS = 8


def output_error(x: torch.Tensor, weights: list[torch.Tensor], act: ActQuantConfig, bits: int,
                 clip_ratio: float) -> float:  # fmt: skip
    """Σ_i ‖(Q_c(x) − x) W_iᵀ‖²: x [T, d], each W_i [out_i, d] (float32)."""
    e = fake_quant_per_token(x, bits, act.symmetric, clip_ratio) - x
    stacked = torch.cat(weights, dim=0)
    if x.shape[1] < stacked.shape[0]:
        return float(((e @ (stacked.T @ stacked)) * e).sum())
    return float((e @ stacked.T).pow(2).sum())


def best_clip_ratio(x: torch.Tensor, weights: list[torch.Tensor], act: ActQuantConfig, bits: int,
                    candidates: tuple[float, ...] = CLIP_CANDIDATES) -> float:  # fmt: skip
    """The candidate with the smallest ``output_error`` (the larger ratio on a tie)."""
    errors = {c: output_error(x, weights, act, bits, c) for c in sorted(candidates, reverse=True)}
    return min(errors, key=errors.__getitem__)


def _sample_rows(rows: list[torch.Tensor], count: int) -> torch.Tensor:
    """``count`` rows taken evenly from the concatenation of ``rows`` (each [t, d])."""
    x = torch.cat(rows)
    if x.shape[0] <= count:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, count).long()]


def _first_windows(
    hidden: list[torch.Tensor], kwargs: list[dict], windows: int
) -> tuple[list[torch.Tensor], list[dict]]:
    """The batches (hidden [b, L, d] and kwargs) that hold the first ``windows`` windows."""
    count, used = 0, 0
    for h in hidden:
        if count >= windows:
            break
        count, used = count + h.shape[0], used + 1
    return hidden[:used], kwargs[:used]


def _input_quantizers(adapter: Adapter, block: nn.Module) -> dict[str, QuantInputLinear]:
    """Every linear's QuantInputLinear in ``block``, by role."""
    return {role: adapter.input_quantizer(block, role) for group in INPUT_GROUPS for role in group}


@torch.no_grad()
def search_block_clip_ratios(
    adapter: Adapter, block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], act: ActQuantConfig,
    device: torch.device | str = "cpu", tokens: int = SEARCH_TOKENS, windows: int = SEARCH_WINDOWS,
) -> dict[str, float]:  # fmt: skip
    """The clip ratio of every quantized linear input of ``block`` (by role; linears that share an
    input share one), searched in the block's order on the calibration stream ``hidden`` (per batch
    [b, L, d], with the block's ``kwargs`` per batch). Leaves the block's activation quantizers set
    to the ratios found; the weights must still be float. Only the batches holding the first
    ``windows`` windows are run."""
    hidden, kwargs = _first_windows(hidden, kwargs, windows)
    quantizers = _input_quantizers(adapter, block)
    for module in quantizers.values():
        module.quantize_input = False
    ratios: dict[str, float] = {}
    for group in INPUT_GROUPS:
        bits = act.bits_for(group[0])
        if bits >= 16:
            continue
        per_batch = max(1, tokens // max(1, len(hidden)))
        captured: list[torch.Tensor] = []

        def capture(_module, args, _captured=captured, _count=per_batch):
            rows = args[0].detach().reshape(-1, args[0].shape[-1])
            _captured.append(_sample_rows([rows], _count).float())

        # on the linear inside the wrapper: its input is after the online rotation, before the grid
        handle = quantizers[group[0]].linear.register_forward_pre_hook(capture)
        try:
            for h, kw in zip(hidden, kwargs, strict=True):
                block_forward(adapter, block, to_device(h, device, torch.float32), to_device(kw, device))
        finally:
            handle.remove()
        x = _sample_rows(captured, tokens)
        shift = quantizers[group[0]].shift
        if shift is not None:  # the grid sees the input less its shift
            x = x - shift
        weights = [quantizers[role].linear.weight.detach().float() for role in group]
        ratio = best_clip_ratio(x, weights, act, bits)
        for role in group:
            quantizers[role].set_quantization(act, bits, ratio)
            ratios[role] = ratio
    return ratios


@contextlib.contextmanager
def recorded_input_means(adapter: Adapter, block: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While open, ``block``'s activation quantizers are off and every input it reads is summed;
    on closing, the yielded dict gets each input's per-channel mean [d] over those tokens (float32,
    by the first role of its ``INPUT_GROUPS`` group), taken after the online rotation, before the
    grid: the value of its shift."""
    quantizers = _input_quantizers(adapter, block)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def accumulate(role: str):
        def hook(_module, args) -> None:
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[role] = sums.get(role, 0) + rows.sum(0)
            counts[role] = counts.get(role, 0) + rows.shape[0]

        return hook

    # on the linear inside the wrapper: its input is after the online rotation, before the grid
    handles = [quantizers[g[0]].linear.register_forward_pre_hook(accumulate(g[0])) for g in INPUT_GROUPS]
    saved = {role: module.quantize_input for role, module in quantizers.items()}
    means: dict[str, torch.Tensor] = {}
    try:
        for module in quantizers.values():
            module.quantize_input = False
        yield means
    finally:
        for handle in handles:
            handle.remove()
        for role, module in quantizers.items():
            module.quantize_input = saved[role]
    means.update({role: (total / counts[role]).float() for role, total in sums.items()})


@torch.no_grad()
def fit_block_shifts(
    adapter: Adapter, block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict],
    device: torch.device | str = "cpu", windows: int = SEARCH_WINDOWS,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The shift of every quantized linear input of ``block`` (by role; linears that share an input
    share one): its per-channel mean [d] over the batches of ``hidden`` (per batch [b, L, d], with the
    block's ``kwargs`` per batch) that hold the first ``windows`` windows, computed with the block's
    activation quantizers off, and set on the linears (``QuantInputLinear.shift``)."""
    with recorded_input_means(adapter, block) as means:
        for h, kw in zip(*_first_windows(hidden, kwargs, windows), strict=True):
            block_forward(adapter, block, to_device(h, device, torch.float32), to_device(kw, device))
    return set_block_shifts(adapter, block, means)


def set_block_shifts(
    adapter: Adapter, block: nn.Module, means: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Set each input group's shift (``means`` by the group's first role, [d]) on every linear of
    the group; returns the shifts by role."""
    quantizers = _input_quantizers(adapter, block)
    shifts = {}
    for group in INPUT_GROUPS:
        for role in group:  # a tensor each: a block's recorded state (edgeq.resume) names every one
            quantizers[role].shift = means[group[0]].clone()
            shifts[role] = quantizers[role].shift
    return shifts


def reserve_shifts(adapter: Adapter, block: nn.Module) -> None:
    """Zero shifts on every quantized linear input of ``block``, for a recorded block's state to be
    copied into (``edgeq.resume.restore_block``)."""
    for module in _input_quantizers(adapter, block).values():
        module.shift = torch.zeros(module.linear.in_features, device=module.linear.weight.device)


@torch.no_grad()
def fit_kv_shift(
    adapter: Adapter, block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict],
    device: torch.device | str = "cpu", windows: int = SEARCH_WINDOWS,
) -> torch.Tensor:  # fmt: skip
    """The shifts of ``block``'s KV cache, [2, Hkv, 1, hd]: the per-head, per-channel means of its keys
    (after R3) and values over the tokens of the batches of ``hidden`` that hold the first
    ``windows`` windows, computed with the block's quantizers off, and set on its attention module
    (``edgeq.kv_cache.KV_SHIFT``). The cache must be quantized already (``kv_spec``)."""
    attention = adapter.attention(block)
    spec: KVQuant = attention.edgeq_kv
    sums: list[torch.Tensor] = []
    tokens = 0

    def observe(key: torch.Tensor, value: torch.Tensor) -> None:  # each [b, Hkv, S, hd]
        nonlocal tokens, sums
        totals = [t.detach().double().sum(dim=(0, 2)) for t in (key, value)]
        sums = totals if not sums else [a + b for a, b in zip(sums, totals, strict=True)]
        tokens += key.shape[0] * key.shape[2]

    spec.observer = observe
    try:
        with float_activations(block):
            for h, kw in zip(*_first_windows(hidden, kwargs, windows), strict=True):
                block_forward(adapter, block, to_device(h, device, torch.float32), to_device(kw, device))
    finally:
        spec.observer = None
    shift = (torch.stack(sums) / tokens).float().unsqueeze(2)
    set_kv_shift(attention, shift)
    return shift


def reserve_kv_shift(model_config: PretrainedConfig, adapter: Adapter, block: nn.Module) -> None:
    """A zero KV shift on ``block``'s attention, for a recorded block's state to be copied into
    (``edgeq.resume.restore_block``)."""
    shape = adapter.attention_shape(model_config)
    weight = adapter.linears(block)["k"].weight
    set_kv_shift(adapter.attention(block), weight.new_zeros(2, shape.num_kv_heads, 1, shape.head_dim))
