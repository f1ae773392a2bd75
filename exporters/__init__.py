"""Deployable graphs from a quantized model, one module per target format.

    info = export_onnx(model, adapter, result, out_dir, "ort")

``qdq``: optimum's export with int4 DequantizeLinear weights (``onnx_qdq``), for NPU toolchains.
``ort``: ONNX Runtime's fast path: where the model allows it, a graph of ORT's fused operators
(``ort_fused``); otherwise optimum's graph with MatMulNBits weights (``ort_matmulnbits``), and
``info.not_fused`` says why.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from exporters.onnx_qdq import DEFAULT_OPSET, OnnxExportInfo, export_qdq
from exporters.ort_fused import export_fused, fused_graph_blockers
from exporters.ort_matmulnbits import to_matmulnbits

FORMATS = ("qdq", "ort")


def export_onnx(
    model, adapter, result, out_dir: Path, fmt: str, opset: int = DEFAULT_OPSET
) -> OnnxExportInfo:
    """Write ``model`` (quantized in place; ``result`` its pipeline QuantizationResult, or None for a
    float model) as ``out_dir``/model.onnx in format ``fmt``."""
    weights = result.weights if result is not None else {}
    tables = result.tables if result is not None else {}
    if fmt == "qdq":
        return export_qdq(model, weights, out_dir, opset, tables=tables)
    if fmt != "ort":
        raise ValueError(f"unknown ONNX format '{fmt}': choose one of {', '.join(FORMATS)}")
    blockers = fused_graph_blockers(model, adapter)
    if not blockers:
        return dataclasses.replace(
            export_fused(model, adapter, weights, tables, out_dir, opset), graph="fused"
        )
    info = to_matmulnbits(export_qdq(model, weights, out_dir, opset, tables=tables))
    return dataclasses.replace(info, not_fused=tuple(blockers))
