"""The weight-quantization methods, each applied to one decoder block at a time.

    method = METHODS[name](quant_config)
    qweights = method.quantize_block(ctx)   # {role: QuantizedWeight}

RTN needs no data. GPTQ collects each linear's input Hessian. BoA also collects the attention
statistics of its Q/K/V Hessians (see ``edgeq.quant.boa``) and, with ``alpha > 0``, corrects each
weight for the error of the blocks quantized before it. With quantized activations and
``ActQuantConfig.compensate_rounding``, GPTQ and BoA instead correct each weight for the rounding of
its own input (``LinearInputs``, ``corrected_weight``). OAC and BoA-OAC use output-adaptive
Hessians (``edgeq.quant.oac``), collected by backward passes before the blocks are quantized
(``needs_output_hessians``) and handed to each block in ``ctx.output_hessians``. aespa learns the
rounding of W_Q, W_K, W_V on BoA's loss (``edgeq.quant.aespa``) and uses OAC on the rest.
"""

from __future__ import annotations

import dataclasses

import torch

from edgeq.config import COMPENSATION_MIN_TOKENS_PER_CHANNEL, BoAOptions, QuantConfig, WeightQuantConfig
from edgeq.errors import EdgeqError
from edgeq.quant.aespa import learned_rounding
from edgeq.quant.block import BlockContext, attention_inputs
from edgeq.quant.boa import AttentionStatistics, kronecker_quantize, value_row_hessians
from edgeq.quant.gptq import dampen, gptq_quantize
from edgeq.quant.grid import QuantizedWeight, rtn_quantize
from edgeq.quant.hessian import HessianAccumulator


class RTN:
    """Round to nearest: each weight to its nearest grid point."""

    needs_fp_stream = False
    needs_output_hessians = False
    compensates_rounding = False  # no data, no target to move

    def __init__(self, config: QuantConfig):
        self.config = config

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        return {role: rtn_quantize(linear.weight.data, ctx.grid(self.config, role))
                for role, linear in ctx.linears.items()}  # fmt: skip


class LinearInputs:
    """Forward hooks that feed each role's input to a HessianAccumulator, batch by batch.

    With an FP stream (ctx.fp_hidden), each batch runs first on the FP-stream hidden states — their
    inputs are remembered — and then on the quantized stream, whose inputs are accumulated together
    with their difference to the FP ones. ``last[role]`` is the latest quantized-stream input.

    ``own_targets`` (``ActQuantConfig.compensate_rounding``), without an FP stream: the difference
    is to the linear's own input before its activation grid (rotated, unrounded), so the correction
    aims the weight at W x from Q(x) and compensates the rounding of the input it reads.
    """

    def __init__(self, ctx: BlockContext, roles: tuple[str, ...], own_targets: bool = False):
        self.ctx = ctx
        linears = ctx.linears
        self.acc = {
            role: HessianAccumulator(linears[role].in_features, device=linears[role].weight.device)
            for role in roles
        }
        self.last: dict[str, torch.Tensor] = {}
        self._fp: dict[str, torch.Tensor] = {}
        self._fp_pass = False
        self._hooks = [linears[role].register_forward_hook(self._hook(role)) for role in roles]
        if own_targets and ctx.fp_hidden is None:
            for role in roles:
                wrapper = ctx.adapter.wrapped_input(ctx.block, role)
                if wrapper is not None and wrapper.quantize_input:
                    self._hooks.append(wrapper.register_forward_pre_hook(self._pre_grid_hook(role)))

    def _hook(self, role: str):
        def hook(_module, args, _output) -> None:
            x = args[0].detach()
            if self._fp_pass:
                self._fp[role] = x
            else:
                self.last[role] = x
                self.acc[role].add(x, self._fp.get(role))

        return hook

    def _pre_grid_hook(self, role: str):
        def hook(wrapper, args) -> None:
            # what the grid rounds (the shift only moves the grid: Q(x − μ) + μ approximates x)
            x = args[0].detach()
            self._fp[role] = x if wrapper.rotation is None else wrapper.rotation(x)

        return hook

    def run(self, batch: int) -> None:
        if self.ctx.fp_hidden is not None:
            self._fp_pass = True
            self.ctx.run_fp(batch)
            self._fp_pass = False
        self.ctx.run(batch)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def corrected_weight(w: torch.Tensor, acc: HessianAccumulator, alpha: float, percdamp: float) -> torch.Tensor:
    """W + α · W D H⁻¹: the least-squares weight for the target W X_fp on the quantized-stream inputs
    X (D = 2E[(x_fp − x) xᵀ], H = 2E[x xᵀ] dampened). α = 1 is the full correction. X_fp is the FP
    stream's input (TurboBoA) or the linear's own input before its grid (``LinearInputs``)."""
    if alpha == 0 or acc.correction is None:
        return w
    h, _ = dampen(acc.hessian, percdamp)
    return w + alpha * torch.linalg.solve(h, (w @ acc.correction).T).T


