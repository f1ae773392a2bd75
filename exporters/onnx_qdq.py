"""ONNX with standard QDQ weights (opset 21).

The (fake-quantized) PyTorch model is exported by optimum as a text-generation decoder with KV
cache, so ``ORTModelForCausalLM.generate`` runs it. Then every quantized linear's float weight
initializer is replaced by its int4 codes feeding a ``DequantizeLinear`` (blocked along the input
axis, or per output channel), which ONNX Runtime fuses into MatMulNBits.

The exported initializer of a linear is found by value: it is exactly Wᵀ of the dequantized weight,
whatever name the exporter gave it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import EdgeqError
from edgeq.packing import pack_bits
from edgeq.quant.grid import QuantizedWeight
from exporters.openvino_form import check_form, to_openvino_form

# Protobuf cannot serialize a single file over 2 GiB; above this the weights go to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
MODEL_FILE = "model.onnx"
DEFAULT_OPSET = 21  # int4 blocked DequantizeLinear
# (signed, unsigned) ONNX type of the weight codes by container width (see ``container_bits``)
CONTAINERS = {
    2: (TensorProto.INT2, TensorProto.UINT2),
    4: (TensorProto.INT4, TensorProto.UINT4),
    8: (TensorProto.INT8, TensorProto.UINT8),
}
INT2_OPSET = 25  # the first opset whose DequantizeLinear reads INT2/UINT2
EXTERNAL_DATA_FILE = "model.onnx_data"


@dataclass(frozen=True)
class OnnxExportInfo:
    """What was written. replaced_weights: integer weight nodes in the graph (the fused graph's one
    q/k/v matmul counts once); graph: "optimum" (the traced export) or "fused" (``ort_fused``);
    not_fused: why the ort format could not use the fused graph; merged_nodes: duplicate nodes removed
    (``merge_duplicate_nodes``: the activation quantizers the linears reading one input shared)."""

    path: Path
    replaced_weights: int
    bytes_total: int
    external_data: bool
    components: dict[str, int]  # initializer bytes: embedding, blocks, lm_head
    graph: str = "optimum"
    not_fused: tuple[str, ...] = ()
    merged_nodes: int = 0  # duplicate nodes removed by ``merge_duplicate_nodes``
    # --qdq-form openvino: what ``exporters.openvino_form`` rewrote, by rewrite
    form_rewrites: dict[str, int] = field(default_factory=dict)


def export_decoder_with_past(model, out_dir: Path, opset: int) -> Path:
    """optimum's text-generation-with-past export of ``model`` into ``out_dir``; returns model.onnx."""
    from optimum.exporters.onnx import onnx_export_from_model

    onnx_export_from_model(
        model, str(out_dir), task="text-generation-with-past", opset=opset, do_validation=False
    )
    path = out_dir / MODEL_FILE
    if not path.exists():
        raise EdgeqError(f"optimum's export wrote no {MODEL_FILE} in {out_dir}")
    return path


# the graph's float types: initializer data type → numpy type
FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def _digest(array: np.ndarray, float_type=np.float32) -> str:
    """Hash of ``array`` as the graph stores it in ``float_type`` (float16 rounds first)."""
    stored = np.ascontiguousarray(array, dtype=np.float32).astype(float_type)
    return hashlib.sha256(stored.astype(np.float32).tobytes()).hexdigest()


def container_bits(bits: int, table: bool = False, row_length: int = 4) -> int:
    """The width of the ONNX integer type that stores ``bits``-wide codes: 2 bits in INT2/UINT2
    (opset 25), 3 and 4 in INT4/UINT4, 8 in INT8/UINT8. A Gather ``table`` keeps 2-bit codes in
    int4, the narrowest ORT's GatherBlockQuantized reads.

    So does a weight whose stored rows (``row_length`` values: a MatMul's output width) do not fill
    whole bytes at 2 bits: ONNX Runtime 1.32 fuses DequantizeLinear → MatMul into MatMulNBits and
    then reads such INT2 rows wrongly (outputs off by whole grid steps for widths 1 and 3, exact for
    multiples of 4; its unfused DequantizeLinear is exact; found by tests/test_properties.py)."""
    if bits == 2 and not table and row_length % 4 == 0:
        return 2
    return 4 if bits <= 4 else 8


