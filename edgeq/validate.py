"""Validation of an artifact folder in ONNX Runtime, and the gates CI compares it with.

The folder is self-contained: at export, the FP model's top-k next-token log-probabilities on the
evaluation windows are stored in ``reference/fp_topk.npz`` (with the token ids), so validation needs
neither the source model nor the text. Per available execution provider it measures perplexity, greedy
top-1 agreement with and KL divergence from the FP model, a 32-token greedy generation (finite
logits), prefill latency and KV-cache decode speed, and peak memory; then applies the gates.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import onnx
import torch
from tqdm.auto import tqdm

from edgeq.config import ValidationConfig
from edgeq.errors import EdgeqError, first_line
from edgeq.evaluation import DecoderLM, LogitsFn, OrtCausalLM
from edgeq.latency import PeakRSS, measure_decode
from edgeq.manifest import MANIFEST_FILE, layout_problems
from edgeq.openvino_runtime import OPENVINO_CPU, OpenVinoCausalLM, openvino_missing

REFERENCE_FILE = "reference/fp_topk.npz"
TOP_K = 32
# --providers name → the provider's name in reports: ONNX Runtime's execution providers, and
# OpenVINO's own CPU runtime (edgeq.openvino_runtime; not ONNX Runtime's OpenVINO provider)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "openvino": OPENVINO_CPU}
GENERATE_TOKENS = 32

# gate name -> (comparison, what is compared)
GATES: dict[str, tuple[str, str]] = {
    "perplexity_ratio": ("<=", "ONNX perplexity / FP perplexity on the stored windows"),
    "top1_agreement": (">=", "share of positions whose greedy next token equals the FP model's"),
    "kl_divergence": ("<=", "mean KL(FP ‖ ONNX) per position in nats (FP's top-32 tokens + the rest)"),
    "decode_speedup": (">=", "decode tokens/s over the FP32 ONNX model's, measured at export"),
    "size_ratio": ("<=", "ONNX bytes / FP32 parameter bytes"),
}


@dataclass
class FPReference:
    """ids [n, L] and the FP model's top-k next-token ids and log-probabilities [n, L, k]."""

    ids: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    fp_perplexity: float


@torch.no_grad()
def fp_reference(
    windows: torch.Tensor, fp_logits: LogitsFn, k: int = TOP_K, progress: bool = True
) -> FPReference:
    """Score windows [n, L] with the FP model: what validation compares against (and its perplexity)."""
    top_ids, top_lp, nll = [], [], []
    for ids in tqdm(windows, desc="FP perplexity", unit="window", disable=not progress):
        logprobs = torch.log_softmax(fp_logits(ids[None])[0].float(), dim=-1)
        values, indices = logprobs.topk(k, dim=-1)
        top_ids.append(indices.to(torch.int32).numpy())
        top_lp.append(values.numpy())
        nll.append(float(-logprobs[:-1].gather(1, ids[1:, None]).mean()))
    return FPReference(
        ids=windows.numpy().astype(np.int32),
        top_ids=np.stack(top_ids),
        top_logprobs=np.stack(top_lp).astype(np.float32),
        fp_perplexity=math.exp(sum(nll) / len(nll)),
    )


def write_fp_reference(folder: Path, ref: FPReference) -> Path:
    path = folder / REFERENCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, ids=ref.ids, top_ids=ref.top_ids, top_logprobs=ref.top_logprobs,
                        fp_perplexity=np.float64(ref.fp_perplexity))  # fmt: skip
    return path


def load_fp_reference(folder: Path) -> FPReference:
    path = folder / REFERENCE_FILE
    if not path.exists():
        raise EdgeqError(f"{folder} has no {REFERENCE_FILE}: export it with edgeq 0.1 or later")
    with np.load(path) as data:
        return FPReference(data["ids"], data["top_ids"], data["top_logprobs"], float(data["fp_perplexity"]))


def kl_top_k(fp_top_logprobs: np.ndarray, q_logprobs_at_top: np.ndarray) -> np.ndarray:
    """KL(P ‖ Q) per position over P's top-k tokens plus one bucket for the rest of the vocabulary
    (a lower bound of the full KL). Both [..., k] in log space → [...]."""
    p, q = np.exp(fp_top_logprobs.astype(np.float64)), np.exp(q_logprobs_at_top.astype(np.float64))
    p_rest = np.clip(1.0 - p.sum(-1), 1e-12, None)
    q_rest = np.clip(1.0 - q.sum(-1), 1e-12, None)
    head = (p * (fp_top_logprobs - q_logprobs_at_top)).sum(-1)
    return head + p_rest * (np.log(p_rest) - np.log(q_rest))


