"""The fake-quantized KV cache with R3: exact while the cache is float, per-entry quantization that a
token-by-token decode reproduces, and the same in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import torch
from conftest import tiny_model

import exporters.onnx_qdq as onnx_qdq
from edgeq.activations import fake_quant_per_token
from edgeq.config import ActQuantConfig, RotationConfig
from edgeq.evaluation import OrtCausalLM
from edgeq.kv_cache import KV_QUANT_ATTENTION
from edgeq.models.adapters import adapter_for
from edgeq.pipeline import enable_activation_quantization
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


@torch.no_grad()
def test_quantized_cache_exports_to_onnx(tmp_path):
    model = tiny_model("qwen2")
    adapter = adapter_for(model)
    rotate_model(model, adapter, RotationConfig(enabled=True), kv_quantized=True)
    enable_activation_quantization(model, adapter, ActQuantConfig(kv_bits=4))
    onnx_qdq.export_qdq(model, {}, tmp_path)
    ids = _ids(model)[:1]
    expected = model(ids, use_cache=False).logits.numpy()
    got = OrtCausalLM(tmp_path).logits(ids).numpy()
    assert np.mean(np.isclose(got, expected, rtol=1e-3, atol=1e-3)) > 0.95
