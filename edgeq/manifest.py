"""The handoff bundle: ``manifest.json`` and ``MODEL_CARD.md`` beside the artifact files.

A receiving team should be able to trust a folder without re-running the export: the manifest pins the
hash and size of every file, the exact source weights and calibration tokens, the library versions and
the ONNX graph's interface, and ``verify_bundle`` re-checks the folder against it. The card says, in
words and with the report's own numbers, what the model is, how to run it and what was measured.

This module imports neither torch nor transformers, so ``edgeq verify`` starts fast.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx

import edgeq
from edgeq.errors import EdgeqError
from edgeq.report_md import compensation_condition, weight_widths_text

MANIFEST_FILE = "manifest.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
ONNX_FILE = "model.onnx"
_CHUNK = 1 << 20  # 1 MiB: multi-GB weights are hashed without holding them in memory


# --- hashing -----------------------------------------------------------------------------------------


def _update(digest: Any, path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)


def sha256_file(path: Path) -> str:
    """SHA-256 of one file, read in 1 MiB chunks (the same digest as ``sha256sum``)."""
    digest = hashlib.sha256()
    _update(digest, path)
    return digest.hexdigest()


def weights_sha256(paths: Iterable[Path]) -> str:
    """One digest over the source model's weight files: their bytes concatenated, sorted by file name.

    Sorting makes the digest independent of the order the files were found in; with a single file
    it equals that file's plain SHA-256, which the Hugging Face Hub shows for every LFS file.
    """
    files = sorted((Path(p) for p in paths), key=lambda p: (p.name, str(p)))
    if not files:
        raise EdgeqError("no weight files to hash (expected .safetensors, .gguf or .bin files)")
    digest = hashlib.sha256()
    for path in files:
        _update(digest, path)
    return digest.hexdigest()


def calibration_sha256(ids: Any) -> str:
    """Digest of the calibration token ids (a torch tensor or an array), as little-endian int64 plus
    the shape, so the same tokens give the same digest whatever dtype or device held them."""
    if hasattr(ids, "detach"):  # a torch tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"calibration ids must be integers, got {array.dtype}")
    array = np.ascontiguousarray(array, dtype="<i8")
    digest = hashlib.sha256(f"int64{list(array.shape)}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


# --- the ONNX graph's interface ------------------------------------------------------------------------


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    except (KeyError, ValueError):  # no numpy equivalent (or not a tensor): keep ONNX's name
        dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
    shape: list[int | str | None] = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
    ]
    return {"name": value.name, "dtype": dtype, "shape": shape}


def _io(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    return {
        "inputs": [_value_info(v) for v in model.graph.input],
        "outputs": [_value_info(v) for v in model.graph.output],
    }


def onnx_io(model_path: Path) -> dict[str, list[dict[str, Any]]]:
    """The graph's inputs and outputs: name, numpy-style dtype, shape (ints, or symbolic dim names).

    The receiving runtime is wired to these names, so the manifest pins them. External weights are
    not loaded: only the graph is needed.
    """
    return _io(onnx.load(str(model_path), load_external_data=False))


# --- manifest ------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# Files that carry the run's timestamps and timings (the report's wall times, the latency
# measurements): hashed apart from the rest, so that two runs of one config share ``content_sha256``.
RUN_FILES = ("report.json", "report.md", MODEL_CARD_FILE, "plots/latency.png")


def _listed_files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a relative posix path, except the manifest itself."""
    paths = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(p for p in paths if p != MANIFEST_FILE)