def raise_opset_for_int2(model: onnx.ModelProto) -> None:
    """Set the default domain's opset to at least INT2_OPSET when an initializer is INT2/UINT2."""
    narrow = {TensorProto.INT2, TensorProto.UINT2}
    if not any(init.data_type in narrow for init in model.graph.initializer):
        return
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, INT2_OPSET)
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(model.opset_import), True))


def dequantize_linear_initializers(
    name: str, qweight: QuantizedWeight, transposed: bool = True, float_type=np.float32
) -> tuple[list[onnx.TensorProto], onnx.NodeProto]:
    """Initializers and the DequantizeLinear node that compute ``name``: Wᵀ [in, out] for a MatMul
    (``transposed``), or W [out, in] itself for a Gather table (an embedding).

    Blocked along the input axis with ``block_size = group_size``, or per output channel when one
    group spans the whole input. Symmetric grids are stored as INT4 without a zero point, asymmetric
    ones as UINT4 with a UINT4 zero point (INT2 / UINT2 for 2-bit grids, INT8 / UINT8 for 8-bit ones;
    see ``container_bits``). The scales are stored in
    ``float_type``, which is what DequantizeLinear outputs (float16 for a float16 graph).
    """
    codes, scale, zero = qweight.codes.numpy(), qweight.scale.numpy().astype(float_type), qweight.zero.numpy()
    if transposed:  # [in, out], scales [n_groups, out]
        codes, scale, zero = codes.T, scale.T, zero.T
    in_axis = 0 if transposed else 1
    per_channel = qweight.group_size >= codes.shape[in_axis]
    if per_channel:
        scale, zero = scale.reshape(-1), zero.reshape(-1)
    container = container_bits(qweight.bits, table=not transposed, row_length=codes.shape[-1])
    signed, unsigned = CONTAINERS[container]
    if qweight.symmetric:
        values, dtype = codes.astype(np.int16) - 2 ** (qweight.bits - 1), signed
    else:
        values, dtype = codes, unsigned

    def tensor(name: str, array: np.ndarray, data_type: int) -> onnx.TensorProto:
        if container == 8:
            return numpy_helper.from_array(array.astype(np.int8 if data_type == signed else np.uint8), name)
        return helper.make_tensor(name, data_type, list(array.shape), pack_bits(array, container), raw=True)

    q_name, s_name, z_name = f"{name}_q{container}", f"{name}_scale", f"{name}_zero_point"
    tensors = [tensor(q_name, values, dtype), numpy_helper.from_array(scale, s_name)]
    inputs = [q_name, s_name]
    if not qweight.symmetric:
        tensors.append(tensor(z_name, zero, unsigned))
        inputs.append(z_name)
    attrs = {"axis": 1 - in_axis} if per_channel else {"axis": in_axis, "block_size": qweight.group_size}
    node = helper.make_node("DequantizeLinear", inputs, [name], name=f"{name}_DequantizeLinear", **attrs)
    return tensors, node


def replace_weights_with_qdq(
    graph_model: onnx.ModelProto,
    weights: dict[str, QuantizedWeight],
    tables: dict[str, QuantizedWeight] | None = None,
    float_type=np.float32,
) -> int:
    """Swap each quantized linear's float initializer (matched by value to Wᵀ) and each quantized
    Gather table (an embedding, matched by value to W) for int4 + DQ. Returns how many initializers
    were replaced; every quantized weight must be found. ``float_type``: the graph's (float16 when
    the model was traced in float16: its weights are the dequantized values rounded to float16)."""
    wanted: dict[str, tuple[str, bool]] = {}
    for module_name, qweight in weights.items():
        wanted.setdefault(_digest(qweight.dequantize().numpy().T, float_type), (module_name, True))
    for module_name, qweight in (tables or {}).items():
        wanted.setdefault(_digest(qweight.dequantize().numpy(), float_type), (module_name, False))
    everything = weights | (tables or {})
    graph = graph_model.graph
    kept, new_tensors, new_nodes, found = [], [], [], set()
    for init in graph.initializer:
        match = None
        # a float16 trace may still hold a weight in float32 (the exporter upcasts where torch
        # computes in float32, e.g. after attention): its values are the float16 ones, and its
        # DequantizeLinear outputs float32 like it
        if init.data_type in FLOAT_TYPES and len(init.dims) == 2:
            match = wanted.get(_digest(numpy_helper.to_array(init), float_type))
        if match is None:
            kept.append(init)
            continue
        module_name, transposed = match
        tensors, node = dequantize_linear_initializers(
            init.name, everything[module_name], transposed, FLOAT_TYPES[init.data_type]
        )
        new_tensors += tensors
        new_nodes.append(node)
        found.add(module_name)
    missing = {name for name, _ in wanted.values()} - found
    if missing:
        raise EdgeqError(
            f"{len(missing)} quantized weights were not found in the exported graph "
            f"(e.g. {sorted(missing)[0]}); the exporter changed their layout"
        )
    del graph.initializer[:]
    graph.initializer.extend(kept + new_tensors)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)
    return len(new_nodes)


