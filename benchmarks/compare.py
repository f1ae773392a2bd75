"""edgeq against ONNX Runtime's own weight quantizer, on one model, with the same data for every row.

    python benchmarks/compare.py                      # SmolLM2, the settings the README shows
    python benchmarks/compare.py --eval-windows all   # perplexity on the whole WikiText-2 test string
    python benchmarks/compare.py --model path/to/hf-folder --rows fp32,ort-default,edgeq-gptq-g128

Rows (``--rows`` takes a comma-separated subset of these keys or of the labels; the FP32 row always
runs, it is the reference of the ratios and the input of ONNX Runtime's quantizer):

    fp32                 optimum's plain FP32 export (``export_onnx(..., None, ..., "qdq")``)
    ort-default          onnxruntime.quantization.matmul_nbits_quantizer on a copy of that export, as a
    ort-default-fp-head  user would run it: Default (block 128, asymmetric, accuracy level 4), the same
    ort-hqq              with the lm_head MatMul (the one producing ``logits``) excluded, HQQ block 128,
    ort-rtn-asym         RTN asymmetric and symmetric block 128, GPTQ block 128 (calibrated on the
    ort-rtn-sym          calibration windows below, fed as the graph's prefill inputs); a variant that
    ort-gptq             raises is recorded with its error and the run goes on
    edgeq-{rtn,gptq,boa}-{g128,pc}   edgeq W4A16 (asymmetric, group 128 / per channel, the preset's
                                     int8 lm_head), ``ort`` format
    edgeq-rtn-g128-fp-head           the same with lm_head left float
    edgeq-w4a4-{rtn,gptq,boa}        edgeq W4A4 (rotations on), ``ort`` format

Every ONNX model is measured the same way in ONNX Runtime on the CPU, as a user gets it (MatMulNBits
accuracy level as the graph sets it): perplexity on the evaluation windows (WikiText-2 test, no BOS),
prefill latency and KV-cache decode speed (128-token prompt, 64 greedy steps, ``--threads``, p50 of
``--repeats`` runs), both also as speed relative to the FP32 row of the same run; size of model.onnx
with its external data. Quantization time and peak RSS of the process cover, for ONNX Runtime, loading
the FP32 graph and quantizing it, and for edgeq, rotating and quantizing the loaded PyTorch model;
saving the ONNX file is timed on its own (``export_seconds``).

Writes benchmarks/results/compare.json (with machine and versions), compare.md and compare.png
(perplexity against decode speed-up), and puts the table and the plot into README.md between the
compare markers. Every number comes from this run; ``--render`` rewrites the table and the plot from
the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import onnx
import psutil
from common import ROOT, add_data_arguments, load_data, publish, save_results, update_readme

from edgeq.config import scheme_preset
from edgeq.evaluation import OrtCausalLM, perplexity
from edgeq.latency import PeakRSS, measure_decode
from edgeq.models.adapters import adapter_for
from edgeq.models.loading import load_model
from edgeq.pipeline import quantize_model
from edgeq.rotation.rotate import rotate_model
from exporters import export_onnx
from exporters.onnx_qdq import onnx_bytes

README_MARKER = "compare results"
BLOCK = 128
ACCURACY_LEVEL = 4  # ORT's fast CPU path (int8 activations in MatMulNBits); edgeq's ort format uses it too
PROMPT_TOKENS, NEW_TOKENS = 128, 64
METHOD_NAMES = {"rtn": "RTN", "gptq": "GPTQ", "boa": "BoA"}
PACKAGES = ("onnxruntime", "onnx", "optimum", "optimum-onnx", "transformers", "numpy", "neural-compressor")


class Row(NamedTuple):
    key: str
    label: str
    kind: str  # "fp32", "ort-quantizer" or "edgeq"
    settings: dict


def _ort(key: str, label: str, algorithm: str, **settings) -> Row:
    return Row(key, label, "ort-quantizer", {"algorithm": algorithm, "block_size": BLOCK, **settings})


def _edgeq(key: str, label: str, scheme: str, method: str, group_size: int | None = None, **extra) -> Row:
    settings = {"scheme": scheme, "method": method, "format": "ort", **extra}
    if group_size is not None:
        settings["group_size"] = group_size
    return Row(key, label, "edgeq", settings)


ASYM = {"symmetric": False, "accuracy_level": ACCURACY_LEVEL}
SYM = {"symmetric": True, "accuracy_level": ACCURACY_LEVEL}
W4A16 = [(m, g) for m in ("rtn", "gptq", "boa") for g in (128, -1)]
ROWS = (
    Row("fp32", "FP32 ONNX", "fp32", {"export": "optimum, float32"}),
    _ort("ort-default", "ORT Default block 128", "default", **ASYM),
    _ort(
        "ort-default-fp-head",
        "ORT Default block 128 (lm_head excluded)",
        "default",
        **ASYM,
        exclude_lm_head=True,
    ),
    _ort("ort-hqq", "ORT HQQ block 128", "hqq", bits=4),  # HQQ's config takes no accuracy level
    _ort("ort-rtn-asym", "ORT RTN asymmetric block 128", "rtn", **ASYM),
    _ort("ort-rtn-sym", "ORT RTN symmetric block 128", "rtn", **SYM),
    _ort("ort-gptq", "ORT GPTQ block 128", "gptq", **ASYM),
    *(
        _edgeq(
            f"edgeq-{m}-{'g128' if g > 0 else 'pc'}",
            f"edgeq {METHOD_NAMES[m]} W4A16 {'group 128' if g > 0 else 'per-channel'}",
            "w4a16",
            m,
            g,
        )
        for m, g in W4A16
    ),
    # the presets' int8 lm_head against a float one: how much of the decode speed it buys
    _edgeq(
        "edgeq-rtn-g128-fp-head",
        "edgeq RTN W4A16 group 128, float lm_head",
        "w4a16",
        "rtn",
        128,
        lm_head_bits=16,
    ),  # fmt: skip
    *(_edgeq(f"edgeq-w4a4-{m}", f"edgeq {METHOD_NAMES[m]} W4A4 (rotated)", "w4a4", m) for m in METHOD_NAMES),
)
KIND_COLORS = {"fp32": "black", "ort-quantizer": "tab:orange", "edgeq": "tab:blue"}
KIND_NAMES = {"fp32": "FP32 ONNX", "ort-quantizer": "ONNX Runtime's quantizer", "edgeq": "edgeq"}


def select_rows(spec: str | None) -> list[Row]:
    """The rows ``--rows`` names (keys or labels, any case), in the table's order, FP32 first."""
    if not spec:
        return list(ROWS)
    names = {name.strip().lower() for name in spec.split(",") if name.strip()}
    known = {row.key for row in ROWS} | {row.label.lower() for row in ROWS}
    unknown = sorted(names - known)
    if unknown:
        keys = ", ".join(row.key for row in ROWS)
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}: choose among {keys}")
    return [row for row in ROWS if row.kind == "fp32" or {row.key, row.label.lower()} & names]