def _hashes(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    return {rel: {"sha256": sha256_file(folder / rel), "bytes": (folder / rel).stat().st_size}
            for rel in names}  # fmt: skip


def content_sha256(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's content: everything but ``run`` and this hash itself, as canonical
    JSON (sorted keys). Equal for two exports of one config, seed and source."""
    content = {k: v for k, v in manifest.items() if k not in ("run", "content_sha256")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def build_manifest(
    folder: Path, *, source: dict[str, Any], calibration_hash: str, metrics: dict[str, Any], config: dict,
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The manifest of an artifact folder; it hashes every file, so write MODEL_CARD.md first.

    Its content (files, source, calibration, config, graph, versions, accuracy ``metrics``) is
    hashed into ``content_sha256``; ``run`` keeps apart what changes from run to run: the creation
    time, the files of ``RUN_FILES`` and the given ``run`` entries (timings, latency)."""
    folder = Path(folder)
    model_path = folder / ONNX_FILE
    if not model_path.is_file():
        raise EdgeqError(f"{folder} has no {ONNX_FILE}: not an edgeq artifact folder")
    model = onnx.load(str(model_path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    external = any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    listed = _listed_files(folder)
    manifest = {
        "edgeq_version": edgeq.__version__,
        "source": source,
        "calibration_sha256": calibration_hash,
        "config": config,
        "onnx": {"opset": opset, "file": ONNX_FILE, "external_data": external, "io": _io(model)},
        "onnxruntime_version": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "onnx_version": onnx.__version__,
        "torch_version": _version("torch"),
        "metrics": metrics,
        "files": _hashes(folder, (rel for rel in listed if rel not in RUN_FILES)),
    }
    manifest["content_sha256"] = content_sha256(manifest)
    manifest["run"] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(run or {}),
        "files": _hashes(folder, (rel for rel in listed if rel in RUN_FILES)),
    }
    return manifest


def write_manifest(folder: Path, **kwargs: Any) -> Path:
    """Build the manifest (keyword arguments of ``build_manifest``) and write it into ``folder``."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(build_manifest(folder, **kwargs), indent=2) + "\n", encoding="utf-8")
    return path


def _read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file the manifest lists (content and run files alike), by relative path."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise EdgeqError(f"{folder} has no {MANIFEST_FILE}: nothing to verify against")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        return dict(manifest["files"]) | dict(manifest.get("run", {}).get("files", {}))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise EdgeqError(f"{path} is not a valid edgeq manifest ({e.__class__.__name__}: {e})") from e


def layout_problems(folder: Path) -> list[str]:
    """The files the manifest lists that are missing, and the files it does not list: one line
    each. A folder laid out otherwise than exported is bad input for ``verify`` and ``validate``."""
    folder = Path(folder)
    listed = _read_manifest(folder)
    problems = []
    for rel in sorted(listed):
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts:  # a tampered manifest must not reach outside
            problems.append(f"unsafe path: {rel} (outside the folder)")
        elif not (folder / pure).is_file():
            problems.append(f"missing: {rel}")
    problems += [
        f"extra: {rel} (not in {MANIFEST_FILE})" for rel in _listed_files(folder) if rel not in listed
    ]
    return problems


def verify_bundle(folder: Path) -> list[str]:
    """Re-hash every file the manifest lists; return one line per problem (missing, changed, extra,
    or a listed path outside the folder). An empty list means the folder is exactly what was exported."""
    folder = Path(folder)
    problems = layout_problems(folder)
    for rel, expected in sorted(_read_manifest(folder).items()):
        pure = PurePosixPath(rel)
        file = folder / pure
        if pure.is_absolute() or ".." in pure.parts or not file.is_file():
            continue  # in layout_problems already
        # the size check first: a changed multi-GB file is caught without hashing it
        if file.stat().st_size != expected["bytes"] or sha256_file(file) != expected["sha256"]:
            problems.append(f"changed: {rel} (size or SHA-256 differs from {MANIFEST_FILE})")
    return problems


# --- model card ----------------------------------------------------------------------------------------


def _num(value: Any, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _pct(value: Any) -> str:
    return _num(value, ".2%")


def _mb(n: Any) -> str:
    return f"{n / 1e6:.2f} MB ({n:,} bytes)" if isinstance(n, int) else "—"


def _yes(value: Any) -> str:
    return {True: "passed", False: "**failed**"}.get(value, "—")


def _runtime_notes(
    quant: dict[str, Any], fmt: str, rotation: dict[str, Any], graph: str = "", qdq_form: str | None = None
) -> list[str]:
    """What runs natively and what is emulated, per runtime: the part a receiving team gets wrong."""
    weights, acts = quant.get("weights", {}), quant.get("activations") or {}
    wbits, abits, kv_bits = weights.get("bits"), acts.get("bits", 16), acts.get("kv_bits", 16)
    container = "" if wbits == 4 else f" (int{wbits} values stored in int4 containers)"
    if (quant.get("mixed") or {}).get("avg_bits") is not None:
        container = (
            f" (each linear its own width: {weight_widths_text(quant)}; 3-bit values in int4 "
            "containers, 2-bit in int2 at opset 25 or MatMulNBits bits=2, 8-bit in int8)"
        )
    if fmt == "ort" and graph == "fused":
        how = (
            "packed for `com.microsoft::MatMulNBits` in a graph of ONNX Runtime's fused operators "
            "(`GroupQueryAttention` with RoPE and the KV cache, `SkipSimplifiedLayerNormalization`): "
            "the graph needs ONNX Runtime's contrib operators, other runtimes cannot load it"
        )
    elif fmt == "ort":
        how = "packed for `com.microsoft::MatMulNBits`"
    else:
        how = "int4 `DequantizeLinear → MatMul` (standard ONNX), which ORT fuses into `MatMulNBits`"
    head_bits = quant.get("lm_head_bits", 16)
    head = f"int{head_bits}" if head_bits < 16 else "float"
    notes = [
        f"- **Weights**: int{wbits}{container}, {how}; ONNX Runtime runs them natively in MatMulNBits "
        "on CPU and CUDA (accuracy level 4 quantizes the activations to int8 inside the kernel). "
        f"lm_head: {head}; embedding: {'int' + str(wbits) if quant.get('quantize_embedding') else 'float'}."
    ]
    if abits < 16:
        down = acts.get("down_proj_bits")
        down_note = f" (down_proj's input: int{down})" if down is not None else ""
        notes.append(
            f"- **Activations**: int{abits}{down_note}, per token, as dynamic `QuantizeLinear → "
            "DequantizeLinear` pairs on the inputs of the block linears, one per tensor (q/k/v share "
            "theirs, as do gate/up). ONNX Runtime *emulates* them "
            "in float (it has no int4 × int4 kernel): the numbers are the quantized model's, the speed "
            "is not. NPU toolchains that consume QDQ graphs run them in integers."
        )
    else:
        notes.append("- **Activations**: float (weight-only quantization).")
    if kv_bits < 16:
        notes.append(
            f"- **KV cache**: int{kv_bits} per token and head, likewise emulated with Q/DQ pairs "
            "(the cache tensors themselves are stored in float)."
        )
    else:
        notes.append("- **KV cache**: float.")
    applied = rotation.get("applied") or {}
    online = [k.upper() for k in ("r3", "r4", "r5") if k in applied]
    fused = [k.upper() for k in ("r1", "r2") if k in applied]
    if fused:
        notes.append(f"- **Rotations {', '.join(fused)}**: fused into the weights; no cost at run time.")
    if online:
        notes.append(
            f"- **Rotations {', '.join(online)}**: run online as small MatMuls (Kronecker factors of "
            "a Hadamard), on every runtime."
        )
    if fmt == "qdq":
        notes.append(_openvino_note(qdq_form, abits < 16 or kv_bits < 16))
    return notes


def _openvino_note(qdq_form: str | None, activations_quantized: bool) -> str:
    """What OpenVINO's CPU runtime makes of a qdq graph in this form."""
    if qdq_form == "openvino":
        emulated = (
            " Its CPU plugin runs the activation Q/DQ as FakeQuantize, in float." * activations_quantized
        )
        return (
            "- **OpenVINO**: this graph is in the form OpenVINO's ONNX frontend reads (`--qdq-form "
            "openvino`: a weight whose input width is not a whole number of blocks as two MatMuls, "
            "per-token activation Q/DQ per axis on a transposed view); the same numbers as the standard "
            f"form.{emulated}"
        )
    return (
        "- **OpenVINO**: its ONNX frontend (2026.4) rejects a blocked DequantizeLinear whose input width "
        "is not a whole number of blocks and per-token activation Q/DQ pairs on dynamic shapes; "
        "`edgeq export --qdq-form openvino` writes the same numbers in a form it reads."
    )


def _gate_line(gate: Any) -> str:
    """A gate as edgeq validate reports it ({name, provider, value, op, limit, passed, note}), or as given."""
    if not isinstance(gate, dict):
        return f"- {gate}"
    where = f" on {gate['provider']}" if gate.get("provider") else ""
    check = (
        f": {_num(gate.get('value'), '.4g')} {gate['op']} {_num(gate.get('limit'), 'g')}"
        if "op" in gate
        else ""
    )
    note = f" ({gate['note']})" if gate.get("note") else ""
    return f"- {gate.get('name', 'gate')}{where}{check} — {_yes(gate.get('passed'))}{note}"


def _validation_lines(validation: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "### Validation (`edgeq validate`)",
        "",
        "| provider | perplexity | top-1 agreement with FP | KL to FP | prefill ms p50 / p90 | "
        "decode tokens/s p50 / p90 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in (validation.get("providers") or {}).items():
        if "skipped" in v or "error" in v:
            status = f"skipped: {v['skipped']}" if "skipped" in v else f"**cannot run it**: {v['error']}"
            lines.append(f"| {name} | {status} | | | | |")
            continue
        pre, dec = v.get("prefill_ms") or {}, v.get("decode_tokens_per_s") or {}
        lines.append(
            f"| {name} | {_num(v.get('perplexity'))} | {_pct(v.get('top1_agreement_fp'))} | "
            f"{_num(v.get('kl_fp'), '.4g')} | {_num(pre.get('p50'), '.1f')} / {_num(pre.get('p90'), '.1f')} "
            f"| {_num(dec.get('p50'), '.1f')} / {_num(dec.get('p90'), '.1f')} |"
        )
    gates = validation.get("gates") or []
    if gates:
        lines += ["", "Gates:", "", *(_gate_line(g) for g in gates)]
    lines += ["", f"Validation overall: {_yes(validation.get('passed'))}."]
    return lines


def _genai_lines(genai: dict[str, Any]) -> list[str]:
    """How to run the folder with onnxruntime-genai, where the export wrote its config."""
    if not genai.get("config"):
        return []
    return [
        f"With onnxruntime-genai, from `{genai['config']}` (no optimum or transformers needed):",
        "",
        "```python",
        "import onnxruntime_genai as og",
        "",
        'model = og.Model("path/to/this/folder")',
        "tokenizer = og.Tokenizer(model)",
        'tokenizer.update_options(add_special_tokens="true")  # BOS where the tokenizer adds it',
        "params = og.GeneratorParams(model)",
        "params.set_search_options(max_length=64)  # prompt + new tokens: the KV cache's length",
        "generator = og.Generator(model, params)",
        'generator.append_tokens(tokenizer.encode("The capital of France is"))',
        "while not generator.is_done():",
        "    generator.generate_next_token()",
        "print(tokenizer.decode(generator.get_sequence(0)))",
        "```",
        "",
    ]


def write_model_card(folder: Path, report: dict[str, Any]) -> Path:
    """Write MODEL_CARD.md from ``report`` (every number comes from it) and the folder's file list.

    The card never names the folder: the export writes it into a temporary folder that is renamed.
    """
    folder = Path(folder)
    model, config, onnx_info = report.get("model", {}), report.get("config", {}), report.get("onnx", {})
    quant = config.get("quant", {})
    weights, acts = quant.get("weights", {}), quant.get("activations") or {}
    fmt = onnx_info.get("format") or config.get("format", "—")
    opset = onnx_info.get("opset") or config.get("onnx_opset", "—")
    rotation, ppl = report.get("rotation", {}), report.get("perplexity", {})
    calib = report.get("calibration") or config.get("calibration") or {}
    evaluation = report.get("evaluation") or config.get("evaluation") or {}
    parity, sizes = report.get("onnx_parity", {}), report.get("sizes_bytes", {})
    scheme, method = quant.get("scheme", "?"), quant.get("method", "?")

    group = "per channel" if weights.get("group_size") == -1 else f"group size {weights.get('group_size')}"
    symmetric = "symmetric" if weights.get("symmetric") else "asymmetric"
    abits, kv_bits = acts.get("bits", 16), acts.get("kv_bits", 16)
    shifted = ", shifted by the calibration mean" if acts.get("shift") else ""
    if condition := compensation_condition(acts):
        shifted += f", its rounding compensated by the weights ({condition})"
    act_text = f"int{abits} per token (clip {acts.get('clip_ratio')}{shifted})" if abits < 16 else "float"
    kv_shifted = " (shifted by the calibration mean)" if acts.get("kv_shift") else ""
    kv_text = f"int{kv_bits}{kv_shifted}" if kv_bits < 16 else "float"
    applied = ", ".join(f"{k.upper()} ({v})" for k, v in (rotation.get("applied") or {}).items()) or "none"
    params = model.get("parameters")
    params_text = f"{params:,}" if isinstance(params, int) else "—"
    components = ", ".join(f"{k} {_mb(v)}" for k, v in (sizes.get("onnx_components") or {}).items())

    lines = [
        f"# {model.get('spec', 'model')} — {scheme} ({method}), ONNX",
        "",
        "## What this is",
        "",
        f"- Source model: `{model.get('spec')}` ({model.get('model_type')}, edgeq adapter "
        f"`{model.get('adapter')}`, {params_text} parameters)",
        f"- Scheme `{scheme}`, method `{method}`: weights {weight_widths_text(quant)}, {group}, {symmetric}; "
        f"activations {act_text}; KV cache {kv_text}",
        f"- Rotations applied: {applied}",
        f"- ONNX format `{fmt}`, opset {opset}, {onnx_info.get('quantized_weights', '—')} quantized weights; "
        f"exported by edgeq {report.get('edgeq_version', '—')} on {report.get('created', '—')}",
        "",
        "## How to run it",
        "",
        "```python",
        "from optimum.onnxruntime import ORTModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        'folder = "path/to/this/folder"',
        "tokenizer = AutoTokenizer.from_pretrained(folder)",
        'model = ORTModelForCausalLM.from_pretrained(folder, provider="CPUExecutionProvider")',
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=32, do_sample=False)",
        "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        "```",
        "",
        *_genai_lines(report.get("genai") or {}),
        f"- `edgeq verify <folder>`: checks every file against `{MANIFEST_FILE}` (run it first).",
        "- `edgeq validate <folder>`: re-measures perplexity, agreement and latency on this machine.",
        "",
        "## What runs natively and what is emulated",
        "",
        *_runtime_notes(quant, fmt, rotation, onnx_info.get("graph", ""), onnx_info.get("qdq_form")),
        "",
        "## What it was validated on",
        "",
        f"- Evaluation: {evaluation.get('text') or 'WikiText-2 raw test'}, "
        f"{evaluation.get('windows', '—')} windows of {evaluation.get('seq_len', '—')} tokens",
        f"- Calibration: {calib.get('file') or calib.get('source') or 'default C4 sample'}, "
        f"{calib.get('documents', '—')} documents, token ids of shape {calib.get('shape', '—')} "
        f"(the exact tokens: `calibration_sha256` in `{MANIFEST_FILE}`)",
        "",
        "| model | runtime | perplexity | top-1 agreement with quantized PyTorch |",
        "| --- | --- | --- | --- |",
        f"| FP | PyTorch | {_num(ppl.get('fp_torch'))} | |",
    ]
    if "rotated_torch" in ppl:
        lines.append(f"| rotated FP | PyTorch | {_num(ppl['rotated_torch'])} | |")
    lines.append(f"| quantized | PyTorch (fake quantization) | {_num(ppl.get('quant_torch'))} | |")
    agreement = report.get("top1_agreement_with_pytorch", {})
    for provider, levels in (ppl.get("quant_onnx") or {}).items():
        for level, value in levels.items():
            top1 = agreement.get(provider, {}).get(level)
            name = f"ONNX Runtime {provider}" if provider.endswith("ExecutionProvider") else provider
            runtime = f"{name}, {level.replace('_', ' ')}"
            lines.append(f"| quantized | {runtime} | {_num(value)} | {_pct(top1)} |")
    lines += [
        "",
        f"ONNX parity with PyTorch: {_yes(parity.get('passed'))} (relative perplexity difference "
        f"{_num(parity.get('relative_difference'), '.2e')}, tolerance {_pct(parity.get('tolerance'))}; "
        f"top-1 agreement {_pct(parity.get('top1_agreement'))}, "
        + (
            f"at least {_pct(parity.get('min_top1_agreement'))})"
            if parity.get("min_top1_agreement")
            else "not required with quantized activations)"
        ),
        "",
        f"Sizes: FP32 parameters {_mb(sizes.get('fp32_parameters'))}, "
        f"ONNX model {_mb(sizes.get('onnx_model'))}" + (f" — {components}" if components else ""),
    ]
    if report.get("validation"):
        lines += _validation_lines(report["validation"])
    lines += ["", "## Files", ""]
    lines += [
        f"- `{rel}`: {(folder / rel).stat().st_size:,} bytes"
        for rel in _listed_files(folder)
        if rel != MODEL_CARD_FILE
    ]
    lines += [
        f"- `{MODEL_CARD_FILE}`: this card",
        f"- `{MANIFEST_FILE}`: SHA-256 and size of every file above, the hashes of the source weights and "
        "the calibration tokens, library versions and the graph's inputs and outputs",
        "",
    ]
    path = folder / MODEL_CARD_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