def share_tied_table(graph_model: onnx.ModelProto) -> int:
    """Store a tied embedding once: a float initializer that equals the transpose of a Gather
    table (what optimum writes for a tied lm_head when it cannot match the two, e.g. Gemma3's scaled
    embedding) becomes a Transpose of that table. Returns how many copies were dropped."""
    graph = graph_model.graph
    inits = {init.name: init for init in graph.initializer}
    tables = {
        node.input[0]
        for node in graph.node
        if node.op_type == "Gather" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2
    }
    dropped = 0
    for table_name in sorted(tables):
        table = inits[table_name]
        if table.data_type not in FLOAT_TYPES:
            continue
        transposed_shape = list(reversed(table.dims))
        candidates = [
            init for init in graph.initializer
            if init.data_type == table.data_type and list(init.dims) == transposed_shape
        ]  # fmt: skip
        if not candidates:
            continue
        digest = _digest(numpy_helper.to_array(table).T)
        for copy in candidates:
            if _digest(numpy_helper.to_array(copy)) != digest:
                continue
            graph.initializer.remove(copy)
            transpose = helper.make_node("Transpose", [table_name], [copy.name], perm=[1, 0])
            transpose.name = f"{copy.name}_Transpose"
            graph.node.insert(0, transpose)
            dropped += 1
    return dropped


# an 8-bit Q → Clip(4-bit range) → DQ, as edgeq.activations.PerTokenFakeQuant emits a 4-bit pair
_NARROW = {TensorProto.INT8: (TensorProto.INT4, -8, 7), TensorProto.UINT8: (TensorProto.UINT4, 0, 15)}


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def narrow_activation_qdq(graph_model: onnx.ModelProto) -> int:
    """Rewrite every Q(int8) → Clip(−8, 7) → DQ into Q(int4) → DQ (uint8 / 0..15 into uint4, the zero
    point's Cast with it): the same numbers, in the types an NPU toolchain reads. Returns how many."""
    graph = graph_model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = _constant_values(graph)
    retyped, dropped, renamed = set(), [], {}
    for clip in graph.node:
        q = producer.get(clip.input[0]) if clip.op_type == "Clip" else None
        if q is None or q.op_type != "QuantizeLinear" or len(clip.input) != 3:
            continue
        attrs = {a.name: a for a in q.attribute}
        dtype = attrs["output_dtype"].i if "output_dtype" in attrs else None
        if dtype not in _NARROW:
            continue
        narrow, low, high = _NARROW[dtype]
        bounds = [constants.get(name) for name in clip.input[1:]]
        if any(b is None or b.size != 1 or int(b) != v for b, v in zip(bounds, (low, high), strict=True)):
            continue
        attrs["output_dtype"].i = narrow
        retyped.add(q.output[0])
        if len(q.input) == 3:  # the runtime zero point: Cast(...) to the narrow type too
            cast = producer[q.input[2]]
            next(a for a in cast.attribute if a.name == "to").i = narrow
            retyped.add(cast.output[0])
        renamed[clip.output[0]] = q.output[0]
        dropped.append(clip)
    bounds = {name for clip in dropped for name in clip.input[1:]}
    for clip in dropped:
        graph.node.remove(clip)
    still_used = {name for node in graph.node for name in node.input}
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in bounds - still_used]:
        graph.node.remove(node)
    for init in [i for i in graph.initializer if i.name in bounds - still_used]:
        graph.initializer.remove(init)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    stale = [vi for vi in graph.value_info if vi.name in retyped or vi.name in renamed]
    for vi in stale:
        graph.value_info.remove(vi)
    return len(dropped)