def lm_head_node(graph: onnx.GraphProto) -> onnx.NodeProto | None:
    """The MatMul (or Gemm, MatMulNBits) that computes the ``logits`` output, found by walking back from
    that output through the ops after it (Cast, Reshape, ...), whatever the nodes are named."""
    producers = {out: node for node in graph.node for out in node.output}
    name, seen = "logits", set()
    while name in producers and name not in seen:
        seen.add(name)
        node = producers[name]
        if node.op_type in ("MatMul", "Gemm", "MatMulNBits"):
            return node
        name = node.input[0] if node.input else ""
    return None


def lm_head_weight_source(model_path: Path) -> str | None:
    """What the lm_head MatMul reads its weight from: "initializer", or the op that computes it (optimum's
    export of a tied lm_head reads the embedding through a Transpose, which weight quantizers skip)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    node = lm_head_node(graph)
    if node is None or len(node.input) < 2:
        return None
    if node.input[1] in {init.name for init in graph.initializer}:
        return "initializer"
    producer = next((n for n in graph.node if node.input[1] in n.output), None)
    return producer.op_type if producer is not None else "graph input"


def lm_head_format(model_path: Path) -> str:
    """lm_head's weight type: "int4"/"int8" (MatMulNBits, or fed by a DequantizeLinear) or "float"."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    node = lm_head_node(graph)
    if node is None:
        return "?"
    if node.op_type == "MatMulNBits":
        return f"int{next(a.i for a in node.attribute if a.name == 'bits')}"
    inits = {init.name: init for init in graph.initializer}
    for dq in graph.node:
        if dq.op_type == "DequantizeLinear" and set(dq.output) & set(node.input) and dq.input[0] in inits:
            kind = inits[dq.input[0]].data_type
            return "int8" if kind in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) else "int4"
    return "float"


