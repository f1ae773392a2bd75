"""The math of GPTQ and BoA, on random layers and a tiny attention, against brute force."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from edgeq.activations import fake_quant_per_token, float_activations
from edgeq.config import (
    COMPENSATION_MIN_TOKENS_PER_CHANNEL,
    ActQuantConfig,
    BoAOptions,
    GPTQOptions,
    QuantConfig,
    WeightQuantConfig,
    scheme_preset,
)
from edgeq.errors import EdgeqError
from edgeq.models.adapters import adapter_for
from edgeq.pipeline import capture_block_inputs, quantize_block_activations, quantize_model
from edgeq.quant.block import BlockContext
from edgeq.quant.boa import kronecker_loss, kronecker_quantize, rope_matrices
from edgeq.quant.gptq import gptq_quantize, layer_loss
from edgeq.quant.grid import rtn_quantize
from edgeq.quant.hessian import HessianAccumulator
from edgeq.quant.methods import (
    GPTQ,
    OTHER_ROLES,
    collect_attention_statistics,
    collect_input_hessians,
    compensation_strength,
    corrected_weight,
)
from edgeq.rotation.rotate import rotate_model

CONFIGS = [
    WeightQuantConfig(bits=4, group_size=-1, symmetric=True),
    WeightQuantConfig(bits=4, group_size=32),  # 200 columns: a ragged last group of 8
    WeightQuantConfig(bits=3, group_size=-1),
]


def spd(n: int, seed: int) -> torch.Tensor:
    """A correlated symmetric positive-definite matrix, like a real input Hessian."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g) @ (torch.randn(n, n, generator=g) * 0.5 + torch.eye(n))
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_loss_is_below_rtn(config, act_order):
    h = spd(200, 0)
    w = torch.randn(48, 200, generator=torch.Generator().manual_seed(1))
    rtn = layer_loss(rtn_quantize(w, config).dequantize() - w, h)
    gptq = layer_loss(gptq_quantize(w, h, config, GPTQOptions(act_order=act_order)).dequantize() - w, h)
    assert gptq < 0.8 * rtn


def test_gptq_with_a_diagonal_hessian_is_rtn():
    """Uncorrelated inputs leave nothing to compensate: GPTQ without clipping rounds to nearest."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 64, generator=g)
    h = torch.diag(torch.rand(64, generator=g) + 0.5)
    for config in CONFIGS[:2]:
        gptq = gptq_quantize(w, h, config, GPTQOptions(clip_grid=1, act_order=False))
        assert torch.equal(gptq.codes, rtn_quantize(w, config).codes)


def test_gptq_zeroes_dead_columns_and_the_clip_search_helps():
    h = spd(64, 3)
    h[5, :] = 0
    h[:, 5] = 0
    # The clip search picks each row's grid before GPTQ's error feedback, so it lowers the loss on
    # average, not on every row: on 16 unseeded rows it lost in 15 of 100 draws (the known flake of
    # this file). On 128 rows it wins for every seed tried (loss ratio 0.89-0.97 over seeds 0-19).
    w = torch.randn(128, 64, generator=torch.Generator().manual_seed(4))
    config = WeightQuantConfig(bits=3, group_size=-1)
    q = gptq_quantize(w, h, config)
    assert torch.all(q.dequantize()[:, 5] == 0)
    no_clip = gptq_quantize(w, h, config, GPTQOptions(clip_grid=1))
    assert layer_loss(q.dequantize() - w, h) < layer_loss(no_clip.dequantize() - w, h)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("row_block", [1, 4])
def test_boa_kronecker_loss_is_below_gptq_under_the_same_row_hessian(config, row_block):
    heads, hd, d_in = 3, 16, 200
    h_col = spd(d_in, 0)
    h_row = torch.stack([spd(hd, 10 + h) for h in range(heads)])
    w = torch.randn(heads * hd, d_in, generator=torch.Generator().manual_seed(2))
    gptq = kronecker_loss(gptq_quantize(w, h_col, config).dequantize() - w, h_row, h_col)
    boa = kronecker_quantize(w, h_row, h_col, config, BoAOptions(row_block=row_block))
    assert kronecker_loss(boa.dequantize() - w, h_row, h_col) < 0.9 * gptq


def test_boa_with_identity_row_hessians_is_gptq():
    heads, hd, d_in = 2, 8, 64
    h_col = spd(d_in, 4)
    w = torch.randn(heads * hd, d_in, generator=torch.Generator().manual_seed(6))
    config = WeightQuantConfig(bits=4, group_size=16)
    eye = torch.eye(hd).expand(heads, hd, hd)
    boa = kronecker_quantize(w, eye, h_col, config, BoAOptions(row_block=4))
    assert torch.equal(boa.codes, gptq_quantize(w, h_col, config).codes)


def test_per_head_column_hessians():
    """W_V's case: one column Hessian per head; the result is in the original row order."""
    heads, hd, d_in = 2, 8, 48
    h_col = torch.stack([spd(d_in, 5), spd(d_in, 6)])
    w = torch.randn(heads * hd, d_in, generator=torch.Generator().manual_seed(7))
    config = WeightQuantConfig(bits=4, group_size=16)
    eye = torch.eye(hd).expand(heads, hd, hd)
    boa = kronecker_quantize(w, eye, h_col, config)
    for h in range(heads):
        alone = gptq_quantize(w[h * hd : (h + 1) * hd], h_col[h], config)
        assert torch.equal(boa.codes[h * hd : (h + 1) * hd], alone.codes)


