"""Deployable graphs from a quantized model, one module per target format.

    info = export_onnx(model, adapter, result, out_dir, "ort")      # a model held in memory
    writer = graph_writer(model, adapter, out_dir, "ort", blockers)  # the streamed export:
    writer.begin(tables); writer.add_block(i, block, qweights) ...; info = writer.finish(weights)

``qdq``: optimum's export with int4 DequantizeLinear weights (``onnx_qdq``), for NPU toolchains.
``ort``: ONNX Runtime's fast path: where the model allows it, a graph of ORT's fused operators
(``ort_fused``, written block by block into external data); otherwise optimum's graph with
MatMulNBits weights (``ort_matmulnbits``), and ``info.not_fused`` says why.

optimum traces a whole model, so its writer (``TracedGraphWriter``) keeps every quantized block in
memory until ``finish``; only the fused graph streams.
"""

from __future__ import annotations

import dataclasses
import gc
import tempfile
from pathlib import Path

from edgeq.memory import trim_heap
from edgeq.models.adapters import Adapter
from edgeq.quant.grid import QuantizedWeight
from exporters.onnx_qdq import (
    DEFAULT_OPSET,
    OnnxExportInfo,
    export_decoder_with_past,
    export_qdq,
    qdq_from_trace,
)
from exporters.ort_fused import FusedDecoderWriter, export_fused, fused_graph_blockers
from exporters.ort_matmulnbits import to_matmulnbits

FORMATS = ("qdq", "ort")


def export_onnx(
    model, adapter, result, out_dir: Path, fmt: str, opset: int = DEFAULT_OPSET, dtype: str = "float32"
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
        return export_fused(model, adapter, weights, tables, out_dir, opset, dtype=dtype)
    info = to_matmulnbits(export_qdq(model, weights, out_dir, opset, tables=tables))
    return dataclasses.replace(info, not_fused=tuple(blockers))


@dataclasses.dataclass
class TracedGraphWriter:
    """optimum's traced graph (qdq, or ort where the fused graph cannot express the model), with the
    writer interface of the streamed export. ``keeps_blocks``: the block source must leave every
    quantized block in memory, since the trace at ``finish`` runs the whole model."""

    model: object
    adapter: Adapter
    out_dir: Path
    fmt: str
    opset: int = DEFAULT_OPSET
    tables: dict[str, QuantizedWeight] = dataclasses.field(default_factory=dict)
    keeps_blocks: bool = True

    def begin(self, tables: dict[str, QuantizedWeight]) -> None:
        self.tables = tables

    def add_block(self, index: int, block, qweights: dict[str, QuantizedWeight]) -> None:
        """Nothing to write yet: the block stays in the model for the trace."""

    def finish(self, weights: dict[str, QuantizedWeight]) -> OnnxExportInfo:
        """Trace the model, let it go (this writer should hold the last reference: the trace's
        float graph and the model need not be in memory together), then write the integer graph."""
        with tempfile.TemporaryDirectory(prefix="edgeq-onnx-") as tmp:
            fp_path = export_decoder_with_past(self.model, Path(tmp), self.opset)
            blockers = fused_graph_blockers(self.model, self.adapter) if self.fmt == "ort" else []
            self.model = None
            gc.collect()
            trim_heap()
            info = qdq_from_trace(fp_path, weights, self.out_dir, self.tables)
        if self.fmt == "qdq":
            return info
        return dataclasses.replace(to_matmulnbits(info), not_fused=tuple(blockers))


def graph_writer(
    model, adapter: Adapter, out_dir: Path, fmt: str, blockers: list[str], opset: int = DEFAULT_OPSET,
    dtype: str = "float32",
) -> FusedDecoderWriter | TracedGraphWriter:  # fmt: skip
    """The writer of the streamed export: the fused graph where the ort format can use it
    (``blockers`` empty), else optimum's trace."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown ONNX format '{fmt}': choose one of {', '.join(FORMATS)}")
    if fmt == "ort" and not blockers:
        return FusedDecoderWriter(model, adapter, out_dir, opset, dtype=dtype)
    if dtype != "float32":
        raise ValueError(f"a float16 graph is written for the fused ort format only, not {fmt}")
    return TracedGraphWriter(model, adapter, out_dir, fmt, opset)
