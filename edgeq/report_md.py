"""report.md: the artifact's report.json made readable, with plots, for the person receiving the model.

Every figure in it is read from the report dict (nothing is typed by hand), so report.md cannot drift
from report.json. Rendering the text is a pure function (``render_markdown``) that needs no plotting
library; only the plots need matplotlib, imported when a plot is drawn so that importing edgeq stays
light and never touches the process-wide matplotlib backend.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeq.config import COMPENSATION_MIN_TOKENS_PER_CHANNEL

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

REPORT_MD = "report.md"
PLOTS_DIR = "plots"
PLOT_FILES = {
    "perplexity": "perplexity.png",
    "layer_errors": "layer_errors.png",
    "layer_bits": "layer_bits.png",
    "latency": "latency.png",
}
ROLE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")
WORST_LAYERS = 5
MB = 1e6
DPI = 120
DASH = "—"
TIMING_LABELS = {
    "data_s": "Load calibration and evaluation data",
    "load_s": "Load model",
    "eval_fp_torch_s": "Evaluate FP model (PyTorch)",
    "eval_rotated_torch_s": "Evaluate rotated model (PyTorch)",
    "quantize_s": "Quantize",
    "export_onnx_s": "Export ONNX",
    "eval_quant_s": "Evaluate quantized model (PyTorch and ONNX Runtime)",
    "fp32_onnx_speed_s": "Export and time the FP32 ONNX reference",
    "validate_s": "Validate (gates, generation, latency)",
}


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def write_report_md(report: dict, folder: Path) -> list[Path]:
    """Write folder/report.md and the plots it embeds (folder/plots/*.png); return the paths written.

    A plot is drawn only when the report holds its data, and report.md links only the plots drawn, so
    every image link resolves inside the folder (the folder can be zipped and moved as it is).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = _draw_plots(report, folder / PLOTS_DIR)
    plot_names = {key: path.relative_to(folder).as_posix() for key, path in plots.items()}
    md_path = folder / REPORT_MD
    md_path.write_text(render_markdown(report, plot_names), encoding="utf-8")
    return [*plots.values(), md_path]


def render_markdown(report: dict, plot_names: dict[str, str]) -> str:
    """report.md's text. ``plot_names`` maps a plot key ("perplexity", "layer_errors", "latency") to its
    path relative to report.md; plots missing from it are not linked."""
    sections = [
        _title(report),
        _summary(report),
        _setup(report),
        _perplexity(report, plot_names),
        _size(report),
        _latency(report, plot_names),
        _gates(report),
        _timings(report),
        _layer_errors(report, plot_names),
        _layer_bits(report, plot_names),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def plot_layer_errors(report: dict, path: Path) -> Path:
    """Weight relative error of every quantized layer along depth, one line per role, above the
    relative error of each block's output: where along the model the error comes from."""
    layers = _layers(report)
    block_errors = _get(report, "quantization", "block_output_rel_error", default=[]) or []
    if not layers and not block_errors:
        raise ValueError("the report has no per-layer quantization errors to plot")
    fig, axes = _figure(8.0, 6.0, nrows=2)
    _draw_role_lines(axes[0], layers)
    _draw_block_errors(axes[1], block_errors)
    return _save(fig, path)


def plot_layer_bits(report: dict, path: Path) -> Path:
    """Weight width of every quantized layer along depth, one line per role: where a mixed-precision
    allocation spent its bits."""
    layers = _mixed_layers(report)
    if not layers:
        raise ValueError("the report has no per-layer widths to plot")
    fig, axes = _figure(8.0, 3.5)
    ax = axes[0]
    roles = _ordered_roles(layers)
    for offset, role in enumerate(roles):  # a small vertical offset per role keeps equal widths apart
        of_role = [layer for layer in layers if layer.get("role") == role]
        points = sorted((layer.get("block", 0), layer["bits"]) for layer in of_role)
        shift = 0.08 * (offset - (len(roles) - 1) / 2)
        ax.plot([b for b, _ in points], [w + shift for _, w in points], marker="o", markersize=3, label=role)
    ax.set_title("Weight bits per layer")
    ax.set_xlabel("block")
    ax.set_ylabel("bits")
    ax.set_yticks(sorted({layer["bits"] for layer in layers}))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(title="role", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_perplexity(report: dict, path: Path) -> Path:
    """Perplexity of each model and runtime as bars, annotated with the ratio to FP: the accuracy cost
    of quantizing and of running in ONNX Runtime, at a glance."""
    rows = [(label, value) for label, value, _ in _perplexity_rows(report) if _is_number(value)]
    if not rows:
        raise ValueError("the report has no perplexities to plot")
    fp = _get(report, "perplexity", "fp_torch")
    fig, axes = _figure(8.0, 0.5 * len(rows) + 1.5)
    _draw_perplexity_bars(axes[0], rows, fp)
    return _save(fig, path)


def plot_latency(report: dict, path: Path) -> Path | None:
    """Decode tokens/s and prefill ms (p50 and p90) per execution provider, next to the FP32 ONNX
    reference when the report has one; None when the report holds no latency measurements."""
    providers = _latency_providers(report)
    if not providers:
        return None
    reference = report.get("reference_speed") or {}
    fig, axes = _figure(10.0, 4.0, ncols=2)
    _draw_latency_bars(axes[0], providers, "decode_tokens_per_s", "Decode (tokens/s, higher is better)")
    _draw_latency_bars(axes[1], providers, "prefill_ms", "Prefill (ms, lower is better)")
    label = f"FP32 ONNX p50 ({_provider(reference.get('provider', '?'))})"
    _draw_reference(axes[0], reference.get("fp32_onnx_decode_tokens_per_s"), label)
    _draw_reference(axes[1], reference.get("fp32_onnx_prefill_ms"), label)
    for ax in axes:  # below the axes: above the bars it would hide their labels
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=3, frameon=False)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------------------------------


def _get(data: Any, *keys: str, default: Any = None) -> Any:
    """Nested lookup that tolerates missing optional keys (reports of older or partial runs)."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def _is_number(value: Any) -> bool:
    """A finite real, NumPy scalars included (the dict may come from memory, not only from JSON)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, spec: str) -> str:
    """A number in ``spec``, or a dash when it is missing (a table cell must never read "None")."""
    return format(value, spec) if _is_number(value) else DASH


def _ppl(value: Any) -> str:
    return _fmt(value, ".2f")


def _ratio(value: Any) -> str:
    return _fmt(value, ".3f")


def _mb(n_bytes: Any) -> str:
    return _fmt(n_bytes / MB, ".1f") if _is_number(n_bytes) else DASH


def _bytes(n_bytes: Any) -> str:
    is_int = isinstance(n_bytes, numbers.Integral) and not isinstance(n_bytes, bool)
    return format(int(n_bytes), ",d") if is_int else DASH


def _div(num: Any, den: Any) -> float | None:
    return num / den if _is_number(num) and _is_number(den) and den else None


def _pass(passed: Any) -> str:
    return DASH if passed is None else ("PASS" if passed else "FAIL")


def _cell(value: Any) -> str:
    """Table cells hold free text (file paths, rotation descriptions): keep pipes and newlines from
    breaking the table."""
    return str(value).replace("|", r"\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _image(plot_names: dict[str, str], key: str, alt: str) -> list[str]:
    return [f"![{alt}]({plot_names[key]})"] if key in plot_names else []


def _provider(name: str) -> str:
    """CPUExecutionProvider → CPU: the suffix is the same on every provider and costs table width."""
    return name.removesuffix("ExecutionProvider") or name


def _level(key: str) -> str:
    return key.replace("_", " ")


# ---------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------


def _title(report: dict) -> list[str]:
    quant = _get(report, "config", "quant", default={})
    fmt = _get(report, "onnx", "format") or _get(report, "config", "format", default="?")
    spec = _get(report, "model", "spec") or _get(report, "config", "model", default="model")
    return [f"# edgeq report: {spec} ({quant.get('scheme', '?')}, {quant.get('method', '?')}, {fmt} format)"]


def _verdict(report: dict) -> tuple[bool | None, list[str]]:
    """Overall verdict and the checks it rests on: ONNX parity, and the validation gates when run."""
    parts, results = [], []
    parity = report.get("onnx_parity")
    if parity:
        results.append(bool(parity.get("passed")))
        parts.append(f"ONNX parity {'passed' if parity.get('passed') else 'FAILED'}")
    validation = report.get("validation")
    if validation:
        gates = validation.get("gates", [])
        passed = validation.get("passed", all(g.get("passed") for g in gates))
        results.append(bool(passed))
        n_ok = sum(bool(g.get("passed")) for g in gates)
        parts.append(f"validation {'passed' if passed else 'FAILED'} ({n_ok} of {len(gates)} gates passed)")
        parts += _validation_failures(validation)
    else:
        parts.append("no validation gates were run")
    return (all(results) if results else None), parts


def _validation_failures(validation: dict) -> list[str]:
    """What failed, named, so the summary line alone says where to look."""
    gates, providers = validation.get("gates", []), validation.get("providers", {})
    failed = [
        f"{g.get('name')} on {_provider(g.get('provider') or DASH)}" for g in gates if not g.get("passed")
    ]
    broken = [_provider(name) for name, m in providers.items() if m.get("generation_ok") is False]
    unrunnable = [_provider(name) for name, m in providers.items() if "error" in m]
    parts = [f"failed gates: {', '.join(failed)}"] if failed else []
    parts += [f"cannot run on {', '.join(unrunnable)}"] if unrunnable else []
    return parts + ([f"generation gave NaN/Inf on {', '.join(broken)}"] if broken else [])


def _summary(report: dict) -> list[str]:
    passed, parts = _verdict(report)
    word = {None: "NOT CHECKED", True: "PASS", False: "FAIL"}[passed]
    lines = [f"**Verdict: {word}**: {'; '.join(parts)}."]
    ppl = report.get("perplexity", {})
    fp, quant = ppl.get("fp_torch"), ppl.get("quant_torch")
    sizes = report.get("sizes_bytes", {})
    fp32, onnx = sizes.get("fp32_parameters"), _onnx_total(sizes)
    if _is_number(fp) and _is_number(quant):
        ratio = _ratio(_div(quant, fp))
        lines.append(f"Perplexity {_ppl(fp)} (FP) → {_ppl(quant)} (quantized, PyTorch), ratio {ratio}.")
    if _is_number(fp32) and _is_number(onnx):
        lines.append(f"Size {_mb(fp32)} MB (FP32) → {_mb(onnx)} MB (ONNX), ratio {_ratio(_div(onnx, fp32))}.")
    return ["\n\n".join(lines)]


def _setup(report: dict) -> list[str]:
    rows = [
        *_model_rows(report),
        *_quant_rows(_get(report, "config", "quant", default={})),
        *_rotation_rows(report),
        *_data_rows(report),
        *_onnx_rows(report),
        ("edgeq version", report.get("edgeq_version", DASH)),
        ("Created", report.get("created", DASH)),
    ]
    return ["## Setup", "", *_table(("Setting", "Value"), rows)]


def _model_rows(report: dict) -> list[tuple[str, str]]:
    model = report.get("model", {})
    params = model.get("parameters")
    detail = f"{model.get('model_type', '?')} (adapter {model.get('adapter', '?')})"
    if isinstance(params, int):
        detail += f", {params:,} parameters"
    return [("Model", f"`{model.get('spec', DASH)}`"), ("Architecture", detail)]


def _quant_rows(quant: dict) -> list[tuple[str, str]]:
    method = quant.get("method", DASH)
    options = quant.get(method) if isinstance(quant.get(method), dict) else None
    method_text = method + (" (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else "")
    return [
        ("Scheme", quant.get("scheme", DASH)),
        ("Method", method_text),
        ("Weights", _weights_text(quant)),
        ("Activations", _activations_text(quant.get("activations", {}))),
        ("KV cache", _kv_text(_get(quant, "activations", "kv_bits"), _get(quant, "activations", "kv_shift"))),
    ]


def _weights_text(quant: dict) -> str:
    weights = quant.get("weights", {})
    group = weights.get("group_size")
    groups = "one scale per output channel" if group == -1 else f"group size {group}"
    symmetric = "symmetric" if weights.get("symmetric") else "asymmetric"
    return f"{weight_widths_text(quant)}, {groups}, {symmetric}"


def weight_widths_text(quant: dict) -> str:
    """ "4-bit", or under mixed precision "2/3/4/8-bit mixed, at most 3 bits on average"."""
    mixed = quant.get("mixed") or {}
    widths = sorted(set((mixed.get("widths") or {}).values()))
    if mixed.get("avg_bits") is None or not widths:
        return f"{_get(quant, 'weights', 'bits', default='?')}-bit"
    return f"{'/'.join(map(str, widths))}-bit mixed, at most {mixed['avg_bits']:g} bits on average (APTQ)"


def compensation_condition(act: dict) -> str:
    """The condition under which the weights compensated the activations' rounding, as text; "" when
    the config (a report's ``activations``) did not ask for it or calibrated on float inputs."""
    if not (act.get("compensate_rounding") and act.get("calibrate_quantized", True)):
        return ""
    return f"≥ {COMPENSATION_MIN_TOKENS_PER_CHANNEL} calibration tokens per channel"


def _activations_text(act: dict) -> str:
    bits = act.get("bits")
    if not _is_number(bits) or bits >= 16:
        return "not quantized (float)"
    text = f"{bits}-bit, {'symmetric' if act.get('symmetric') else 'asymmetric'}"
    if act.get("clip_ratio") is not None:
        text += f", clip ratio {act['clip_ratio']}"
    if act.get("shift"):
        text += ", each input shifted by its calibration mean"
    if condition := compensation_condition(act):
        text += f", the weights fitted to compensate its rounding ({condition})"
    if act.get("down_proj_bits") is not None:
        text += f"; down_proj input {act['down_proj_bits']}-bit"
    return text


def _kv_text(kv_bits: Any, shift: Any) -> str:
    if not _is_number(kv_bits) or kv_bits >= 16:
        return "not quantized (float)"
    shifted = ", shifted by the calibration mean" if shift is True else ""
    return f"{kv_bits}-bit, asymmetric per token and head{shifted}"


def _rotation_rows(report: dict) -> list[tuple[str, str]]:
    """One row per rotation, applied with how its matrix was built or skipped with why: the reader
    should not have to know which rotations exist to see which did not run."""
    rotation = report.get("rotation", {})
    rows = [(f"Rotation {k.upper()}", f"applied: {v}") for k, v in rotation.get("applied", {}).items()]
    rows += [(f"Rotation {k.upper()}", f"skipped: {v}") for k, v in rotation.get("skipped", {}).items()]
    if not rows:
        enabled = _get(report, "config", "quant", "rotation", "enabled")
        rows = [("Rotations", "none (rotation disabled)" if not enabled else "none")]
    return rows


def _data_rows(report: dict) -> list[tuple[str, str]]:
    calib, evaluation = report.get("calibration", {}), report.get("evaluation", {})
    shape = calib.get("shape") or []
    shape_text = " × ".join(str(s) for s in shape) + " tokens" if shape else DASH
    seed = _get(report, "config", "calibration", "seed", default=DASH)
    windows = f"{evaluation.get('windows', '?')} windows × {evaluation.get('seq_len', '?')} tokens"
    return [
        ("Calibration", f"`{calib.get('file', DASH)}`: {calib.get('documents', '?')} documents"),
        ("Calibration windows", f"{shape_text}, seed {seed}"),
        ("Evaluation", f"{evaluation.get('text', DASH)}: {windows}"),
    ]


def _onnx_rows(report: dict) -> list[tuple[str, str]]:
    onnx = report.get("onnx", {})
    opset = onnx.get("opset", _get(report, "config", "onnx_opset", default="?"))
    fmt = onnx.get("format", _get(report, "config", "format", default="?"))
    text = f"opset {opset}, {fmt} format, `{onnx.get('file', DASH)}`"
    if onnx.get("quantized_weights") is not None:
        text += f", {onnx['quantized_weights']} quantized weight nodes"
    if onnx.get("graph") == "fused":
        text += "; graph of ORT's fused operators (GroupQueryAttention, SkipSimplifiedLayerNormalization)"
    elif onnx.get("not_fused"):
        text += "; optimum's graph, not the fused one: " + "; ".join(onnx["not_fused"])
    if onnx.get("qdq_form") == "openvino":
        done = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in (onnx.get("form_rewrites") or {}).items())
        text += f"; in the form OpenVINO reads (`--qdq-form openvino`{'; ' + done if done else ''})"
    return [("ONNX", text)]


def _perplexity_rows(report: dict) -> list[tuple[str, Any, Any]]:
    """(label, perplexity, top-1 agreement with PyTorch) for every model and runtime measured."""
    ppl = report.get("perplexity", {})
    rows: list[tuple[str, Any, Any]] = [("FP (PyTorch)", ppl.get("fp_torch"), None)]
    if "rotated_torch" in ppl:
        rows.append(("Rotated FP (PyTorch)", ppl["rotated_torch"], None))
    rows.append(("Quantized (PyTorch)", ppl.get("quant_torch"), None))
    top1 = report.get("top1_agreement_with_pytorch", {})
    for provider, levels in ppl.get("quant_onnx", {}).items():
        for level, value in levels.items():
            agreement = _get(top1, provider, level)
            rows.append((f"Quantized (ONNX {_provider(provider)}, {_level(level)})", value, agreement))
    return rows


def _perplexity(report: dict, plot_names: dict[str, str]) -> list[str]:
    if "perplexity" not in report:
        return []
    fp = _get(report, "perplexity", "fp_torch")
    rows = [(label, _ppl(v), _ratio(_div(v, fp)), _ratio(a)) for label, v, a in _perplexity_rows(report)]
    headers = ("Model", "Perplexity", "Ratio to FP", "Top-1 agreement with PyTorch")
    lines = ["## Perplexity", "", *_table(headers, rows), *_not_run(report), "", *_parity_line(report)]
    lines += ["", *_image(plot_names, "perplexity", "Perplexity by model and runtime")]
    return lines + _validation_accuracy(report)


def _not_run(report: dict) -> list[str]:
    """The runtimes asked for that did not score the graph, and why."""
    not_run = _get(report, "perplexity", "quant_onnx_not_run", default={}) or {}
    return ["", *(f"Not run on {_provider(name)}: {why}" for name, why in not_run.items())] if not_run else []


def _parity_line(report: dict) -> list[str]:
    parity = report.get("onnx_parity")
    if not parity:
        return []
    return [
        f"ONNX parity: **{_pass(parity.get('passed'))}**: relative perplexity difference "
        f"{_fmt(parity.get('relative_difference'), '.2e')} (tolerance {parity.get('tolerance', DASH)}), "
        f"top-1 agreement {_ratio(parity.get('top1_agreement'))} "
        f"(minimum {parity.get('min_top1_agreement') or 'not required'}). {parity.get('what', '')}".rstrip()
    ]


def _validation_accuracy(report: dict) -> list[str]:
    """The artifact as validated on each execution provider, against the stored FP reference."""
    providers = _get(report, "validation", "providers", default={}) or {}
    if not providers:
        return []
    fp = _get(report, "perplexity", "fp_torch")
    rows = [_validation_row(_provider(name), m, fp) for name, m in providers.items()]
    headers = ("Provider", "Perplexity", "Ratio to FP", "Top-1 agreement with FP", "KL from FP (nats)")
    return ["", "### Validation accuracy", "", *_table((*headers, "Generation"), rows)]


def _validation_row(provider: str, m: dict, fp: Any) -> tuple[str, ...]:
    """One provider's accuracy row; a provider that could not run here says why instead."""
    if "skipped" in m:
        return (provider, DASH, DASH, DASH, DASH, f"skipped: {m['skipped']}")
    if "error" in m:
        return (provider, DASH, DASH, DASH, DASH, f"**cannot run it**: {m['error']}")
    generation = {None: DASH, True: "ok", False: "NaN/Inf"}[m.get("generation_ok")]
    ppl = m.get("perplexity")
    agreement, kl = _ratio(m.get("top1_agreement_fp")), _fmt(m.get("kl_fp"), ".4f")
    return (provider, _ppl(ppl), _ratio(_div(ppl, fp)), agreement, kl, generation)


def _onnx_total(sizes: dict) -> int | None:
    """ONNX bytes on disk: the model file plus its external data file when there is one (the report
    holds ``false`` there when the weights are inside model.onnx)."""
    model, external = sizes.get("onnx_model"), sizes.get("onnx_external_data")
    if not _is_number(model):
        return None
    return model + (external if _is_number(external) else 0)


def _size(report: dict) -> list[str]:
    sizes = report.get("sizes_bytes")
    if not sizes:
        return []
    fp32, total = sizes.get("fp32_parameters"), _onnx_total(sizes)
    rows = [("FP32 parameters", _bytes(fp32), _mb(fp32), _ratio(1.0 if _is_number(fp32) else None), DASH)]
    if _is_number(sizes.get("onnx_external_data")):
        rows.append(("ONNX model file", _bytes(sizes["onnx_model"]), _mb(sizes["onnx_model"]), DASH, DASH))
        ext = sizes["onnx_external_data"]
        rows.append(("ONNX external data", _bytes(ext), _mb(ext), DASH, DASH))
    rows.append(("**ONNX total**", _bytes(total), _mb(total), _ratio(_div(total, fp32)), DASH))
    for part, n in (sizes.get("onnx_components") or {}).items():
        rows.append((f"ONNX: {part}", _bytes(n), _mb(n), _ratio(_div(n, fp32)), _ratio(_div(n, total))))
    headers = ("Part", "Bytes", "MB", "Ratio to FP32", "Share of ONNX")
    return ["## Size", "", *_table(headers, rows)]


def _latency_providers(report: dict) -> dict[str, dict]:
    providers = _get(report, "validation", "providers", default={}) or {}
    return {name: m for name, m in providers.items() if "decode_tokens_per_s" in m or "prefill_ms" in m}


def _latency(report: dict, plot_names: dict[str, str]) -> list[str]:
    providers = _latency_providers(report)
    if not providers:
        return []
    rows = [_latency_row(_provider(name), m) for name, m in providers.items()]
    rows += _reference_speed_rows(report.get("reference_speed"))
    prefill = ("Prefill p50 (ms)", "Prefill p90 (ms)")
    decode = ("Decode p50 (tokens/s)", "Decode p90 (tokens/s)")
    lines = ["## Latency", "", *_table(("Provider", *prefill, *decode, "Peak RSS (MB)"), rows)]
    return lines + ["", *_image(plot_names, "latency", "Prefill and decode speed per execution provider")]


def _latency_row(provider: str, m: dict) -> tuple[str, ...]:
    prefill = [_fmt(_get(m, "prefill_ms", pct), ".1f") for pct in ("p50", "p90")]
    decode = [_fmt(_get(m, "decode_tokens_per_s", pct), ".1f") for pct in ("p50", "p90")]
    return (provider, *prefill, *decode, _mb(m.get("peak_rss_bytes")))


def _reference_speed_rows(ref: dict | None) -> list[tuple[str, ...]]:
    """The FP32 ONNX model's speed measured at export (p50 only): what decode_speedup is relative to."""
    if not ref:
        return []
    label = f"FP32 ONNX reference ({_provider(ref.get('provider', '?'))}, {ref.get('threads', '?')} threads)"
    prefill, decode = ref.get("fp32_onnx_prefill_ms"), ref.get("fp32_onnx_decode_tokens_per_s")
    return [(label, _fmt(prefill, ".1f"), DASH, _fmt(decode, ".1f"), DASH, DASH)]


def _gates(report: dict) -> list[str]:
    gates = _get(report, "validation", "gates", default=[]) or []
    if not gates:
        return []
    rows = [_gate_row(g) for g in gates]
    return ["## Gates", "", *_table(("Gate", "Provider", "Value", "Condition", "Result", "Note"), rows)]


def _gate_row(g: dict) -> tuple[str, ...]:
    condition = f"{g.get('op', '?')} {g.get('limit', '?')}"
    value = _fmt(g.get("value"), ".4g") if g.get("value") is not None else "n/a"
    name, provider = g.get("name", DASH), _provider(g.get("provider") or DASH)
    return (name, provider, value, condition, f"**{_pass(g.get('passed'))}**", g.get("note") or "")


def _timings(report: dict) -> list[str]:
    timings = {k: v for k, v in (report.get("timings_s") or {}).items() if _is_number(v)}
    if not timings:
        return []
    rows = [(_timing_label(key), f"{seconds:.2f}") for key, seconds in timings.items()]
    rows.append(("**Total**", f"{sum(timings.values()):.2f}"))
    return ["## Timings", "", *_table(("Stage", "Seconds"), rows)]


def _timing_label(key: str) -> str:
    """A readable stage name; a stage this module does not know yet still shows, named by its key."""
    return TIMING_LABELS.get(key, key.removesuffix("_s").replace("_", " "))


def _layers(report: dict) -> list[dict]:
    layers = _get(report, "quantization", "layers", default=[]) or []
    return [layer for layer in layers if _is_number(layer.get("weight_rel_error"))]


def _layer_errors(report: dict, plot_names: dict[str, str]) -> list[str]:
    layers = _layers(report)
    block_errors = _get(report, "quantization", "block_output_rel_error", default=[]) or []
    if not layers and not block_errors:
        return []
    lines = ["## Per-layer quantization error", ""]
    lines += _image(plot_names, "layer_errors", "Per-layer weight error and block output error along depth")
    lines += ["", *_block_error_line(block_errors), "", *_role_table(layers), "", *_worst_layers(layers)]
    return lines + _clip_lines(report) + _fallback_lines(report)


def _clip_lines(report: dict) -> list[str]:
    """The searched activation clip ratios, per role: how far each input's grid was clipped."""
    ratios = _get(report, "quantization", "clip_ratios", default={}) or {}
    by_role: dict[str, list[float]] = {}
    for name, ratio in ratios.items():
        if _is_number(ratio):
            by_role.setdefault(name.rsplit(".", 1)[-1], []).append(ratio)
    if not by_role:
        return []
    parts = [f"{role} {min(v):g}–{max(v):g}" for role, v in by_role.items()]
    return ["", f"Activation clip ratios searched per input (range over the blocks): {', '.join(parts)}."]


def _fallback_lines(report: dict) -> list[str]:
    """The numerical fallbacks the quantization took (a Hessian that needed more dampening)."""
    fallbacks = _get(report, "quantization", "fallbacks", default=[]) or []
    if not fallbacks:
        return ["", "Numerical fallbacks: none (every Hessian factored at the configured dampening)."]
    return ["", "Numerical fallbacks taken:", "", *(f"- {line}" for line in fallbacks)]


def _mixed_layers(report: dict) -> list[dict]:
    """The layers with their widths, when the export allocated mixed precision (else [])."""
    if _get(report, "config", "quant", "mixed", "avg_bits") is None:
        return []
    return [layer for layer in _layers(report) if isinstance(layer.get("bits"), int)]


def _layer_bits(report: dict, plot_names: dict[str, str]) -> list[str]:
    layers = _mixed_layers(report)
    if not layers:
        return []
    mixed = _get(report, "quantization", "mixed_precision", default={}) or {}
    budget = _get(report, "config", "quant", "mixed", "avg_bits")
    lines = ["## Mixed precision", ""]
    average = mixed.get("average_bits")
    summary = f"Budget: an average of {budget:g} bits per weight over the block linears"
    if _is_number(average):
        summary += f"; allocated {average:.3f} (parameter-weighted)"
    lines += [summary + ". Widths follow each linear's Hessian-trace sensitivity (APTQ).", ""]
    lines += _image(plot_names, "layer_bits", "Weight bits per layer along depth")
    widths = sorted({layer["bits"] for layer in layers})
    rows = []
    for role in _ordered_roles(layers):
        of_role = [layer["bits"] for layer in layers if layer.get("role") == role]
        rows.append((role, *(of_role.count(w) for w in widths)))
    lines += ["", *_table(("Role", *(f"{w}-bit layers" for w in widths)), rows)]
    return lines


def _block_error_line(block_errors: list[float]) -> list[str]:
    if not block_errors or not all(_is_number(e) for e in block_errors):
        return []
    worst = max(range(len(block_errors)), key=block_errors.__getitem__)
    return [
        "Block output relative error (each block's output with quantized vs original weights, on the "
        f"calibration data): {block_errors[0]:.4f} at block 0, {block_errors[-1]:.4f} at "
        f"block {len(block_errors) - 1}, largest {block_errors[worst]:.4f} at block {worst}."
    ]


def _ordered_roles(layers: list[dict]) -> list[str]:
    roles = {layer.get("role", "?") for layer in layers}
    return [r for r in ROLE_ORDER if r in roles] + sorted(roles - set(ROLE_ORDER))


def _role_table(layers: list[dict]) -> list[str]:
    if not layers:
        return []
    rows = []
    for role in _ordered_roles(layers):
        errors = [layer["weight_rel_error"] for layer in layers if layer.get("role", "?") == role]
        rows.append((role, len(errors), f"{sum(errors) / len(errors):.4f}", f"{max(errors):.4f}"))
    return _table(("Role", "Layers", "Mean weight relative error", "Max weight relative error"), rows)


def _worst_layers(layers: list[dict]) -> list[str]:
    if not layers:
        return []
    worst = sorted(layers, key=lambda layer: layer["weight_rel_error"], reverse=True)[:WORST_LAYERS]
    rows = [(rank, *_layer_cells(layer)) for rank, layer in enumerate(worst, start=1)]
    headers = ("Rank", "Layer", "Block", "Role", "Weight relative error")
    return [f"The {len(worst)} layers with the largest weight relative error:", "", *_table(headers, rows)]


def _layer_cells(layer: dict) -> tuple[Any, ...]:
    name, error = f"`{layer.get('name', DASH)}`", f"{layer['weight_rel_error']:.4f}"
    return (name, layer.get("block", DASH), layer.get("role", DASH), error)


# ---------------------------------------------------------------------------------------------------
# Plotting
# ---------------------------------------------------------------------------------------------------


def _draw_plots(report: dict, plots_dir: Path) -> dict[str, Path]:
    """Draw each plot whose data the report holds, keyed as ``render_markdown`` expects."""
    plots: dict[str, Path] = {}
    if any(_is_number(value) for _, value, _ in _perplexity_rows(report)):
        plots["perplexity"] = plot_perplexity(report, plots_dir / PLOT_FILES["perplexity"])
    if _layers(report) or _get(report, "quantization", "block_output_rel_error"):
        plots["layer_errors"] = plot_layer_errors(report, plots_dir / PLOT_FILES["layer_errors"])
    if _mixed_layers(report):
        plots["layer_bits"] = plot_layer_bits(report, plots_dir / PLOT_FILES["layer_bits"])
    latency = plot_latency(report, plots_dir / PLOT_FILES["latency"])
    if latency is not None:
        plots["latency"] = latency
    return plots


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure on an explicit Agg canvas: headless, and it leaves pyplot's global backend and figure
    list alone (edgeq may run inside a notebook or another program that uses matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).flat)


def _save(fig: Figure, path: Path) -> Path:
    """PNG without the matplotlib version in its metadata, so the same report gives the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _draw_role_lines(ax: Axes, layers: list[dict]) -> None:
    for role in _ordered_roles(layers):
        of_role = [layer for layer in layers if layer.get("role", "?") == role]
        points = sorted((layer.get("block", 0), layer["weight_rel_error"]) for layer in of_role)
        ax.plot([b for b, _ in points], [e for _, e in points], marker="o", markersize=3, label=role)
    ax.set_title("Weight relative error per layer")
    ax.set_xlabel("block")
    ax.set_ylabel("‖W − Q(W)‖ / ‖W‖")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if layers:
        ax.legend(title="role", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _draw_block_errors(ax: Axes, block_errors: list[float]) -> None:
    blocks = [i for i, e in enumerate(block_errors) if _is_number(e)]
    ax.plot(blocks, [block_errors[i] for i in blocks], marker="o", markersize=3, color="black")
    ax.set_title("Block output relative error (quantized vs original block, same calibration inputs)")
    ax.set_xlabel("block")
    ax.set_ylabel("relative error")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)


def _draw_perplexity_bars(ax: Axes, rows: list[tuple[str, float]], fp: Any) -> None:
    labels = [label for label, _ in rows]
    values = [value for _, value in rows]
    colors = [_bar_color(label) for label in labels]
    bars = ax.barh(range(len(rows)), values, color=colors)
    notes = [_ppl(v) + (f"  ({_ratio(_div(v, fp))}× FP)" if _is_number(fp) else "") for v in values]
    ax.bar_label(bars, labels=notes, padding=3, fontsize="small")
    if _is_number(fp):
        ax.axvline(fp, color="black", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels=labels, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlim(0, max(values) * 1.35)
    ax.set_xlabel("perplexity (lower is better)")
    ax.set_title("Perplexity")


def _bar_color(label: str) -> str:
    """Gray for the float references, blue for quantized PyTorch, orange for ONNX Runtime."""
    if "FP" in label:
        return "tab:gray"
    return "tab:orange" if "ONNX" in label else "tab:blue"


def _draw_latency_bars(ax: Axes, providers: dict[str, dict], metric: str, title: str) -> None:
    names = [_provider(name) for name in providers]
    width = 0.38
    for offset, pct in ((-width / 2, "p50"), (width / 2, "p90")):
        values = [_get(m, metric, pct) for m in providers.values()]
        values = [v if _is_number(v) else 0.0 for v in values]
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=pct)
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize="small")
    ax.set_xticks(range(len(names)), labels=names)
    ax.set_xlim(-0.75, len(names) - 0.25)
    ax.set_title(title)
    ax.margins(y=0.15)


def _draw_reference(ax: Axes, value: Any, label: str) -> None:
    """The FP32 ONNX model's p50 as a dashed line: what the decode_speedup gate divides by."""
    if _is_number(value):
        ax.axhline(value, color="black", linestyle="--", linewidth=0.8, label=label)
