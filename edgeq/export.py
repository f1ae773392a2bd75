"""``edgeq export``: load → calibrate → quantize → ONNX → check in ONNX Runtime → report."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import logging
import platform
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import edgeq
from edgeq.artifact import RESUME_DIR, atomic_folder, check_destination, partial_folders
from edgeq.config import ExportConfig, QuantConfig
from edgeq.data import bos_convention, eval_windows, prepare_text_data, wikitext2_test_string
from edgeq.errors import EdgeqError
from edgeq.evaluation import OrtCausalLM, perplexity
from edgeq.latency import measure_decode
from edgeq.manifest import calibration_sha256, weights_sha256, write_manifest, write_model_card
from edgeq.memory import fix_mmap_threshold, trim_heap
from edgeq.models.adapters import adapter_for_config
from edgeq.models.lazy import (
    Checkpoint,
    checkpoint_bytes,
    empty_model,
    load_block,
    load_outer,
    open_checkpoint,
    release,
)
from edgeq.models.loading import (
    ModelSource,
    check_vocabulary,
    load_config,
    load_generation_config,
    load_model,
    load_tokenizer,
    resolve_model,
    weight_files,
    weights_folder,
)
from edgeq.openvino_runtime import OPENVINO_CPU, PRECISIONS, OpenVinoCausalLM, openvino_missing
from edgeq.pipeline import (
    EvalStreams,
    QuantizationResult,
    advance,
    capture_block_inputs,
    quantize_embedding_table,
    quantize_lm_head,
    run_blocks,
)
from edgeq.quant import method_class
from edgeq.quant.aptq import average_bits, linear_sizes, with_widths
from edgeq.quant.methods import check_compensation, needs_output_hessians
from edgeq.quant.oac import OutputHessianStore, collect_output_hessians
from edgeq.report_md import write_report_md
from edgeq.resume import Journal, fingerprint
from edgeq.rotation.learned import learn_rotations
from edgeq.rotation.rotate import RotationPlan, apply_plan, plan_rotations, rotate_embedding, rotate_head
from edgeq.scoring import agreement_with, score_stream
from edgeq.validate import (
    TOP_K,
    check_gates,
    check_latency_settings,
    format_table,
    provider_status,
    validate,
    write_fp_reference,
)
from exporters import graph_writer
from exporters.genai_config import write_genai_files
from exporters.onnx_qdq import export_qdq
from exporters.openvino_form import check_form
from exporters.ort_fused import architecture_blockers, scheme_blockers

log = logging.getLogger("edgeq")

CONFIG_FILE = "edgeq_config.json"
REPORT_FILE = "report.json"
ALLOCATED_WIDTHS = "widths"  # the journal's record of APTQ's widths (empty without --avg-bits)
ONNX_PROVIDER = "CPUExecutionProvider"
FORMATS = ("qdq", "ort")
# ORT perplexity must match the PyTorch fake-quant perplexity within this relative difference.
ONNX_PARITY_TOLERANCE = 0.005
# ... and agree with its greedy next-token choice on at least this share of positions.
MIN_TOP1_AGREEMENT = 0.99
# With quantized activations, the last-bit float differences between two runtimes move values across
# rounding boundaries, and the flips cascade through the layers: PyTorch float32 and float64 runs of
# one W4A4 SmolLM2 agree on only 42% of greedy tokens. Parity is then statistical: perplexity within
# this tolerance, top-1 agreement reported but not required.
ONNX_PARITY_TOLERANCE_QUANTIZED_ACTS = 0.02
# A float16 graph against the PyTorch model run in float16: the two runtimes accumulate and round
# float16 in different orders, so the bar is wider than float32's.
ONNX_PARITY_TOLERANCE_FP16, MIN_TOP1_AGREEMENT_FP16 = 0.01, 0.98

DEVICES = ("auto", "cpu", "cuda")
GRAPH_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
BATCH_SIZE = 8  # windows per block forward


def parity(
    quant_ppl: float, onnx_ppl: float, top1: float, activations_quantized: bool, dtype: str = "float32"
) -> dict[str, Any]:
    """The export's ONNX-vs-PyTorch parity verdict (see the tolerances above)."""
    rel = abs(onnx_ppl - quant_ppl) / quant_ppl
    half = dtype == "float16"
    if activations_quantized:
        tolerance, min_top1 = ONNX_PARITY_TOLERANCE_QUANTIZED_ACTS, None
    elif half:
        tolerance, min_top1 = ONNX_PARITY_TOLERANCE_FP16, MIN_TOP1_AGREEMENT_FP16
    else:
        tolerance, min_top1 = ONNX_PARITY_TOLERANCE, MIN_TOP1_AGREEMENT
    return {
        "what": "ONNX Runtime CPU (MatMulNBits accuracy level 0) vs the PyTorch fake-quantized model "
        f"in {dtype}: relative perplexity difference and greedy top-1 agreement"
        + (
            " (not required with quantized activations: rounding flips cascade)"
            if activations_quantized
            else ""
        ),
        "relative_difference": rel,
        "tolerance": tolerance,
        "top1_agreement": top1,
        "min_top1_agreement": min_top1,
        "passed": rel <= tolerance and (min_top1 is None or top1 >= min_top1),
    }


