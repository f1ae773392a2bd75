"""edgeq against ONNX Runtime's own weight quantizer and the toolkits a user would pick instead
(GPTQModel, llm-compressor), on one model, with the same data for every row.

    bash benchmarks/peers/setup.sh                    # once: the peers' venvs, in /work/venvs
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
    gptqmodel-gptq-g128      GPTQModel's GPTQ, 4 bits, group 128, its other defaults (symmetric)
    llmcompressor-gptq-g128  llm-compressor's GPTQModifier with its W4A16 preset (symmetric, group 128)
    llmcompressor-gptq-pc    the same per output channel: llm-compressor refuses group 128 on SmolLM2's
                             576-wide inputs, and per channel is where a user falls back to
    llmcompressor-w4a4       llm-compressor's rotation recipe for W4A4: SpinQuantModifier (R1, R2, R4,
                             Hadamard blocks of 64) then GPTQModifier with its integer W4A4 preset
                             (weights group 128, inputs per-token int4)
    llmcompressor-w4a4-pc    the same with per-channel weights (QuaRot's and SpinQuant's, edgeq's w4a4)

Peer rows run in the toolkits' own virtual environments (``benchmarks/peers/setup.sh`` makes them,
every package pinned in ``benchmarks/peers/requirements-*.txt``; ``--peer-venvs`` or
``$EDGEQ_PEER_VENVS`` say where, default /work/venvs): compare.py writes the calibration and evaluation
token ids to a safetensors file and runs ``benchmarks/peers/<toolkit>_run.py`` with the venv's python
(its log in the row's ``log_tail`` on failure). The runner quantizes on the CPU from the float32
checkpoint edgeq loads (``weights_folder``), timing the toolkit's quantization call and sampling its
peak RSS. Their output is a PyTorch model, not ONNX, so they get no size or speed. Weight-only rows
hand back every quantized linear's dequantized weight, which compare.py loads into edgeq's float model
and scores with ``edgeq.evaluation.perplexity``, the code that scores edgeq's PyTorch models; the W4A4
rows' activation quantization and online rotation live in the toolkit's forward pass, so their runner
scores the windows there with a copy of ``window_nll`` (``benchmarks/peers/peer_io.py``).

Every ONNX model is measured the same way in ONNX Runtime on the CPU, as a user gets it (MatMulNBits
accuracy level as the graph sets it): perplexity on the evaluation windows (WikiText-2 test, no BOS),
prefill latency and KV-cache decode speed (128-token prompt, 64 greedy steps, ``--threads``, p50 of
``--repeats`` runs), both also as speed relative to the FP32 row of the same run; size of model.onnx
with its external data. Quantization time and peak RSS of the process cover, for ONNX Runtime, loading
the FP32 graph and quantizing it, and for edgeq, rotating and quantizing the loaded PyTorch model;
saving the ONNX file is timed on its own (``export_seconds``). A row that cannot run (a quantizer that
raises, a peer venv that is missing or a toolkit that refuses the model) keeps its row with the error.

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
import math
import os
import shutil
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import onnx
import psutil
import torch
from common import ROOT, add_data_arguments, load_data, publish, save_results, update_readme
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edgeq.config import scheme_preset
from edgeq.evaluation import OrtCausalLM, perplexity, torch_logits_fn
from edgeq.latency import PeakRSS, measure_decode
from edgeq.models.adapters import adapter_for
from edgeq.models.loading import load_model, weights_folder
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
PEERS = Path(__file__).resolve().parent / "peers"
DEFAULT_PEER_VENVS = Path(os.environ.get("EDGEQ_PEER_VENVS", "/work/venvs"))
PEER_NAMES = {"gptqmodel": "GPTQModel", "llmcompressor": "llm-compressor"}
LOG_TAIL_LINES = 40


class Row(NamedTuple):
    key: str
    label: str
    kind: str  # "fp32", "ort-quantizer", "edgeq" or "peer"
    settings: dict


def _ort(key: str, label: str, algorithm: str, **settings) -> Row:
    return Row(key, label, "ort-quantizer", {"algorithm": algorithm, "block_size": BLOCK, **settings})


def _edgeq(key: str, label: str, scheme: str, method: str, group_size: int | None = None, **extra) -> Row:
    settings = {"scheme": scheme, "method": method, "format": "ort", **extra}
    if group_size is not None:
        settings["group_size"] = group_size
    return Row(key, label, "edgeq", settings)


def _peer(key: str, label: str, toolkit: str, recipe: str) -> Row:
    return Row(key, label, "peer", {"toolkit": toolkit, "recipe": recipe})


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
    _peer("gptqmodel-gptq-g128", "GPTQModel GPTQ W4A16 group 128", "gptqmodel", "gptq-g128"),
    _peer("llmcompressor-gptq-g128", "llm-compressor GPTQ W4A16 group 128", "llmcompressor", "gptq-g128"),
    _peer("llmcompressor-gptq-pc", "llm-compressor GPTQ W4A16 per-channel", "llmcompressor", "gptq-pc"),
    _peer("llmcompressor-w4a4", "llm-compressor SpinQuant + GPTQ W4A4", "llmcompressor", "w4a4"),
    _peer(
        "llmcompressor-w4a4-pc",
        "llm-compressor SpinQuant + GPTQ W4A4, per-channel weights",
        "llmcompressor",
        "w4a4-pc",
    ),
)
KIND_COLORS = {"fp32": "black", "ort-quantizer": "tab:orange", "edgeq": "tab:blue", "peer": "tab:green"}
KIND_NAMES = {
    "fp32": "FP32 ONNX",
    "ort-quantizer": "ONNX Runtime's quantizer",
    "edgeq": "edgeq",
    "peer": "other toolkits (PyTorch perplexity, no ONNX)",
}


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


def ort_quantizer(settings: dict, model: onnx.ModelProto, exclude: list[str], feeds: list[dict] | None):
    """ONNX Runtime's MatMulNBitsQuantizer for one row's settings, on the FP32 graph ``model``."""
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
        model, bits=4, block_size=block, is_symmetric=symmetric, accuracy_level=level,
        nodes_to_exclude=exclude, algo_config=config,
    )  # fmt: skip


def _rss() -> int:
    return psutil.Process().memory_info().rss


class PeerError(RuntimeError):
    """A peer toolkit's runner failed; the message is the toolkit's own error where it wrote one."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(err, PeerError):  # already the toolkit's own "Type: message"
        return first
    return f"{type(err).__name__}: {first}".rstrip(": ")


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
        # the graph with its external data in memory: given the path, ORT's RTN and GPTQ keep the
        # FP32 file's external references (and GPTQ builds a session from bytes, which cannot follow them)
        quantizer = ort_quantizer(row.settings, onnx.load(str(fp_path)), exclude, feeds)
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


