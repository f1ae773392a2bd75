"""Fusing QuaRot's rotations into a model, one function per step.

    report = rotate_model(model, adapter, RotationConfig(enabled=True))

With x the residual stream and Q orthogonal, a block computes the same function on x·Q as on x when
every RMSNorm's scale has been folded into the linears it feeds (‖xQ‖ = ‖x‖), the linears reading
the stream take W·Q and those writing it take Qᵀ·W (R1). Inside attention, each value head may be
rotated and o_proj's matching input columns counter-rotated (R2). down_proj's input may be rotated
online and the inverse fused into its weight (R4), and so may o_proj's whole input, across heads
(R5: after R2, which rotates within each head, so o_proj's weight takes W·(I ⊗ R2)·Mᵀ). Queries and
keys may be rotated online after RoPE (R3), for a quantized KV cache. All weight products run in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from edgeq.config import RotationConfig
from edgeq.kv_cache import kv_spec
from edgeq.models.adapters import (
    ATTN_INPUT_ROLES,
    MLP_INPUT_ROLES,
    RESIDUAL_OUTPUT_ROLES,
    Adapter,
    AttentionShape,
)
from edgeq.rotation.hadamard import (
    OnlineRotation,
    OrthogonalTransform,
    hadamard_transform,
    random_hadamard_matrix,
)


@dataclass
class RotationReport:
    """Which rotations were applied (with how each matrix was built) and which skipped (with why)."""

    applied: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def untie_lm_head(model: nn.Module, adapter: Adapter) -> None:
    """Give lm_head its own weight when it shares the embedding's (a rotation treats them apart)."""
    head, embed = adapter.lm_head(model), adapter.embedding(model)
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = []


def _fold_norm(norm: nn.Module, consumers: list[nn.Linear], offset: float) -> None:
    """W ← W · diag(offset + w) for each consumer; the norm's scale becomes 1."""
    scale = offset + norm.weight.detach().double()
    for linear in consumers:
        _set(linear.weight, linear.weight.double() * scale[None, :])
    norm.weight.data.fill_(1.0 - offset)


def fold_block_norms(block: nn.Module, adapter: Adapter) -> None:
    """Fold a block's attention norm into q/k/v and its MLP norm into gate/up."""
    linears = adapter.linears(block)
    norms = adapter.norms(block)
    _fold_norm(norms[adapter.attn_norm], [linears[r] for r in ATTN_INPUT_ROLES], adapter.norm_offset)
    _fold_norm(norms[adapter.mlp_norm], [linears[r] for r in MLP_INPUT_ROLES], adapter.norm_offset)


def fuse_norms(model: nn.Module, adapter: Adapter) -> None:
    """Fold every RMSNorm that feeds a linear into it: attention norm → q/k/v, MLP norm → gate/up,
    final norm → lm_head (untied first)."""
    untie_lm_head(model, adapter)
    for block in adapter.blocks(model):
        fold_block_norms(block, adapter)
    _fold_norm(adapter.final_norm(model), [adapter.lm_head(model)], adapter.norm_offset)


def rotate_block_residual(block: nn.Module, adapter: Adapter, q: torch.Tensor) -> None:
    """R1 inside one block: the linears reading the stream take W·Q, those writing it Qᵀ·W (with
    their bias b·Q); q [d, d] orthogonal, float64. The block's norms must be folded."""
    linears = adapter.linears(block)
    for role in (*ATTN_INPUT_ROLES, *MLP_INPUT_ROLES):
        _set(linears[role].weight, linears[role].weight.double() @ q)
    for role in RESIDUAL_OUTPUT_ROLES:
        linear = linears[role]
        _set(linear.weight, q.T @ linear.weight.double())
        if linear.bias is not None:
            _set(linear.bias, linear.bias.double() @ q)


def rotate_block_value_heads(
    block: nn.Module, adapter: Adapter, shape: AttentionShape, r: torch.Tensor
) -> None:
    """R2 in one block: every value head becomes v_h·R and o_proj's columns of every query head
    W_o,h·R (r [head_dim, head_dim] orthogonal, float64; one R for all heads, so grouped-query
    attention stays exact)."""
    hd = shape.head_dim
    linears = adapter.linears(block)
    v, o = linears["v"], linears["o"]
    wv = v.weight.double().view(shape.num_kv_heads, hd, -1)
    _set(v.weight, (r.T @ wv.to(r.device)).reshape(v.weight.shape))
    if v.bias is not None:
        _set(v.bias, (v.bias.double().view(shape.num_kv_heads, hd) @ r).reshape(-1))
    wo = o.weight.double().view(o.out_features, shape.num_heads, hd)
    _set(o.weight, (wo @ r).reshape(o.weight.shape))


def add_block_input_rotation(
    block: nn.Module, adapter: Adapter, role: str, transform: OrthogonalTransform
) -> None:
    """An online rotation of one linear's input in one block: the input becomes x·Mᵀ online and
    the weight W·Mᵀ (M the factored Hadamard of its width). R4: down_proj's input; R5: o_proj's
    (after R2, whose W_o,h·R2 it then rotates)."""
    linear = adapter.linears(block)[role]
    _set(linear.weight, linear.weight.double() @ transform.matrix().to(linear.weight.device).T)
    adapter.input_quantizer(block, role).rotation = OnlineRotation(transform)


def add_block_query_key_rotation(
    model: nn.Module, block: nn.Module, adapter: Adapter, transform: OrthogonalTransform
) -> None:
    """R3 in one block: queries and keys after RoPE rotated online by a Hadamard of the head width
    (qkᵀ is unchanged), so that the quantized keys see no outlier channel."""
    kv_spec(model, adapter.attention(block), transform.size).rotation = OnlineRotation(transform)


