"""The weight-quantization methods, each applied to one decoder block at a time.

    method = make_method(quant_config)
    qweights = method.quantize_block(ctx)   # {role: QuantizedWeight}

RTN needs no data. GPTQ collects each linear's input Hessian. BoA also collects the attention
statistics of its Q/K/V Hessians (see ``edgeq.quant.boa``).
"""

from __future__ import annotations

import torch

from edgeq.config import QuantConfig
from edgeq.errors import EdgeqError
from edgeq.quant.block import BlockContext, attention_inputs
from edgeq.quant.boa import AttentionStatistics, kronecker_quantize
from edgeq.quant.gptq import gptq_quantize
from edgeq.quant.grid import QuantizedWeight, rtn_quantize
from edgeq.quant.hessian import HessianAccumulator


class RTN:
    """Round to nearest: each weight to its nearest grid point."""

    def __init__(self, config: QuantConfig):
        self.config = config

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        return {
            role: rtn_quantize(layer.weight.data, self.config.weights) for role, layer in ctx.linears.items()
        }


def collect_input_hessians(ctx: BlockContext, roles: list[str]) -> dict[str, HessianAccumulator]:
    """Run the block over its calibration batches and accumulate 2E[x xᵀ] of each role's input."""
    linears = ctx.linears
    acc = {role: HessianAccumulator(linears[role].in_features) for role in roles}
    hooks = [
        linears[role].register_forward_hook(lambda _m, args, _out, a=acc[role]: a.add(args[0].detach()))
        for role in roles
    ]
    try:
        ctx.run_all()
    finally:
        for hook in hooks:
            hook.remove()
    return acc


class GPTQ:
    """GPTQ on every linear, each with the Hessian of its own input."""

    def __init__(self, config: QuantConfig):
        self.config = config

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        hessians = collect_input_hessians(ctx, list(ctx.linears))
        return {
            role: gptq_quantize(
                layer.weight.data, hessians[role].hessian, self.config.weights, self.config.gptq
            )
            for role, layer in ctx.linears.items()
        }


OTHER_ROLES = ("o", "gate", "up", "down")  # the linears BoA leaves to GPTQ


@torch.no_grad()
def collect_attention_statistics(
    ctx: BlockContext, other_roles: tuple[str, ...], relaxed_v: bool
) -> tuple[AttentionStatistics, dict[str, HessianAccumulator]]:
    """Run the block over its calibration batches; return BoA's attention statistics and the input
    Hessians of ``other_roles``."""
    shape = ctx.adapter.attention_shape(ctx.model_config)
    linears = ctx.linears
    stats = AttentionStatistics(
        linears["q"].in_features, shape.num_heads, shape.num_kv_heads, shape.head_dim, relaxed_v
    )
    acc = {role: HessianAccumulator(linears[role].in_features) for role in other_roles}
    seen: dict[str, torch.Tensor] = {}
    hooks = [linears["q"].register_forward_hook(lambda _m, args, _out: seen.update(x=args[0].detach()))]
    hooks += [
        linears[role].register_forward_hook(lambda _m, args, _out, a=acc[role]: a.add(args[0].detach()))
        for role in other_roles
    ]
    try:
        for batch, kwargs in enumerate(ctx.kwargs):
            ctx.run(batch)
            x = seen["x"]
            q, k, probs, cos, sin = attention_inputs(ctx, x, kwargs, with_probs=not relaxed_v)
            stats.add(x, q, k, probs, cos, sin)
    finally:
        for hook in hooks:
            hook.remove()
    return stats, acc


class BoA:
    """BoA on W_Q, W_K, W_V (attention-aware Kronecker Hessians); GPTQ on o_proj and the MLP."""

    def __init__(self, config: QuantConfig):
        self.config = config

    @torch.no_grad()
    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        options = self.config.boa
        shape = ctx.adapter.attention_shape(ctx.model_config)
        linears = ctx.linears
        stats, acc = collect_attention_statistics(ctx, OTHER_ROLES, options.relaxed_v)
        weights, gptq = self.config.weights, self.config.gptq
        h_x = stats.x.hessian
        h_row_q, h_row_k = stats.row_hessians()
        out = {
            "q": kronecker_quantize(linears["q"].weight.data, h_row_q, h_x, weights, options, gptq),
            "k": kronecker_quantize(linears["k"].weight.data, h_row_k, h_x, weights, options, gptq),
        }
        v_col = stats.v_col_hessians()
        if v_col is None:
            out["v"] = gptq_quantize(linears["v"].weight.data, h_x, weights, gptq)
        else:
            eye = torch.eye(shape.head_dim).expand(shape.num_kv_heads, -1, -1)
            out["v"] = kronecker_quantize(linears["v"].weight.data, eye, v_col, weights, options, gptq)
        for role in OTHER_ROLES:
            out[role] = gptq_quantize(linears[role].weight.data, acc[role].hessian, weights, gptq)
        return out


METHODS = {"rtn": RTN, "gptq": GPTQ, "boa": BoA}


def method_class(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise EdgeqError(f"unknown method '{name}': choose one of {', '.join(METHODS)}") from None
