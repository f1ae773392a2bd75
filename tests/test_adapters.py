"""Adapters on tiny random Llama, Qwen2 and Gemma3 models: the declared modules exist, have the
shapes the architecture implies, and are what the model actually runs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import BertConfig, GPT2Config

from edgeq.errors import EdgeqError
from edgeq.models.adapters import LINEAR_ROLES, adapter_for, adapter_for_config


def test_linears_have_the_attention_geometry(model_type):
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    shape = adapter.attention_shape(model.config)
    d, kv = shape.hidden_size, shape.num_kv_heads * shape.head_dim
    expected = {
        "q": (shape.num_heads * shape.head_dim, d),
        "k": (kv, d),
        "v": (kv, d),
        "o": (d, shape.num_heads * shape.head_dim),
        "gate": (model.config.intermediate_size, d),
        "up": (model.config.intermediate_size, d),
        "down": (d, model.config.intermediate_size),
    }
    blocks = adapter.blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    for block in blocks:
        linears = adapter.linears(block)
        assert list(linears) == list(LINEAR_ROLES)
        for role, layer in linears.items():
            assert isinstance(layer, torch.nn.Linear)
            assert tuple(layer.weight.shape) == expected[role], role
            assert (layer.bias is not None) == (adapter.qkv_bias and role in "qkv"), role


def test_named_linears_are_every_block_linear_and_nothing_else(model_type):
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    named = adapter.named_linears(model)
    assert len(named) == len(LINEAR_ROLES) * model.config.num_hidden_layers
    modules = dict(model.named_modules())
    for name, layer in named.items():
        assert modules[name] is layer
    assert adapter.lm_head(model) not in named.values()
    all_linears = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    assert all_linears - set(named) == {adapter.lm_head_path}


def test_declared_norms_feed_the_declared_linears(model_type):
    """The attention norm's output is the q/k/v input and the MLP norm's output the gate/up input."""
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    seen: dict[str, torch.Tensor] = {}

    def record(key: str, use_output: bool):
        def hook(_module, args, output) -> None:
            seen[key] = output if use_output else args[0]

        return hook

    linears = adapter.linears(block)
    hooks = [
        block.get_submodule(adapter.attn_norm).register_forward_hook(record("attn", True)),
        block.get_submodule(adapter.mlp_norm).register_forward_hook(record("mlp", True)),
        linears["q"].register_forward_hook(record("q", False)),
        linears["gate"].register_forward_hook(record("gate", False)),
    ]
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (1, 12)))
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(seen["q"], seen["attn"])
    torch.testing.assert_close(seen["gate"], seen["mlp"])


def test_norm_offset_matches_the_rmsnorm_convention(model_type):
    """With weight w = 0, an RMSNorm scales by norm_offset (Gemma's 1 + w) and outputs 0 otherwise."""
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    norm = adapter.blocks(model)[0].get_submodule(adapter.attn_norm)
    with torch.no_grad():
        norm.weight.zero_()
        x = torch.randn(3, model.config.hidden_size)
        y = norm(x)
    rms = x / x.pow(2).mean(-1, keepdim=True).add(norm.eps if hasattr(norm, "eps") else 1e-6).sqrt()
    torch.testing.assert_close(y, adapter.norm_offset * rms, atol=1e-5, rtol=1e-4)


def test_gemma3_declares_its_branch_norms():
    model = tiny_model("gemma3_text")
    adapter = adapter_for(model)
    assert adapter.branch_norms
    norms = adapter.norms(adapter.blocks(model)[0])
    assert set(adapter.branch_norms) <= set(norms)
    for path in adapter.qk_norms:
        adapter.blocks(model)[0].get_submodule(path)


@pytest.mark.parametrize("config", [GPT2Config(n_layer=1), BertConfig(num_hidden_layers=1)])
def test_unsupported_architecture_is_a_one_line_error_naming_the_supported(config):
    with pytest.raises(EdgeqError) as err:
        adapter_for_config(config)
    message = str(err.value)
    assert "\n" not in message
    assert config.model_type in message
    for supported in ("llama", "qwen2", "gemma3_text"):
        assert supported in message


def test_block_output_kind_is_what_the_block_returns(model_type):
    """Whether a block returns a tuple is declared, and the declaration is checked against the model
    (the recorder that stands in for blocks during calibration returns the declared kind)."""
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    seen = []
    hook = adapter.blocks(model)[0].register_forward_hook(lambda _m, _args, output: seen.append(output))
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (1, 6)))
    hook.remove()
    assert isinstance(seen[0], tuple) == adapter.block_returns_tuple
    assert adapter.block_hidden(seen[0]).shape == (1, 6, model.config.hidden_size)
    wrong_kind = seen[0][0] if adapter.block_returns_tuple else (seen[0],)
    with pytest.raises(EdgeqError, match="changed the block's interface"):
        adapter.block_hidden(wrong_kind)