class _CalibrationFeeds:
    """ORT's CalibrationDataReader over prepared feed dicts (ORT deep-copies it, then iterates)."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.index = feeds, 0

    def get_next(self) -> dict | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed


def ort_quantizer(settings: dict, model_path: Path, exclude: list[str], feeds: list[dict] | None):
    """ONNX Runtime's MatMulNBitsQuantizer for one row's settings, on the FP32 graph at model_path."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    # its import sets the root logger to INFO and every node logs a line; keep its warnings only
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    algorithm, block = settings["algorithm"], settings["block_size"]
    symmetric, level = settings.get("symmetric", False), settings.get("accuracy_level")
    if algorithm == "default":
        config = mnq.DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=symmetric, accuracy_level=level
        )
    elif algorithm == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=settings["bits"])
    elif algorithm == "rtn":
        config = mnq.RTNWeightOnlyQuantConfig()
    elif algorithm == "gptq":
        config = mnq.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=_CalibrationFeeds(feeds), block_size=block
        )
    else:
        raise ValueError(f"unknown ORT quantizer algorithm {algorithm}")
    # RTN and GPTQ take their group size, symmetry and accuracy level from the quantizer itself
    return mnq.MatMulNBitsQuantizer(
        str(model_path), bits=4, block_size=block, is_symmetric=symmetric, accuracy_level=level,
        nodes_to_exclude=exclude, algo_config=config,
    )  # fmt: skip


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _copy_side_files(src: Path, dst: Path) -> None:
    """config.json, tokenizer files, ...: everything of the FP32 folder but the graph."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.is_file() and not path.name.startswith("model.onnx"):
            shutil.copy2(path, dst / path.name)


def run_ort_row(row: Row, record: dict, fp_dir: Path, out_dir: Path, feeds: list[dict] | None) -> None:
    """Quantize a copy of the FP32 export with ONNX Runtime's quantizer, as a user would, and save it."""
    fp_path = fp_dir / "model.onnx"
    exclude = []
    if row.settings.get("exclude_lm_head"):
        node = lm_head_node(onnx.load(str(fp_path), load_external_data=False).graph)
        if node is None or not node.name:
            raise RuntimeError("no named MatMul computes the logits output: cannot exclude the lm_head")
        exclude = [node.name]
        record["settings"]["nodes_to_exclude"] = exclude
    _copy_side_files(fp_dir, out_dir)
    external = any(p.name != "model.onnx" for p in fp_dir.glob("model.onnx*"))
    record["rss_before_bytes"] = _rss()
    with PeakRSS() as peak:
        start = time.perf_counter()
        quantizer = ort_quantizer(row.settings, fp_path, exclude, feeds)
        quantizer.process()
        record["quantization_seconds"] = time.perf_counter() - start
    record["peak_rss_bytes"] = peak.peak
    start = time.perf_counter()
    quantizer.model.save_model_to_file(str(out_dir / "model.onnx"), external)
    record["export_seconds"] = time.perf_counter() - start


