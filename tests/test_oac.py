"""OAC's output-adaptive Hessians (``edgeq.quant.oac``) and the methods that use them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model

from edgeq.config import QuantConfig, WeightQuantConfig
from edgeq.models.adapters import adapter_for
from edgeq.pipeline import quantize_model
from edgeq.quant.gptq import dampen
from edgeq.quant.oac import collect_output_hessians, sequence_losses


def _ids(model, n: int = 4, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("batch_size", [1, 3])
def test_hooks_give_the_sum_of_per_sequence_weight_gradient_products(model_type, batch_size):
    """E_s[G_sᵀ G_s] from the hooks equals the same sum built from autograd's weight gradients of
    each sequence's loss, one sequence at a time."""
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    ids = _ids(model)
    got = collect_output_hessians(model, adapter, ids, batch_size=batch_size, progress=False)
    linears = adapter.named_linears(model)
    expected = {name: torch.zeros(lin.in_features, lin.in_features) for name, lin in linears.items()}
    for s in range(ids.shape[0]):
        model.zero_grad()
        sequence_losses(model(ids[s : s + 1], use_cache=False).logits, ids[s : s + 1]).backward()
        for name, linear in linears.items():
            g = linear.weight.grad
            expected[name] += g.T @ g / ids.shape[0]
    assert got.keys() == expected.keys()
    for name in got:  # batched and one-by-one float32 sums differ in rounding only
        assert float((got[name] - expected[name]).norm() / expected[name].norm()) < 1e-4, name
    # no weight was left with a gradient or requires_grad changed by the collection
    assert all(p.requires_grad for p in model.parameters())


def _weighted_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = w - q
    return float(torch.trace(d @ h @ d.T))


@pytest.mark.parametrize("method", ["oac", "boa-oac"])
def test_oac_lowers_the_output_adaptive_error_against_gptq(method):
    """Each method minimizes its own objective: summed over the linears OAC quantizes with H_OAC,
    its rounding error weighted by H_OAC is below GPTQ's."""
    model = tiny_model("llama", hidden_size=64, intermediate_size=128, head_dim=16)
    adapter = adapter_for(model)
    ids = _ids(model, n=8, length=32)
    hessians = collect_output_hessians(model, adapter, ids, progress=False)
    weights = WeightQuantConfig(3, -1)
    results = {}
    for name in ("gptq", method):
        copy = tiny_model("llama", hidden_size=64, intermediate_size=128, head_dim=16)
        config = dataclasses.replace(QuantConfig(method=name, weights=weights))
        results[name] = quantize_model(copy, adapter, config, ids, progress=False)
    original = adapter.named_linears(model)
    roles = ("o", "gate", "up", "down") if method == "boa-oac" else ("q", "k", "v", "o", "gate", "up", "down")
    names = [adapter.linear_name(i, role) for i in range(len(adapter.blocks(model))) for role in roles]
    errors = {}
    for name, result in results.items():
        errors[name] = sum(
            _weighted_error(
                original[n].weight.detach(), result.weights[n].dequantize(), dampen(hessians[n], 0.01)[0]
            )
            for n in names
        )
    assert errors[method] < errors["gptq"], errors


def test_a_method_that_needs_output_hessians_says_so_without_them():
    from edgeq.pipeline import capture_block_inputs, run_blocks

    model = tiny_model("llama")
    adapter = adapter_for(model)
    stream = capture_block_inputs(model, adapter, _ids(model), 2)
    with pytest.raises(ValueError, match="needs output_hessians"):
        run_blocks(model, adapter, None, QuantConfig(method="oac"), stream, progress=False)