def compare_with_fp(logits_fn: LogitsFn, ref: FPReference, progress: bool = True) -> dict[str, float]:
    """Perplexity, top-1 agreement with and KL divergence from the FP model on the stored windows."""
    nll, agree, kl = [], 0, []
    for i in tqdm(range(len(ref.ids)), desc="compare with FP", unit="window", disable=not progress):
        ids = torch.from_numpy(ref.ids[i].astype(np.int64))
        logprobs = torch.log_softmax(logits_fn(ids[None])[0].float(), dim=-1)
        nll.append(float(-logprobs[:-1].gather(1, ids[1:, None]).mean()))
        agree += int((logprobs.argmax(-1).numpy() == ref.top_ids[i, :, 0]).sum())
        at_top = logprobs.gather(1, torch.from_numpy(ref.top_ids[i].astype(np.int64))).numpy()
        kl.append(kl_top_k(ref.top_logprobs[i], at_top).mean())
    return {
        "perplexity": math.exp(sum(nll) / len(nll)),
        "top1_agreement_fp": agree / ref.ids.size,
        "kl_fp": float(np.mean(kl)),
    }


def greedy_generation_is_finite(lm: DecoderLM, prompt: np.ndarray, new_tokens: int) -> bool:
    """Greedy decoding with the KV cache; False as soon as any logit is NaN or Inf."""
    logits, past = lm.step(prompt, lm.empty_past(1), 0)
    for t in range(new_tokens):
        if not np.isfinite(logits).all():
            return False
        token = int(logits[0, -1].argmax())
        logits, past = lm.step(np.array([[token]]), past, prompt.shape[1] + t)
    return bool(np.isfinite(logits).all())


