"""The ``qdq`` graph in the form OpenVINO's ONNX frontend reads (``--qdq-form openvino``).

OpenVINO 2026.4's ONNX frontend rejects two constructs of the standard graph (found with one-node
repro graphs, ``tests/test_openvino.py``); everything else in it (int4/uint4 codes and zero points,
opset 21, per-channel and evenly blocked DequantizeLinear, external data, optimum's attention) it
reads, and its CPU plugin computes what ONNX Runtime does:

1. a blocked ``DequantizeLinear`` whose axis is not a whole number of blocks (the shorter last block
   that ONNX defines: SmolLM2's 576 inputs are 4.5 blocks of 128): "DequantizeLinear doesn't support
   case when dimension of X at axis 0 (576) cannot be divided by block_size (128)";
2. a blocked ``QuantizeLinear``/``DequantizeLinear`` on a tensor with dynamic dimensions, the
   per-token activation pair of W4A4 (one block over the last axis of [batch, length, d]):
   "DequantizeLinear cannot operate with dynamic shapes of input X". Written per axis on the rows
   of a [rows, d] view instead (axis 0, the scale a vector of rows), it is read but run wrongly: the
   frontend leaves a 1-D scale on a dynamic axis unreshaped and OpenVINO broadcasts it along the
   last axis, a shape error at run time.

The rewrites below compute the same numbers in forms it reads, all standard ONNX (ONNX Runtime runs
them too, tested): a ragged weight becomes two evenly blocked weights and two MatMuls on slices of
the input; a per-token pair is applied per axis to the transposed [d, rows] view, so the scale
vector lies along the last axis, where every broadcast agrees.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import EdgeqError
from edgeq.packing import pack_bits

QDQ_FORMS = ("standard", "openvino")
# integer weight types DequantizeLinear reads → bits per element
_INTEGER_BITS = {
    TensorProto.INT2: 2, TensorProto.UINT2: 2, TensorProto.INT4: 4, TensorProto.UINT4: 4,
    TensorProto.INT8: 8, TensorProto.UINT8: 8,
}  # fmt: skip
_SIGNED = {TensorProto.INT2, TensorProto.INT4, TensorProto.INT8}


def check_form(form: str) -> None:
    """A one-line error for a ``--qdq-form`` that does not exist."""
    if form not in QDQ_FORMS:
        raise EdgeqError(f"unknown qdq form '{form}': choose one of {', '.join(QDQ_FORMS)}")


def _attrs(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}


def _integer_array(tensor: onnx.TensorProto) -> np.ndarray:
    """An integer initializer's values as int8 / uint8, whatever its width."""
    dtype = np.int8 if tensor.data_type in _SIGNED else np.uint8
    return numpy_helper.to_array(tensor).astype(dtype)


def _integer_tensor(name: str, values: np.ndarray, data_type: int) -> onnx.TensorProto:
    """``values`` stored as ``data_type`` (packed when 2- or 4-bit)."""
    bits = _INTEGER_BITS[data_type]
    if bits == 8:
        return numpy_helper.from_array(values.astype(np.int8 if data_type in _SIGNED else np.uint8), name)
    return helper.make_tensor(name, data_type, list(values.shape), pack_bits(values, bits), raw=True)


def _slice_along(tensor: onnx.TensorProto, axis: int, start: int, stop: int, name: str) -> onnx.TensorProto:
    """Rows start:stop of an initializer along ``axis``, in its own type."""
    if tensor.data_type in _INTEGER_BITS:
        values = np.take(_integer_array(tensor), np.arange(start, stop), axis=axis)
        return _integer_tensor(name, values, tensor.data_type)
    values = numpy_helper.to_array(tensor)
    return numpy_helper.from_array(np.take(values, np.arange(start, stop), axis=axis), name)


def _constant(name: str, values: list[int]) -> onnx.NodeProto:
    """An int64 Constant node: merged by value (``merge_duplicate_nodes``), and named in the scope
    of the nodes that read it, so a traced layer keeps it."""
    value = numpy_helper.from_array(np.array(values, np.int64))
    return helper.make_node("Constant", [], [name], name=name, value=value)


