"""GPTQ, BoA and the rotations on the inputs that break naive implementations: dead input channels,
duplicated inputs, a rank-deficient Hessian from one short calibration window, all-zero weights and
1e4× outliers. Nothing may come out NaN or Inf; a Hessian that needs more dampening is reported."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_model

import edgeq.quant.gptq
from edgeq.config import BoAOptions, GPTQOptions, QuantConfig, WeightQuantConfig, scheme_preset
from edgeq.models.adapters import adapter_for
from edgeq.pipeline import quantize_model
from edgeq.quant.boa import kronecker_quantize
from edgeq.quant.gptq import DampingFallback, factor_dampened, gptq_quantize
from edgeq.report_md import render_markdown

CONFIGS = [
    WeightQuantConfig(bits=4, group_size=-1, symmetric=True),
    WeightQuantConfig(bits=3, group_size=16),  # 64 columns: four groups
    WeightQuantConfig(bits=2, group_size=-1),
]
D = 64


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def layer_case(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [32, D], H [D, D]) of one pathological layer."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, D, generator=g), torch.randn(32, D, generator=g)
    if name == "dead-inputs":
        x[:, [3, 40]] = 0
    elif name == "duplicated-inputs":
        x[:, 7] = x[:, 3]
        x[:, 8] = x[:, 3]
    elif name == "one-short-window":
        x = x[:9]  # 9 tokens for 64 inputs: rank 9
    elif name == "zero-weights":
        w = torch.zeros_like(w)
    elif name == "input-outliers":
        x[:, 9] *= 1e4
    elif name == "weight-outliers":
        w[:, 4] *= 1e4
    return w, hessian(x)


CASES = ["dead-inputs", "duplicated-inputs", "one-short-window", "zero-weights", "input-outliers",
         "weight-outliers"]  # fmt: skip


def assert_finite(q) -> None:
    assert torch.isfinite(q.scale).all() and torch.isfinite(q.dequantize()).all()


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_gptq_and_boa_stay_finite(case, config):
    w, h = layer_case(case)
    heads, hd = 4, 8
    g = torch.Generator().manual_seed(1)
    a = torch.randn(heads, hd, 3 * hd, generator=g)
    h_row = a @ a.transpose(1, 2) / hd
    with warnings.catch_warnings():
        warnings.simplefilter("error", DampingFallback)  # these all factor at the default dampening
        for act_order in (False, True):
            assert_finite(gptq_quantize(w, h, config, GPTQOptions(act_order=act_order)))
        assert_finite(kronecker_quantize(w, h_row, h, config, BoAOptions()))
    if case == "zero-weights":
        assert torch.equal(gptq_quantize(w, h, config).dequantize(), w)


def test_an_indefinite_hessian_gets_more_dampening_then_its_diagonal():
    # eigenvalues 4 and -2 + λ: 10 % of the mean diagonal is not enough, 100 % makes it definite
    h = torch.tensor([[1.0, 1.9], [1.9, 1.0]])
    with pytest.warns(DampingFallback, match="at dampening 0.01; used 1"):
        u, damped, _ = factor_dampened(h, 0.01)
    assert torch.allclose(u.T @ u, torch.linalg.inv(damped), atol=1e-4)

    h = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # -2 + λ stays negative for every λ tried
    with pytest.warns(DampingFallback, match="diagonal alone"):
        u, damped, _ = factor_dampened(h, 0.01)
    assert torch.isfinite(u).all()
    assert torch.allclose(u.T @ u, torch.diag(1 / damped.diagonal()))


# --- a whole model ----------------------------------------------------------------------------------


def pathological_model(case: str):
    """A tiny Llama with the case built into its weights, and its calibration windows."""
    model = tiny_model("llama", seed=3)
    emb = model.model.embed_tokens.weight.data
    calib = torch.randint(0, emb.shape[0], (4, 32), generator=torch.Generator().manual_seed(0))
    if case == "dead-inputs":  # every token's hidden state is 0 there, so every norm's output too
        emb[:, [5, 17]] = 0
    elif case == "duplicated-inputs":
        emb[:, 9] = emb[:, 2]
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.data[9] = norm.weight.data[2]
    elif case == "one-short-window":
        calib = calib[:1, :12]  # 12 tokens for 72 inputs
    elif case == "zero-weights":
        for proj in (model.model.layers[0].self_attn.o_proj, model.model.layers[1].mlp.down_proj):
            proj.weight.data.zero_()
    elif case == "input-outliers":
        emb[:, 11] *= 1e4
    elif case == "weight-outliers":
        model.model.layers[0].mlp.up_proj.weight.data[:, 6] *= 1e4
    return model, calib


METHOD_CONFIGS = {
    "gptq": QuantConfig(method="gptq", weights=WeightQuantConfig(bits=4, group_size=16)),
    "boa": QuantConfig(method="boa", weights=WeightQuantConfig(bits=3, group_size=-1)),
    "w4a4-rotated": scheme_preset("w4a4"),  # randomized Hadamard rotations, BoA, 4-bit activations
}


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
@pytest.mark.parametrize("case", CASES)
def test_quantized_model_stays_finite(case, method):
    model, calib = pathological_model(case)
    result = quantize_model(model, adapter_for(model), METHOD_CONFIGS[method], calib, progress=False)
    for name, q in result.weights.items():
        assert torch.isfinite(q.scale).all() and torch.isfinite(q.dequantize()).all(), name
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits).all()
    assert isinstance(result.fallbacks, list)


def test_a_fallback_is_reported(monkeypatch):
    """A factorization that fails (as float32 rounding can make it) is retried with more dampening,
    and the report says which block needed it."""
    model, calib = pathological_model("none")
    calls = []
    factor = edgeq.quant.gptq.inverse_cholesky_upper

    def fails_once(h):
        calls.append(1)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("the leading minor of order 3 is not positive-definite")
        return factor(h)

    monkeypatch.setattr(edgeq.quant.gptq, "inverse_cholesky_upper", fails_once)
    config = QuantConfig(method="gptq", weights=WeightQuantConfig(bits=4, group_size=16))
    result = quantize_model(model, adapter_for(model), config, calib, progress=False)
    assert result.fallbacks == ["block 0: Hessian not positive definite at dampening 0.01; used 0.1"]

    report = {
        "quantization": {"layers": [], "block_output_rel_error": [0.1, 0.2], "fallbacks": result.fallbacks}
    }
    assert "- block 0: Hessian not positive definite at dampening 0.01; used 0.1" in render_markdown(
        report, {}
    )
