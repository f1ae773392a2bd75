"""The block-by-block pipeline on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from edgeq.config import QuantConfig, WeightQuantConfig
from edgeq.errors import EdgeqError
from edgeq.models.adapters import adapter_for
from edgeq.pipeline import allocating_on, capture_block_inputs, quantize_model
from edgeq.quant.block import block_forward
from edgeq.quant.grid import rtn_quantize


def test_captured_inputs_replay_the_full_model(model_type):
    """Running the blocks one by one on the captured inputs reproduces the model's hidden states."""
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    ids = torch.randint(0, model.config.vocab_size, (5, 16))
    inputs = capture_block_inputs(model, adapter, ids, batch_size=2)
    assert [h.shape[0] for h in inputs.hidden] == [2, 2, 1]
    assert all("forward" not in vars(block) for block in adapter.blocks(model))  # capture restored them
    hidden = inputs.hidden
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True, use_cache=False).hidden_states
        for index, block in enumerate(adapter.blocks(model)):
            torch.testing.assert_close(torch.cat(hidden), reference[index])
            kwargs = [batch[index] for batch in inputs.kwargs]
            hidden = [block_forward(adapter, block, h, kw) for h, kw in zip(hidden, kwargs, strict=True)]


def test_rtn_pipeline_sets_weights_to_their_integer_values(model_type):
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    original = {n: m.weight.detach().clone() for n, m in adapter.named_linears(model).items()}
    config = QuantConfig(method="rtn", weights=WeightQuantConfig(bits=4, group_size=16))
    ids = torch.randint(0, model.config.vocab_size, (4, 16))
    result = quantize_model(model, adapter, config, ids, batch_size=2, progress=False)
    linears = adapter.named_linears(model)
    assert set(result.weights) == set(linears)
    for name, layer in linears.items():
        expected = rtn_quantize(original[name], config.weights).dequantize()
        torch.testing.assert_close(layer.weight.data, expected, rtol=0, atol=0)
    assert len(result.block_output_rel_error) == model.config.num_hidden_layers
    assert all(0 < e < 1 for e in result.block_output_rel_error)
    assert all(0 < s.weight_rel_error < 0.5 for s in result.layers)


def test_more_bits_give_smaller_block_error():
    errors = {}
    for bits in (2, 4):
        model = tiny_model("llama")
        config = QuantConfig(weights=WeightQuantConfig(bits=bits, group_size=16))
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        result = quantize_model(model, adapter_for(model), config, ids, progress=False)
        errors[bits] = result.block_output_rel_error[-1]
    assert errors[4] < errors[2]


def test_unknown_method_is_rejected_before_any_work():
    model = tiny_model("llama")
    with pytest.raises(EdgeqError, match="unknown method"):
        quantize_model(
            model, adapter_for(model), QuantConfig(method="magic"), torch.zeros(1, 4, dtype=torch.long)
        )


def test_allocating_on_enters_a_device_mode_only_off_the_cpu():
    """Off the CPU, what the methods allocate without ``device=`` lands on the block's device; on the
    CPU no TorchFunctionMode is entered, so torch calls are not dispatched through Python."""
    with allocating_on("meta"):
        assert torch.zeros(2).device.type == "meta"
        assert torch._C._is_torch_function_mode_enabled()
    with allocating_on(torch.device("cpu")):
        assert torch.zeros(2).device.type == "cpu"
        assert not torch._C._is_torch_function_mode_enabled()