def validate_inputs(config: ExportConfig) -> None:
    """Every check that needs no model, so bad input fails before minutes of work."""
    config.quant.weights.validate()
    config.quant.activations.validate()
    config.quant.rotation.validate()
    config.quant.mixed.validate()
    method_class(config.quant.method)
    check_compensation(config.quant)
    if config.format not in FORMATS:
        raise EdgeqError(f"unknown format '{config.format}': choose one of {', '.join(FORMATS)}")
    check_form(config.qdq_form)
    if config.qdq_form != "standard" and config.format != "qdq":
        raise EdgeqError(
            f"--qdq-form {config.qdq_form} rewrites the qdq format's graph, not --format {config.format}"
        )
    if config.device not in DEVICES:
        raise EdgeqError(f"unknown device '{config.device}': choose one of {', '.join(DEVICES)}")
    if config.dtype not in GRAPH_TORCH_DTYPES:
        raise EdgeqError(f"unknown dtype '{config.dtype}': choose one of {', '.join(GRAPH_TORCH_DTYPES)}")
    if config.calibration.num_sequences < 1 or config.calibration.seq_len < 2:
        raise EdgeqError("calibration needs at least 1 sequence of at least 2 tokens")
    if config.evaluation.seq_len < 2:
        raise EdgeqError("evaluation windows need at least 2 tokens")
    if config.evaluation.max_windows is not None and config.evaluation.max_windows < 1:
        raise EdgeqError("--eval-windows must be a positive number or 'all'")
    if config.validation.enabled:
        check_gates(config.validation.gates)
        check_latency_settings(config.validation.latency_runs, config.validation.decode_tokens)
        provider_status(list(config.validation.providers))


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - start, 3)


def resolve_device(name: str) -> torch.device:
    """``--device``: cpu, cuda, or auto (CUDA when torch sees one); a one-line error for CUDA that
    is not there."""
    if name not in DEVICES:
        raise EdgeqError(f"unknown device '{name}': choose one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EdgeqError(
            "--device cuda: this torch build sees no CUDA GPU (torch.cuda.is_available() is False)"
        )
    return torch.device(name)


def storage_dtype(checkpoint_dtype: torch.dtype) -> torch.dtype:
    """How calibration activations are stored between blocks: in the model's own dtype when that
    is float16 or bfloat16 (half the memory), else float32. Blocks always compute in float32."""
    return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.float32


@dataclass
class CheckpointBlocks:
    """The blocks of a model whose weights are on disk: read when loaded, freed once written."""

    model: torch.nn.Module
    adapter: Any
    checkpoint: Checkpoint

    def load(self, index: int, device: torch.device | str) -> torch.nn.Module:
        return load_block(self.model, self.adapter, self.checkpoint, index, device)

    def done(self, index: int, block: torch.nn.Module) -> None:
        release(block)


LEARNED_ROTATIONS = "rotations.pt"  # the journal's record of the learned R1/R2


