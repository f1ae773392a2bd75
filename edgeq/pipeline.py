"""Block-by-block post-training quantization (the GPTQ recipe).

The calibration inputs of the first decoder block are captured once; then each block in turn
collects its linears' activations, has them quantized, and is run again so that the next block is
calibrated on the outputs of the already-quantized blocks before it. Only one block's inputs and
outputs are held at a time.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from edgeq.config import ActQuantConfig, QuantConfig
from edgeq.kv_cache import kv_spec
from edgeq.models.adapters import LINEAR_ROLES, Adapter
from edgeq.quant import QuantizedWeight, method_class
from edgeq.quant.block import BlockContext, block_forward
from edgeq.quant.grid import rtn_quantize
from edgeq.rotation.rotate import untie_lm_head


@dataclass
class BlockInputs:
    """Per calibration batch: the first block's hidden states [b, L, d] and every block's
    keyword arguments (attention mask, position embeddings, ...), as the model passed them."""

    hidden: list[torch.Tensor]
    kwargs: list[list[dict]]


@dataclass
class LayerStats:
    name: str
    block: int
    role: str
    weight_rel_error: float  # ||W_q - W||_F / ||W||_F


@dataclass
class QuantizationResult:
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)  # linears (and lm_head)
    tables: dict[str, QuantizedWeight] = field(default_factory=dict)  # the embedding, when quantized
    layers: list[LayerStats] = field(default_factory=list)
    block_output_rel_error: list[float] = field(default_factory=list)  # per block, on calibration data
    seconds: float = 0.0


class _StopForward(Exception):
    pass


def _recorder(adapter: Adapter, store: list[dict], hidden_store: list[torch.Tensor] | None, last: bool):
    """A forward that records what a decoder block receives instead of computing it. It replaces
    the block's ``forward`` only, so the module keeps its attributes (e.g. Gemma3's attention_type),
    and returns its input as the block would return its output (a tuple for Gemma3: the model
    indexes it, and a bare tensor would lose a dimension per block)."""

    def forward(hidden_states, *args, **kwargs):
        if args:
            raise TypeError("edgeq expects decoder blocks to take everything but hidden_states by keyword")
        store.append(kwargs)
        if hidden_store is not None:
            hidden_store.append(hidden_states.detach())
        if last:
            raise _StopForward
        return adapter.block_output(hidden_states)

    return forward


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, batch_size: int
) -> BlockInputs:
    """Run the embedding part of the model on ``input_ids`` [N, L] and record each block's inputs."""
    blocks = list(adapter.blocks(model))
    hidden: list[torch.Tensor] = []
    per_batch: list[list[dict]] = []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            stores: list[list[dict]] = [[] for _ in blocks]
            for i, block in enumerate(blocks):
                last = i == len(blocks) - 1
                block.forward = _recorder(adapter, stores[i], hidden if i == 0 else None, last)
            with contextlib.suppress(_StopForward):
                model(input_ids[start : start + batch_size], use_cache=False)
            per_batch.append([store[0] for store in stores])
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    return BlockInputs(hidden=hidden, kwargs=per_batch)