# Operators whose outputs are not a function of their inputs and attributes: two of them with equal
# inputs still compute different values, so they are never merged.
_NONDETERMINISTIC = frozenset(
    {"Bernoulli", "Dropout", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform",
     "RandomUniformLike"}
)  # fmt: skip
_STANDARD_DOMAINS = ("", "ai.onnx")  # other domains' operators are not known to be pure
_SUBGRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _tensor_key(tensor: onnx.TensorProto) -> tuple:
    """A tensor by value: type, shape and the bytes of its elements, whatever its name and however
    they are stored (raw_data or the typed fields). Strings and external data: by their serialized
    form without the name (equal tensors may then look different, which only misses a merge)."""
    if tensor.data_type != TensorProto.STRING and tensor.data_location != TensorProto.EXTERNAL:
        return (tensor.data_type, tuple(tensor.dims), numpy_helper.to_array(tensor).tobytes())
    copy = TensorProto()
    copy.CopyFrom(tensor)
    copy.name, copy.doc_string = "", ""
    return (tensor.data_type, copy.SerializeToString(deterministic=True))


def _attribute_key(attr: onnx.AttributeProto) -> tuple:
    """An attribute by name, type and value (tensors by value, see ``_tensor_key``); its doc_string,
    which changes nothing, left out."""
    if attr.type == onnx.AttributeProto.TENSOR:
        return (attr.name, attr.type, _tensor_key(attr.t))
    copy = onnx.AttributeProto()
    copy.CopyFrom(attr)
    copy.doc_string = ""
    return (attr.name, attr.type, copy.SerializeToString(deterministic=True))


def _node_key(node: onnx.NodeProto) -> tuple | None:
    """What decides the values a node computes: its operator (domain, type, overload), its inputs
    by name, its attributes by value, and which of its optional outputs it makes (a node that makes
    fewer cannot stand in for one that makes more). None for a node that must not be merged: one of
    another domain, a random one, or one with a subgraph (If, Loop, Scan: its body may read names
    from the graph around it)."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    if domain not in _STANDARD_DOMAINS or node.op_type in _NONDETERMINISTIC:
        return None
    if any(attr.type in _SUBGRAPH_TYPES for attr in node.attribute):
        return None
    attrs = tuple(sorted(_attribute_key(attr) for attr in node.attribute))
    made = tuple(bool(name) for name in node.output)
    return (domain, node.op_type, node.overload, tuple(node.input), attrs, made)


def _names_read_by_subgraphs(graph: onnx.GraphProto) -> set[str]:
    """Every name a node inside a subgraph of ``graph`` reads (at any depth): such a tensor keeps its
    producer, since the merge rewires only the top-level graph's inputs."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies if attr.type in _SUBGRAPH_TYPES else []:
                names |= {name for inner in body.node for name in inner.input}
                names |= _names_read_by_subgraphs(body)
    return names


def _merge_once(graph: onnx.GraphProto, kept_names: set[str]) -> int:
    """One pass of ``merge_duplicate_nodes`` in graph order: each node's inputs are rewired to the
    merged names first, so a chain of duplicates (Abs → ReduceMax → Mul → … → QuantizeLinear →
    DequantizeLinear) collapses in one pass of a topologically sorted graph. Returns how many nodes
    were removed."""
    first_of: dict[tuple, onnx.NodeProto] = {}
    renamed: dict[str, str] = {}
    kept, removed = [], []
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        key = _node_key(node)
        original = first_of.setdefault(key, node) if key is not None else node
        if original is node or any(name in kept_names for name in node.output):
            kept.append(node)
            continue
        for mine, theirs in zip(node.output, original.output, strict=True):
            if mine:
                renamed[mine] = theirs
        removed.append(node)
    if not removed:
        return 0
    for node in kept:  # a graph out of topological order may read a name before it was merged
        node.input[:] = [renamed.get(name, name) for name in node.input]
    _drop_value_info(graph, renamed)
    del graph.node[:]
    graph.node.extend(kept)
    return len(removed)


def _drop_value_info(graph: onnx.GraphProto, names: Container[str]) -> None:
    """Remove the value_info of tensors no node makes any more (``names``: renamed away)."""
    stale = [vi for vi in graph.value_info if vi.name in names]
    for vi in stale:
        graph.value_info.remove(vi)


# initializers up to this size are compared by value (activation shifts, a few KiB); weights are not
_ALIASED_INITIALIZER_BYTES = 1 << 16