def compensation_strength(acc: HessianAccumulator) -> float:
    """corrected_weight's α for compensate_rounding: 1 with enough calibration tokens, else 0."""
    return 1.0 if acc.count >= COMPENSATION_MIN_TOKENS_PER_CHANNEL * acc.sum.shape[0] else 0.0


@torch.no_grad()
def collect_input_hessians(
    ctx: BlockContext, roles: tuple[str, ...], own_targets: bool = False
) -> dict[str, HessianAccumulator]:
    """Run the block over its calibration batches; 2E[x xᵀ] of each role's input (and the
    correction term of ``own_targets``, see ``LinearInputs``)."""
    inputs = LinearInputs(ctx, roles, own_targets)
    try:
        for batch in range(len(ctx.hidden)):
            inputs.run(batch)
    finally:
        inputs.close()
    return inputs.acc


class GPTQ:
    """GPTQ on every linear, each with the Hessian of its own input; with
    ``compensate_rounding``, aimed at W x from the rounded input (``corrected_weight``,
    ``compensation_strength``)."""

    needs_fp_stream = False
    needs_output_hessians = False
    compensates_rounding = True

    def __init__(self, config: QuantConfig):
        self.config = config

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        config = self.config
        acc = collect_input_hessians(ctx, tuple(ctx.linears), config.activations.compensate_rounding)
        percdamp = config.gptq.percdamp
        return {role: gptq_quantize(corrected_weight(linear.weight.data, acc[role],
                                                     compensation_strength(acc[role]), percdamp),
                                    acc[role].hessian, ctx.grid(config, role), config.gptq)
                for role, linear in ctx.linears.items()}  # fmt: skip


OTHER_ROLES = ("o", "gate", "up", "down")  # the linears BoA leaves to GPTQ


@torch.no_grad()
def collect_attention_statistics(
    ctx: BlockContext, relaxed_v: bool, own_targets: bool = False
) -> tuple[AttentionStatistics, dict[str, HessianAccumulator]]:
    """Run the block over its calibration batches; BoA's attention statistics and the input Hessians
    of q (shared by q/k/v) and of OTHER_ROLES (with ``own_targets``' correction terms)."""
    shape = ctx.adapter.attention_shape(ctx.model_config)
    d_in = ctx.linears["q"].in_features
    stats = AttentionStatistics(d_in, shape.num_heads, shape.num_kv_heads, shape.head_dim, relaxed_v)
    inputs = LinearInputs(ctx, ("q", *OTHER_ROLES), own_targets)
    try:
        for batch in range(len(ctx.kwargs)):
            inputs.run(batch)
            x, kwargs = inputs.last["q"], ctx.batch_kwargs(batch)
            q, k, probs, cos, sin = attention_inputs(ctx, x, kwargs, with_probs=not relaxed_v)
            stats.add(x, q, k, probs, cos, sin)
    finally:
        inputs.close()
    return stats, inputs.acc


class BoA:
    """BoA on W_Q, W_K, W_V (attention-aware Kronecker Hessians); GPTQ on o_proj and the MLP."""

    needs_output_hessians = False
    compensates_rounding = True  # and so do BoA-OAC and aespa, which round the same targets

    def __init__(self, config: QuantConfig):
        self.config = config
        self.needs_fp_stream = config.boa.alpha > 0

    @torch.no_grad()
    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        config, options = self.config, self.config.boa
        shape = ctx.adapter.attention_shape(ctx.model_config)
        linears = ctx.linears
        own_targets = config.activations.compensate_rounding
        stats, acc = collect_attention_statistics(ctx, options.relaxed_v, own_targets)

        def target(role: str, acc_role: str) -> torch.Tensor:
            w, acc_in = linears[role].weight.data, acc[acc_role]
            # the FP stream's target at TurboBoA's strength, or the own inputs' (compensate_rounding)
            alpha = options.alpha if ctx.fp_hidden is not None else compensation_strength(acc_in)
            return corrected_weight(w, acc_in, alpha, config.gptq.percdamp)

        h_x = acc["q"].hessian
        h_row_q, h_row_k = stats.row_hessians()
        out = {
            "q": self.attention_weight(target("q", "q"), h_row_q, self.column_hessian(ctx, "q", h_x),
                                       ctx.grid(config, "q"), options),
            "k": self.attention_weight(target("k", "q"), h_row_k, self.column_hessian(ctx, "k", h_x),
                                       ctx.grid(config, "k"), options),
        }  # fmt: skip
        v_col = stats.v_col_hessians()
        if options.v_out_proj:
            h_row_v = value_row_hessians(linears["o"].weight, shape.num_kv_heads, shape.head_dim)
            v_options = options
        else:  # identity row Hessians: rows are independent, so one row block per head suffices
            h_row_v = torch.eye(shape.head_dim).expand(shape.num_kv_heads, -1, -1)
            v_options = dataclasses.replace(options, row_block=shape.head_dim)
        v_h_col = self.column_hessian(ctx, "v", h_x if v_col is None else v_col)
        out["v"] = self.attention_weight(target("v", "q"), h_row_v, v_h_col, ctx.grid(config, "v"), v_options)
        for role in OTHER_ROLES:
            h = self.other_hessian(ctx, role, acc)
            out[role] = gptq_quantize(target(role, role), h, ctx.grid(config, role), config.gptq)
        return out

    def attention_weight(
        self, w: torch.Tensor, h_row: torch.Tensor, h_col: torch.Tensor, grid: WeightQuantConfig,
        options: BoAOptions,
    ) -> QuantizedWeight:  # fmt: skip
        """W_Q, W_K or W_V [heads·hd, d_in] on ``grid``, against its Kronecker-factored loss."""
        return kronecker_quantize(w, h_row, h_col, grid, options, self.config.gptq)

    def column_hessian(self, ctx: BlockContext, role: str, attention_aware: torch.Tensor) -> torch.Tensor:
        """The column factor of W_Q, W_K or W_V's Kronecker Hessian: BoA's (2E[x xᵀ], or W_V's
        attention-weighted one)."""
        return attention_aware

    def other_hessian(self, ctx: BlockContext, role: str, acc: dict[str, HessianAccumulator]) -> torch.Tensor:
        """The Hessian GPTQ uses on o_proj and the MLP linears: their input's 2E[x xᵀ]."""
        return acc[role].hessian


