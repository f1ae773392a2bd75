"""Rotations leave the model's function unchanged; W4A4 quantizes every block linear's input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model

import exporters.onnx_qdq as onnx_qdq
from edgeq.activations import QuantInputLinear
from edgeq.config import RotationConfig, scheme_preset
from edgeq.evaluation import OrtCausalLM
from edgeq.models.adapters import LINEAR_ROLES, adapter_for
from edgeq.pipeline import quantize_model
from edgeq.rotation.rotate import fuse_norms, rotate_model


def _with_random_norms(model_type: str):
    """A tiny model whose norm scales are far from 1, so an unfused norm would show."""
    model = tiny_model(model_type)
    gen = torch.Generator().manual_seed(1)
    offset = adapter_for(model).norm_offset
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data = (1.0 - offset) + 0.3 * torch.randn(param.shape, generator=gen)
    return model


def _ids(model, length: int = 24) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(2))


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def test_rotations_leave_logits_unchanged(model_type):
    model = _with_random_norms(model_type)
    ids = _ids(model)
    before = model(ids).logits
    adapter = adapter_for(model)
    report = rotate_model(model, adapter, RotationConfig(enabled=True, r5=True))
    assert _max_rel_diff(model(ids).logits, before) < 1e-3
    assert {"r2", "r4", "r5"} <= set(report.applied)
    # R5 (after R2) rotates o_proj's input online, as R4 does down_proj's
    assert all(adapter.input_quantizer(b, "o").rotation is not None for b in adapter.blocks(model))
    if model_type == "gemma3_text":
        assert "r1" in report.skipped and "residual branch" in report.skipped["r1"]
    else:
        assert report.applied["r1"].startswith("randomized Hadamard")
        # the residual stream really is rotated: the embedding rows moved
        original = tiny_model(model_type).model.embed_tokens.weight
        assert not torch.allclose(model.model.embed_tokens.weight, original)


@torch.no_grad()
def test_each_rotation_alone_is_exact(model_type):
    for name in ("r1", "r2", "r4", "r5"):
        model = _with_random_norms(model_type)
        ids = _ids(model)
        before = model(ids).logits
        only = {k: k == name for k in ("r1", "r2", "r4", "r5")}
        rotate_model(model, adapter_for(model), RotationConfig(enabled=True, **only))
        assert _max_rel_diff(model(ids).logits, before) < 1e-3, name


@torch.no_grad()
def test_fused_norms_become_identity_and_untie_lm_head():
    model = _with_random_norms("llama")
    model.tie_weights()
    adapter = adapter_for(model)
    ids = _ids(model)
    before = model(ids).logits
    fuse_norms(model, adapter)
    assert adapter.lm_head(model).weight.data_ptr() != adapter.embedding(model).weight.data_ptr()
    for block in adapter.blocks(model):
        for norm in adapter.norms(block).values():
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert _max_rel_diff(model(ids).logits, before) < 1e-5


@torch.no_grad()
def test_rotations_flatten_an_outlier_channel():
    """What rotations are for: a residual channel 50x larger than the rest is spread out (the
    per-token max over mean magnitude, which sets the int4 step, drops)."""
    model = _with_random_norms("llama")
    adapter = adapter_for(model)
    model.model.embed_tokens.weight[:, 5] *= 50.0
    ids = _ids(model)
    seen = {}

    def record(_module, args):
        seen["x"] = args[0]

    hook = adapter.linears(adapter.blocks(model)[0])["q"].register_forward_pre_hook(record)
    model(ids)
    peak_before = float(seen["x"].abs().amax(-1).mean() / seen["x"].abs().mean())
    rotate_model(model, adapter, RotationConfig(enabled=True))
    model(ids)
    hook.remove()
    peak_after = float(seen["x"].abs().amax(-1).mean() / seen["x"].abs().mean())
    assert peak_after < 0.5 * peak_before


@torch.no_grad()
@pytest.mark.parametrize("r5", [False, True], ids=["r4", "r4-r5"])
def test_w4a4_quantizes_the_input_of_every_block_linear_and_exports(model_type, r5, tmp_path):
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    config = scheme_preset("w4a4")
    rotate_model(model, adapter, dataclasses.replace(config.rotation, r5=r5))
    ids = _ids(model, 16)
    config = dataclasses.replace(config, method="gptq")
    result = quantize_model(model, adapter, config, ids, progress=False)
    for block in adapter.blocks(model):
        for role in LINEAR_ROLES:
            wrapper = adapter.input_quantizer(block, role)
            assert isinstance(wrapper, QuantInputLinear) and wrapper.quantize_input and wrapper.bits == 4
        assert adapter.input_quantizer(block, "down").rotation is not None
        assert (adapter.input_quantizer(block, "o").rotation is not None) == r5
    assert not isinstance(adapter.lm_head(model), QuantInputLinear)
    with_act = model(ids).logits
    for block in adapter.blocks(model):
        for role in LINEAR_ROLES:
            adapter.input_quantizer(block, role).quantize_input = False
    assert not torch.allclose(model(ids).logits, with_act)
    for block in adapter.blocks(model):
        for role in LINEAR_ROLES:
            adapter.input_quantizer(block, role).quantize_input = True

    info = onnx_qdq.export_qdq(model, result.weights, tmp_path)
    assert info.replaced_weights == len(result.weights)
    expected = model(ids[:1], use_cache=False).logits
    got = OrtCausalLM(tmp_path, accuracy_level=0).logits(ids[:1])
    # a few tokens may round to the neighbouring int4 level in one runtime and not the other
    close = torch.isclose(got, expected, rtol=1e-3, atol=1e-3).float().mean()
    assert close > 0.95


def test_unknown_rotation_names_are_not_silently_accepted():
    with pytest.raises(TypeError):
        RotationConfig(enabled=True, r9=True)


@torch.no_grad()
def test_weights_can_be_calibrated_on_the_quantized_activations():
    """calibrate_quantized (the default) gives other weights than calibrating on float activations,
    and the FP stream runs with every quantizer off."""
    from edgeq.activations import float_activations

    codes = {}
    for calibrate in (True, False):
        model = tiny_model("llama")
        adapter = adapter_for(model)
        config = scheme_preset("w4a4")
        acts = dataclasses.replace(config.activations, calibrate_quantized=calibrate, kv_bits=4)
        config = dataclasses.replace(config, method="gptq", activations=acts)
        rotate_model(model, adapter, config.rotation, kv_quantized=True)
        result = quantize_model(model, adapter, config, _ids(model, 16), progress=False)
        codes[calibrate] = torch.cat([w.codes.flatten() for w in result.weights.values()])
        block = adapter.blocks(model)[0]
        with float_activations(block):
            assert not adapter.input_quantizer(block, "q").quantize_input
            assert adapter.attention(block).edgeq_kv.bits == 16
        assert adapter.input_quantizer(block, "q").quantize_input
        assert adapter.attention(block).edgeq_kv.bits == 4
    assert not torch.equal(codes[True], codes[False])
