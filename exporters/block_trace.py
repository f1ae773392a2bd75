"""optimum's decoder graph, traced one block at a time and stitched: the ``qdq`` format (and the ``ort``
format where the fused operators cannot express the model) written with one block in memory.

optimum traces whole models. Tracing the quantized model whole would need every block in memory at
once, plus the trace's own float copy of each weight (measured on SmolLM2-135M: 2.6 GB for a 0.5 GB
model). So edgeq traces *shells* of the same model class instead, each with one layer per attention
kind (one for Llama and Qwen2; Gemma3's sliding and full layers read different masks and RoPE):

- a **block shell** per decoder block: the real quantized block (with its activation quantizers,
  online rotations and KV quantizers) in the slot of its kind, small placeholder layers in the
  others, and a 16-token vocabulary, so the trace is about one block's size;
- an **outer shell** at the end: the real embedding, final norm and lm_head around placeholders.

Every shell runs the same model code outside its layers with the same kinds of layer reading its
results, and the exporter names each tensor by the module scope and position of the operation that
made it (after removing dead and duplicate operations, which is why every shell carries every kind),
so the tensors a layer reads from outside (the causal masks, RoPE's cos and sin) carry the same names
in every trace. Block ``i``, traced in slot ``k`` of its shell, has its names moved to index ``i``:

    /model/layers.k/...        → /model/layers.i/...          (nodes and the tensors they make)
    model.layers.k.<param>     → model.layers.i.<param>       (initializers)
    past_key_values.k.key      → past_key_values.i.key        (and present.k.* → present.i.*)
    anything else it owns      → /model/layers.i/<name>       (folded constants: onnx::MatMul_123)

Its hidden-state input (the one outside tensor of shape [batch, seq, hidden]) is wired to block
``i - 1``'s output, or to the embedding's for block 0, and the final norm reads the last block's.
Each block's weights are swapped for integer codes + DequantizeLinear (matched by value, as for the
whole-model trace) and written to the external data file as soon as the block is added.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

from edgeq.errors import EdgeqError
from edgeq.models.adapters import Adapter
from edgeq.models.lazy import empty_model
from edgeq.quant.grid import QuantizedWeight
from exporters.onnx_qdq import (
    DEFAULT_OPSET,
    EXTERNAL_DATA_FILE,
    MODEL_FILE,
    OnnxExportInfo,
    component_bytes,
    export_decoder_with_past,
    merge_duplicate_nodes,
    narrow_activation_qdq,
    onnx_bytes,
    raise_opset_for_int2,
    replace_weights_with_qdq,
    share_tied_table,
)
from exporters.openvino_form import check_form, per_token_qdq_per_axis, split_ragged_blocks
from exporters.ort_fused import GRAPH_DTYPES, ExternalData
from exporters.ort_matmulnbits import MS_DOMAIN, convert_to_matmulnbits

SHELL_VOCAB = 16  # a block shell's vocabulary: its embedding and lm_head stay a few KB
PLACEHOLDER_MLP = 16  # a placeholder layer's MLP width (only its attention must keep the real shape)
PAST, PRESENT = "past_key_values.", "present."


def layer_kinds(config, adapter: Adapter) -> list[str]:
    """The model's attention kinds in order of first appearance ([""] for a single kind)."""
    count = config.num_hidden_layers
    return list(dict.fromkeys(adapter.attention_type(config, i) for i in range(count)))


def shell_config(config, kinds: list[str], vocab_size: int | None = None):
    """A copy of ``config`` with one layer per entry of ``kinds``, placeholder-sized MLPs and, if
    given, another vocabulary size. Attention keeps its shape: the KV cache and RoPE depend on it."""
    shell = copy.deepcopy(config)
    shell.num_hidden_layers = len(kinds)
    shell.intermediate_size = PLACEHOLDER_MLP
    if getattr(shell, "layer_types", None):
        shell.layer_types = list(kinds)
    if vocab_size is not None:
        shell.vocab_size = vocab_size
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if isinstance(getattr(shell, key, None), int) and getattr(shell, key) >= vocab_size:
                setattr(shell, key, None)
    return shell