def _output_hessian(ctx: BlockContext, role: str) -> torch.Tensor:
    if ctx.output_hessians is None:
        raise EdgeqError("this method needs OAC's output-adaptive Hessians, and none were collected")
    return ctx.output_hessians[role].to(ctx.device)


class OAC:
    """GPTQ on every linear, each with its output-adaptive Hessian E_s[G_sᵀ G_s] (``edgeq.quant.oac``)
    in place of 2E[x xᵀ]: rounding errors weighed by what they do to the model's cross-entropy."""

    needs_fp_stream = False
    needs_output_hessians = True
    compensates_rounding = False  # its Hessians come from backward passes, not the inputs

    def __init__(self, config: QuantConfig):
        self.config = config

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        config = self.config
        return {role: gptq_quantize(linear.weight.data, _output_hessian(ctx, role), ctx.grid(config, role),
                                    config.gptq)
                for role, linear in ctx.linears.items()}  # fmt: skip


class BoAOAC(BoA):
    """BoA's attention-aware Kronecker Hessians on W_Q, W_K, W_V; OAC's output-adaptive Hessians on
    o_proj and the MLP, where BoA falls back to GPTQ's layer-local 2E[x xᵀ]."""

    needs_output_hessians = True

    def column_hessian(self, ctx: BlockContext, role: str, attention_aware: torch.Tensor) -> torch.Tensor:
        """With ``output_adaptive_columns``, the projection's own OAC Hessian: under a Kronecker model
        of its cross-entropy Hessian, A_row ⊗ B_col, OAC's row sum E[GᵀG] is tr(A_row) · B_col, a
        column factor weighed by the output; the row factor stays BoA's."""
        if self.config.boa.output_adaptive_columns:
            return _output_hessian(ctx, role)
        return attention_aware

    def other_hessian(self, ctx: BlockContext, role: str, acc: dict[str, HessianAccumulator]) -> torch.Tensor:
        return _output_hessian(ctx, role)


class Aespa(BoAOAC):
    """aespa: W_Q, W_K, W_V with learned rounding on their attention-wise Kronecker loss
    (``edgeq.quant.aespa``); OAC's output-adaptive Hessians on o_proj and the MLP."""

    def attention_weight(
        self, w: torch.Tensor, h_row: torch.Tensor, h_col: torch.Tensor, grid: WeightQuantConfig,
        options: BoAOptions,
    ) -> QuantizedWeight:  # fmt: skip
        config = self.config
        return learned_rounding(w, h_row, h_col, grid, config.aespa, config.gptq)


METHODS = {"rtn": RTN, "gptq": GPTQ, "boa": BoA, "oac": OAC, "boa-oac": BoAOAC, "aespa": Aespa}


def needs_output_hessians(config: QuantConfig) -> bool:
    """OAC's Hessians are needed by the method, or by the mixed-precision allocation."""
    return method_class(config.method).needs_output_hessians or config.mixed.enabled


def check_compensation(config: QuantConfig) -> None:
    """A clear error when compensate_rounding is asked of a method that cannot apply it."""
    if config.activations.compensate_rounding and not method_class(config.method).compensates_rounding:
        able = ", ".join(name for name, cls in METHODS.items() if cls.compensates_rounding)
        raise EdgeqError(f"--act-compensate works with the methods {able}, not '{config.method}'")


def method_class(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise EdgeqError(f"unknown method '{name}': choose one of {', '.join(METHODS)}") from None
