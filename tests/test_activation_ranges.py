"""The per-input clip-ratio search: what it picks on inputs whose best ratio is known, that inputs
shared by several linears share one ratio, and that the ratios travel into the pass's result."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import VOCAB, tiny_model

from edgeq.activation_ranges import (
    CLIP_CANDIDATES,
    best_clip_ratio,
    fit_block_shifts,
    output_error,
    search_block_clip_ratios,
)
from edgeq.activations import QuantInputLinear, fake_quant_per_token
from edgeq.config import ActQuantConfig, scheme_preset
from edgeq.models.adapters import INPUT_GROUPS, adapter_for
from edgeq.pipeline import capture_block_inputs, quantize_model
from edgeq.rotation.rotate import rotate_model

A4 = ActQuantConfig(bits=4, symmetric=True)


def test_heavy_tailed_inputs_are_clipped_and_flat_ones_are_not():
    """A per-token grid over Laplace-distributed values spends most levels on a few large entries:
    clipping them lowers the error. Values spread evenly over [−1, 1] gain little from a finer step
    and lose by clipping: their best ratio stays near 1."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((512, 256))
    flat = torch.rand(512, 256, generator=gen) * 2 - 1
    w = [torch.randn(64, 256, generator=gen)]
    assert best_clip_ratio(laplace, w, A4, 4) <= 0.8
    assert best_clip_ratio(flat, w, A4, 4) >= 0.95
    # the search returns the argmin of the error it measures
    errors = {c: output_error(laplace, w, A4, 4, c) for c in CLIP_CANDIDATES}
    assert errors[best_clip_ratio(laplace, w, A4, 4)] == min(errors.values())


def test_output_error_is_the_same_through_either_product():
    """err = Σ‖E W_iᵀ‖², computed as tr(E M Eᵀ) when the input is narrower than the stacked outputs
    and directly otherwise: both give the definition's value."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=gen, dtype=torch.float64)
    e = fake_quant_per_token(x, 4, True, 0.8) - x
    few_outputs = [torch.randn(8, 32, generator=gen, dtype=torch.float64)] * 2
    many_outputs = [torch.randn(48, 32, generator=gen, dtype=torch.float64)]
    for weights in (few_outputs, many_outputs):
        expected = sum(float((e @ w.T).pow(2).sum()) for w in weights)
        assert output_error(x, weights, A4, 4, 0.8) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("symmetric", [True, False])
def test_block_search_shares_a_ratio_per_input_and_sets_it(symmetric):
    model = tiny_model("llama")
    adapter = adapter_for(model)
    rotate_model(model, adapter, scheme_preset("w4a4").rotation)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    stream = capture_block_inputs(model, adapter, ids, batch_size=2)
    block = adapter.blocks(model)[0]
    act = ActQuantConfig(bits=4, symmetric=symmetric, clip_search=True)
    ratios = search_block_clip_ratios(adapter, block, stream.hidden, [kw[0] for kw in stream.kwargs], act)
    assert set(ratios) == {role for group in INPUT_GROUPS for role in group}
    for group in INPUT_GROUPS:
        assert len({ratios[role] for role in group}) == 1
    for role, ratio in ratios.items():
        module = adapter.input_quantizer(block, role)
        assert ratio in CLIP_CANDIDATES
        assert (module.quantize_input, module.clip_ratio, module.symmetric) == (True, ratio, symmetric)


def test_searched_ratios_lower_each_inputs_error_and_reach_the_result():
    """The pass records one ratio per linear; with the search, each block's output under quantized
    activations is at least not worse than with the fixed 0.9 on these random models."""
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    errors = {}
    for search in (False, True):
        model = tiny_model("llama")
        adapter = adapter_for(model)
        quant = scheme_preset("w4a4")
        quant = dataclasses.replace(
            quant, method="rtn", activations=dataclasses.replace(quant.activations, clip_search=search)
        )
        rotate_model(model, adapter, quant.rotation)
        result = quantize_model(model, adapter, quant, ids, batch_size=4, progress=False)
        errors[search] = sum(result.block_output_rel_error)
        if search:
            blocks = adapter.blocks(model)
            names = {adapter.linear_name(i, r) for i, b in enumerate(blocks) for r in adapter.linears(b)}
            assert set(result.clip_ratios) == names
        else:
            assert result.clip_ratios == {}
    assert errors[True] <= errors[False] * 1.05


def test_a_shift_takes_the_shared_direction_out_of_the_grid():
    """Tokens that share one large direction μ (as SmolLM2's norm outputs do, ``activation_ranges``):
    Q(x − μ) + μ rounds only the part that differs between tokens, so its error is far below the
    per-token grid's on x itself; with the grid off the shift changes nothing."""
    gen = torch.Generator().manual_seed(0)
    mu = 3 * torch.randn(256, generator=gen)
    x = mu + torch.randn(512, 256, generator=gen)
    linear = torch.nn.Linear(256, 64, bias=False)
    module = QuantInputLinear(linear)
    errors = {}
    for shifted in (False, True):
        module.shift = mu.clone() if shifted else None
        module.set_quantization(A4, 4)
        with torch.no_grad():
            errors[shifted] = float((module(x) - linear(x)).pow(2).sum())
            module.quantize_input = False
            torch.testing.assert_close(module(x), linear(x), rtol=0, atol=0)
    assert errors[True] < 0.5 * errors[False], errors


def test_block_shifts_are_each_inputs_calibration_mean():
    """fit_block_shifts: one shift per input, equal for the linears that share it but a tensor each
    (a block's recorded state names every one), and the per-channel mean of what the linear reads
    (after the online rotation)."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    rotate_model(model, adapter, scheme_preset("w4a4").rotation)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    stream = capture_block_inputs(model, adapter, ids, batch_size=2)
    block, kwargs = adapter.blocks(model)[0], [kw[0] for kw in stream.kwargs]
    seen: dict[str, list[torch.Tensor]] = {group[0]: [] for group in INPUT_GROUPS}
    handles = [
        adapter.input_quantizer(block, role).linear.register_forward_pre_hook(
            lambda _m, args, role=role: seen[role].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for role in seen
    ]
    shifts = fit_block_shifts(adapter, block, stream.hidden, kwargs)
    for handle in handles:
        handle.remove()
    assert set(shifts) == {role for group in INPUT_GROUPS for role in group}
    for group in INPUT_GROUPS:
        expected = torch.cat(seen[group[0]]).mean(0)
        for role in group:
            module = adapter.input_quantizer(block, role)
            assert module.shift is shifts[role]
            torch.testing.assert_close(module.shift, expected, rtol=1e-5, atol=1e-6)
        assert len({id(shifts[role]) for role in group}) == len(group)