def _alias_copies(graph: onnx.GraphProto, kept_names: set[str]) -> int:
    """Copies of one tensor read under one name: an Identity node's consumers read its input (the
    node goes), and small initializers with equal type, shape and bytes the first one's name.
    The traced linears that read one input each carry their own copy of its shift
    (``QuantInputLinear.shift``): equal tensors, which the exporter writes as initializers or as
    Identity nodes of the first; once they are one name, the Sub nodes reading them merge as the
    rest of the chain does. ``kept_names`` (graph inputs and outputs, names that a subgraph reads)
    keep their producers. Returns how many Identity nodes were removed."""
    identities = [n for n in graph.node if n.op_type == "Identity" and n.domain in ("", "ai.onnx")
                  and n.output[0] not in kept_names]  # fmt: skip
    alias = {node.output[0]: node.input[0] for node in identities}
    first: dict[tuple, str] = {}
    for init in graph.initializer:
        if init.data_location == TensorProto.EXTERNAL or init.name in kept_names:
            continue
        data = init.raw_data or numpy_helper.to_array(init).tobytes()
        if len(data) > _ALIASED_INITIALIZER_BYTES:
            continue
        key = (init.data_type, tuple(init.dims), data)
        original = first.setdefault(key, init.name)
        if original != init.name:
            alias[init.name] = original
    if not alias:
        return 0

    def resolve(name: str) -> str:
        while name in alias:  # an Identity of an Identity, or of an aliased initializer
            name = alias[name]
        return name

    nodes = [node for node in graph.node if node.op_type != "Identity" or node.output[0] not in alias]
    for node in nodes:
        node.input[:] = [resolve(name) for name in node.input]
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_value_info(graph, alias)
    kept = [init for init in graph.initializer if init.name not in alias]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(identities)


def merge_duplicate_nodes(graph_model: onnx.ModelProto) -> int:
    """Common-subexpression elimination: of the nodes that compute the same values (same operator and
    domain, the same inputs, equal attributes, Constant nodes compared by value), the first is kept
    and the others' consumers read its outputs; repeated until nothing merges. Returns how many nodes
    were removed.

    Why: each ``edgeq.activations.QuantInputLinear`` traces its own per-token activation quantizer,
    so the linears reading one tensor (q/k/v, gate/up) each get an identical ReduceMax → … →
    QuantizeLinear → DequantizeLinear chain on it. NPU toolchains expect one Q/DQ pair per tensor,
    shared by its consumers; after this pass a block has four (attention input, o_proj input, MLP
    input, down_proj input). The merged nodes computed the same values, so the graph's outputs are
    bit for bit the same.

    Copies of one tensor count as one (``_alias_copies``; its removed Identity nodes are counted
    too). Only what is safe merges: operators of the standard ONNX domain that are functions of their
    inputs (not the random ones, not those with subgraphs); a node making a graph output stays (its
    name is the graph's interface), as does one whose output a subgraph reads. Weight
    DequantizeLinear nodes read distinct initializers, so each keeps its one MatMul, the pattern
    ``exporters.ort_matmulnbits`` converts. Removing a duplicate leaves nothing else unused: its
    inputs are its original's."""
    graph = graph_model.graph
    kept_names = {vi.name for vi in graph.output} | _names_read_by_subgraphs(graph)
    total = _alias_copies(graph, kept_names | {vi.name for vi in graph.input})
    while removed := _merge_once(graph, kept_names):
        total += removed
    return total


def _tensor_bytes(init: onnx.TensorProto) -> int:
    if init.HasField("raw_data") or init.data_location == TensorProto.EXTERNAL:
        ext = {e.key: e.value for e in init.external_data}
        return int(ext["length"]) if "length" in ext else len(init.raw_data)
    return numpy_helper.to_array(init).nbytes