def run_edgeq_row(row: Row, record: dict, source, data, out_dir: Path) -> None:
    """A fresh model, rotated (W4A4) and quantized by edgeq, exported in the ``ort`` format."""
    preset = scheme_preset(row.settings["scheme"])
    weights = preset.weights
    if "group_size" in row.settings:
        weights = dataclasses.replace(weights, group_size=row.settings["group_size"])
    config = dataclasses.replace(preset, method=row.settings["method"], weights=weights)
    if "lm_head_bits" in row.settings:
        config = dataclasses.replace(config, lm_head_bits=row.settings["lm_head_bits"])
    record["settings"]["config"] = dataclasses.asdict(config)
    model = load_model(source)
    adapter = adapter_for(model)
    record["rss_before_bytes"] = _rss()
    with PeakRSS() as peak:
        start = time.perf_counter()
        rotation = rotate_model(model, adapter, config.rotation)
        result = quantize_model(model, adapter, config, data.calibration, progress=True)
        record["quantization_seconds"] = time.perf_counter() - start
    record["peak_rss_bytes"] = peak.peak
    record["settings"]["rotation"] = dataclasses.asdict(rotation)
    start = time.perf_counter()
    info = export_onnx(model, adapter, result, out_dir, "ort")
    record["export_seconds"] = time.perf_counter() - start
    # which ort graph: ORT's fused operators, or optimum's with MatMulNBits weights (and why)
    record["settings"]["graph"] = info.graph
    record["settings"]["not_fused"] = list(info.not_fused)


def measure(record: dict, folder: Path, windows, args: argparse.Namespace) -> OrtCausalLM:
    """Perplexity, size and speed of the ONNX model in ``folder``, as a user's ORT session runs it."""
    record["bytes"] = onnx_bytes(folder)
    record["lm_head"] = lm_head_format(folder / "model.onnx")
    lm = OrtCausalLM(folder, accuracy_level=None, threads=args.threads)
    record["perplexity"] = perplexity(lm.logits, windows, record["label"])
    speed = measure_decode(lm, PROMPT_TOKENS, NEW_TOKENS, args.repeats)
    record["speed"] = speed
    record["prefill_ms"] = speed["prefill_ms"]["p50"]
    record["decode_tokens_per_s"] = speed["decode_tokens_per_s"]["p50"]
    return lm


def _new_record(row: Row) -> dict:
    return {
        "key": row.key, "label": row.label, "kind": row.kind, "settings": dict(row.settings),
        "perplexity": None, "error": None, "quantization_seconds": None, "export_seconds": None,
        "rss_before_bytes": None, "peak_rss_bytes": None, "bytes": None, "lm_head": None,
        "prefill_ms": None, "decode_tokens_per_s": None, "prefill_vs_fp32": None, "decode_vs_fp32": None,
    }  # fmt: skip


def _report(record: dict) -> None:
    if record["error"]:
        print(f"{record['label']}: failed: {record['error']}", flush=True)
    else:
        print(
            f"{record['label']}: ppl {record['perplexity']:.3f}, {record['bytes'] / 1e6:.1f} MB, prefill "
            f"{record['prefill_ms']:.0f} ms, {record['decode_tokens_per_s']:.1f} tokens/s",
            flush=True,
        )


