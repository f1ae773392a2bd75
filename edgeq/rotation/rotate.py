"""Fusing QuaRot's rotations into a model, one function per step.

    report = rotate_model(model, adapter, RotationConfig(enabled=True))

With x the residual stream and Q orthogonal, a block computes the same function on x·Q as on x when
every RMSNorm's scale has been folded into the linears it feeds (‖xQ‖ = ‖x‖), the linears reading
the stream take W·Q and those writing it take Qᵀ·W (R1). Inside attention, each value head may be
rotated and o_proj's matching input columns counter-rotated (R2). down_proj's input may be rotated
online and the inverse fused into its weight (R4). Queries and keys may be rotated online after
RoPE (R3), for a quantized KV cache. All weight products run in float64.
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
)
from edgeq.rotation.hadamard import OnlineRotation, hadamard_transform, random_hadamard_matrix


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


def fuse_norms(model: nn.Module, adapter: Adapter) -> None:
    """Fold every RMSNorm that feeds a linear into it: attention norm → q/k/v, MLP norm → gate/up,
    final norm → lm_head (untied first)."""
    untie_lm_head(model, adapter)
    for block in adapter.blocks(model):
        linears = adapter.linears(block)
        norms = adapter.norms(block)
        _fold_norm(norms[adapter.attn_norm], [linears[r] for r in ATTN_INPUT_ROLES], adapter.norm_offset)
        _fold_norm(norms[adapter.mlp_norm], [linears[r] for r in MLP_INPUT_ROLES], adapter.norm_offset)
    _fold_norm(adapter.final_norm(model), [adapter.lm_head(model)], adapter.norm_offset)


def rotate_residual(model: nn.Module, adapter: Adapter, q: torch.Tensor) -> None:
    """R1: the residual stream becomes x·Q (q [d, d] orthogonal, float64). Norms must be fused."""
    embed = adapter.embedding(model)
    _set(embed.weight, embed.weight.double() @ q)
    for block in adapter.blocks(model):
        linears = adapter.linears(block)
        for role in (*ATTN_INPUT_ROLES, *MLP_INPUT_ROLES):
            _set(linears[role].weight, linears[role].weight.double() @ q)
        for role in RESIDUAL_OUTPUT_ROLES:
            linear = linears[role]
            _set(linear.weight, q.T @ linear.weight.double())
            if linear.bias is not None:
                _set(linear.bias, linear.bias.double() @ q)
    head = adapter.lm_head(model)
    _set(head.weight, head.weight.double() @ q)


def rotate_value_heads(model: nn.Module, adapter: Adapter, r: torch.Tensor) -> None:
    """R2: every value head becomes v_h·R and o_proj's columns of every query head W_o,h·R
    (r [head_dim, head_dim] orthogonal, float64; one R for all heads, so grouped-query attention
    stays exact)."""
    shape = adapter.attention_shape(model.config)
    hd = shape.head_dim
    for block in adapter.blocks(model):
        linears = adapter.linears(block)
        v, o = linears["v"], linears["o"]
        wv = v.weight.double().view(shape.num_kv_heads, hd, -1)
        _set(v.weight, (r.T @ wv).reshape(v.weight.shape))
        if v.bias is not None:
            _set(v.bias, (v.bias.double().view(shape.num_kv_heads, hd) @ r).reshape(-1))
        wo = o.weight.double().view(o.out_features, shape.num_heads, hd)
        _set(o.weight, (wo @ r).reshape(o.weight.shape))


def add_down_proj_rotation(model: nn.Module, adapter: Adapter) -> str:
    """R4: down_proj's input becomes x·Mᵀ online (M the factored Hadamard of the MLP width) and its
    weight W·Mᵀ; returns how M was built."""
    kind = ""
    for block in adapter.blocks(model):
        down = adapter.linears(block)["down"]
        transform = hadamard_transform(down.in_features)
        _set(down.weight, down.weight.double() @ transform.matrix().T)
        adapter.input_quantizer(block, "down").rotation = OnlineRotation(transform)
        kind = transform.kind
    return kind


def add_query_key_rotation(model: nn.Module, adapter: Adapter) -> str:
    """R3: queries and keys after RoPE rotated online by a Hadamard of the head width (qkᵀ is
    unchanged), so that the quantized keys see no outlier channel; returns how it was built."""
    head_dim = adapter.attention_shape(model.config).head_dim
    transform = hadamard_transform(head_dim)
    for block in adapter.blocks(model):
        kv_spec(model, adapter.attention(block), head_dim).rotation = OnlineRotation(transform)
    return transform.kind


def rotate_model(
    model: nn.Module, adapter: Adapter, config: RotationConfig, kv_quantized: bool = False
) -> RotationReport:
    """Apply the enabled rotations that are exact for this architecture, in place (R3 only when the
    KV cache will be quantized)."""
    report = RotationReport()
    if not config.enabled:
        return report
    wanted = {"r1": config.r1, "r2": config.r2, "r4": config.r4, "r3": config.r3}
    for name, on in wanted.items():
        if not on:
            report.skipped[name] = "turned off in the config"
        elif name == "r3" and not kv_quantized:
            report.skipped[name] = "used only when the KV cache is quantized"
        elif name in adapter.inexact_rotations:
            report.skipped[name] = f"not exact for {adapter.name}: {adapter.inexact_rotations[name]}"
    todo = {name for name, on in wanted.items() if on and name not in report.skipped}
    if "r1" in todo:
        fuse_norms(model, adapter)
        q, kind = random_hadamard_matrix(model.config.hidden_size, config.seed)
        rotate_residual(model, adapter, q)
        report.applied["r1"] = kind
    if "r2" in todo:
        head_dim = adapter.attention_shape(model.config).head_dim
        r, kind = random_hadamard_matrix(head_dim, config.seed + 1)
        rotate_value_heads(model, adapter, r)
        report.applied["r2"] = kind
    if "r4" in todo:
        report.applied["r4"] = "online " + add_down_proj_rotation(model, adapter)
    if "r3" in todo:
        report.applied["r3"] = "online " + add_query_key_rotation(model, adapter)
    return report