def learned_plan(
    source, adapter, quant: QuantConfig, plan: RotationPlan, calibration: torch.Tensor, journal: Journal,
    progress: bool,
) -> tuple[RotationPlan, dict[str, Any]]:  # fmt: skip
    """The plan with R1/R2 learned (``edgeq.rotation.learned``) on a float copy of the whole model,
    and what the learning did for the report; saved in the journal, so a resumed run reads them."""
    path = journal.folder / LEARNED_ROTATIONS
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        return saved["plan"], saved["learning"]
    model = load_model(source)
    plan, log = learn_rotations(model, adapter, quant, plan, calibration, progress=progress)
    losses = log.losses
    tail = max(1, len(losses) // 10)
    learning = {
        "steps": len(losses),
        "seconds": round(log.seconds, 1),
        "loss_first_steps": sum(losses[:tail]) / tail if losses else None,
        "loss_last_steps": sum(losses[-tail:]) / tail if losses else None,
    }
    torch.save({"plan": plan, "learning": learning}, path)
    del model
    gc.collect()
    trim_heap()
    return plan, learning


def output_hessian_store(
    source, adapter, quant: QuantConfig, plan: RotationPlan, calibration: torch.Tensor, journal: Journal,
    progress: bool,
) -> tuple[Callable[[int], dict[str, torch.Tensor]], QuantConfig]:  # fmt: skip
    """OAC's output-adaptive Hessians of every block linear, saved per block in the journal's
    folder: the reader of block i's, and ``quant`` with its mixed-precision widths allocated from
    them (APTQ). The backward passes hold the float32 model (rotated as the scheme's plan rotates it)
    once, before the streamed pass; a resumed run reads what the interrupted one saved."""
    saved = journal.load_json(ALLOCATED_WIDTHS)
    if saved is not None:
        mixed = dataclasses.replace(quant.mixed, widths=saved["widths"])
        return OutputHessianStore(journal.oac_folder, adapter).block, dataclasses.replace(quant, mixed=mixed)
    model = load_model(source)
    if plan.applied:
        apply_plan(model, adapter, plan)
    hessians = collect_output_hessians(model, adapter, calibration, progress=progress)
    quant = with_widths(quant, model, adapter, hessians)
    store = OutputHessianStore(journal.oac_folder, adapter)
    store.save(hessians, len(adapter.blocks(model)))
    # last: the Hessians are complete once this exists
    journal.save_json(ALLOCATED_WIDTHS, {"widths": quant.mixed.widths})
    del model, hessians
    gc.collect()
    trim_heap()
    return store.block, quant


def resume_folder(out: Path, run_fingerprint: str) -> Path | None:
    """The partial folder of an interrupted run into ``out`` with this run's fingerprint; None when
    there is none; a one-line error when the only ones were made by another config or model."""
    found = partial_folders(out)
    for folder in found:
        if Journal.fingerprint_of(folder) == run_fingerprint:
            for child in folder.iterdir():  # what the writer wrote is written again, the same
                if child.name != RESUME_DIR:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            return folder
    if found:
        raise EdgeqError(
            f"--resume: the interrupted export in {found[0]} was run with another config, model or "
            "edgeq version; delete that folder or run without --resume"
        )
    log.info("--resume: no interrupted export of %s found; starting from the first block", out)
    return None


def run_export(
    config: ExportConfig, out: Path, overwrite: bool = False, progress: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Run the whole export into ``out`` (written atomically) and return the report. Each finished
    block is recorded for ``resume`` (``edgeq.resume``), which continues an interrupted run.

    One pass over the decoder blocks does everything that needs the model: each block is read from
    the checkpoint onto the device, takes the FP evaluation windows one block further, is rotated
    (the rotated windows), quantized on the calibration stream, written into the graph, takes the
    quantized evaluation windows one block further, and is freed. Peak memory is one block, the
    streams' hidden states, the embedding and lm_head.
    """
    validate_inputs(config)
    check_destination(out, overwrite)
    device = resolve_device(config.device)
    fix_mmap_threshold()  # one block's tensors at a time must not leave the heap fragmented
    timings: dict[str, Any] = {}
    source = resolve_model(config.model)
    model_config = load_config(source)
    adapter = adapter_for_config(model_config)

    # Tokenize before loading the weights: short or empty text fails in seconds, not minutes.
    with _timed(timings, "data_s"):
        tokenizer = load_tokenizer(source)
        check_vocabulary(tokenizer, model_config, config.model)
        data = prepare_text_data(tokenizer, config.calibration, config.evaluation, adapter)
    windows = data.evaluation
    log.info("evaluation: %d windows of %d tokens", windows.shape[0], windows.shape[1])
    # the run's identity, which --resume must match (after the data: bad text fails before hashing)
    weights = weight_files(source)
    with _timed(timings, "hash_weights_s"):
        weights_hash = weights_sha256(weights) if weights else None
    run_fingerprint = fingerprint(config.to_dict(), weights_hash, edgeq.__version__)
    reuse = resume_folder(out, run_fingerprint) if resume else None

    log.info("loading %s (block by block, on %s)", config.model, device)
    with _timed(timings, "load_s"):
        checkpoint = open_checkpoint(weights_folder(source))
        model = empty_model(model_config)
        generation = load_generation_config(weights_folder(source))
        if generation is not None:  # the artifact's generation_config.json: the checkpoint's own
            model.generation_config = generation
        sizes = linear_sizes(model, adapter)
        load_outer(model, adapter, checkpoint)
        stored = storage_dtype(checkpoint.floating_dtype())
    report: dict[str, Any] = {
        "edgeq_version": edgeq.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "spec": config.model,
            "model_type": model.config.model_type,
            "adapter": adapter.name,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "config": config.to_dict(),
        "device": {"calibration": str(device), "activation_storage": str(stored).removeprefix("torch.")},
        "calibration": {
            "file": str(data.calibration_file),
            "documents": data.num_documents,
            "shape": list(data.calibration.shape),
        },
        "evaluation": {
            "text": f"WikiText-2 raw test, the papers' string; {data.bos.describe()}",
            "bos": data.bos.to_dict(),
            "windows": windows.shape[0],
            "seq_len": windows.shape[1],
        },
        "timings_s": timings,
    }
    fp_bytes = checkpoint_bytes(model)
    if config.validation.enabled and "decode_speedup" in config.validation.gates:
        with _timed(timings, "fp32_onnx_speed_s"):
            report["reference_speed"] = fp32_onnx_speed(load_model(source), config)

    quant = config.quant
    plan = plan_rotations(adapter, model.config, quant.rotation, quant.activations.kv_bits < 16)
    report["rotation"] = dataclasses.asdict(plan.report)
    for name, why in plan.report.skipped.items():
        log.info("rotation %s skipped: %s", name, why)
    blockers = architecture_blockers(model.config, adapter) + scheme_blockers(quant, plan.r3 is not None)
    graph_dtype = GRAPH_TORCH_DTYPES[config.dtype]
    ppl: dict[str, Any] = {}
    with atomic_folder(out, overwrite, reuse) as tmp:
        journal = Journal(tmp, run_fingerprint)
        if journal.finished:
            log.info("resuming %s after block %d of %d", tmp, journal.finished, len(adapter.blocks(model)))
        if quant.rotation.kind == "learned" and plan.applied:
            with _timed(timings, "learn_rotations_s"):
                plan, learning = learned_plan(
                    source, adapter, quant, plan, data.calibration, journal, progress
                )
            report["rotation"] = dataclasses.asdict(plan.report) | {"learning": learning}
        tokenizer.save_pretrained(tmp)
        hessians = None
        if needs_output_hessians(quant):
            with _timed(timings, "output_hessians_s"):
                hessians, quant = output_hessian_store(
                    source, adapter, quant, plan, data.calibration, journal, progress
                )
            config = dataclasses.replace(config, quant=quant)  # with the allocated widths
            report["config"] = config.to_dict()
        writer = graph_writer(model, adapter, tmp, config.format, blockers, config.onnx_opset, config.dtype,
                              config.qdq_form)  # fmt: skip
        blocks = CheckpointBlocks(model, adapter, checkpoint)
        result = QuantizationResult()
        with _timed(timings, "quantize_s"):
            batch = BATCH_SIZE
            fp_eval = capture_block_inputs(model, adapter, windows, batch)
            rotate_embedding(model, adapter, plan)
            calibration = capture_block_inputs(model, adapter, data.calibration, batch, stored)
            rotated = capture_block_inputs(model, adapter, windows, batch) if plan.applied else None
            quantize_embedding_table(model, adapter, quant, result)
            quant_eval = (
                capture_block_inputs(model, adapter, windows, batch)
                if quant.quantize_embedding
                else (rotated or fp_eval).with_hidden(list((rotated or fp_eval).hidden))
            )
            if plan.applied:
                log.info("rotations: %s", ", ".join(f"{k} ({v})" for k, v in plan.report.applied.items()))
            writer.begin(result.tables)
            evals = EvalStreams(fp=fp_eval, rotated=rotated, quant=quant_eval, quant_dtype=graph_dtype)
            streamed = run_blocks(model, adapter, blocks, quant, calibration, device=device,
                                  storage_dtype=stored, plan=plan, evals=evals, on_block=writer.add_block,
                                  keep_weights=False, output_hessians=hessians, journal=journal,
                                  progress=progress)  # fmt: skip
            result.weights |= streamed.weights
            result.layers, result.block_seconds = streamed.layers, streamed.block_seconds
            result.block_output_rel_error = streamed.block_output_rel_error
            result.fallbacks = streamed.fallbacks
            result.clip_ratios = streamed.clip_ratios
        timings["blocks_s"] = result.block_seconds

        with _timed(timings, "eval_fp_torch_s"):
            fp_scores = score_stream(
                model, adapter, fp_eval, windows, top_k=TOP_K, desc="FP", progress=progress
            )
        reference = fp_scores.fp_reference(windows)
        ppl["fp_torch"] = reference.fp_perplexity
        log.info("FP perplexity (PyTorch): %.3f", ppl["fp_torch"])
        rotate_head(model, adapter, plan)
        if rotated is not None:
            with _timed(timings, "eval_rotated_torch_s"):
                ppl["rotated_torch"] = score_stream(
                    model, adapter, rotated, windows, desc="rotated", progress=progress
                ).perplexity
            log.info("rotated perplexity (PyTorch, no quantization): %.3f", ppl["rotated_torch"])
        quantize_lm_head(model, adapter, quant, result)
        quant_scores = score_stream(model, adapter, quant_eval, windows, dtype=graph_dtype,
                                    desc="quantized", progress=progress)  # fmt: skip

        log.info("writing ONNX (%s format)", config.format)
        # the streams' hidden states go before the graph's outer part is traced
        del model, blocks, fp_eval, rotated, quant_eval, calibration, evals
        with _timed(timings, "export_onnx_s"):
            info = writer.finish(result.weights)
        if info.not_fused:
            log.info("ort format in optimum's graph, not the fused one: %s", "; ".join(info.not_fused))
        if info.merged_nodes:
            log.info("%d duplicate nodes merged (one activation Q/DQ per shared input)", info.merged_nodes)
        genai = genai_files(tmp, config.format, model_config, adapter)
        del writer  # the ONNX sessions below get the memory the tables held
        gc.collect()
        trim_heap()
        with _timed(timings, "eval_quant_s"):
            runtimes_ppl, agreement, not_run = onnx_runtime_scores(
                tmp, quant_scores, windows, config.validation.providers, progress
            )
        ppl["quant_torch"] = quant_scores.perplexity
        ppl["quant_onnx"] = runtimes_ppl
        if not_run:
            ppl["quant_onnx_not_run"] = not_run
        ppl_onnx = ppl["quant_onnx"][ONNX_PROVIDER]["accuracy_level_0"]
        level4 = ppl["quant_onnx"][ONNX_PROVIDER]["accuracy_level_4"]
        log.info("quantized perplexity: PyTorch %.3f, ONNX Runtime CPU %.3f (accuracy level 4: %.3f)",
                 ppl["quant_torch"], ppl_onnx, level4)  # fmt: skip
        for setting, value in ppl["quant_onnx"].get(OPENVINO_CPU, {}).items():
            log.info("quantized perplexity: %s (%s) %.3f", OPENVINO_CPU, setting, value)
        top1 = agreement[ONNX_PROVIDER]["accuracy_level_0"]
        acts_quantized = quant.activations.enabled or quant.activations.kv_bits < 16
        report |= {
            "perplexity": ppl,
            "top1_agreement_with_pytorch": agreement,
            "onnx_parity": parity(ppl["quant_torch"], ppl_onnx, top1, acts_quantized, config.dtype),
            "sizes_bytes": {
                "fp32_parameters": fp_bytes,
                "onnx_model": info.bytes_total,
                "onnx_external_data": info.external_data,
                "onnx_components": info.components,
            },
            "onnx": {
                "file": info.path.name,
                "format": config.format,
                "graph": info.graph,
                "dtype": config.dtype,
                "not_fused": list(info.not_fused),
                "opset": config.onnx_opset,
                "quantized_weights": info.replaced_weights,
                "merged_duplicate_nodes": info.merged_nodes,
                "qdq_form": config.qdq_form if config.format == "qdq" else None,
                "form_rewrites": info.form_rewrites,
            },
            "genai": genai,
            "quantization": {
                "layers": [dataclasses.asdict(s) for s in result.layers],
                "block_output_rel_error": result.block_output_rel_error,
                "fallbacks": result.fallbacks,
                "clip_ratios": result.clip_ratios,
            },
        }
        if quant.mixed.enabled:
            report["quantization"]["mixed_precision"] = {
                "average_bits": average_bits(quant.mixed.widths, sizes),
                "widths_histogram": dict(sorted(Counter(quant.mixed.widths.values()).items())),
            }
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        write_fp_reference(tmp, reference)
        if config.validation.enabled:
            with _timed(timings, "validate_s"):
                v = config.validation
                validation = validate(tmp, list(v.providers), v.gates, v.threads, progress, report,
                                      v.latency_runs, v.decode_tokens)  # fmt: skip
            report["validation"] = validation.to_dict()
            log.info("validation:\n%s", format_table(validation))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        journal.close()  # before the manifest hashes the folder: the records are not shipped
        write_handoff_files(tmp, report, source, data.calibration, weights_hash)
    check = report["onnx_parity"]
    if not check["passed"]:
        log.warning("ONNX differs from PyTorch: perplexity by %.2f%% (tolerance %.1f%%), top-1 agreement "
                    "%.2f%% (required: %s)", check["relative_difference"] * 100, check["tolerance"] * 100,
                    top1 * 100, check["min_top1_agreement"])  # fmt: skip
    return report


GENAI_FORMAT = "ort"  # onnxruntime-genai runs ORT's contrib operators; qdq is for NPU toolchains


def genai_files(folder: Path, fmt: str, model_config, adapter) -> dict[str, Any]:
    """onnxruntime-genai's config (and tokenizer fixes) beside an ``ort`` format graph; for report.json,
    what was written, or why nothing was."""
    if fmt != GENAI_FORMAT:
        reason = f"written for the {GENAI_FORMAT} format only ({fmt}: for NPU toolchains)"
        return {"config": None, "reason": reason}
    genai = write_genai_files(folder, model_config, adapter)
    if genai["config"]:
        log.info("onnxruntime-genai: %s written", genai["config"])
    for change in genai.get("tokenizer_changes", []):
        log.info("tokenizer for onnxruntime-genai's reader: %s", change)
    return genai


def onnx_runtime_openers(folder: Path, providers: tuple[str, ...]) -> tuple[dict, dict[str, str]]:
    """What scores the quantized graph: provider → setting → a function that opens it (ORT's CPU
    provider at MatMulNBits accuracy levels 0 and 4; with ``openvino`` among ``providers``, OpenVINO's
    CPU runtime at each of its PRECISIONS), and provider → why it cannot run here."""
    openers: dict[str, dict[str, Callable[[], Any]]] = {
        ONNX_PROVIDER: {
            f"accuracy_level_{level}": functools.partial(OrtCausalLM, folder, ONNX_PROVIDER, level)
            for level in (0, 4)
        }
    }
    not_run = {}
    if "openvino" in providers:
        missing = openvino_missing()
        if missing:
            not_run[OPENVINO_CPU] = missing
        else:
            openers[OPENVINO_CPU] = {
                precision: functools.partial(OpenVinoCausalLM, folder, precision) for precision in PRECISIONS
            }
    return openers, not_run


def onnx_runtime_scores(
    folder: Path, quant_scores, windows: torch.Tensor, providers: tuple[str, ...], progress: bool
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, str]]:
    """The graph in ``folder`` scored on the evaluation windows [n, L] by each runtime and setting of
    ``onnx_runtime_openers``, one session at a time: perplexities and greedy top-1 agreement with the
    quantized PyTorch model (``quant_scores``), both as provider → setting → value, and provider →
    why it did not run. A runtime other than ORT that cannot read the graph is reported, not fatal."""
    openers, not_run = onnx_runtime_openers(folder, providers)
    ppl: dict[str, dict[str, float]] = {}
    agreement: dict[str, dict[str, float]] = {}
    for provider, settings in openers.items():
        for setting, open_model in settings.items():
            try:
                lm = open_model()
            except EdgeqError as err:
                if provider == ONNX_PROVIDER:
                    raise
                log.warning("%s: %s", provider, err)
                not_run[provider] = str(err)
                break
            compared = agreement_with(quant_scores, {setting: lm.logits}, windows,
                                      f"{provider} ({setting}) vs PyTorch", progress)[setting]  # fmt: skip
            del lm
            ppl.setdefault(provider, {})[setting] = compared["perplexity"]
            agreement.setdefault(provider, {})[setting] = compared["top1_agreement"]
    return ppl, agreement, not_run


def fp32_onnx_speed(model, config: ExportConfig) -> dict[str, Any]:
    """Decode speed of the unquantized model exported to FP32 ONNX, on this machine: what the
    decode_speedup gate divides by."""
    with tempfile.TemporaryDirectory(prefix="edgeq-fp32-") as tmp:
        export_qdq(model, {}, Path(tmp), config.onnx_opset)
        v = config.validation
        lm = OrtCausalLM(tmp, ONNX_PROVIDER, threads=v.threads)
        speed = measure_decode(lm, 128, v.decode_tokens, repeats=v.latency_runs)
    log.info("FP32 ONNX decode: %.1f tokens/s", speed["decode_tokens_per_s"]["p50"])
    return {
        "fp32_onnx_decode_tokens_per_s": speed["decode_tokens_per_s"]["p50"],
        "fp32_onnx_prefill_ms": speed["prefill_ms"]["p50"],
        "provider": ONNX_PROVIDER,
        "threads": v.threads,
        "machine": platform.platform(),
    }


def write_handoff_files(
    folder: Path, report: dict[str, Any], source, calibration_ids, weights_hash: str | None
) -> None:
    """What the receiving team reads: report.md with plots, MODEL_CARD.md, and manifest.json (last:
    it hashes every other file). weights_hash: ``weights_sha256`` of the source's weight files."""
    write_report_md(report, folder)
    write_model_card(folder, report)
    weights = weight_files(source)
    write_manifest(
        folder,
        source={
            "spec": report["model"]["spec"],
            "model_type": report["model"]["model_type"],
            "weights_sha256": weights_hash,
            "weight_files": [p.name for p in weights],
        },
        calibration_hash=calibration_sha256(calibration_ids),
        metrics={key: report[key] for key in ("perplexity", "onnx_parity", "sizes_bytes") if key in report},
        config=report["config"],
        # the validation holds latency measurements, so it changes from run to run
        run={"timings_s": report["timings_s"]}
        | ({"validation": report["validation"]} if "validation" in report else {}),
    )


def evaluate(
    model_spec: str,
    text: str | None,
    seq_len: int,
    max_windows: int | None,
    accuracy_level: int = 0,
    progress: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    """Perplexity of an artifact folder in ORT (it holds model.onnx) or of a model in PyTorch
    (streamed block by block, as the export does)."""
    folder = Path(model_spec)
    eval_text = wikitext2_test_string(text)
    # an artifact folder holds the config and tokenizer of its source model, so both paths read the
    # model's BOS convention the same way
    is_artifact = (folder / "model.onnx").exists()
    source = ModelSource(model_spec, str(folder)) if is_artifact else resolve_model(model_spec)
    tokenizer = load_tokenizer(source)
    bos = bos_convention(tokenizer, adapter_for_config(load_config(source)))
    windows = eval_windows(tokenizer, eval_text, seq_len, max_windows, bos.token_id)
    if is_artifact:
        logits_fn = OrtCausalLM(folder, provider=ONNX_PROVIDER, accuracy_level=accuracy_level).logits
        runtime = f"onnxruntime CPU (MatMulNBits accuracy level {accuracy_level})"
        ppl = perplexity(logits_fn, windows, "perplexity", progress)
    else:
        runtime = "pytorch"
        ppl = streamed_perplexity(source, windows, resolve_device(device), progress)
    return {
        "model": model_spec,
        "runtime": runtime,
        "perplexity": ppl,
        "windows": windows.shape[0],
        "seq_len": windows.shape[1],
        "bos": bos.to_dict(),
    }


@torch.no_grad()
def streamed_perplexity(
    source: ModelSource, windows: torch.Tensor, device: torch.device, progress: bool = True
) -> float:
    """The unquantized model's perplexity on windows [n, L], its blocks read from disk one at a time."""
    config = load_config(source)
    adapter = adapter_for_config(config)
    checkpoint = open_checkpoint(weights_folder(source))
    model = empty_model(config)
    load_outer(model, adapter, checkpoint)
    stream = capture_block_inputs(model, adapter, windows, BATCH_SIZE)
    for index in range(len(adapter.blocks(model))):
        block = load_block(model, adapter, checkpoint, index, device)
        advance(stream, adapter, block, index, device)
        release(block)
    return score_stream(model, adapter, stream, windows, desc="perplexity", progress=progress).perplexity
