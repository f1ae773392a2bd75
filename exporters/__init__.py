"""Deployable graphs from a quantized model, one module per target format.

    info = export_onnx(model, adapter, result, out_dir, "ort")      # a model held in memory
    writer = graph_writer(model, adapter, out_dir, "ort", blockers)  # the streamed export:
    writer.begin(tables); writer.add_block(i, block, qweights) ...; info = writer.finish(weights)

``qdq``: optimum's graph with int4 DequantizeLinear weights, for NPU toolchains (``qdq_form``
"openvino": rewritten into the form OpenVINO's ONNX frontend reads, ``openvino_form``).
``ort``: ONNX Runtime's fast path: where the model allows it, a graph of ORT's fused operators
(``ort_fused``); otherwise optimum's graph with MatMulNBits weights, and ``info.not_fused`` says why.

Both writers take one block at a time and write its weights out before the next: the fused graph
is built block by block, and optimum's graph is traced block by block in one-layer shells and
stitched (``block_trace``). ``onnx_qdq.export_qdq`` still traces a model held in memory whole: the
reference the stitched graph is tested against.
"""

from __future__ import annotations

from pathlib import Path

from edgeq.models.adapters import Adapter
from exporters.block_trace import BlockTraceWriter
from exporters.onnx_qdq import DEFAULT_OPSET, OnnxExportInfo
from exporters.ort_fused import FusedDecoderWriter, fused_graph_blockers

FORMATS = ("qdq", "ort")


def export_onnx(
    model, adapter, result, out_dir: Path, fmt: str, opset: int = DEFAULT_OPSET, dtype: str = "float32",
    qdq_form: str = "standard",
) -> OnnxExportInfo:  # fmt: skip
    """Write ``model`` (quantized in place; ``result`` its pipeline QuantizationResult, or None for a
    float model) as ``out_dir``/model.onnx in format ``fmt``: its blocks fed to ``graph_writer``."""
    weights = result.weights if result is not None else {}
    tables = result.tables if result is not None else {}
    blockers = fused_graph_blockers(model, adapter) if fmt == "ort" else []
    writer = graph_writer(model, adapter, out_dir, fmt, blockers, opset, dtype, qdq_form)
    writer.begin(tables)
    for i, block in enumerate(adapter.blocks(model)):
        names = {role: adapter.linear_name(i, role) for role in adapter.linears(block)}
        writer.add_block(i, block, {role: weights[name] for role, name in names.items() if name in weights})
    return writer.finish(weights)


def graph_writer(
    model, adapter: Adapter, out_dir: Path, fmt: str, blockers: list[str], opset: int = DEFAULT_OPSET,
    dtype: str = "float32", qdq_form: str = "standard",
) -> FusedDecoderWriter | BlockTraceWriter:  # fmt: skip
    """The writer of the streamed export: the fused graph where the ort format can use it
    (``blockers`` empty), else optimum's graph traced block by block (``qdq_form``: the qdq graph's
    form, ``exporters.openvino_form``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown ONNX format '{fmt}': choose one of {', '.join(FORMATS)}")
    if fmt == "ort" and not blockers:
        return FusedDecoderWriter(model, adapter, out_dir, opset, dtype=dtype)
    return BlockTraceWriter(model, adapter, out_dir, fmt, opset, not_fused=tuple(blockers), dtype=dtype,
                            qdq_form=qdq_form)  # fmt: skip