def _package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--rows", default=None, help="comma-separated row keys or labels (default: all; fp32 always runs)"
    )
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads for every measurement")
    parser.add_argument("--repeats", type=int, default=5, help="timed decode runs per model")
    args = parser.parse_args(argv)
    if args.render:
        write_tables(json.loads((args.out / "compare.json").read_text()), args.out, not args.no_readme)
        return
    rows = select_rows(args.rows)

    source, data = load_data(args)
    windows = data.evaluation
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgeq-compare-") as tmp:
        fp_dir = Path(tmp) / "fp32"
        fp = _new_record(rows[0])
        model = load_model(source)
        start = time.perf_counter()
        export_onnx(model, adapter_for(model), None, fp_dir, "qdq")
        fp["export_seconds"] = time.perf_counter() - start
        del model
        lm = measure(fp, fp_dir, windows, args)
        fp["lm_head_weight"] = lm_head_weight_source(fp_dir / "model.onnx")
        fp["prefill_vs_fp32"] = fp["decode_vs_fp32"] = 1.0
        feeds = None
        if any(row.settings.get("algorithm") == "gptq" for row in rows):
            # ORT's GPTQ calibrates on the same windows as edgeq, fed as the graph's prefill inputs
            feeds = [lm.prefill_feeds(ids[None]) for ids in data.calibration]
        del lm
        records.append(fp)
        _report(fp)

        for row in rows[1:]:
            record = _new_record(row)
            out_dir = Path(tmp) / row.key
            gc.collect()
            try:
                if row.kind == "ort-quantizer":
                    run_ort_row(row, record, fp_dir, out_dir, feeds)
                else:
                    if fp_dir.exists():  # the ORT rows are done: free the disk
                        shutil.rmtree(fp_dir)
                    run_edgeq_row(row, record, source, data, out_dir)
                gc.collect()
                measure(record, out_dir, windows, args)
                record["prefill_vs_fp32"] = fp["prefill_ms"] / record["prefill_ms"]
                record["decode_vs_fp32"] = record["decode_tokens_per_s"] / fp["decode_tokens_per_s"]
            except Exception as err:  # a variant that fails is a result too; the run goes on
                traceback.print_exc()
                record["error"] = _first_line(err)
            shutil.rmtree(out_dir, ignore_errors=True)
            records.append(record)
            _report(record)
    results = save_results(
        args, "compare", windows, fp_perplexity=fp["perplexity"], packages=_package_versions(), rows=records
    )
    write_tables(results, args.out, not args.no_readme)