def write_peer_data(data, path: Path) -> Path:
    """The calibration [n, L] and evaluation [w, L] int64 token ids every peer runner reads."""
    tensors = {"calibration": data.calibration, "evaluation": data.evaluation}
    save_file({name: t.long().contiguous() for name, t in tensors.items()}, str(path))
    return path


def peer_command(row: Row, venvs: Path, model_dir: Path, data_file: Path, out_dir: Path) -> list[str]:
    """The runner's command line, with the toolkit's venv python (missing venv: a clear error)."""
    toolkit = row.settings["toolkit"]
    python = venvs / toolkit / "bin" / "python"
    if not python.exists():
        raise PeerError(
            f"no {PEER_NAMES[toolkit]} venv at {venvs / toolkit}: run bash benchmarks/peers/setup.sh {venvs}"
        )
    runner = PEERS / f"{toolkit}_run.py"
    return [str(python), str(runner), "--model-dir", str(model_dir), "--data", str(data_file),
            "--out", str(out_dir), "--recipe", row.settings["recipe"]]  # fmt: skip


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a runner's log (progress bars' carriage returns folded away)."""
    if not log.exists():
        return ""
    text = log.read_text(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def read_peer_result(out_dir: Path, returncode: int, log: Path) -> dict:
    """The runner's result.json. Raises PeerError with the toolkit's error, or with the log's last line
    when the runner died before writing a result."""
    path = out_dir / "result.json"
    if not path.exists():
        last = (log_tail(log, 1) or "no output").strip()
        raise PeerError(f"runner exited with status {returncode} and no result: {last}")
    result = json.loads(path.read_text())
    if result.get("error"):
        raise PeerError(result["error"])
    if returncode != 0:
        raise PeerError(f"runner exited with status {returncode}")
    return result


def load_peer_weights(model: torch.nn.Module, path: Path) -> int:
    """Put a peer's dequantized weights ([out, in] each, named as in the model's state dict) into the
    float model; a name the model has no parameter for, or a shape that differs, is a PeerError (tied
    weights appear under one name only, so a peer cannot rewrite the embedding through lm_head).
    Returns how many weights were replaced."""
    weights = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise PeerError(f"the peer's weights name {len(unknown)} unknown parameter(s), e.g. {unknown[0]}")
    with torch.no_grad():
        for name, weight in weights.items():
            if params[name].shape != weight.shape:
                shapes = f"{tuple(weight.shape)} for {tuple(params[name].shape)}"
                raise PeerError(f"the peer's {name} has shape {shapes}")
            params[name].copy_(weight)
    return len(weights)


def float_linears(model: torch.nn.Module, replaced: set[str]) -> list[str]:
    """The decoder's linear layers (lm_head aside) whose weight the peer did not hand back."""
    return [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head" and f"{name}.weight" not in replaced
    ]  # fmt: skip