def _materialize(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter still on the meta device small random values on the CPU: a shell's own
    tables, norms and placeholder layers, which only need to trace. Distinct values keep the
    exporter from merging them with a real tensor that happens to be equal (it deduplicates
    initializers by value)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in list(module.named_parameters()):
        if param.device.type == "meta":
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            values = torch.randn(param.shape, generator=generator) * 0.02
            owner._parameters[leaf] = torch.nn.Parameter(values, requires_grad=False)


def _share_outer(shell: torch.nn.Module, model: torch.nn.Module, adapter: Adapter) -> None:
    """Make ``shell``'s modules outside the blocks the very modules of ``model`` (no copies): each
    sibling of ``blocks_path`` and of its ancestors (embedding, final norm, rotary, lm_head)."""
    parts = adapter.blocks_path.split(".")
    for depth in range(len(parts)):
        prefix = ".".join(parts[:depth])
        real = model.get_submodule(prefix) if prefix else model
        target = shell.get_submodule(prefix) if prefix else shell
        for name, child in real.named_children():
            if name != parts[depth]:
                setattr(target, name, child)


@contextlib.contextmanager
def _in_slot(block: torch.nn.Module, slot: int) -> Iterator[None]:
    """The block indexes the KV cache by its ``layer_idx``: in a shell it is layer ``slot``."""
    saved = {m: m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
    try:
        for module in saved:
            module.layer_idx = slot
        yield
    finally:
        for module, index in saved.items():
            module.layer_idx = index


@contextlib.contextmanager
def _in_graph_dtype(shell: torch.nn.Module, adapter: Adapter, dtype: torch.dtype) -> Iterator[None]:
    """The shell traced in ``dtype``: every floating parameter, and the floating buffers inside its
    layers (an online Hadamard's factors), converted for the duration and restored after. The
    buffers outside stay: RoPE's frequencies must stay float32 (the model computes its angles in
    float32, and a float16 frequency is off by a quarter turn at position 500)."""
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # by identity: a tied table once
    buffers: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
    try:
        if dtype != torch.float32:
            for param in shell.parameters():
                if param.is_floating_point() and id(param) not in saved:
                    saved[id(param)] = (param, param.data)
                    param.data = param.data.to(dtype)
            for module in adapter.blocks(shell).modules():
                for name, buffer in module._buffers.items():
                    if buffer is not None and buffer.is_floating_point():
                        buffers.append((module, name, buffer))
                        module._buffers[name] = buffer.to(dtype)
        yield
    finally:
        for param, data in saved.values():
            param.data = data
        for module, name, buffer in buffers:
            module._buffers[name] = buffer


def trace(shell: torch.nn.Module, opset: int) -> onnx.ModelProto:
    """optimum's text-generation-with-past graph of ``shell`` (on the CPU), loaded into memory. The
    tracer's warnings (Python conditions taken as constants, opset notes) are the same for every
    shell and say nothing about this model, so they are not repeated to the user per block."""
    with tempfile.TemporaryDirectory(prefix="edgeq-shell-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return onnx.load(str(export_decoder_with_past(shell, Path(tmp), opset)))


def layer_scope(adapter: Adapter, index: int) -> str:
    """The name prefix the exporter gives the nodes of decoder layer ``index``: /model/layers.3/."""
    return "/" + adapter.blocks_path.replace(".", "/") + f".{index}/"


def _copy(message):
    """A free-standing copy of a protobuf message (a part of a graph keeps all of it alive)."""
    copied = type(message)()
    copied.CopyFrom(message)
    return copied


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def layer_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], scope: str) -> set[int]:
    """Positions in ``nodes`` (the graph's nodes, as one list: protobuf hands out a new wrapper
    object on every iteration, so identities hold only within one list) of one layer's nodes: those
    named in its ``scope``, and the nodes that only make constants for them (DequantizeLinear of an
    initializer, Identity of a deduplicated one, an unscoped Constant)."""
    initializers = {init.name for init in graph.initializer}
    members = {i for i, node in enumerate(nodes) if node.name.startswith(scope)}
    consumers: dict[str, list[int]] = {}
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
        for name in node.output:
            producer[name] = i
    changed = True
    while changed:
        changed = False
        for i, node in enumerate(nodes):
            if i in members or not node.output:
                continue
            constant_inputs = all(
                name in initializers or producer.get(name) in members for name in node.input if name
            )
            users = [user for out in node.output for user in consumers.get(out, [])]
            if constant_inputs and users and all(user in members for user in users):
                members.add(i)
                changed = True
    return members


@dataclass
class LayerPart:
    """The real block's layer of a traced shell, renamed to decoder block ``index``: its nodes and
    initializers, the outside tensors it reads (``hidden_in`` is the residual stream; the rest, masks
    and RoPE, are the outer graph's), its output and its KV-cache inputs and outputs."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    hidden_in: str
    hidden_out: str
    outside: set[str]
    inputs: list[onnx.ValueInfoProto]
    outputs: list[onnx.ValueInfoProto]


def _hidden_input(graph_model: onnx.ModelProto, outside: set[str], hidden_size: int) -> str:
    """The one outside tensor a layer reads that has the residual stream's shape [b, L, hidden]."""
    inferred = onnx.shape_inference.infer_shapes(graph_model).graph
    shapes = {vi.name: vi.type.tensor_type for vi in list(inferred.value_info) + list(inferred.input)}
    found = []
    for name in sorted(outside):
        tensor_type = shapes.get(name)
        if tensor_type is None or tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        dims = tensor_type.shape.dim
        if len(dims) == 3 and dims[2].HasField("dim_value") and dims[2].dim_value == hidden_size:
            found.append(name)
    if len(found) != 1:
        raise EdgeqError(f"cannot tell a traced layer's hidden-state input among {sorted(outside)}")
    return found[0]


def extract_layer(
    graph_model: onnx.ModelProto, adapter: Adapter, hidden_size: int, slot: int, index: int
) -> LayerPart:
    """Layer ``slot`` of a shell's graph, with every name it owns moved to block ``index``."""
    graph = graph_model.graph
    scope, target = layer_scope(adapter, slot), layer_scope(adapter, index)
    param_prefix = f"{adapter.blocks_path}.{slot}."
    everything = list(graph.node)
    members = layer_nodes(graph, everything, scope)
    nodes = [_copy(everything[i]) for i in sorted(members)]  # copies: the shell's graph can go
    made = {out for node in nodes for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    graph_inputs = {vi.name: vi for vi in graph.input}
    read = {name for node in nodes for name in node.input if name}
    owned_inits = sorted(read & initializers.keys())
    outside = read - made - initializers.keys() - graph_inputs.keys()
    # a constant the layer shares with the rest of the shell is copied in: the exporter numbers
    # unnamed constants by trace order, so another shell may call it something else
    produced_by = _producers(graph)
    shared_constants = set()
    for name in sorted(outside):
        node = produced_by.get(name)
        if node is not None and node.op_type == "Constant" and not node.input:
            nodes.append(_copy(node))
            shared_constants.add(name)
    outside -= shared_constants
    hidden_in = _hidden_input(graph_model, outside, hidden_size)
    read_by_rest = {name for i, node in enumerate(everything) if i not in members for name in node.input}
    leaving = [name for name in made if name in read_by_rest]
    made |= shared_constants
    if len(leaving) != 1:
        raise EdgeqError(f"a traced layer should hand one tensor to the rest of the graph, not {leaving}")

    def rename(name: str) -> str:
        if name.startswith(scope):
            return target + name[len(scope) :]
        if name.startswith(param_prefix):
            return f"{adapter.blocks_path}.{index}." + name[len(param_prefix) :]
        for prefix in (PAST, PRESENT):
            if name.startswith(f"{prefix}{slot}."):
                return f"{prefix}{index}." + name[len(f"{prefix}{slot}.") :]
        return target + name

    mapping = {name: rename(name) for name in made | set(owned_inits)}
    mapping |= {name: rename(name) for name in graph_inputs if name.startswith(f"{PAST}{slot}.")}
    for node in nodes:
        node.name = rename(node.name) if node.name else ""
        node.input[:] = [mapping.get(name, name) for name in node.input]
        node.output[:] = [mapping.get(name, name) for name in node.output]
    owned = []
    for name in owned_inits:
        tensor = initializers[name]
        tensor.name = mapping[name]
        owned.append(tensor)
    inputs, outputs = [], []
    for vi in graph.input:
        if vi.name.startswith(f"{PAST}{slot}."):
            inputs.append(helper.make_value_info(mapping[vi.name], vi.type))
    for vi in graph.output:
        if vi.name.startswith(f"{PRESENT}{slot}."):
            outputs.append(helper.make_value_info(mapping[vi.name], vi.type))
    return LayerPart(nodes, owned, hidden_in, mapping[leaving[0]], outside - {hidden_in}, inputs, outputs)


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each comes after the producers of its inputs (Kahn's)."""
    waiting: dict[str, list[int]] = {}
    missing = []
    for i, node in enumerate(nodes):
        needs = {name for name in node.input if name and name not in available}
        missing.append(len(needs))
        for name in needs:
            waiting.setdefault(name, []).append(i)
    ready = [i for i, count in enumerate(missing) if count == 0]
    ordered = []
    while ready:
        i = ready.pop()
        ordered.append(nodes[i])
        for out in nodes[i].output:
            for j in waiting.pop(out, []):
                missing[j] -= 1
                if missing[j] == 0:
                    ready.append(j)
    if len(ordered) != len(nodes):
        stuck = next(n for n, count in zip(nodes, missing, strict=True) if count)
        raise EdgeqError(
            f"the stitched graph cannot be ordered: {stuck.name} waits for an input nobody makes"
        )
    return ordered


def _float32_logits(nodes: list[onnx.NodeProto], outputs: list[onnx.ValueInfoProto]) -> list[onnx.NodeProto]:
    """Rename the float16 ``logits`` to ``logits_float16`` and return the Cast that makes ``logits``
    float32 from it; the graph output's type follows."""
    for node in nodes:
        node.output[:] = ["logits_float16" if name == "logits" else name for name in node.output]
    for vi in outputs:
        if vi.name == "logits":
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    return [
        helper.make_node("Cast", ["logits_float16"], ["logits"], name="/logits/Cast", to=TensorProto.FLOAT)
    ]


@dataclass
class BlockTraceWriter:
    """The streamed export's writer for optimum's graph: ``begin``, ``add_block`` for each decoder
    block in order (traced in its shell, converted, its weights written out), ``finish`` (the outer
    shell, the stitch, model.onnx). ``fmt``: "qdq", or "ort" (MatMulNBits in place of each weight's
    DequantizeLinear → MatMul)."""

    model: object
    adapter: Adapter
    out_dir: Path
    fmt: str = "qdq"
    opset: int = DEFAULT_OPSET
    not_fused: tuple[str, ...] = ()  # why an ort graph is this one, not the fused one
    dtype: str = "float32"  # the graph's float type: "float32" or "float16" (logits stay float32)
    qdq_form: str = "standard"  # "openvino": the form OpenVINO reads (``exporters.openvino_form``)
    tables: dict[str, QuantizedWeight] = field(default_factory=dict)
    parts: list[LayerPart] = field(default_factory=list)
    replaced: int = 0

    def __post_init__(self):
        if self.dtype not in GRAPH_DTYPES:
            raise ValueError(f"graph dtype must be one of {', '.join(GRAPH_DTYPES)}, got {self.dtype}")
        check_form(self.qdq_form)
        if self.qdq_form != "standard" and self.fmt != "qdq":
            raise ValueError(f"qdq form '{self.qdq_form}' is for the qdq format, not {self.fmt}")
        self.float_type = GRAPH_DTYPES[self.dtype]
        self.rewrites: dict[str, int] = {}
        self.torch_dtype = {"float32": torch.float32, "float16": torch.float16}[self.dtype]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.sink = ExternalData(self.out_dir / EXTERNAL_DATA_FILE)

    def begin(self, tables: dict[str, QuantizedWeight]) -> None:
        self.tables = tables

    def _integer_weights(self, graph_model: onnx.ModelProto, weights, tables=None) -> None:
        replaced = replace_weights_with_qdq(graph_model, weights, tables, self.float_type)
        narrow_activation_qdq(graph_model)
        if self.qdq_form == "openvino":  # the weights' data is here only until the block is written
            self._count("ragged_weights_split", split_ragged_blocks(graph_model))
        if self.fmt == "ort":
            converted = convert_to_matmulnbits(graph_model, scale_dtype=self.float_type)
            if converted != replaced:
                raise EdgeqError(f"only {converted} of {replaced} integer weights could become MatMulNBits")
        self.replaced += replaced

    def _count(self, rewrite: str, count: int) -> None:
        self.rewrites[rewrite] = self.rewrites.get(rewrite, 0) + count

    def add_block(self, index: int, block: torch.nn.Module, qweights: dict[str, QuantizedWeight]) -> None:
        """Trace block ``index`` in its shell (on the CPU; it goes back to its device after),
        swap its weights for integer ones and write them to the data file."""
        if index != len(self.parts):
            raise ValueError(f"blocks must be added in order: got {index} after {len(self.parts)}")
        config = self.model.config
        kinds = layer_kinds(config, self.adapter)
        slot = kinds.index(self.adapter.attention_type(config, index))
        shell = empty_model(shell_config(config, kinds, SHELL_VOCAB))
        self.adapter.blocks(shell)[slot] = block
        _materialize(shell)
        device = next(block.parameters()).device
        shell.to("cpu")
        with _in_slot(block, slot), _in_graph_dtype(shell, self.adapter, self.torch_dtype):
            graph_model = trace(shell, self.opset)
        block.to(device)
        del shell
        weights = {self.adapter.linear_name(index, role): q for role, q in qweights.items()}
        self._integer_weights(graph_model, weights)
        part = extract_layer(graph_model, self.adapter, config.hidden_size, slot, index)
        for tensor in part.initializers:
            self.sink.move(tensor)
        part.initializers = [_copy(tensor) for tensor in part.initializers]  # references only
        self.parts.append(part)

    def _outer_graph(self, weights: dict[str, QuantizedWeight]) -> onnx.ModelProto:
        """The outer shell's graph (one placeholder layer per attention kind), its integer tables
        and lm_head swapped in, its layers taken out."""
        shell = empty_model(shell_config(self.model.config, layer_kinds(self.model.config, self.adapter)))
        _share_outer(shell, self.model, self.adapter)
        _materialize(shell)
        with _in_graph_dtype(shell, self.adapter, self.torch_dtype):
            graph_model = trace(shell, self.opset)
        del shell
        outer_weights = {k: q for k, q in weights.items() if not k.startswith(self.adapter.blocks_path + ".")}
        self._integer_weights(graph_model, outer_weights, self.tables)
        share_tied_table(graph_model)
        return graph_model

    def finish(self, weights: dict[str, QuantizedWeight]) -> OnnxExportInfo:
        """Trace the outer shell, stitch the blocks into it, write model.onnx and the config files;
        checked with ``onnx.checker`` (full_check)."""
        if len(self.parts) != len(self.adapter.blocks(self.model)):
            raise ValueError(f"{len(self.parts)} of {len(self.adapter.blocks(self.model))} blocks were added")
        outer_model = self._outer_graph(weights)
        graph = outer_model.graph
        scopes = [
            layer_scope(self.adapter, j) for j in range(len(layer_kinds(self.model.config, self.adapter)))
        ]
        everything = list(graph.node)
        removed = set().union(*(layer_nodes(graph, everything, scope) for scope in scopes))
        kept = [node for i, node in enumerate(everything) if i not in removed]
        made_by_layers = {out for i in removed for out in everything[i].output}
        first, last = self.parts[0], self.parts[-1]
        for node in kept:
            node.input[:] = [last.hidden_out if name in made_by_layers else name for name in node.input]
        blocks_prefix = f"{self.adapter.blocks_path}."
        for init in graph.initializer:  # an outer tensor deduplicated into a placeholder's name
            if init.name.startswith(blocks_prefix):
                old = init.name
                init.name = "outer." + old
                for node in kept:
                    node.input[:] = ["outer." + old if name == old else name for name in node.input]
        previous = None
        for part in self.parts:
            if previous is not None:
                for node in part.nodes:
                    node.input[:] = [previous if name == part.hidden_in else name for name in node.input]
            previous = part.hidden_out
        made_outside = {out for node in kept for out in node.output} | {vi.name for vi in graph.input}
        for part in self.parts:
            lacking = part.outside - made_outside
            if lacking:
                raise EdgeqError(f"the outer graph lacks tensors a block reads: {sorted(lacking)[:3]}")
        if first.hidden_in not in made_outside:
            raise EdgeqError(f"the outer graph does not make the embedding output {first.hidden_in}")

        outputs = [vi for vi in graph.output if not vi.name.startswith(PRESENT)]
        if self.dtype != "float32":  # logits in float32, as the fused graph gives them
            kept += _float32_logits(kept, outputs)
        nodes = kept + [node for part in self.parts for node in part.nodes]
        used = {name for node in nodes for name in node.input}
        outer_inits = [init for init in graph.initializer if init.name in used]
        for init in outer_inits:
            self.sink.move(init)
        self.sink.close()
        block_inits = [init for part in self.parts for init in part.initializers]
        inputs = [vi for vi in graph.input if not vi.name.startswith(PAST)]
        inputs += [vi for part in self.parts for vi in part.inputs]
        outputs += [vi for part in self.parts for vi in part.outputs]
        available = {vi.name for vi in inputs} | {init.name for init in outer_inits + block_inits}
        stitched = helper.make_graph(_topological(nodes, available), graph.name, inputs, outputs,
                                     outer_inits + block_inits)  # fmt: skip
        opsets = list(outer_model.opset_import)
        if self.fmt == "ort" and not any(op.domain == MS_DOMAIN for op in opsets):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        graph_model = helper.make_model(stitched, opset_imports=opsets, producer_name="edgeq")
        graph_model.ir_version = outer_model.ir_version
        # after the stitch, not per shell: a block's nodes must keep their own names until
        # extract_layer has taken them out (a merge could make them read the shell's outer tensors)
        merged = merge_duplicate_nodes(graph_model)
        if self.qdq_form == "openvino":  # after the merge: one rewritten pair per shared input
            self._count("activation_pairs_per_axis", per_token_qdq_per_axis(graph_model))
        raise_opset_for_int2(graph_model)
        path = self.out_dir / MODEL_FILE
        onnx.save_model(graph_model, str(path))
        onnx.checker.check_model(str(path), full_check=True)
        self.model.config.save_pretrained(self.out_dir)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(self.out_dir)
        not_fused = self.not_fused if self.fmt == "ort" else ()
        sizes = component_bytes(graph_model)
        return OnnxExportInfo(path, self.replaced, onnx_bytes(self.out_dir), True, sizes, not_fused=not_fused,
                              merged_nodes=merged, form_rewrites=dict(self.rewrites))  # fmt: skip