def ragged_blocked_weights(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The blocked DequantizeLinear nodes of initializers whose blocked axis is not a whole number
    of blocks (what OpenVINO rejects)."""
    inits = {init.name: init for init in graph.initializer}
    found = []
    for node in graph.node:
        attrs = _attrs(node)
        if (
            node.op_type != "DequantizeLinear"
            or attrs.get("block_size", 0) <= 0
            or node.input[0] not in inits
        ):
            continue
        dims = inits[node.input[0]].dims
        if dims[attrs.get("axis", 1) % len(dims)] % attrs["block_size"]:
            found.append(node)
    return found


def _dequantize_part(
    dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto], part: str, rows: tuple[int, int]
) -> tuple[list[onnx.TensorProto], onnx.NodeProto]:
    """Rows ``start:stop`` (along the blocked axis) of ``dq``'s weight as their own blocked
    DequantizeLinear: the codes' rows, the scales' and zero points' blocks. ``start`` is a block
    boundary; the part is blocked by the original block size, or is the one shorter last block."""
    attrs = _attrs(dq)
    codes = inits[dq.input[0]]
    axis, block = attrs.get("axis", 1) % len(codes.dims), attrs["block_size"]
    start, stop = rows
    tensors = [_slice_along(codes, axis, start, stop, f"{codes.name}_{part}")]
    for name in dq.input[1:]:
        tensors.append(_slice_along(inits[name], axis, start // block, -(-stop // block), f"{name}_{part}"))
    node = helper.make_node(
        "DequantizeLinear", [t.name for t in tensors], [f"{dq.output[0]}_{part}"],
        name=f"{dq.name or dq.output[0]}_{part}", axis=axis, block_size=min(block, stop - start),
    )  # fmt: skip
    return tensors, node


def _op(op_type: str, inputs: list[str], output: str, name: str, **attrs) -> onnx.NodeProto:
    """A one-output node."""
    return helper.make_node(op_type, inputs, [output], name=name, **attrs)


def _split_matmul(
    matmul: onnx.NodeProto, weights: tuple[str, str], main: int, length: int
) -> list[onnx.NodeProto]:
    """MatMul(A, W) as MatMul(A[..., :main], W_main) + MatMul(A[..., main:length], W_tail), named in
    the MatMul's scope (a traced layer's nodes are told by their names); the Add makes the MatMul's
    output."""
    base, a = matmul.name or matmul.output[0], matmul.input[0]
    bounds = {"zero": 0, "main": main, "length": length, "axis": -1}
    constants = [_constant(f"{base}/ragged_{key}", [value]) for key, value in bounds.items()]
    zero, mid, end, axis = (c.output[0] for c in constants)
    nodes = [*constants]
    for part, weight, (start, stop) in (("main", weights[0], (zero, mid)), ("tail", weights[1], (mid, end))):
        nodes.append(_op("Slice", [a, start, stop, axis], f"{base}/{part}_input", f"{base}/Slice_{part}"))
        nodes.append(
            _op("MatMul", [nodes[-1].output[0], weight], f"{base}/{part}_output", f"{base}/MatMul_{part}")
        )
    nodes.append(
        _op("Add", [nodes[-3].output[0], nodes[-1].output[0]], matmul.output[0], f"{base}/Add_parts")
    )
    return nodes


def split_ragged_blocks(graph_model: onnx.ModelProto) -> int:
    """Rewrite each blocked integer weight W whose axis (length K) ends in a shorter block of r
    rows into W_main (the K − r rows of whole blocks) and W_tail (the last r rows, one block of r):
    the same codes, scales and zero points, both evenly blocked. A MatMul(A, W) reading W [K, N]
    becomes MatMul(A[..., :K − r], W_main) + MatMul(A[..., K − r:], W_tail), so every weight keeps its
    own DequantizeLinear → MatMul, the pattern runtimes fuse; any other reader (a Gather of a
    quantized embedding, the Transpose of a tied table) reads Concat(W_main, W_tail) along the axis.
    The graph must be in topological order (the parts take the places of what they replace).
    Returns how many weights were split."""
    graph = graph_model.graph
    ragged = {node.output[0] for node in ragged_blocked_weights(graph)}
    if not ragged:
        return 0
    inits = {init.name: init for init in graph.initializer}
    everything = list(graph.node)
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(everything):
        for name in node.input:
            readers.setdefault(name, []).append(i)
    replacement: dict[int, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    for i, dq in enumerate(everything):
        if dq.op_type != "DequantizeLinear" or dq.output[0] not in ragged:
            continue
        attrs = _attrs(dq)
        dims = inits[dq.input[0]].dims
        axis = attrs.get("axis", 1) % len(dims)
        length = dims[axis]
        main = length - length % attrs["block_size"]
        if main == 0:  # one block, shorter than block_size: the same numbers as a block of its length
            next(a for a in dq.attribute if a.name == "block_size").i = length
            continue
        made = []
        for part, rows in (("main", (0, main)), ("tail", (main, length))):
            tensors, node = _dequantize_part(dq, inits, part, rows)
            new_inits += tensors
            made.append(node)
        parts = (made[0].output[0], made[1].output[0])
        weight, rest = dq.output[0], []
        for j in readers.get(weight, []):
            reader = everything[j]
            if reader.op_type == "MatMul" and reader.input[1] == weight != reader.input[0] and axis == 0:
                replacement[j] = _split_matmul(reader, parts, main, length)
            else:
                rest.append(j)
        if rest:
            made.append(_op("Concat", list(parts), weight, f"{made[0].name}_Concat", axis=axis))
        replacement[i] = made
    nodes = [new for i, node in enumerate(everything) for new in replacement.get(i, [node])]
    # the split weights' whole tensors go; an initializer nothing read before stays as it was
    read_now = {name for node in nodes for name in node.input}
    read_before = {name for node in everything for name in node.input}
    kept = [init for init in graph.initializer if init.name in read_now or init.name not in read_before]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    return len(ragged)


def _quantize_transposed_rows(
    q: onnx.NodeProto, width: int, producers: dict[str, onnx.NodeProto]
) -> tuple[list[onnx.NodeProto], list[str]]:
    """``q`` (a per-token QuantizeLinear of x [..., width]) as QuantizeLinear along axis 1 of the
    [width, rows] view of x, its scale and zero point [..., 1] as vectors [rows]: the nodes, and
    the names of the vectors its DequantizeLinear reads too. It keeps q's name; its output is new.

    A zero point made by a Cast (to uint4: ONNX Runtime has no Reshape for 4-bit types) is made
    again from its float input reshaped."""
    base = q.name or q.output[0]
    rows_shape = _constant(f"{base}/per_axis_rows_shape", [-1, width])
    vector_shape = _constant(f"{base}/per_axis_vector_shape", [-1])
    nodes = [rows_shape, vector_shape]
    nodes.append(
        _op("Reshape", [q.input[0], rows_shape.output[0]], f"{base}/per_axis_rows", f"{base}/Reshape_rows")
    )
    nodes.append(
        _op("Transpose", [nodes[-1].output[0]], f"{base}/per_axis_view", f"{base}/Transpose", perm=[1, 0])
    )
    view = nodes[-1].output[0]
    vectors = []
    for name, role in zip(q.input[1:], ("scale", "zero_point"), strict=False):
        vector = f"{base}/per_axis_{role}"
        cast = producers.get(name)
        if cast is not None and cast.op_type == "Cast":
            to = {a.name: a.i for a in cast.attribute}["to"]
            nodes.append(
                _op(
                    "Reshape", [cast.input[0], vector_shape.output[0]], f"{vector}_float", f"{vector}_Reshape"
                )
            )
            nodes.append(_op("Cast", [f"{vector}_float"], vector, f"{vector}_Cast", to=to))
        else:
            nodes.append(_op("Reshape", [name, vector_shape.output[0]], vector, f"{vector}_Reshape"))
        vectors.append(vector)
    dtype = {a.name: a.i for a in q.attribute}.get("output_dtype")
    extra = {"output_dtype": dtype} if dtype is not None else {}
    nodes.append(_op("QuantizeLinear", [view, *vectors], f"{q.output[0]}_per_axis", q.name, axis=1, **extra))
    return nodes, vectors


def _dequantize_back(dq: onnx.NodeProto, quantized: str, vectors: list[str], x: str) -> list[onnx.NodeProto]:
    """``dq`` on the transposed view: DequantizeLinear along axis 1, transposed back, reshaped to
    the shape of the quantizer's input ``x``, into dq's own output."""
    base = dq.name or dq.output[0]
    return [
        _op("DequantizeLinear", [quantized, *vectors], f"{base}/per_axis_view", dq.name, axis=1),
        _op(
            "Transpose", [f"{base}/per_axis_view"], f"{base}/per_axis_rows", f"{base}/Transpose", perm=[1, 0]
        ),
        _op("Shape", [x], f"{base}/input_shape", f"{base}/Shape"),
        _op("Reshape", [f"{base}/per_axis_rows", f"{base}/input_shape"], dq.output[0], f"{base}/Reshape"),
    ]


def per_token_qdq_per_axis(graph_model: onnx.ModelProto) -> int:
    """Rewrite each per-token activation pair, QuantizeLinear → DequantizeLinear of x [..., d] with a
    scale (and zero point) [..., 1] computed at run time and one block of d along the last axis,
    into per-axis quantization of the [d, rows] view of x (rows: the product of its other axes)
    along axis 1, the scale and zero point as vectors of rows, and the result transposed and
    reshaped back to x's shape. Same grid, same rounding, same numbers. Returns how many pairs."""
    graph = graph_model.graph
    constants = {init.name for init in graph.initializer}
    constants |= {node.output[0] for node in graph.node if node.op_type == "Constant"}
    everything = list(graph.node)
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(everything):
        for name in node.input:
            readers.setdefault(name, []).append(i)
    producers = {out: node for node in everything for out in node.output}
    replacement: dict[int, list[onnx.NodeProto]] = {}
    for i, q in enumerate(everything):
        attrs = _attrs(q)
        if q.op_type != "QuantizeLinear" or attrs.get("block_size", 0) <= 0 or attrs.get("axis", 1) != -1:
            continue
        if q.input[1] in constants:  # a static scale: not a per-token pair
            continue
        pairs = readers.get(q.output[0], [])
        dqs = [everything[j] for j in pairs]
        if not dqs or any(d.op_type != "DequantizeLinear" or d.input[1:] != q.input[1:] for d in dqs):
            continue
        replacement[i], vectors = _quantize_transposed_rows(q, attrs["block_size"], producers)
        for j in pairs:
            replacement[j] = _dequantize_back(
                everything[j], replacement[i][-1].output[0], vectors, q.input[0]
            )
    if not replacement:
        return 0
    nodes = [new for i, node in enumerate(everything) for new in replacement.get(i, [node])]
    read = {name for node in nodes for name in node.input} | {vi.name for vi in graph.output}
    quantizers = [everything[i] for i in replacement if everything[i].op_type == "QuantizeLinear"]
    zero_points = {q.input[2] for q in quantizers if len(q.input) > 2}
    # the zero points' Casts that the vectors bypass, now read by nobody
    nodes = [node for node in nodes if not node.output or node.output[0] not in zero_points - read]
    del graph.node[:]
    graph.node.extend(nodes)
    stale = {q.output[0] for q in quantizers}
    for vi in [vi for vi in graph.value_info if vi.name in stale]:
        graph.value_info.remove(vi)
    return len(stale)


def to_openvino_form(graph_model: onnx.ModelProto) -> dict[str, int]:
    """Both rewrites (see the module's docstring); how many of each."""
    return {
        "ragged_weights_split": split_ragged_blocks(graph_model),
        "activation_pairs_per_axis": per_token_qdq_per_axis(graph_model),
    }