def run_peer_row(
    row: Row, record: dict, source, data_file: Path, windows, out_dir: Path, venvs: Path
) -> None:
    """Quantize with another toolkit in its own venv (``benchmarks/peers/<toolkit>_run.py``) and score
    it: dequantized weights in edgeq's float model with edgeq's perplexity code, or, for recipes that
    quantize activations, the per-window NLLs the runner computed in the toolkit's forward pass."""
    out_dir = out_dir.resolve()
    command = peer_command(
        row, venvs.absolute(), weights_folder(source).resolve(), data_file.resolve(), out_dir
    )
    out_dir.mkdir(parents=True)
    log = out_dir / "runner.log"
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}  # the venv's packages
    print(f"{row.label}: {' '.join(command)} (log in {log})", flush=True)
    with log.open("w") as handle:
        # in out_dir: toolkits write logs into their working folder (GPTQModel: logs/)
        returncode = subprocess.run(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=out_dir
        ).returncode
    try:
        result = read_peer_result(out_dir, returncode, log)
    except PeerError:
        record["log_tail"] = log_tail(log)
        raise
    record["quantization_seconds"] = result["quantization_seconds"]
    record["peak_rss_bytes"] = result["peak_rss_bytes"]
    record["lm_head"] = result["settings"].get("lm_head")
    record["settings"]["peer"] = {
        name: result[name] for name in ("versions", "settings", "process_peak_rss_bytes", "eval_seconds")
    }
    nll = result["window_nll"]
    if nll:
        if len(nll) != len(windows):
            raise PeerError(f"the runner scored {len(nll)} windows, not {len(windows)}")
        record["peer_perplexity"] = math.exp(sum(nll) / len(nll))  # as edgeq.evaluation.perplexity
    if result["weights_file"]:
        model = load_model(source)
        weights = out_dir / result["weights_file"]
        with safe_open(str(weights), "pt") as handle:
            replaced = set(handle.keys())
        record["settings"]["quantized_linears"] = load_peer_weights(model, weights)
        record["settings"]["float_linears"] = float_linears(model, replaced)
        record["perplexity"] = perplexity(torch_logits_fn(model), windows, record["label"])
        record["scored_in"] = "edgeq"
    elif nll:
        record["perplexity"] = record["peer_perplexity"]
        record["scored_in"] = "peer"
    else:
        raise PeerError("the runner returned neither weights nor window NLLs")


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
    elif record["kind"] == "peer":
        print(
            f"{record['label']}: ppl {record['perplexity']:.3f} (PyTorch, scored in {record['scored_in']}), "
            f"quantization {record['quantization_seconds']:.0f} s",
            flush=True,
        )
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
    parser.add_argument(
        "--peer-venvs",
        type=str,  # a string, as the results JSON records it
        default=str(DEFAULT_PEER_VENVS),
        help="folder of the peer toolkits' venvs made by benchmarks/peers/setup.sh "
        "(default: $EDGEQ_PEER_VENVS or /work/venvs)",
    )
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

        peer_data = None
        for row in rows[1:]:
            record = _new_record(row)
            out_dir = Path(tmp) / row.key
            gc.collect()
            try:
                if row.kind == "ort-quantizer":
                    run_ort_row(row, record, fp_dir, out_dir, feeds)
                elif fp_dir.exists():  # the ORT rows are done: free the disk
                    shutil.rmtree(fp_dir)
                if row.kind == "edgeq":
                    run_edgeq_row(row, record, source, data, out_dir)
                elif row.kind == "peer":
                    peer_data = peer_data or write_peer_data(data, Path(tmp) / "peer-data.safetensors")
                    run_peer_row(row, record, source, peer_data, windows, out_dir, Path(args.peer_venvs))
                if row.kind != "peer":  # a peer's model is PyTorch: no ONNX to measure
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
    has_peers = any(r["kind"] == "peer" for r in results["rows"])
    calibrated = "ORT GPTQ, edgeq and the other toolkits" if has_peers else "ORT GPTQ and edgeq"
    scored = "ONNX Runtime (other toolkits: PyTorch, below the table)" if has_peers else "ONNX Runtime"
    lines = [
        f"Model `{results['model']}`, the same data for every row. Calibration ({calibrated}): "
        f"{s['calib_samples']} × {s['calib_seq_len']} tokens of C4 (seed {s['seed']}). Perplexity in "
        f"{scored} on WikiText-2 test, {windows}, no BOS. ONNX Runtime {ort_version} on the CPU (a machine "
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
    lines += peer_notes(results["rows"])
    if image:
        lines += ["", f"![perplexity against decode speed-up over FP32 ONNX, one point per row]({image})"]
    lines += ["", f"Produced by `{results['command']}` on {results['date']}."]
    return "\n".join(lines) + "\n"


def peer_notes(rows: list[dict]) -> list[str]:
    """The paragraph under the table that says how the other toolkits' rows were made and scored."""
    peers = [r for r in rows if r["kind"] == "peer"]
    if not peers:
        return []
    versions: dict[str, dict] = {}
    for r in peers:
        if r["settings"].get("peer"):
            versions.setdefault(r["settings"]["toolkit"], r["settings"]["peer"]["versions"])
    pins = "; ".join(
        f"{PEER_NAMES[t]} {v.get(t)} with torch {v.get('torch')}, transformers {v.get('transformers')}"
        for t, v in versions.items()
    )
    text = (
        "Other toolkits (`gptqmodel-*`, `llmcompressor-*`) each ran in its own virtual environment "
        "(`benchmarks/peers/setup.sh`" + (f": {pins}" if pins else "") + ") on the CPU, from the same "
        "float32 checkpoint and the same calibration token ids, with the toolkit's own defaults otherwise "
        "(symmetric grids; lm_head stays float). They give a PyTorch model, not ONNX, so their size and "
        "speed cells are empty and their perplexity is PyTorch's on the same windows, not ONNX Runtime's: "
        "the weight-only rows' dequantized weights loaded into edgeq's float model and scored by the code "
        "that scores edgeq's PyTorch models; the W4A4 rows in the toolkit's own forward pass (its online "
        "rotation and per-token activation fake-quantization) with a copy of that code. Their quantization "
        "time and peak RSS cover the toolkit's call (GPTQModel's `quantize`, llm-compressor's `oneshot`) "
        "in its own process."
    )
    lines = ["", text]
    checks = [r for r in peers if r.get("scored_in") == "edgeq" and r.get("peer_perplexity") is not None]
    if checks:
        pairs = ", ".join(f"`{r['key']}` {r['peer_perplexity']:.2f} ({r['perplexity']:.2f})" for r in checks)
        lines += [
            "",
            f"The toolkit's own forward pass on the same windows (edgeq's scoring in brackets): {pairs}.",
        ]
    return lines


def plot(results: dict, path: Path) -> None:
    """Perplexity (log) against decode speed relative to FP32, one labelled point per successful row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    rows = [r for r in results["rows"] if r["perplexity"] is not None and r.get("decode_vs_fp32") is not None]
    for kind, color in KIND_COLORS.items():
        mine = [r for r in rows if r["kind"] == kind]
        if mine:
            ax.scatter([r["decode_vs_fp32"] for r in mine], [r["perplexity"] for r in mine], color=color,
                       label=KIND_NAMES[kind], zorder=3)  # fmt: skip
    peers = [r for r in results["rows"] if r["kind"] == "peer" and r["perplexity"] is not None]
    for i, r in enumerate(peers):  # no ONNX graph, so no speed: a line at the row's perplexity
        color = KIND_COLORS["peer"]
        ax.axhline(r["perplexity"], color=color, linestyle="--", linewidth=1,
                   label=KIND_NAMES["peer"] if i == 0 else None)  # fmt: skip
        ax.annotate(r["key"], (0.01, r["perplexity"]), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 2), fontsize=8, color=color)  # fmt: skip
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