def test_rope_matrices_match_transformers_rotary():
    model = tiny_model("llama")
    hd = 18
    positions = torch.arange(7)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, 7, hd), positions)
    x = torch.randn(1, 1, 7, hd, generator=torch.Generator().manual_seed(9))
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    r = rope_matrices(cos[0], sin[0])
    torch.testing.assert_close(torch.einsum("lij,lj->li", r, x[0, 0]), expected[0, 0])


def _block_statistics(model_type: str, relaxed_v: bool = False):
    model = tiny_model(model_type)
    model.config._attn_implementation = "eager"  # so the attention module returns its probabilities
    adapter = adapter_for(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, adapter, ids, batch_size=2)
    block = adapter.blocks(model)[0]
    ctx = BlockContext(0, block, adapter, model.config, inputs.hidden, [b[0] for b in inputs.kwargs])
    stats, acc = collect_attention_statistics(ctx, relaxed_v)
    return model, adapter, ctx, stats, acc


def test_qkv_hessians_equal_brute_force_from_the_attention_itself():
    """Row Hessians from the model's own post-RoPE q/k, V's column Hessian from the model's own
    attention probabilities (eager attention), against BoA's accumulators."""
    model, adapter, ctx, stats, acc = _block_statistics("llama")
    shape = adapter.attention_shape(model.config)
    attn = adapter.attention(ctx.block)
    linears = ctx.linears
    record = {}
    hooks = [
        ctx.block.get_submodule(adapter.attn_norm).register_forward_hook(lambda m, a, o: record.update(x=o)),
        attn.register_forward_hook(lambda m, a, o: record.update(probs=o[1])),
    ]
    group = shape.num_heads // shape.num_kv_heads
    q_sum = torch.zeros(shape.num_heads, shape.head_dim, shape.head_dim)
    k_sum = torch.zeros(shape.num_kv_heads, shape.head_dim, shape.head_dim)
    v_col = torch.zeros(shape.num_kv_heads, shape.hidden_size, shape.hidden_size)
    tokens = 0
    xs = []
    with torch.no_grad():
        for hidden, kwargs in zip(ctx.hidden, ctx.kwargs, strict=True):
            ctx.block(hidden, **kwargs)
            x, probs = record["x"], record["probs"]
            xs.append(x)
            b, length, _ = x.shape
            q = linears["q"](x).view(b, length, shape.num_heads, -1).transpose(1, 2)
            k = linears["k"](x).view(b, length, shape.num_kv_heads, -1).transpose(1, 2)
            cos, sin = kwargs["position_embeddings"]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            for i in range(b):
                for h in range(shape.num_heads):
                    q_sum[h] += q[i, h].T @ q[i, h]
                    a_x = probs[i, h] @ x[i]  # [L, d]: what head h's attention mixes
                    v_col[h // group] += a_x.T @ a_x
                for g in range(shape.num_kv_heads):
                    k_sum[g] += k[i, g].T @ k[i, g]
            tokens += b * length
    for hook in hooks:
        hook.remove()
    cos, sin = ctx.kwargs[0]["position_embeddings"]
    # R_l e_j for every basis vector e_j, through transformers' own RoPE: r[l][:, j] = R_l e_j
    basis = torch.eye(shape.head_dim)[None, :, None, :].expand(1, -1, cos.shape[1], -1)  # [1, d, L, d]
    rotated, _ = apply_rotary_pos_emb(basis, basis, cos[:1], sin[:1])
    r = rotated[0].permute(1, 2, 0)  # [L, d, d]
    h_row_q, h_row_k = stats.row_hessians()
    for h in range(shape.num_heads):
        sigma = k_sum[h // group] / tokens
        expected = torch.stack([r[pos].T @ sigma @ r[pos] for pos in range(r.shape[0])]).mean(0)
        torch.testing.assert_close(h_row_q[h], expected, rtol=1e-4, atol=1e-6)
    for g in range(shape.num_kv_heads):
        sigma = (q_sum[g * group : (g + 1) * group] / tokens).mean(0)
        expected = torch.stack([r[pos].T @ sigma @ r[pos] for pos in range(r.shape[0])]).mean(0)
        torch.testing.assert_close(h_row_k[g], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.v_col_hessians(), 2 * v_col / tokens, rtol=1e-4, atol=1e-6)
    x_all = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    torch.testing.assert_close(acc["q"].hessian, 2 * x_all.T @ x_all / tokens, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_gqa_shapes(model_type):
    model, adapter, _, stats, acc = _block_statistics(model_type)
    shape = adapter.attention_shape(model.config)
    h_row_q, h_row_k = stats.row_hessians()
    assert h_row_q.shape == (shape.num_heads, shape.head_dim, shape.head_dim)
    assert h_row_k.shape == (shape.num_kv_heads, shape.head_dim, shape.head_dim)
    assert stats.v_col_hessians().shape == (shape.num_kv_heads, shape.hidden_size, shape.hidden_size)
    assert set(acc) == {"q", *OTHER_ROLES}
    for h in (*h_row_q, *h_row_k):  # covariances: symmetric positive semi-definite
        torch.testing.assert_close(h, h.T)
        assert torch.linalg.eigvalsh(h).min() > -1e-5


def test_hessian_accumulators_agree_in_float64_and_float32():
    x = torch.randn(5, 300, 40, generator=torch.Generator().manual_seed(8)) * 3 + 1
    acc32, acc64 = HessianAccumulator(40), HessianAccumulator(40, torch.float64)
    for chunk in x:
        acc32.add(chunk)
        acc64.add(chunk)
    torch.testing.assert_close(acc32.hessian, acc64.hessian, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_block_output_error_boa_below_gptq_below_rtn(model_type):
    errors = {}
    for method in ("rtn", "gptq", "boa"):
        model = tiny_model(model_type)
        ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
        config = QuantConfig(method=method, weights=WeightQuantConfig(bits=3, group_size=-1))
        result = quantize_model(model, adapter_for(model), config, ids, batch_size=4, progress=False)
        errors[method] = result.block_output_rel_error[-1]
    assert errors["boa"] < errors["gptq"] < errors["rtn"]


def test_full_correction_is_the_least_squares_weight_for_the_fp_target():
    """α = 1: W* = argmin ‖W X_fp − W* X‖² (TurboBoA's target) when dampening is negligible."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 24, generator=g)
    x_fp = x + 0.1 * torch.randn(2000, 24, generator=g)
    w = torch.randn(8, 24, generator=g)
    acc = HessianAccumulator(24)
    acc.add(x, x_fp)
    corrected = corrected_weight(w, acc, alpha=1.0, percdamp=1e-9)
    expected = torch.linalg.lstsq(x, x_fp @ w.T).solution.T
    torch.testing.assert_close(corrected, expected, rtol=1e-3, atol=1e-4)
    assert corrected_weight(w, acc, alpha=0.0, percdamp=0.01) is w


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_compensated_rounding_targets_each_linears_unrounded_input(model_type):
    """compensate_rounding: each role's correction term is D = 2E[(x − Q(x)) Q(x)ᵀ], x the rotated
    input before the grid (R4 on down_proj's), Q(x) what the linear reads, and its Hessian
    2E[Q(x)Q(x)ᵀ] is unchanged; without it there is no correction term."""
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    rotate_model(model, adapter, scheme_preset("w4a4").rotation)
    act = ActQuantConfig(bits=4, symmetric=False, clip_ratio=0.8)
    block = adapter.blocks(model)[0]
    quantize_block_activations(model, adapter, block, act)
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, adapter, ids, batch_size=2)
    ctx = BlockContext(0, block, adapter, model.config, inputs.hidden, [b[0] for b in inputs.kwargs])
    roles = tuple(ctx.linears)
    seen: dict[str, list] = {role: [] for role in roles}

    def record(role):
        def hook(wrapper, args):
            x = args[0] if wrapper.rotation is None else wrapper.rotation(args[0])
            x = x.reshape(-1, x.shape[-1])
            seen[role].append((x, fake_quant_per_token(x, 4, False, 0.8)))

        return hook

    hooks = [adapter.wrapped_input(block, r).register_forward_pre_hook(record(r)) for r in roles]
    try:
        acc = collect_input_hessians(ctx, roles, own_targets=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert adapter.wrapped_input(block, "down").rotation is not None  # R4 is in the target
    for role in roles:
        x = torch.cat([x for x, _ in seen[role]])
        q = torch.cat([q for _, q in seen[role]])
        torch.testing.assert_close(acc[role].hessian, 2 * q.T @ q / len(q), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(acc[role].correction, 2 * (x - q).T @ q / len(q), rtol=1e-4, atol=1e-5)
        assert acc[role].correction.abs().max() > 0
    assert all(a.correction is None for a in collect_input_hessians(ctx, roles).values())
    with float_activations(block):  # calibrate_quantized=False: x = Q(x), nothing to compensate
        assert all(a.correction is None for a in collect_input_hessians(ctx, roles, True).values())


def test_gptq_rounds_the_compensated_weight():
    """With enough tokens (768 for the 96 inputs of down_proj), GPTQ with compensate_rounding rounds
    corrected_weight(W) at α = 1 against the rounded inputs' Hessian, and so other integers than
    without it."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    act = ActQuantConfig(bits=4, symmetric=False, clip_ratio=0.8, compensate_rounding=True)
    config = QuantConfig(method="gptq", weights=WeightQuantConfig(bits=4, group_size=16), activations=act)
    block = adapter.blocks(model)[0]
    quantize_block_activations(model, adapter, block, act)
    ids = torch.randint(0, model.config.vocab_size, (4, 192), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, adapter, ids, batch_size=2)
    ctx = BlockContext(0, block, adapter, model.config, inputs.hidden, [b[0] for b in inputs.kwargs])
    compensated = GPTQ(config).quantize_block(ctx)
    acc = collect_input_hessians(ctx, tuple(ctx.linears), own_targets=True)
    for role, linear in ctx.linears.items():
        assert compensation_strength(acc[role]) == 1.0
        target = corrected_weight(linear.weight.data, acc[role], 1.0, config.gptq.percdamp)
        expected = gptq_quantize(target, acc[role].hessian, ctx.grid(config, role), config.gptq)
        assert torch.equal(compensated[role].codes, expected.codes)
    plain_act = ActQuantConfig(bits=4, symmetric=False, clip_ratio=0.8)
    uncompensated = GPTQ(QuantConfig(method="gptq", weights=config.weights, activations=plain_act))
    plain = uncompensated.quantize_block(ctx)
    assert any(not torch.equal(plain[r].codes, compensated[r].codes) for r in plain)


@pytest.mark.parametrize("method", ["rtn", "oac"])
def test_methods_that_cannot_compensate_refuse_it(method):
    model = tiny_model("llama")
    act = ActQuantConfig(bits=4, compensate_rounding=True)
    config = QuantConfig(method=method, weights=WeightQuantConfig(bits=4, group_size=16), activations=act)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(EdgeqError, match="--act-compensate works with the methods gptq, boa"):
        quantize_model(model, adapter_for(model), config, ids, progress=False)


def test_compensation_needs_enough_tokens_per_input_channel():
    """Below COMPENSATION_MIN_TOKENS_PER_CHANNEL tokens per channel the correction would fit the tokens' own
    rounding noise, so its strength is 0; from there on it is 1."""
    acc = HessianAccumulator(10)
    short = COMPENSATION_MIN_TOKENS_PER_CHANNEL * 10 - 1
    acc.add(torch.randn(short, 10), torch.randn(short, 10))
    assert compensation_strength(acc) == 0.0
    acc.add(torch.randn(1, 10), torch.randn(1, 10))
    assert compensation_strength(acc) == 1.0


def test_fp_stream_follows_the_unquantized_model():
    """With alpha > 0 the pipeline carries the unquantized hidden states alongside; after
    quantization the model's weights are on the grid and the FP stream was the FP model's."""
    model = tiny_model("llama")
    reference = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(
        method="boa", weights=WeightQuantConfig(bits=4, group_size=16), boa=BoAOptions(alpha=0.5)
    )
    adapter = adapter_for(model)
    captured = []
    original = BlockContext.run_fp

    def spy(self, batch):
        out = original(self, batch)
        captured.append((self.index, batch, out))
        return out

    BlockContext.run_fp = spy
    try:
        quantize_model(model, adapter, config, ids, batch_size=2, progress=False)
    finally:
        BlockContext.run_fp = original
    with torch.no_grad():
        hidden = reference(ids, output_hidden_states=True, use_cache=False).hidden_states
    last = model.config.num_hidden_layers - 1
    for index, batch, out in captured:
        if index == last:  # transformers reports the last hidden state after the final norm
            out = adapter.final_norm(reference)(out)
        torch.testing.assert_close(out, hidden[index + 1][2 * batch : 2 * batch + 2], rtol=1e-4, atol=1e-5)
    assert len(captured) == 2 * model.config.num_hidden_layers


def test_value_loss_through_o_proj_is_kronecker_exact_per_head():
    """With one query head per key/value head, tr(H_row ΔV H_col ΔVᵀ) with H_row = W_O,hᵀ W_O,h and
    H_col = 2 X Aᵀ A Xᵀ is exactly 2‖W_O,h ΔV_h X Aᵀ‖², the error V's error leaves in the residual."""
    from edgeq.quant.boa import value_row_hessians

    g = torch.Generator().manual_seed(0)
    heads, hd, d, length = 3, 8, 24, 10
    w_o = torch.randn(d, heads * hd, generator=g, dtype=torch.float64)
    delta = torch.randn(heads * hd, d, generator=g, dtype=torch.float64)
    x = torch.randn(length, d, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(heads, length, length, generator=g, dtype=torch.float64), -1).tril()
    h_row = value_row_hessians(w_o, heads, hd).double()
    h_col = torch.stack([2 * x.T @ a.T @ a @ x for a in probs])
    expected = sum(
        2 * (w_o[:, h * hd : (h + 1) * hd] @ delta[h * hd : (h + 1) * hd] @ x.T @ probs[h].T).square().sum()
        for h in range(heads)
    )
    assert kronecker_loss(delta, h_row, h_col) == pytest.approx(float(expected), rel=1e-6)
    # grouped heads: the mean of the group's W_O,hᵀ W_O,h
    grouped = value_row_hessians(w_o, 1, hd).double()
    per_head = torch.stack(
        [w_o[:, h * hd : (h + 1) * hd].T @ w_o[:, h * hd : (h + 1) * hd] for h in range(heads)]
    )
    torch.testing.assert_close(grouped[0], per_head.mean(0), rtol=1e-5, atol=1e-5)


def test_boa_with_the_o_proj_row_hessian_for_v_beats_rtn():
    errors = {}
    for method, options in (("rtn", BoAOptions()), ("boa", BoAOptions(v_out_proj=True))):
        model = tiny_model("qwen2")
        ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
        config = QuantConfig(method=method, weights=WeightQuantConfig(bits=3, group_size=-1), boa=options)
        result = quantize_model(model, adapter_for(model), config, ids, batch_size=4, progress=False)
        errors[method] = result.block_output_rel_error[-1]
    assert errors["boa"] < errors["rtn"]
