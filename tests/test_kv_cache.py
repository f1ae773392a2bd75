"""The fake-quantized KV cache with R3: exact while the cache is float, per-entry quantization that a
token-by-token decode reproduces, shifts that are the cache's calibration means, and the same in ONNX
Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import exporters.onnx_qdq as onnx_qdq
from edgeq.activation_ranges import fit_kv_shift
from edgeq.activations import fake_quant_per_token, float_activations
from edgeq.config import ActQuantConfig, RotationConfig
from edgeq.evaluation import OrtCausalLM
from edgeq.kv_cache import KV_QUANT_ATTENTION, KV_SHIFT, set_kv_shift
from edgeq.models.adapters import adapter_for
from edgeq.pipeline import capture_block_inputs, enable_activation_quantization
from edgeq.quant.block import block_forward
from edgeq.rotation.rotate import rotate_model


def _ids(model, length: int = 20) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def test_r3_is_exact_and_only_applied_for_a_quantized_cache(model_type):
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    ids = _ids(model)
    before = model(ids).logits
    report = rotate_model(model, adapter, RotationConfig(enabled=True), kv_quantized=False)
    assert "r3" in report.skipped and "r3" not in report.applied
    rotated = tiny_model(model_type)
    report = rotate_model(rotated, adapter, RotationConfig(enabled=True), kv_quantized=True)
    assert "r3" in report.applied and rotated.config._attn_implementation == KV_QUANT_ATTENTION
    torch.testing.assert_close(rotated(ids).logits, before, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_quantized_cache_changes_logits_and_decode_matches_prefill(model_type):
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    ids = _ids(model)
    before = model(ids).logits
    rotate_model(model, adapter, RotationConfig(enabled=True), kv_quantized=True)
    enable_activation_quantization(model, adapter, ActQuantConfig(kv_bits=4))
    full = model(ids[:1]).logits
    assert not torch.allclose(full, before[:1], atol=1e-3)
    out = model(ids[:1, :8], use_cache=True)
    for t in range(8, ids.shape[1]):
        out = model(ids[:1, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
    torch.testing.assert_close(out.logits[0, -1], full[0, -1], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_cache_entries_are_quantized_per_token_and_head(monkeypatch):
    from edgeq import activations

    model = tiny_model("llama")
    enable_activation_quantization(model, adapter_for(model), ActQuantConfig(kv_bits=4))
    seen = []

    def recording(x, bits, symmetric, clip_ratio):
        seen.append((x, fake_quant_per_token(x, bits, symmetric, clip_ratio)))
        return seen[-1][1]

    monkeypatch.setattr(activations, "fake_quant_per_token", recording)  # block linears stay float here
    model(_ids(model))
    assert len(seen) == 2 * model.config.num_hidden_layers  # keys and values of every layer
    raw, quantized = seen[0]  # keys [b, Hkv, S, hd]
    assert raw.shape[1] == model.config.num_key_value_heads
    assert all(len(torch.unique(row)) <= 16 for row in quantized.reshape(-1, raw.shape[-1]))
    assert not torch.equal(raw, quantized)


def _offset_cache_block(monkeypatch):
    """Block 0 of a tiny Qwen2 (q/k/v with biases) whose keys and values share a large per-channel
    offset, with R3 and a 4-bit cache; its calibration stream; and every key and value SDPA reads."""
    model = tiny_model("qwen2")
    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for role in ("k", "v"):
            bias = adapter.linears(block)[role].bias
            bias += 4 * torch.randn(bias.shape, generator=gen)
    rotate_model(model, adapter, RotationConfig(enabled=True), kv_quantized=True)
    enable_activation_quantization(model, adapter, ActQuantConfig(kv_bits=4))
    stream = capture_block_inputs(model, adapter, _ids(model, 32), batch_size=1)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, *args, **kwargs):
        seen.append((key, value))
        return sdpa(module, query, key, value, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", spy)
    return adapter, block, stream.hidden, [kw[0] for kw in stream.kwargs], seen


@torch.no_grad()
def test_kv_shift_is_the_mean_of_the_keys_and_values_the_attention_reads(monkeypatch):
    adapter, block, hidden, kwargs, seen = _offset_cache_block(monkeypatch)
    shift = fit_kv_shift(adapter, block, hidden, kwargs)
    assert getattr(adapter.attention(block), KV_SHIFT) is shift
    seen.clear()  # what SDPA reads in float: the rotated keys and the values
    with float_activations(block):
        for h, kw in zip(hidden, kwargs, strict=True):
            block_forward(adapter, block, h, kw)
    for i, name in enumerate(("keys", "values")):
        expected = torch.cat([pair[i] for pair in seen], dim=2).mean(dim=(0, 2)).unsqueeze(1)
        torch.testing.assert_close(shift[i], expected, rtol=1e-5, atol=1e-5, msg=name)
    assert any(key.endswith(KV_SHIFT) for key in block.state_dict())  # what a block's record holds


@torch.no_grad()
def test_kv_shift_lowers_the_cache_error_and_leaves_a_float_cache_exact(monkeypatch):
    """Keys and values that share an offset spend a per-token grid's levels on it; Q(x − μ) + μ
    rounds only what differs between tokens. The float cache (the FP stream) ignores the shift."""
    adapter, block, hidden, kwargs, _ = _offset_cache_block(monkeypatch)

    def outputs() -> list[torch.Tensor]:
        return [block_forward(adapter, block, h, kw) for h, kw in zip(hidden, kwargs, strict=True)]

    with float_activations(block):
        exact = outputs()

    def error() -> float:
        return sum(float((a - e).pow(2).sum()) for a, e in zip(outputs(), exact, strict=True))

    unshifted = error()
    fit_kv_shift(adapter, block, hidden, kwargs)
    assert error() < 0.5 * unshifted
    with float_activations(block):
        for got, expected in zip(outputs(), exact, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shifted", [False, True], ids=["unshifted", "shifted"])
@torch.no_grad()
def test_quantized_cache_exports_to_onnx(tmp_path, shifted):
    model = tiny_model("qwen2")
    adapter = adapter_for(model)
    rotate_model(model, adapter, RotationConfig(enabled=True), kv_quantized=True)
    enable_activation_quantization(model, adapter, ActQuantConfig(kv_bits=4))
    if shifted:  # any values: the graph must compute Q(x − μ) + μ as PyTorch does
        shape = adapter.attention_shape(model.config)
        gen = torch.Generator().manual_seed(0)
        for block in adapter.blocks(model):
            shift = torch.randn(2, shape.num_kv_heads, 1, shape.head_dim, generator=gen)
            set_kv_shift(adapter.attention(block), shift)
    onnx_qdq.export_qdq(model, {}, tmp_path)
    ids = _ids(model)[:1]
    expected = model(ids, use_cache=False).logits.numpy()
    got = OrtCausalLM(tmp_path).logits(ids).numpy()
    assert np.mean(np.isclose(got, expected, rtol=1e-3, atol=1e-3)) > 0.95