def provider_status(names: list[str]) -> dict[str, str | None]:
    """Execution provider → None when it can run here, else why it is skipped."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    status = {}
    for name in names:
        if name not in PROVIDERS:
            raise EdgeqError(f"unknown provider '{name}': choose from {', '.join(PROVIDERS)}")
        full = PROVIDERS[name]
        if full == OPENVINO_CPU:
            status[full] = openvino_missing()
            continue
        status[full] = None if full in available else (
            f"{full} is not available in this onnxruntime build ({', '.join(available)}); "
            "install onnxruntime-gpu on a machine with a GPU"
        )  # fmt: skip
    return status


def fallback_reason(provider: str, active: list[str]) -> str:
    """Why a provider that this onnxruntime build lists is skipped all the same."""
    why = f"ONNX Runtime could not start {provider} here and ran the session on {', '.join(active)}"
    if provider == "CUDAExecutionProvider":
        why += " (no usable GPU, or the CUDA / cuDNN libraries that onnxruntime-gpu needs are missing)"
    return why


def open_for_validation(folder: Path, provider: str, threads: int | None) -> DecoderLM:
    """The artifact on ``provider`` (a value of PROVIDERS) as the receiving team runs it: ORT's
    MatMulNBits accuracy level as ORT and the graph set it, OpenVINO's CPU plugin defaults. EdgeqError
    when OpenVINO cannot read the graph."""
    if provider == OPENVINO_CPU:
        return OpenVinoCausalLM(folder, "cpu_defaults", threads=threads)
    return OrtCausalLM(folder, provider=provider, accuracy_level=None, threads=threads)


def validate_provider(
    folder: Path,
    provider: str,
    ref: FPReference,
    threads: int,
    progress: bool,
    latency_runs: int = ValidationConfig.latency_runs,
    decode_tokens: int = ValidationConfig.decode_tokens,
) -> dict:
    """Every measurement of one execution provider, in the session options the receiving team gets
    (MatMulNBits accuracy level as ORT or the graph sets it; OpenVINO's CPU plugin defaults);
    ``{"skipped": why}`` when ORT could not put the session on that provider (it falls back to the
    CPU, e.g. onnxruntime-gpu without a GPU); ``{"error": why}`` when OpenVINO cannot read the graph
    (a finding about the artifact, which fails the validation)."""
    with PeakRSS() as peak:
        try:
            lm = open_for_validation(folder, provider, threads)
        except EdgeqError as err:
            if provider != OPENVINO_CPU:
                raise
            return {"error": str(err)}
        if provider not in lm.active_providers:
            return {"skipped": fallback_reason(provider, lm.active_providers)}
        metrics: dict[str, Any] = compare_with_fp(lm.logits, ref, progress)
        metrics["generation_ok"] = greedy_generation_is_finite(
            lm, ref.ids[:1, :16].astype(np.int64), GENERATE_TOKENS
        )
        metrics |= measure_decode(lm, prompt_len=128, new_tokens=decode_tokens, repeats=latency_runs)
    metrics["peak_rss_bytes"] = peak.peak
    return metrics


@dataclass
class GateResult:
    name: str
    provider: str
    value: float | None
    op: str
    limit: float
    passed: bool
    note: str = ""


@dataclass
class ValidationResult:
    # measurements, or {"skipped": why} (not here), or {"error": why} (cannot run the artifact)
    providers: dict[str, dict] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    files_bytes: int = 0

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates) and all(
            m.get("generation_ok", True) and "error" not in m for m in self.providers.values()
        )

    def to_dict(self) -> dict:
        return {"providers": self.providers, "gates": [asdict(g) for g in self.gates],
                "files_bytes": self.files_bytes, "passed": self.passed}  # fmt: skip


def gate_values(metrics: dict, report: dict, ref: FPReference, files_bytes: int) -> dict[str, float | None]:
    """What each gate compares, for one provider (None where it cannot be computed)."""
    fp32_tps = report.get("reference_speed", {}).get("fp32_onnx_decode_tokens_per_s")
    fp32_bytes = report.get("sizes_bytes", {}).get("fp32_parameters")
    tps = metrics["decode_tokens_per_s"]["p50"]
    return {
        "perplexity_ratio": metrics["perplexity"] / ref.fp_perplexity,
        "top1_agreement": metrics["top1_agreement_fp"],
        "kl_divergence": metrics["kl_fp"],
        "decode_speedup": tps / fp32_tps if fp32_tps else None,
        "size_ratio": files_bytes / fp32_bytes if fp32_bytes else None,
    }


def apply_gates(values: dict[str, float | None], gates: dict[str, float], provider: str) -> list[GateResult]:
    results = []
    for name, limit in gates.items():
        op = GATES[name][0]
        value = values[name]
        if value is None:
            results.append(GateResult(name, provider, None, op, limit, False, "not measurable: no reference"))
            continue
        passed = value <= limit if op == "<=" else value >= limit
        results.append(GateResult(name, provider, value, op, limit, passed))
    return results


def check_latency_settings(latency_runs: int, decode_tokens: int) -> None:
    if latency_runs < 1 or decode_tokens < 1:
        raise EdgeqError("--latency-runs and --decode-tokens must be at least 1")


def check_gates(gates: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(gates) - set(GATES))
    if unknown:
        raise EdgeqError(f"unknown gate '{unknown[0]}': choose from {', '.join(GATES)}")
    for name, limit in gates.items():
        # bool is an int to Python, and float("1.1") would pass a quoted number: both are typos
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit):
            raise EdgeqError(f"gate '{name}' must be a finite number, got {limit!r}")
    return {name: float(limit) for name, limit in gates.items()}


def load_gates(path: Path) -> dict[str, float]:
    """Gates from a TOML file's ``[gates]`` table, e.g. ``perplexity_ratio = 1.10``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EdgeqError(f"gates file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise EdgeqError(f"gates file {path} is not valid TOML: {err}") from None
    if "gates" not in data or not isinstance(data["gates"], dict):
        raise EdgeqError(f"gates file {path} has no [gates] table")
    extra = sorted(set(data) - {"gates"})
    if extra:
        raise EdgeqError(f"gates file {path} has unknown key '{extra[0]}' (only a [gates] table is read)")
    return check_gates(data["gates"])


def check_artifact(folder: Path) -> None:
    """One-line errors for a folder that cannot be validated: no folder, no model.onnx, a
    model.onnx that is not ONNX, files missing from or added to what its manifest lists."""
    if not folder.is_dir():
        raise EdgeqError(f"artifact folder not found: {folder}")
    model_path = folder / "model.onnx"
    if not model_path.is_file():
        raise EdgeqError(f"{folder} is not an edgeq artifact: no model.onnx")
    try:
        onnx.load(str(model_path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf's decode errors have no common base here
        raise EdgeqError(f"{model_path} is not an ONNX model ({first_line(err)})") from None
    if (folder / MANIFEST_FILE).exists():
        problems = layout_problems(folder)
        if problems:
            raise EdgeqError(f"{folder} differs from its {MANIFEST_FILE}: {'; '.join(problems)}")


def model_files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*"))


def validate(
    folder: Path,
    providers: list[str],
    gates: dict[str, float],
    threads: int = 2,
    progress: bool = True,
    report: dict | None = None,
    latency_runs: int = ValidationConfig.latency_runs,
    decode_tokens: int = ValidationConfig.decode_tokens,
) -> ValidationResult:
    """Validate the artifact in ``folder`` on each requested provider that exists here."""
    folder = Path(folder)
    check_artifact(folder)
    gates = check_gates(gates)
    check_latency_settings(latency_runs, decode_tokens)
    if report is None:
        report_path = folder / "report.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
    ref = load_fp_reference(folder)
    result = ValidationResult(files_bytes=model_files_bytes(folder))
    for provider, skipped in provider_status(providers).items():
        if skipped:
            result.providers[provider] = {"skipped": skipped}
            continue
        metrics = validate_provider(folder, provider, ref, threads, progress, latency_runs, decode_tokens)
        result.providers[provider] = metrics
        if "skipped" in metrics or "error" in metrics:
            continue
        values = gate_values(metrics, report, ref, result.files_bytes)
        result.gates += apply_gates(values, gates, provider)
    return result


def format_table(result: ValidationResult) -> str:
    """The gates and the main measurements as a plain-text table."""
    lines = [f"{'provider':22s} {'gate':18s} {'value':>10s}    {'limit':>8s}  result"]
    for g in result.gates:
        value = "n/a" if g.value is None else f"{g.value:.4g}"
        lines.append(f"{g.provider:22s} {g.name:18s} {value:>10s} {g.op} {g.limit:>8.4g}  "
                     f"{'PASS' if g.passed else 'FAIL'} {g.note}".rstrip())  # fmt: skip
    for provider, m in result.providers.items():
        if "skipped" in m or "error" in m:
            status = "skipped" if "skipped" in m else "FAILED"
            lines.append(f"{provider:22s} {status}: {m.get('skipped') or m['error']}")
        else:
            lines.append(
                f"{provider:22s} perplexity {m['perplexity']:.3f}, top-1 vs FP {m['top1_agreement_fp']:.3f}, "
                f"KL {m['kl_fp']:.4f}, prefill {m['prefill_ms']['p50']:.0f} ms, "
                f"decode {m['decode_tokens_per_s']['p50']:.1f} tokens/s, generation "
                f"{'ok' if m['generation_ok'] else 'NaN/Inf'}, peak RSS {m['peak_rss_bytes'] / 2**30:.2f} GiB"
            )
    lines.append("PASSED" if result.passed else "FAILED")
    return "\n".join(lines)


def junit_xml(result: ValidationResult, suite: str = "edgeq.validate") -> str:
    """JUnit XML for CI systems: one test case per gate and provider, one per generation check, a
    skipped case per missing provider, a failed one per provider that cannot run the artifact."""
    root = ElementTree.Element("testsuite", name=suite)
    cases = 0
    failures = 0
    for g in result.gates:
        case = ElementTree.SubElement(root, "testcase", classname=g.provider, name=g.name)
        cases += 1
        if not g.passed:
            failures += 1
            value = "n/a" if g.value is None else f"{g.value:.6g}"
            msg = f"gate {g.name} failed: {value} not {g.op} {g.limit:g} {g.note}".rstrip()
            ElementTree.SubElement(case, "failure", message=msg, type="GateFailed").text = msg
    for provider, m in result.providers.items():
        case = ElementTree.SubElement(root, "testcase", classname=provider, name="greedy_generation")
        cases += 1
        if "skipped" in m:
            ElementTree.SubElement(case, "skipped", message=m["skipped"])
        elif "error" in m:
            failures += 1
            ElementTree.SubElement(case, "failure", message=m["error"], type="CannotRun")
        elif not m["generation_ok"]:
            failures += 1
            ElementTree.SubElement(case, "failure", message="NaN or Inf logits during generation")
    root.set("tests", str(cases))
    root.set("failures", str(failures))
    return ElementTree.tostring(root, encoding="unicode", xml_declaration=True)
