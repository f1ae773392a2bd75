"""``edgeq export``: load → calibrate → quantize → ONNX → check in ONNX Runtime → report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import edgeq
from edgeq.artifact import atomic_folder, check_destination
from edgeq.config import ExportConfig
from edgeq.data import bos_convention, eval_windows, prepare_text_data, wikitext2_test_string
from edgeq.errors import EdgeqError
from edgeq.evaluation import OrtCausalLM, perplexities_and_agreement, perplexity, torch_logits_fn
from edgeq.latency import measure_decode
from edgeq.manifest import calibration_sha256, weights_sha256, write_manifest, write_model_card
from edgeq.models.adapters import adapter_for_config
from edgeq.models.loading import (
    ModelSource,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model,
    weight_files,
)
from edgeq.pipeline import quantize_model
from edgeq.quant import method_class
from edgeq.report_md import write_report_md
from edgeq.rotation.rotate import rotate_model
from edgeq.validate import (
    check_gates,
    check_latency_settings,
    format_table,
    fp_reference,
    provider_status,
    validate,
    write_fp_reference,
)
from exporters import export_onnx
from exporters.onnx_qdq import export_qdq

log = logging.getLogger("edgeq")

CONFIG_FILE = "edgeq_config.json"
REPORT_FILE = "report.json"
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


def parity(quant_ppl: float, onnx_ppl: float, top1: float, activations_quantized: bool) -> dict[str, Any]:
    """The export's ONNX-vs-PyTorch parity verdict (see the tolerances above)."""
    rel = abs(onnx_ppl - quant_ppl) / quant_ppl
    tolerance = ONNX_PARITY_TOLERANCE_QUANTIZED_ACTS if activations_quantized else ONNX_PARITY_TOLERANCE
    min_top1 = None if activations_quantized else MIN_TOP1_AGREEMENT
    return {
        "what": "ONNX Runtime CPU (MatMulNBits accuracy level 0) vs the PyTorch fake-quantized model: "
        "relative perplexity difference and greedy top-1 agreement"
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
    method_class(config.quant.method)
    if config.format not in FORMATS:
        raise EdgeqError(f"unknown format '{config.format}': choose one of {', '.join(FORMATS)}")
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


def run_export(
    config: ExportConfig, out: Path, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run the whole export into ``out`` (written atomically) and return the report."""
    validate_inputs(config)
    check_destination(out, overwrite)
    timings: dict[str, float] = {}
    source = resolve_model(config.model)
    adapter = adapter_for_config(load_config(source))

    # Tokenize before loading the weights: short or empty text fails in seconds, not minutes.
    with _timed(timings, "data_s"):
        tokenizer = load_tokenizer(source)
        data = prepare_text_data(tokenizer, config.calibration, config.evaluation, adapter)
    windows = data.evaluation
    log.info("evaluation: %d windows of %d tokens", windows.shape[0], windows.shape[1])

    log.info("loading %s", config.model)
    with _timed(timings, "load_s"):
        model = load_model(source)
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
    fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ppl: dict[str, Any] = {}
    with _timed(timings, "eval_fp_torch_s"):
        reference = fp_reference(windows, torch_logits_fn(model), progress=progress)
    ppl["fp_torch"] = reference.fp_perplexity
    log.info("FP perplexity (PyTorch): %.3f", ppl["fp_torch"])
    if config.validation.enabled and "decode_speedup" in config.validation.gates:
        with _timed(timings, "fp32_onnx_speed_s"):
            report["reference_speed"] = fp32_onnx_speed(model, config)

    kv_quantized = config.quant.activations.kv_bits < 16
    rotation = rotate_model(model, adapter, config.quant.rotation, kv_quantized)
    report["rotation"] = dataclasses.asdict(rotation)
    for name, why in rotation.skipped.items():
        log.info("rotation %s skipped: %s", name, why)
    if rotation.applied:
        log.info("rotations applied: %s", ", ".join(f"{k} ({v})" for k, v in rotation.applied.items()))
        with _timed(timings, "eval_rotated_torch_s"):
            ppl["rotated_torch"] = perplexity(torch_logits_fn(model), windows, "rotated perplexity", progress)
        log.info("rotated perplexity (PyTorch, no quantization): %.3f", ppl["rotated_torch"])

    result = quantize_model(model, adapter, config.quant, data.calibration, progress=progress)
    timings["quantize_s"] = round(result.seconds, 3)

    with atomic_folder(out, overwrite) as tmp:
        tokenizer.save_pretrained(tmp)
        log.info("exporting ONNX (%s format)", config.format)
        with _timed(timings, "export_onnx_s"):
            info = export_onnx(model, adapter, result, tmp, config.format, config.onnx_opset)
        if info.not_fused:
            log.info("ort format in optimum's graph, not the fused one: %s", "; ".join(info.not_fused))
        with _timed(timings, "eval_quant_s"):
            levels = {f"accuracy_level_{lvl}": OrtCausalLM(tmp, ONNX_PROVIDER, lvl).logits for lvl in (0, 4)}
            compared = perplexities_and_agreement(
                torch_logits_fn(model), levels, windows, "quantized: PyTorch vs ONNX", progress
            )
        ppl["quant_torch"] = compared.pop("reference")
        ppl["quant_onnx"] = {ONNX_PROVIDER: {k: v["perplexity"] for k, v in compared.items()}}
        agreement = {ONNX_PROVIDER: {k: v["top1_agreement"] for k, v in compared.items()}}
        ppl_onnx = ppl["quant_onnx"][ONNX_PROVIDER]["accuracy_level_0"]
        level4 = ppl["quant_onnx"][ONNX_PROVIDER]["accuracy_level_4"]
        log.info("quantized perplexity: PyTorch %.3f, ONNX Runtime CPU %.3f (accuracy level 4: %.3f)",
                 ppl["quant_torch"], ppl_onnx, level4)  # fmt: skip
        top1 = agreement[ONNX_PROVIDER]["accuracy_level_0"]
        acts_quantized = config.quant.activations.enabled or config.quant.activations.kv_bits < 16
        report |= {
            "perplexity": ppl,
            "top1_agreement_with_pytorch": agreement,
            "onnx_parity": parity(ppl["quant_torch"], ppl_onnx, top1, acts_quantized),
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
                "not_fused": list(info.not_fused),
                "opset": config.onnx_opset,
                "quantized_weights": info.replaced_weights,
            },
            "quantization": {
                "layers": [dataclasses.asdict(s) for s in result.layers],
                "block_output_rel_error": result.block_output_rel_error,
            },
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
        write_handoff_files(tmp, report, source, data.calibration)
    check = report["onnx_parity"]
    if not check["passed"]:
        log.warning("ONNX differs from PyTorch: perplexity by %.2f%% (tolerance %.1f%%), top-1 agreement "
                    "%.2f%% (required: %s)", check["relative_difference"] * 100, check["tolerance"] * 100,
                    top1 * 100, check["min_top1_agreement"])  # fmt: skip
    return report


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


def write_handoff_files(folder: Path, report: dict[str, Any], source, calibration_ids) -> None:
    """What the receiving team reads: report.md with plots, MODEL_CARD.md, and manifest.json (last:
    it hashes every other file)."""
    write_report_md(report, folder)
    write_model_card(folder, report)
    weights = weight_files(source)
    write_manifest(
        folder,
        source={
            "spec": report["model"]["spec"],
            "model_type": report["model"]["model_type"],
            "weights_sha256": weights_sha256(weights) if weights else None,
            "weight_files": [p.name for p in weights],
        },
        calibration_hash=calibration_sha256(calibration_ids),
        metrics={key: report[key] for key in ("perplexity", "onnx_parity", "sizes_bytes") if key in report}
        | ({"validation": report["validation"]} if "validation" in report else {}),
        config=report["config"],
    )


def evaluate(
    model_spec: str,
    text: str | None,
    seq_len: int,
    max_windows: int | None,
    accuracy_level: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of an artifact folder in ORT (it holds model.onnx) or of a model in PyTorch."""
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
    else:
        logits_fn = torch_logits_fn(load_model(source))
        runtime = "pytorch"
    ppl = perplexity(logits_fn, windows, "perplexity", progress)
    return {
        "model": model_spec,
        "runtime": runtime,
        "perplexity": ppl,
        "windows": windows.shape[0],
        "seq_len": windows.shape[1],
        "bos": bos.to_dict(),
    }