@dataclass
class RotationPlan:
    """The rotations one model gets, built once and applied block by block (``rotate_block``) and
    to the embedding and lm_head (``rotate_outer``). r1 [d, d] and r2 [head_dim, head_dim] are
    float64 orthogonal matrices; r4 and r3 the online transforms; None where not applied.
    r2_blocks: one R2 per block instead of the shared r2 (learned rotations, ``edgeq.rotation.learned``).
    """

    report: RotationReport
    r1: torch.Tensor | None = None
    r2: torch.Tensor | None = None
    r4: OrthogonalTransform | None = None
    r3: OrthogonalTransform | None = None
    r5: OrthogonalTransform | None = None
    r2_blocks: list[torch.Tensor] | None = None

    @property
    def applied(self) -> bool:
        return bool(self.report.applied)

    def r2_for(self, index: int) -> torch.Tensor | None:
        """Block ``index``'s R2 (None: not applied)."""
        return self.r2_blocks[index] if self.r2_blocks is not None else self.r2


def plan_rotations(
    adapter: Adapter, model_config, config: RotationConfig, kv_quantized: bool = False
) -> RotationPlan:
    """Which rotations are exact for this architecture and enabled (R3 only when the KV cache will
    be quantized), with their matrices."""
    plan = RotationPlan(RotationReport())
    report = plan.report
    if not config.enabled:
        return plan
    wanted = {"r1": config.r1, "r2": config.r2, "r4": config.r4, "r3": config.r3, "r5": config.r5}
    for name, on in wanted.items():
        if not on:
            report.skipped[name] = "turned off in the config"
        elif name == "r3" and not kv_quantized:
            report.skipped[name] = "used only when the KV cache is quantized"
        elif name in adapter.inexact_rotations:
            report.skipped[name] = f"not exact for {adapter.name}: {adapter.inexact_rotations[name]}"
    todo = {name for name, on in wanted.items() if on and name not in report.skipped}
    shape = adapter.attention_shape(model_config)
    head_dim = shape.head_dim
    if "r1" in todo:
        plan.r1, report.applied["r1"] = random_hadamard_matrix(model_config.hidden_size, config.seed)
    if "r2" in todo:
        plan.r2, report.applied["r2"] = random_hadamard_matrix(head_dim, config.seed + 1)
    if "r4" in todo:
        plan.r4 = hadamard_transform(model_config.intermediate_size)
        report.applied["r4"] = "online " + plan.r4.kind
    if "r3" in todo:
        plan.r3 = hadamard_transform(head_dim)
        report.applied["r3"] = "online " + plan.r3.kind
    if "r5" in todo:
        plan.r5 = hadamard_transform(shape.num_heads * head_dim)
        report.applied["r5"] = "online " + plan.r5.kind
    return plan


def rotate_embedding(model: nn.Module, adapter: Adapter, plan: RotationPlan) -> None:
    """R1 on the embedding: E·Q (lm_head untied first, so it keeps the unrotated table)."""
    if plan.r1 is None:
        return
    untie_lm_head(model, adapter)
    embed = adapter.embedding(model)
    _set(embed.weight, embed.weight.double() @ plan.r1)


def rotate_head(model: nn.Module, adapter: Adapter, plan: RotationPlan) -> None:
    """R1 on the output: the final norm folded into lm_head (untied first), then W·Q."""
    if plan.r1 is None:
        return
    untie_lm_head(model, adapter)
    _fold_norm(adapter.final_norm(model), [adapter.lm_head(model)], adapter.norm_offset)
    head = adapter.lm_head(model)
    _set(head.weight, head.weight.double() @ plan.r1)


def rotate_outer(model: nn.Module, adapter: Adapter, plan: RotationPlan) -> None:
    """R1 outside the blocks: the embedding and lm_head."""
    rotate_embedding(model, adapter, plan)
    rotate_head(model, adapter, plan)


def rotate_block(
    model: nn.Module, adapter: Adapter, block: nn.Module, plan: RotationPlan, index: int
) -> None:
    """Every planned rotation of decoder block ``index``, in place (on the block's device)."""
    device = next(block.parameters()).device
    if plan.r1 is not None:
        fold_block_norms(block, adapter)
        rotate_block_residual(block, adapter, plan.r1.to(device))
    r2 = plan.r2_for(index)
    if r2 is not None:
        shape = adapter.attention_shape(model.config)
        rotate_block_value_heads(block, adapter, shape, r2.to(device))
    if plan.r4 is not None:
        add_block_input_rotation(block, adapter, "down", plan.r4)
    if plan.r5 is not None:  # after R2: o_proj's weight is W·(I ⊗ R2)·Mᵀ
        add_block_input_rotation(block, adapter, "o", plan.r5)
    if plan.r3 is not None:
        add_block_query_key_rotation(model, block, adapter, plan.r3)


def apply_plan(model: nn.Module, adapter: Adapter, plan: RotationPlan) -> RotationReport:
    """Apply a rotation plan to a whole model in memory, in place."""
    rotate_outer(model, adapter, plan)
    for index, block in enumerate(adapter.blocks(model)):
        rotate_block(model, adapter, block, plan, index)
    return plan.report


def rotate_model(
    model: nn.Module, adapter: Adapter, config: RotationConfig, kv_quantized: bool = False
) -> RotationReport:
    """Apply the enabled rotations that are exact for this architecture to a whole model in memory,
    in place (the streamed pipeline applies the same plan block by block)."""
    return apply_plan(model, adapter, plan_rotations(adapter, model.config, config, kv_quantized))
