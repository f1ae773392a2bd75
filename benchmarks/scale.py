"""Bounded memory at scale: peak RSS, wall time, time per block and artifact size of `edgeq export` on
random-weight models with the real shapes of SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B and Llama-3.2-3B.

    python benchmarks/scale.py                                  # every row, README table updated
    python benchmarks/scale.py --models smollm2-135m --no-readme
    python benchmarks/scale.py --render                         # only rewrite the tables

The models (benchmarks/scale_models.py) are built once, shard by shard, into --models-dir and reused.
Each row runs the CLI in its own process: W4A16 `ort` format, RTN for every model and BoA for the two
smallest, the same small calibration and evaluation for every size (2-core machine). Its peak RSS is
that process's alone: ru_maxrss from wait4, measured by a small launcher process, because Linux puts
the parent's high-water mark into a child's ru_maxrss when the child execs (a Python parent that
touched 400 MB gives `python -c pass` a ru_maxrss of 411 MB).

Writes benchmarks/results/scale.json (with machine and versions; rewritten after every row, so an
interrupted run keeps its rows) and scale.md, and puts the table into README.md between the scale
markers. The checks the table shows: the 3B export's peak ≤ 8 GiB, peak(3B) / peak(1B) below the
parameter ratio (memory grows slower than the model), and the README's main job (the real SmolLM2,
BoA, qdq, default settings; its own row, last) within 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import RESULTS, publish, save_results
from scale_models import (
    BLOCK_STD,
    EMBED_STD,
    SCALE_MODELS,
    SELF_LOGIT,
    default_models_dir,
    ensure_model,
    parameter_count,
)
from transformers import AutoConfig

README_MARKER = "scale results"
BOA_MODELS = ("smollm2-135m", "qwen2.5-0.5b")
BIG, SMALL = "llama-3.2-3b", "llama-3.2-1b"  # the must-show pair, RTN rows
PEAK_LIMIT_BYTES = 8 * 2**30
# the README's main job, run as the README runs it: the bundled real SmolLM2-135M-Instruct, w4a16 with
# the defaults (BoA, qdq format, the default calibration and evaluation)
MAIN_JOB, MAIN_JOB_METHOD = "smollm2-135m-instruct", "boa"
MAIN_JOB_LIMIT_BYTES = 2 * 2**30
LOG_TAIL_LINES = 20

# Runs ``argv[2:]``, waits for it with wait4 and writes {"status", "maxrss_kib", "wall_s"} to argv[1].
# Started with -S and only the standard library, its own high-water mark (what a child inherits at
# exec) is a few MB, below any export's peak.
_LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
child.returncode = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    json.dump({"status": status, "maxrss_kib": usage.ru_maxrss, "wall_s": time.perf_counter() - start}, f)
"""


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` with stdout and stderr to ``log``; returns {"returncode", "peak_rss_bytes", "wall_s"}
    of that process alone (peak: ru_maxrss, KiB on Linux; returncode -N for signal N)."""
    result = log.with_suffix(".rusage.json")
    with open(log, "wb") as out:
        launcher = subprocess.run(
            [sys.executable, "-S", "-c", _LAUNCHER, str(result), *cmd], stdout=out, stderr=out
        )
    if launcher.returncode != 0 or not result.exists():
        return {"returncode": launcher.returncode, "peak_rss_bytes": None, "wall_s": None}
    usage = json.loads(result.read_text())
    result.unlink()
    return {
        "returncode": os.waitstatus_to_exitcode(usage["status"]),
        "peak_rss_bytes": usage["maxrss_kib"] * 1024,
        "wall_s": round(usage["wall_s"], 3),
    }


def edgeq_cli() -> list[str]:
    return [sys.executable, "-m", "edgeq.cli"]


def export_flags() -> str:
    """`edgeq export --help`: the flags this edgeq has (the rows pass --device cpu where it is listed)."""
    return subprocess.run(
        [*edgeq_cli(), "export", "--help"], capture_output=True, text=True, check=True
    ).stdout


def export_args(model_dir: Path, method: str, out: Path, args: argparse.Namespace, device: bool) -> list[str]:
    """The CLI arguments of one row (after ``edgeq``)."""
    return [
        "--no-progress", "export", "--model", str(model_dir), "--scheme", "w4a16", "--method", method,
        "--format", "ort", "--calib-samples", str(args.calib_samples),
        "--calib-seq-len", str(args.calib_seq_len), "--seed", str(args.seed),
        "--eval-seq-len", str(args.eval_seq_len),
        "--eval-windows", str(args.eval_windows), "--latency-runs", str(args.latency_runs),
        "--decode-tokens", str(args.decode_tokens), "--providers", "cpu",
        *(["--device", "cpu"] if device else []), "--out", str(out), "--overwrite",
    ]  # fmt: skip


def main_job_args(out: Path) -> list[str]:
    """The README's main job (after ``edgeq``), with its output folder."""
    return [
        "--no-progress",
        "export",
        "--model",
        "smollm2-135m",
        "--scheme",
        "w4a16",
        "--out",
        str(out),
        "--overwrite",
    ]


def block_seconds(report: dict) -> list[float] | None:
    """Seconds per decoder block wherever the report keeps them (timings_s.blocks_s, or
    quantization.block_seconds, or quantization.blocks[i].seconds); None when it does not."""
    quantization = report.get("quantization") or {}
    candidates = [(report.get("timings_s") or {}).get("blocks_s"), quantization.get("block_seconds")]
    blocks = quantization.get("blocks")
    if isinstance(blocks, list) and all(isinstance(b, dict) and "seconds" in b for b in blocks):
        candidates.append([b["seconds"] for b in blocks])
    for seconds in candidates:
        if isinstance(seconds, list) and seconds and all(isinstance(s, (int, float)) for s in seconds):
            return [float(s) for s in seconds]
    return None


def folder_bytes(folder: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def make_row(model: str, method: str, run: dict, out: Path, log: Path, parameters: int) -> dict:
    """One table row from a finished run: its measurements, and what ``out/report.json`` says. A run
    without a report is an error (the log's last lines); one whose gates failed is a result
    (validated: false). ``parameters``: the built model's count, for rows without a report."""
    report_file = out / "report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    blocks = block_seconds(report) if report else None
    row = {
        "model": model,
        "method": method,
        "parameters": (report or {}).get("model", {}).get("parameters", parameters),
        "peak_rss_bytes": run["peak_rss_bytes"],
        "wall_s": run["wall_s"],
        "returncode": run["returncode"],
        "timings_s": (report or {}).get("timings_s"),
        "block_seconds": blocks,
        "block_seconds_mean": sum(blocks) / len(blocks) if blocks else None,
        "block_seconds_max": max(blocks) if blocks else None,
        # model.onnx and its external data, whatever the exporter named it (model.onnx_data, .data)
        "onnx_bytes": folder_bytes(out, "model.onnx*") if report else None,
        "artifact_bytes": folder_bytes(out) if report else None,
        "validated": (report.get("validation") or {}).get("passed") if report else None,
        "perplexity": (report or {}).get("perplexity"),
        "error": None,
    }
    if report is None:
        row["error"] = f"exit code {run['returncode']}: {log_tail(log)}"
    return row


def _rtn_row(rows: list[dict], model: str) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["method"] == "rtn"), None)


def _measured(row: dict) -> bool:
    """The export finished and its peak was read: a failed run shows nothing about memory."""
    return row["error"] is None and row["peak_rss_bytes"] is not None


def must_show_checks(rows: list[dict]) -> dict:
    """The two claims, on the RTN rows: the 3B export's peak ≤ PEAK_LIMIT_BYTES, and peak(3B) / peak(1B)
    below params(3B) / params(1B). passed: None when a row was not run, False when one failed."""
    big, small = _rtn_row(rows, BIG), _rtn_row(rows, SMALL)
    peak = {"model": BIG, "peak_rss_bytes": None, "limit_bytes": PEAK_LIMIT_BYTES, "passed": None}
    if big is not None:
        peak["peak_rss_bytes"] = big["peak_rss_bytes"]
        peak["passed"] = _measured(big) and big["peak_rss_bytes"] <= PEAK_LIMIT_BYTES
    ratio = {"models": [BIG, SMALL], "peak_ratio": None, "parameter_ratio": None, "passed": None}
    if big is not None and small is not None:
        ratio["passed"] = _measured(big) and _measured(small)
        if ratio["passed"]:
            ratio["peak_ratio"] = big["peak_rss_bytes"] / small["peak_rss_bytes"]
            ratio["parameter_ratio"] = big["parameters"] / small["parameters"]
            ratio["passed"] = ratio["peak_ratio"] < ratio["parameter_ratio"]
    job = next((r for r in rows if r.get("main_job")), None)
    main = {"model": MAIN_JOB, "peak_rss_bytes": None, "limit_bytes": MAIN_JOB_LIMIT_BYTES, "passed": None}
    if job is not None:
        main["peak_rss_bytes"] = job["peak_rss_bytes"]
        main["passed"] = _measured(job) and job["peak_rss_bytes"] <= MAIN_JOB_LIMIT_BYTES
    return {
        "peak_3b_within_limit": peak,
        "peak_ratio_below_parameter_ratio": ratio,
        "main_job_within_limit": main,
    }


def _gib(n: float | None) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"


def _gb(n: float | None) -> str:
    return "" if n is None else f"{n / 1e9:.2f}"


def _seconds(s: float | None) -> str:
    return "" if s is None else f"{s:.0f}" if s >= 10 else f"{s:.1f}"


def _ppl_ratio(row: dict) -> str:
    """ONNX Runtime CPU perplexity (accuracy level 0) over the FP PyTorch one, as the gate divides."""
    ppl = row["perplexity"] or {}
    onnx = next(iter((ppl.get("quant_onnx") or {}).values()), {}).get("accuracy_level_0")
    return f"{onnx / ppl['fp_torch']:.3f}" if onnx and ppl.get("fp_torch") else ""


def _verdict(passed: bool | None) -> str:
    return {True: "**pass**", False: "**FAIL**", None: "not run"}[passed]


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        "Random-weight models with the real shapes (full depth, real vocabulary, float32 safetensors, one "
        f"shard per block); `edgeq export --scheme w4a16 --format ort`, CPU. Calibration: "
        f"{s['calib_samples']} × {s['calib_seq_len']} tokens of C4 (seed {s['seed']}); evaluation: "
        f"WikiText-2 test, {s['eval_windows']} windows of {s['eval_seq_len']} tokens; latency: "
        f"{s['latency_runs']} run of {s['decode_tokens']} decode steps. {results['machine']['cpus']} CPU "
        f"threads, {results['machine']['memory_bytes'] / 2**30:.0f} GiB RAM. Peak RSS: the export process "
        "alone. Perplexity: ONNX Runtime / FP PyTorch (random weights: only the ratio means anything).",
        "",
        "| model | method | parameters (B) | peak RSS (GiB) | wall (s) | quantization (s) | s per block "
        "(mean / max) | ONNX (GB) | artifact (GB) | perplexity ratio | validated |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in (r for r in results["rows"] if not r.get("main_job")):
        blocks = (
            f"{r['block_seconds_mean']:.1f} / {r['block_seconds_max']:.1f}"
            if r["block_seconds_mean"] is not None
            else ""
        )
        quantize = (r["timings_s"] or {}).get("quantize_s")
        validated = "" if r["validated"] is None else ("yes" if r["validated"] else "no")
        if r["error"]:
            last = r["error"].strip().splitlines()[-1] if r["error"].strip() else ""
            validated = f"failed: {last.replace('|', '/')}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['parameters'] / 1e9:.3f} | {_gib(r['peak_rss_bytes'])} | "
            f"{_seconds(r['wall_s'])} | {_seconds(quantize)} | {blocks} | {_gb(r['onnx_bytes'])} | "
            f"{_gb(r['artifact_bytes'])} | {_ppl_ratio(r)} | {validated} |"
        )
    peak, ratio = (
        results["checks"]["peak_3b_within_limit"],
        results["checks"]["peak_ratio_below_parameter_ratio"],
    )
    lines += [
        "",
        f"- {BIG} RTN peak RSS {_gib(peak['peak_rss_bytes']) or '?'} GiB ≤ "
        f"{peak['limit_bytes'] / 2**30:.0f} GiB: {_verdict(peak['passed'])}.",
        f"- peak({BIG}) / peak({SMALL}) = "
        + (f"{ratio['peak_ratio']:.2f}" if ratio["peak_ratio"] is not None else "?")
        + " < parameters ratio "
        + (f"{ratio['parameter_ratio']:.2f}" if ratio["parameter_ratio"] is not None else "?")
        + f": {_verdict(ratio['passed'])}.",
    ]
    main = results["checks"].get("main_job_within_limit")
    job = next((r for r in results["rows"] if r.get("main_job")), None)
    if main is not None:
        ppl = (job or {}).get("perplexity") or {}
        onnx = next(iter((ppl.get("quant_onnx") or {}).values()), {}).get("accuracy_level_0")
        numbers = (
            f"; perplexity FP {ppl['fp_torch']:.3f}, quantized PyTorch {ppl['quant_torch']:.3f}, "
            f"ONNX Runtime {onnx:.3f}; {_seconds(job['wall_s'])} s"
            if ppl.get("fp_torch") and ppl.get("quant_torch") and onnx
            else ""
        )
        lines.append(
            f"- The README's main job (`edgeq export --model smollm2-135m --scheme w4a16`: the real "
            f"SmolLM2-135M-Instruct, BoA, qdq format, default calibration and evaluation) peak RSS "
            f"{_gib(main['peak_rss_bytes']) or '?'} GiB ≤ {main['limit_bytes'] / 2**30:.0f} GiB: "
            f"{_verdict(main['passed'])}{numbers}."
        )
    lines += ["", f"Produced by `{results['command']}` on {results['date']}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # dest "model": save_results records args.model
    parser.add_argument(
        "--models", dest="model", metavar="MODELS", default=",".join(SCALE_MODELS), help="comma-separated"
    )
    parser.add_argument("--boa-models", default=",".join(BOA_MODELS), help="models that also get a BoA row")
    parser.add_argument(
        "--models-dir", default=None, help="built models (default: ~/.cache/edgeq/scale-models)"
    )
    parser.add_argument("--work-dir", default=None, help="artifacts and logs (default: a temporary folder)")
    parser.add_argument("--keep-artifacts", action="store_true", help="keep each row's artifact folder")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling and weights")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--eval-seq-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--latency-runs", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--no-main-job", action="store_true", help="skip the README main job's row")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    parser.add_argument("--render", action="store_true", help="only rewrite the tables from the results JSON")
    args = parser.parse_args(argv)
    unknown = set(args.model.split(",")) - set(SCALE_MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {', '.join(SCALE_MODELS)}")
    return args


def planned_rows(args: argparse.Namespace) -> list[tuple[str, str]]:
    boa = set(filter(None, args.boa_models.split(",")))
    return [
        (m, method) for m in args.model.split(",") for method in ("rtn", "boa") if method == "rtn" or m in boa
    ]


def run_row(
    model: str, method: str, folder: Path, parameters: int, work: Path, args: argparse.Namespace, device: bool
) -> dict:
    """Export ``folder`` with ``method`` in a child process under ``work``; its row (artifact deleted
    afterwards unless --keep-artifacts)."""
    out, log = work / f"{model}-{method}", work / f"{model}-{method}.log"
    shutil.rmtree(out, ignore_errors=True)  # a stale report.json must not pass for this run's
    cli = export_args(folder, method, out, args, device)
    print(f"{model} {method}: edgeq {' '.join(cli)}", flush=True)
    row = make_row(model, method, run_measured([*edgeq_cli(), *cli], log), out, log, parameters)
    print(f"{model} {method}: peak {_gib(row['peak_rss_bytes'])} GiB, {_seconds(row['wall_s'])} s"
          + (f", error: {row['error'].splitlines()[-1]}" if row["error"] else ""), flush=True)  # fmt: skip
    if not args.keep_artifacts:
        shutil.rmtree(out, ignore_errors=True)
    return row | {"command": "edgeq " + " ".join(cli)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        write_tables(json.loads((args.out / "scale.json").read_text()), args.out, not args.no_readme)
        return
    models_dir = Path(args.models_dir).expanduser() if args.models_dir else default_models_dir()
    device = re.search(r"--device\b", export_flags()) is not None
    rows: list[dict] = []
    models: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="edgeq-scale-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for model, method in planned_rows(args):
            if model not in models:
                print(f"{model}: building or reusing it in {models_dir}", flush=True)
                folder = ensure_model(model, models_dir, args.seed)
                models[model] = {
                    "checkpoint": SCALE_MODELS[model].checkpoint,
                    "folder": str(folder),
                    "parameters": parameter_count(AutoConfig.from_pretrained(folder)),
                }
            folder, parameters = Path(models[model]["folder"]), models[model]["parameters"]
            rows.append(run_row(model, method, folder, parameters, work, args, device))
            results = save(args, models, rows, device)  # an interrupted run keeps what it measured
        if not args.no_main_job:
            rows.append(run_main_job(work, args))
            results = save(args, models, rows, device)
    write_tables(results, args.out, not args.no_readme)


def save(args: argparse.Namespace, models: dict, rows: list[dict], device: bool) -> dict:
    # save_results reads the window count from an evaluation tensor's shape (the windows live in
    # the child)
    return save_results(
        args, "scale", torch.empty(args.eval_windows, 0), models=models, rows=rows,
        checks=must_show_checks(rows), device_flag=device,
        init={"embed_std": EMBED_STD, "block_std": BLOCK_STD, "self_logit": SELF_LOGIT},
    )  # fmt: skip


def run_main_job(work: Path, args: argparse.Namespace) -> dict:
    """The README's main job in a child process, measured like every row."""
    out, log = work / "main-job", work / "main-job.log"
    shutil.rmtree(out, ignore_errors=True)
    cli = main_job_args(out)
    print(f"main job: edgeq {' '.join(cli)}", flush=True)
    row = make_row(MAIN_JOB, MAIN_JOB_METHOD, run_measured([*edgeq_cli(), *cli], log), out, log, 0)
    print(f"main job: peak {_gib(row['peak_rss_bytes'])} GiB, {_seconds(row['wall_s'])} s", flush=True)
    if not args.keep_artifacts:
        shutil.rmtree(out, ignore_errors=True)
    return row | {"command": "edgeq " + " ".join(cli), "main_job": True, "format": "qdq"}


def write_tables(results: dict, out: Path, readme: bool) -> None:
    publish(markdown(results), out / "scale.md", README_MARKER, readme)


if __name__ == "__main__":
    main()