def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def markdown(results: dict, image: str | None = None) -> str:
    s, fp = results["settings"], results["rows"][0]
    n, length = results["eval_windows"], s["eval_seq_len"]
    if s["eval_windows"] == "all":
        windows = f"all {n} windows of {length} tokens (the whole test string)"
    else:
        windows = f"the first {n} windows of {length} tokens (`--eval-windows all` scores the whole string)"
    speed, ort_version = fp["speed"], results.get("packages", {}).get("onnxruntime")
    lines = [
        f"Model `{results['model']}`, the same data for every row. Calibration (ORT GPTQ and edgeq): "
        f"{s['calib_samples']} × {s['calib_seq_len']} tokens of C4 (seed {s['seed']}). Perplexity in ONNX "
        f"Runtime on WikiText-2 test, {windows}, no BOS. ONNX Runtime {ort_version} on the CPU (a machine "
        f"with {results['machine']['cpus']} CPU threads), MatMulNBits accuracy level as each graph sets it "
        f"(4 where ORT's config takes one, HQQ's does not; edgeq's `ort` format: 4). Prefill: "
        f"{speed['prompt_tokens']}-token prompt; decode: {speed['new_tokens']} greedy steps with the KV "
        f"cache; {s['threads']} threads, p50 of {speed['repeats']} runs; vs FP32: speed relative to the FP32 "
        f"ONNX of the same run (above 1 is faster). ORT's quantizer runs on the FP32 export as a user would "
        f"(block 128). Quantization time and peak RSS of the process: ORT from loading the FP32 graph, "
        f"edgeq from the loaded PyTorch model (rotation included); saving the graph is not counted.",
        "",
        "| row | key | lm_head | perplexity | size (MB) | quantization (s) | peak RSS (GiB) | prefill (ms) "
        "| prefill vs FP32 | decode (tokens/s) | decode vs FP32 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        if row["error"]:
            message = row["error"].replace("|", "\\|")
            ppl = f"failed: {message[:160]}{'…' if len(message) > 160 else ''}"
        else:
            ppl = _cell(row["perplexity"], ".2f")
        size = None if row["bytes"] is None else row["bytes"] / 1e6
        peak = None if row["peak_rss_bytes"] is None else row["peak_rss_bytes"] / 2**30
        lines.append(
            f"| {row['label']} | `{row['key']}` | {row['lm_head'] or ''} | {ppl} | {_cell(size, '.1f')} "
            f"| {_cell(row['quantization_seconds'], '.0f')} | {_cell(peak, '.2f')} "
            f"| {_cell(row['prefill_ms'], '.0f')} | {_cell(row['prefill_vs_fp32'], '.2f')} "
            f"| {_cell(row['decode_tokens_per_s'], '.1f')} | {_cell(row['decode_vs_fp32'], '.2f')} |"
        )
    edgeq = [r for r in results["rows"] if r["kind"] == "edgeq" and r["settings"].get("graph")]
    if edgeq:
        fused = [f"`{r['key']}`" for r in edgeq if r["settings"]["graph"] == "fused"]
        traced = [r for r in edgeq if r["settings"]["graph"] != "fused"]
        parts = [f"ORT's fused operators for {', '.join(fused)}"] if fused else []
        if traced:
            why = "; ".join(dict.fromkeys(w for r in traced for w in r["settings"].get("not_fused", [])))
            keys = ", ".join(f"`{r['key']}`" for r in traced)
            parts.append(
                f"optimum's graph with MatMulNBits weights for {keys}" + (f" ({why})" if why else "")
            )
        lines += ["", f"edgeq's `ort` graph: {'; '.join(parts)}."]
    if fp.get("lm_head_weight") not in (None, "initializer") and any(
        r["kind"] == "ort-quantizer" and r["lm_head"] == "float" for r in results["rows"]
    ):
        source = fp["lm_head_weight"]
        lines += [
            "",
            f"In the FP32 export the lm_head MatMul's weight is computed by a {source} node (how optimum "
            "exports a tied embedding), not a constant, so ONNX Runtime's quantizer leaves lm_head in float, "
            "excluded or not.",
        ]
    if image:
        lines += ["", f"![perplexity against decode speed-up over FP32 ONNX, one point per row]({image})"]
    lines += ["", f"Produced by `{results['command']}` on {results['date']}."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Perplexity (log) against decode speed relative to FP32, one labelled point per successful row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    rows = [r for r in results["rows"] if r["perplexity"] is not None and r["decode_vs_fp32"] is not None]
    for kind, color in KIND_COLORS.items():
        mine = [r for r in rows if r["kind"] == kind]
        if mine:
            ax.scatter([r["decode_vs_fp32"] for r in mine], [r["perplexity"] for r in mine], color=color,
                       label=KIND_NAMES[kind], zorder=3)  # fmt: skip
    ax.set_yscale("log")
    ax.autoscale_view()
    placed: list[tuple[float, float]] = []  # label anchors in pixels, to step a label down off another
    for r in rows:
        px, py = ax.transData.transform((r["decode_vs_fp32"], r["perplexity"]))
        dy = 4
        while any(abs(px - qx) < 90 and abs(py + dy - qy) < 10 for qx, qy in placed):
            dy -= 11
        placed.append((px, py + dy))
        ax.annotate(r["key"], (r["decode_vs_fp32"], r["perplexity"]), textcoords="offset points",
                    xytext=(5, dy), fontsize=8, color=KIND_COLORS[r["kind"]])  # fmt: skip
    ax.axhline(results["fp_perplexity"], color="black", linestyle=":", linewidth=1)
    ax.axvline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel("decode speed vs FP32 ONNX (×, ONNX Runtime CPU)")
    ax.set_ylabel("perplexity, WikiText-2 test (log scale)")
    length = results["settings"]["eval_seq_len"]
    ax.set_title(f"{results['model']}: WikiText-2 test, {results['eval_windows']} windows of {length} tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_tables(results: dict, out: Path, readme: bool) -> None:
    """compare.png and compare.md in ``out``; the README gets the table with the plot's path from the root."""
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "compare.png")
    publish(markdown(results, "compare.png"), out / "compare.md", README_MARKER, False)
    if readme:
        update_readme(markdown(results, os.path.relpath(out / "compare.png", ROOT)), README_MARKER)


if __name__ == "__main__":
    main()