def component_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Initializer bytes by component: ``embedding`` (the table a Gather reads, float or int4),
    ``lm_head`` (the weights of the node producing ``logits``, reached through Transpose, Cast or
    DequantizeLinear; 0 when tied to the embedding) and ``blocks`` (everything else). A weight split
    in two by ``exporters.openvino_form`` (a Concat of two DequantizeLinear, or logits made by the
    Add of two MatMuls) counts where the whole one did."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def parts(node: onnx.NodeProto | None, op_type: str) -> list[onnx.NodeProto]:
        """The two halves of a split weight (``op_type`` nodes) that ``node`` joins, else []."""
        if node is None or node.op_type not in ("Concat", "Add"):
            return []
        halves = [producer.get(name) for name in node.input]
        return halves if all(h is not None and h.op_type == op_type for h in halves) else []

    embedding: set[str] = set()
    for node in graph.node:
        if node.op_type in ("Gather", "GatherBlockQuantized"):
            table = producer.get(node.input[0])
            tables = parts(table, "DequantizeLinear") or [table]
            sources = [
                name for t in tables if t is not None and t.op_type == "DequantizeLinear" for name in t.input
            ]
            embedding |= {name for name in sources or node.input if name in inits and name != node.input[1]}
    head: set[str] = set()
    frontier = [n for n in graph.node if "logits" in n.output]
    frontier = [half for n in frontier for half in parts(n, "MatMul") or [n]]
    while frontier:
        node = frontier.pop()
        for name in node.input:
            if name in inits:
                head.add(name)
            elif name in producer and producer[name].op_type in ("Transpose", "Cast", "DequantizeLinear"):
                frontier.append(producer[name])
    sizes = {"embedding": 0, "blocks": 0, "lm_head": 0}
    for name, init in inits.items():
        part = "embedding" if name in embedding else "lm_head" if name in head else "blocks"
        sizes[part] += _tensor_bytes(init)
    return sizes


def save_onnx(graph_model: onnx.ModelProto, path: Path) -> bool:
    """Save, with external data when the weights would pass protobuf's 2 GiB limit; returns whether
    external data was used."""
    external = graph_model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        graph_model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_FILE,
        size_threshold=1024,
    )
    return external


def export_qdq(
    model,
    weights: dict[str, QuantizedWeight],
    out_dir: Path,
    opset: int = DEFAULT_OPSET,
    tables: dict[str, QuantizedWeight] | None = None,
    form: str = "standard",
) -> OnnxExportInfo:
    """Write ``out_dir/model.onnx`` (+ config files) for a model whose quantized linears (and
    quantized embedding, ``tables``) hold their dequantized weights; ``form`` "openvino" rewrites
    it into the form OpenVINO reads (``exporters.openvino_form``). Checked with ``onnx.checker``
    (full_check)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeq-onnx-") as tmp:
        fp_path = export_decoder_with_past(model, Path(tmp), opset)
        return qdq_from_trace(fp_path, weights, out_dir, tables, form)


def qdq_from_trace(
    fp_path: Path, weights: dict[str, QuantizedWeight], out_dir: Path,
    tables: dict[str, QuantizedWeight] | None = None, form: str = "standard",
) -> OnnxExportInfo:  # fmt: skip
    """The QDQ model from optimum's float export at ``fp_path`` (its config files copied beside):
    needs the integer weights only, not the PyTorch model, which may be freed before."""
    check_form(form)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph_model = onnx.load(str(fp_path))
    replaced = replace_weights_with_qdq(graph_model, weights, tables)
    share_tied_table(graph_model)
    narrow_activation_qdq(graph_model)
    merged = merge_duplicate_nodes(graph_model)  # one activation Q/DQ pair per shared input
    rewrites = to_openvino_form(graph_model) if form == "openvino" else {}
    for extra in fp_path.parent.iterdir():
        if extra.suffix == ".json" and not (out_dir / extra.name).exists():
            shutil.copy2(extra, out_dir / extra.name)
    info = write_model(graph_model, out_dir, replaced, merged)
    return dataclasses.replace(info, form_rewrites=rewrites)


def onnx_bytes(folder: Path) -> int:
    """model.onnx and its external data file, whatever the exporter named it (model.onnx_data, .data)."""
    return sum(p.stat().st_size for p in folder.glob("model.onnx*") if p.is_file())


def write_model(
    graph_model: onnx.ModelProto, out_dir: Path, replaced: int, merged_nodes: int = 0
) -> OnnxExportInfo:
    """Save ``out_dir/model.onnx`` (replacing any earlier one and its external data), check it with
    ``onnx.checker`` (full_check) and describe it (``merged_nodes``: what ``merge_duplicate_nodes``
    removed)."""
    path = out_dir / MODEL_FILE
    (out_dir / EXTERNAL_DATA_FILE).unlink(missing_ok=True)
    raise_opset_for_int2(graph_model)
    external = save_onnx(graph_model, path)
    onnx.checker.check_model(str(path), full_check=True)
    total = onnx_bytes(out_dir)
    return OnnxExportInfo(
        path, replaced, total, external, component_bytes(graph_model), merged_nodes=merged_nodes
    )