def _rel_error(approx: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    num = sum(float((a - e).pow(2).sum()) for a, e in zip(approx, exact, strict=True))
    den = sum(float(e.pow(2).sum()) for e in exact)
    return (num / den) ** 0.5 if den > 0 else 0.0


def enable_activation_quantization(model: nn.Module, adapter: Adapter, act: ActQuantConfig) -> None:
    """Per-token fake quantization on the input of every block linear (lm_head stays float), and of
    the KV cache when ``act.kv_bits`` asks for it."""
    for block in adapter.blocks(model):
        quantize_block_activations(model, adapter, block, act)


def quantize_block_activations(
    model: nn.Module, adapter: Adapter, block: nn.Module, act: ActQuantConfig
) -> None:
    """Activation (and KV cache) quantization of one block as ``act`` sets it."""
    for role in LINEAR_ROLES:
        adapter.input_quantizer(block, role).set_quantization(act, act.bits_for(role))
    attention = adapter.attention(block)
    if act.kv_bits < 16 or hasattr(attention, "edgeq_kv"):
        kv_spec(model, attention, adapter.attention_shape(model.config).head_dim).bits = act.kv_bits


@torch.no_grad()
def quantize_embedding_and_head(
    model: nn.Module, adapter: Adapter, config: QuantConfig, result: QuantizationResult
) -> None:
    """Round the embedding table (to the weights' grid) and lm_head (to its own, ``lm_head_bits``)
    when the config asks; a tied lm_head is untied first, so each keeps its own weight."""
    head = config.lm_head_weights
    if not (config.quantize_embedding or head):
        return
    if head is not None:
        head.validate()
    untie_lm_head(model, adapter)
    parts = [
        (adapter.embed_path, adapter.embedding(model), config.weights if config.quantize_embedding else None,
         result.tables),
        (adapter.lm_head_path, adapter.lm_head(model), head, result.weights),
    ]  # fmt: skip
    for name, module, grid, store in parts:
        if grid is not None:
            qweight = rtn_quantize(module.weight.data, grid)
            module.weight.data.copy_(qweight.dequantize().to(module.weight.dtype))
            store[name] = qweight


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    adapter: Adapter,
    config: QuantConfig,
    calibration_ids: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
) -> QuantizationResult:
    """Quantize every decoder-block linear of ``model`` in place (weights become their dequantized
    integer values) and return the integer weights by module name. With activation quantization,
    each block's is switched on before its weights are calibrated (``calibrate_quantized``, the
    default), so they see the activations they will get, or only at the end.

    calibration_ids: LongTensor [N, L].
    """
    config.weights.validate()
    config.activations.validate()
    method = method_class(config.method)(config)
    start = time.perf_counter()
    result = QuantizationResult()
    inputs = capture_block_inputs(model, adapter, calibration_ids, batch_size)
    hidden = inputs.hidden
    # the unquantized model's block inputs, for methods that correct for earlier blocks' error
    fp_hidden = list(hidden) if method.needs_fp_stream else None
    blocks = adapter.blocks(model)
    bar = tqdm(blocks, desc=f"quantize {config.method}", unit="block", disable=not progress)
    for index, block in enumerate(bar):
        kwargs = [batch[index] for batch in inputs.kwargs]
        if config.activations.enabled and config.activations.calibrate_quantized:
            quantize_block_activations(model, adapter, block, config.activations)
        ctx = BlockContext(index, block, adapter, model.config, hidden, kwargs, fp_hidden=fp_hidden)
        qweights = method.quantize_block(ctx)
        fp_out = ctx.outputs if len(ctx.outputs) == len(hidden) else ctx.run_all()
        for role, layer in ctx.linears.items():
            name = adapter.linear_name(index, role)
            w = layer.weight.data
            dequant = qweights[role].dequantize().to(w.dtype)
            result.layers.append(
                LayerStats(
                    name=name,
                    block=index,
                    role=role,
                    weight_rel_error=float((dequant - w).norm() / w.norm().clamp_min(1e-12)),
                )
            )
            layer.weight.data.copy_(dequant)
            result.weights[name] = qweights[role]
        hidden = [block_forward(adapter, block, h, kw) for h, kw in zip(hidden, kwargs, strict=True)]
        if fp_hidden is not None:
            fp_hidden = ctx.fp_outputs
        result.block_output_rel_error.append(_rel_error(hidden, fp_out))
        bar.set_postfix(out_err=f"{result.block_output_rel_error[-1]:.4f}")
    if config.activations.enabled:
        enable_activation_quantization(model, adapter, config.activations)
    quantize_embedding_and_head(model, adapter, config, result)
    result.seconds = time.perf_counter() - start
    return result
