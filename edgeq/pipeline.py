"""Block-by-block post-training quantization (the GPTQ recipe), streamed.

Token windows travel through the decoder blocks as ``Stream``s: the hidden states entering the
next block, per batch, with the keyword arguments the model passes each block (recorded once, by
running only the embedding: ``capture_block_inputs``). ``run_blocks`` takes one block at a time from
a ``BlockSource`` (read from disk, or held in memory), on the calibration device:

    load block i                                   (float32, on --device)
    FP evaluation windows        → through it      (the source weights)
    rotate it (RotationPlan)     → rotated windows (QuaRot's R1/R2/R4/R3, fused as before)
    calibrate and quantize it on the calibration stream, which then goes through the quantized block
    hand it to the writer (on_block)               (the fused graph appends it to the ONNX file)
    quantized evaluation windows → through it      (with its activation quantization, in the graph dtype)
    give it back                                   (freed, or kept for a writer that traces the model)

so the next block is calibrated on the outputs of the already-quantized blocks before it, and memory
holds one block, the streams' hidden states [N, L, d] and the embedding and lm_head, whatever the
depth. Calibration activations are stored in the checkpoint's dtype when that is float16 or
bfloat16 and move to the device a batch at a time; the blocks and the Hessians compute in float32.
``quantize_model`` is the same pass over a model held in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from edgeq.activation_ranges import (
    fit_block_shifts,
    fit_kv_shift,
    reserve_kv_shift,
    reserve_shifts,
    search_block_clip_ratios,
)
from edgeq.activations import float_activations
from edgeq.config import ActQuantConfig, QuantConfig
from edgeq.kv_cache import kv_spec
from edgeq.memory import trim_heap
from edgeq.models.adapters import LINEAR_ROLES, Adapter
from edgeq.quant import QuantizedWeight, method_class
from edgeq.quant.aptq import with_widths
from edgeq.quant.block import BlockContext, block_forward, to_device
from edgeq.quant.gptq import DampingFallback
from edgeq.quant.grid import rtn_quantize_in_place
from edgeq.quant.methods import check_compensation, needs_output_hessians
from edgeq.quant.oac import collect_output_hessians, resident_provider
from edgeq.resume import BlockRecord, Journal, block_state, restore_block
from edgeq.rotation.rotate import RotationPlan, rotate_block, untie_lm_head

log = logging.getLogger("edgeq")


@dataclass
class Stream:
    """Token windows on their way through the decoder blocks.

    hidden: per batch, the hidden states [b, L, d] entering the next block (on the CPU, in the
    stream's storage dtype); kwargs: per batch, per block, the keyword arguments the model passes
    that block (attention mask, RoPE cos/sin), recorded once by ``capture_block_inputs``.
    """

    hidden: list[torch.Tensor]
    kwargs: list[list[dict]]

    def with_hidden(self, hidden: list[torch.Tensor]) -> Stream:
        """The same windows with other hidden states (the kwargs are shared, not copied)."""
        return Stream(hidden=hidden, kwargs=self.kwargs)


@dataclass
class LayerStats:
    name: str
    block: int
    role: str
    weight_rel_error: float  # ||W_q - W||_F / ||W||_F
    bits: int = 4


@dataclass
class QuantizationResult:
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)  # linears (and lm_head)
    tables: dict[str, QuantizedWeight] = field(default_factory=dict)  # the embedding, when quantized
    layers: list[LayerStats] = field(default_factory=list)
    block_output_rel_error: list[float] = field(default_factory=list)  # per block, on calibration data
    block_seconds: list[float] = field(default_factory=list)  # per block: load, calibrate, write
    seconds: float = 0.0
    widths: dict[str, int] = field(default_factory=dict)  # mixed precision: linear name → bits
    # searched activation clip ratios (ActQuantConfig.clip_search): linear name → ratio
    clip_ratios: dict[str, float] = field(default_factory=dict)
    # numerical fallbacks taken (edgeq.quant.gptq.DampingFallback), "block i: what was done"
    fallbacks: list[str] = field(default_factory=list)


class _StopForward(Exception):
    pass


def _recorder(
    adapter: Adapter,
    store: list[dict],
    hidden_store: list[torch.Tensor] | None,
    last: bool,
    dtype: torch.dtype,
):
    """A forward that records what a decoder block receives instead of computing it. It replaces
    the block's ``forward`` only, so the module keeps its attributes (e.g. Gemma3's attention_type),
    and returns its input as the block would return its output (a tuple for Gemma3: the model
    indexes it, and a bare tensor would lose a dimension per block)."""

    def forward(hidden_states, *args, **kwargs):
        if args:
            raise TypeError("edgeq expects decoder blocks to take everything but hidden_states by keyword")
        store.append(kwargs)
        if hidden_store is not None:
            hidden_store.append(hidden_states.detach().to(dtype))
        if last:
            raise _StopForward
        return adapter.block_output(hidden_states)

    return forward


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, batch_size: int,
    dtype: torch.dtype = torch.float32,
) -> Stream:  # fmt: skip
    """Run the embedding part of the model on ``input_ids`` [N, L] and record each block's inputs
    (the hidden states stored in ``dtype``). Only the modules before the first block run, so the
    blocks may be on the meta device."""
    blocks = list(adapter.blocks(model))
    hidden: list[torch.Tensor] = []
    per_batch: list[list[dict]] = []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            stores: list[list[dict]] = [[] for _ in blocks]
            for i, block in enumerate(blocks):
                last = i == len(blocks) - 1
                block.forward = _recorder(adapter, stores[i], hidden if i == 0 else None, last, dtype)
            with contextlib.suppress(_StopForward):
                model(input_ids[start : start + batch_size], use_cache=False)
            per_batch.append([store[0] for store in stores])
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    return Stream(hidden=hidden, kwargs=per_batch)


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
    model: nn.Module, adapter: Adapter, block: nn.Module, act: ActQuantConfig,
    clip_ratios: dict[str, float] | None = None,
) -> None:  # fmt: skip
    """Activation (and KV cache) quantization of one block as ``act`` sets it, with searched clip
    ratios by role where given."""
    clip_ratios = clip_ratios or {}
    for role in LINEAR_ROLES:
        quantizer = adapter.input_quantizer(block, role)
        quantizer.set_quantization(act, act.bits_for(role), clip_ratios.get(role))
    attention = adapter.attention(block)
    if act.kv_bits < 16 or hasattr(attention, "edgeq_kv"):
        kv_spec(model, attention, adapter.attention_shape(model.config).head_dim).bits = act.kv_bits


def prepare_block(
    model: nn.Module, adapter: Adapter, block: nn.Module, index: int, plan: RotationPlan | None,
    act: ActQuantConfig, clip_ratios: dict[str, float] | None = None,
) -> None:  # fmt: skip
    """What the pass does to a block besides quantizing its weights, for a block replayed from its
    record: its rotations (online ones included) and its activation quantizers."""
    if plan is not None and plan.applied:
        rotate_block(model, adapter, block, plan, index)
    if act.enabled:
        quantize_block_activations(model, adapter, block, act, clip_ratios)
        if act.shift:  # the record's state holds their values
            reserve_shifts(adapter, block)
        if act.kv_shifted:
            reserve_kv_shift(model.config, adapter, block)


@torch.no_grad()
def quantize_embedding_table(
    model: nn.Module, adapter: Adapter, config: QuantConfig, result: QuantizationResult
) -> None:
    """Round the embedding table to the weights' grid when the config asks (lm_head untied first,
    so it keeps its own weight)."""
    if not config.quantize_embedding:
        return
    untie_lm_head(model, adapter)
    embedding = adapter.embedding(model)
    result.tables[adapter.embed_path] = rtn_quantize_in_place(embedding.weight.data, config.weights)


@torch.no_grad()
def quantize_lm_head(
    model: nn.Module, adapter: Adapter, config: QuantConfig, result: QuantizationResult
) -> None:
    """Round lm_head to its own grid (``lm_head_bits``) when the config asks (untied first)."""
    head = config.lm_head_weights
    if head is None:
        return
    head.validate()
    untie_lm_head(model, adapter)
    module = adapter.lm_head(model)
    result.weights[adapter.lm_head_path] = rtn_quantize_in_place(module.weight.data, head)


def quantize_embedding_and_head(
    model: nn.Module, adapter: Adapter, config: QuantConfig, result: QuantizationResult
) -> None:
    """Round the embedding table (to the weights' grid) and lm_head (to its own, ``lm_head_bits``)
    when the config asks; a tied lm_head is untied first, so each keeps its own weight."""
    if config.lm_head_weights is not None:
        config.lm_head_weights.validate()
    quantize_embedding_table(model, adapter, config, result)
    quantize_lm_head(model, adapter, config, result)


class BlockSource(Protocol):
    """Where the decoder blocks come from: ``load`` hands block ``index`` (float32, on ``device``),
    ``done`` takes it back once it was quantized and written."""

    def load(self, index: int, device: torch.device | str) -> nn.Module: ...

    def done(self, index: int, block: nn.Module) -> None: ...


@dataclass
class ResidentBlocks:
    """The blocks of a model held in memory: moved to the device and back, kept quantized."""

    model: nn.Module
    adapter: Adapter

    def load(self, index: int, device: torch.device | str) -> nn.Module:
        return self.adapter.blocks(self.model)[index].to(device)

    def done(self, index: int, block: nn.Module) -> None:
        block.to("cpu")


@dataclass
class EvalStreams:
    """The evaluation windows through three versions of each block: ``fp`` the source weights,
    ``rotated`` after the rotations (None without), ``quant`` the quantized block with its
    activation quantization, computed in ``quant_dtype`` (the exported graph's float type)."""

    fp: Stream
    rotated: Stream | None
    quant: Stream
    quant_dtype: torch.dtype = torch.float32


BlockCallback = Callable[[int, nn.Module, dict[str, QuantizedWeight]], None]


def advance(
    stream: Stream, adapter: Adapter, block: nn.Module, index: int, device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> None:  # fmt: skip
    """Run every batch of ``stream`` through block ``index`` (computing in ``dtype`` on ``device``);
    the outputs replace the stream's hidden states, in the dtype they were stored in."""
    outputs = []
    for hidden, kwargs in zip(stream.hidden, stream.kwargs, strict=True):
        x = to_device(hidden, device, dtype)
        out = block_forward(adapter, block, x, to_device(kwargs[index], device, dtype))
        outputs.append(out.to(device="cpu", dtype=hidden.dtype))
    stream.hidden = outputs


@contextlib.contextmanager
def in_dtype(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The module's floating parameters and buffers in ``dtype`` for the duration (float32 ones restored
    after)."""
    if dtype == torch.float32:
        yield
        return
    # buffers too: the online rotations' factors and the activation shifts stay float32 after
    saved = {name: t.data for name, t in [*module.named_parameters(), *module.named_buffers()]}
    try:
        module.to(dtype)
        yield
    finally:
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            t.data = saved[name]


def allocating_on(device: torch.device | str) -> contextlib.AbstractContextManager:
    """New tensors that the methods create without a ``device=`` land on ``device``.

    On the CPU, where they land anyway, no mode is entered: ``torch.device`` as a context is a
    TorchFunctionMode that routes every torch call through Python, and BoA's row and column sweeps
    make millions of them (13 of 19 s of BoA on six SmolLM2 blocks went to that dispatch)."""
    if torch.device(device).type == "cpu":
        return contextlib.nullcontext()
    return torch.device(device)


def calibrating(block: nn.Module, act: ActQuantConfig) -> contextlib.AbstractContextManager:
    """The activations the weights are calibrated on: the quantized ones they will see (the
    default), or float ones (QuaRot's recipe, ``calibrate_quantized=False``)."""
    return contextlib.nullcontext() if act.calibrate_quantized else float_activations(block)


def _fallbacks(caught: list[warnings.WarningMessage], index: int) -> list[str]:
    """The DampingFallback warnings of block ``index``, logged and returned as report lines; any
    other warning caught with them is shown as it would have been."""
    lines = []
    for w in caught:
        if issubclass(w.category, DampingFallback):
            lines.append(f"block {index}: {w.message}")
            log.warning("block %d: %s", index, w.message)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return lines


def _stream_states(
    hidden: list[torch.Tensor], fp_hidden: list[torch.Tensor] | None, evals: EvalStreams | None
) -> dict[str, list[torch.Tensor] | None]:
    """The hidden states of every stream between two blocks, by ``edgeq.resume.STREAMS`` name."""
    states = {"calibration": hidden, "calibration_fp": fp_hidden}
    if evals is not None:
        rotated = evals.rotated.hidden if evals.rotated is not None else None
        states |= {"eval_fp": evals.fp.hidden, "eval_rotated": rotated, "eval_quant": evals.quant.hidden}
    return states


@torch.no_grad()
def run_blocks(
    model: nn.Module,
    adapter: Adapter,
    blocks: BlockSource,
    config: QuantConfig,
    calibration: Stream,
    *,
    device: torch.device | str = "cpu",
    storage_dtype: torch.dtype = torch.float32,
    plan: RotationPlan | None = None,
    evals: EvalStreams | None = None,
    on_block: BlockCallback | None = None,
    keep_weights: bool = True,
    output_hessians: Callable[[int], dict[str, torch.Tensor]] | None = None,
    journal: Journal | None = None,
    progress: bool = True,
) -> QuantizationResult:
    """The block-by-block pass: each decoder block in turn is loaded onto ``device``, rotated
    (``plan``), calibrated and quantized on the calibration stream, handed to ``on_block`` (the
    writer) and given back, so only one block is ever resident. The evaluation streams, when given,
    go through the block as it was loaded (fp), after rotation, and quantized.

    Each block's weights become their dequantized integer values in place; the integer weights are
    returned by module name. With activation quantization, each block's is switched on before its
    weights are calibrated (``calibrate_quantized``, the default), so they see the activations they
    will get, or after. ``keep_weights=False`` leaves the integer weights out of the result once
    ``on_block`` has them (a writer that streams them: holding them would hold the whole model).
    ``output_hessians(i)``: block i's OAC Hessians by role, for the methods that need them.
    ``journal``: each finished block is recorded in it, and the blocks it already holds are replayed
    from their records instead of calibrated (``edgeq.resume``).
    """
    method = method_class(config.method)(config)
    if method.needs_output_hessians and output_hessians is None:
        raise ValueError(f"method {config.method} needs output_hessians")
    result = QuantizationResult()
    hidden = calibration.hidden
    # the unquantized model's block inputs, for methods that correct for earlier blocks' error
    fp_hidden = list(hidden) if method.needs_fp_stream else None
    act = config.activations
    count = len(adapter.blocks(model))
    bar = tqdm(range(count), desc=f"quantize {config.method}", unit="block", disable=not progress)
    for index in bar:
        if journal is not None and index < journal.finished:
            record = journal.block(index)
            block = blocks.load(index, device)
            with allocating_on(device):
                prepare_block(model, adapter, block, index, plan, act, record.clip_ratios)
            restore_block(block, adapter.linears(block), record)
            result.layers += [LayerStats(**layer) for layer in record.layers]
            result.block_output_rel_error.append(record.output_rel_error)
            result.block_seconds.append(record.seconds)
            result.fallbacks += record.fallbacks
            result.clip_ratios |= {adapter.linear_name(index, r): c for r, c in record.clip_ratios.items()}
            if keep_weights:
                result.weights |= {adapter.linear_name(index, r): q for r, q in record.weights.items()}
            if on_block is not None:
                on_block(index, block, record.weights)
            blocks.done(index, block)
            if index == journal.finished - 1:  # the streams as they entered the next block
                saved = journal.streams()
                hidden = saved["calibration"]
                fp_hidden = saved.get("calibration_fp") if fp_hidden is not None else None
                if evals is not None:
                    evals.fp.hidden, evals.quant.hidden = saved["eval_fp"], saved["eval_quant"]
                    if evals.rotated is not None:
                        evals.rotated.hidden = saved["eval_rotated"]
            continue
        start = time.perf_counter()
        block = blocks.load(index, device)
        with allocating_on(device):  # what the methods allocate lands beside the block
            if evals is not None:
                advance(evals.fp, adapter, block, index, device)
            if plan is not None and plan.applied:
                rotate_block(model, adapter, block, plan, index)
                if evals is not None and evals.rotated is not None:
                    advance(evals.rotated, adapter, block, index, device)
            kwargs = [batch[index] for batch in calibration.kwargs]
            clip_ratios: dict[str, float] = {}
            if act.enabled:
                quantize_block_activations(model, adapter, block, act)
                if act.kv_shifted:  # first: the linear shifts and clip search see the exported attention
                    fit_kv_shift(adapter, block, hidden, kwargs, device)
                if act.shift:  # first: the clip search fits the grid of the shifted inputs
                    fit_block_shifts(adapter, block, hidden, kwargs, device)
                if act.clip_search:  # on the float weights, the inputs the quantized blocks give
                    clip_ratios = search_block_clip_ratios(adapter, block, hidden, kwargs, act, device)
                    result.clip_ratios |= {adapter.linear_name(index, r): c for r, c in clip_ratios.items()}
            oac = output_hessians(index) if output_hessians else None
            ctx = BlockContext(index, block, adapter, model.config, hidden, kwargs, fp_hidden=fp_hidden,
                               device=device, storage_dtype=storage_dtype, output_hessians=oac)  # fmt: skip
            with calibrating(block, act), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DampingFallback)
                qweights = method.quantize_block(ctx)
            fallbacks = _fallbacks(caught, index)
            result.fallbacks += fallbacks
            with calibrating(block, act):
                fp_out = ctx.outputs if len(ctx.outputs) == len(hidden) else ctx.run_all()
            for role, layer in ctx.linears.items():
                name = adapter.linear_name(index, role)
                w = layer.weight.data
                dequant = qweights[role].dequantize().to(device=w.device, dtype=w.dtype)
                rel = float((dequant - w).norm() / w.norm().clamp_min(1e-12))
                bits = qweights[role].bits
                result.layers.append(LayerStats(name, index, role, weight_rel_error=rel, bits=bits))
                layer.weight.data.copy_(dequant)
                if keep_weights:
                    result.weights[name] = qweights[role]
            hidden = ctx.run_all()
            if fp_hidden is not None:
                fp_hidden = ctx.fp_outputs
            result.block_output_rel_error.append(_rel_error(hidden, fp_out))
            if on_block is not None:
                on_block(index, block, {role: qweights[role] for role in ctx.linears})
            if evals is not None:
                with in_dtype(block, evals.quant_dtype):
                    advance(evals.quant, adapter, block, index, device, evals.quant_dtype)
        if journal is not None:
            state = block_state(block, ctx.linears)
        blocks.done(index, block)
        del block, ctx, fp_out
        trim_heap()
        result.block_seconds.append(round(time.perf_counter() - start, 3))
        if journal is not None:
            layers = [dataclasses.asdict(s) for s in result.layers if s.block == index]
            record = BlockRecord(qweights, state, layers, result.block_seconds[-1],
                                 result.block_output_rel_error[-1], fallbacks, clip_ratios)  # fmt: skip
            journal.record(index, record, _stream_states(hidden, fp_hidden, evals))
        del qweights
        bar.set_postfix(out_err=f"{result.block_output_rel_error[-1]:.4f}")
    calibration.hidden = hidden
    return result


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    adapter: Adapter,
    config: QuantConfig,
    calibration_ids: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    device: torch.device | str = "cpu",
    output_hessians: dict[str, torch.Tensor] | None = None,
) -> QuantizationResult:
    """Quantize every decoder-block linear of a model held in memory, in place (weights become their
    dequantized integer values), and return the integer weights by module name: ``run_blocks`` over
    its resident blocks, then the embedding and lm_head as the config asks.

    calibration_ids: LongTensor [N, L]. output_hessians: OAC's Hessians by linear name, when already
    collected on this float model and calibration (a benchmark reuses them across settings);
    otherwise collected here for the methods that need them.
    """
    config.weights.validate()
    config.activations.validate()
    config.mixed.validate()
    check_compensation(config)
    start = time.perf_counter()
    hessians = None
    if needs_output_hessians(config):  # backward passes on the float model
        if output_hessians is None:
            output_hessians = collect_output_hessians(model, adapter, calibration_ids, progress=progress)
        hessians = resident_provider(output_hessians, adapter)
        config = with_widths(config, model, adapter, output_hessians)
    calibration = capture_block_inputs(model, adapter, calibration_ids, batch_size)
    result = run_blocks(model, adapter, ResidentBlocks(model, adapter), config, calibration,
                        device=device, output_hessians=hessians, progress=progress)  # fmt: skip
    quantize_embedding_and_head(model, adapter, config, result)
    result.widths = dict(config.mixed.widths)
    result.seconds = time.perf_counter() - start
    return result
