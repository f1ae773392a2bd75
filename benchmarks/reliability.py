"""Same seed, same bytes, and resume after a kill, measured on a real model with the real CLI.

    python benchmarks/reliability.py          # SmolLM2, w4a16 BoA, the qdq format

Four `edgeq export` processes with one command line: two uninterrupted runs (their model files
compared byte for byte, their manifests outside ``run``); a third stopped with SIGTERM once it has
recorded half of its blocks; a fourth with ``--resume`` that finishes it (its files compared with the
first run's). Writes benchmarks/results/reliability.json and reliability.md, and the table into
README.md between the reliability markers.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine_and_versions, publish

MODEL_FILES = ("model.onnx", "model.onnx_data")
README_MARKER = "reliability results"


def export_command(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "edgeq.cli", "--no-progress", "export", "--model", args.model,
        "--scheme", args.scheme, "--method", args.method, "--format", args.format,
        "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
        "--eval-windows", str(args.eval_windows), "--no-validate", "--out", str(out),
    ]  # fmt: skip


def timed_run(command: list[str]) -> dict:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    return {"exit_status": done.returncode, "seconds": round(time.perf_counter() - start, 1),
            "last_line": (done.stderr.strip().splitlines() or [""])[-1]}  # fmt: skip


def journal(out: Path) -> dict | None:
    for path in out.parent.glob(f".{out.name}.partial-*/.resume/journal.json"):
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:  # caught between write and rename: read again
            return None
    return None


def killed_run(command: list[str], out: Path, after_blocks: int) -> dict:
    """Start the export, SIGTERM it once ``after_blocks`` blocks are recorded, and wait for it."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    while process.poll() is None:
        state = journal(out)
        if state and state["finished"] >= after_blocks:
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    _, err = process.communicate()
    state = journal(out) or {}
    return {"exit_status": process.returncode, "seconds": round(time.perf_counter() - start, 1),
            "blocks_recorded": state.get("finished"), "last_line": (err.strip().splitlines() or [""])[-1],
            "out_exists": out.exists()}  # fmt: skip


def same_files(a: Path, b: Path) -> dict[str, bool]:
    return {name: (a / name).read_bytes() == (b / name).read_bytes() for name in MODEL_FILES}


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def markdown(results: dict) -> str:
    runs = results["runs"]
    rows = [
        ("1: uninterrupted", runs["first"]["seconds"], "—"),
        ("2: uninterrupted, again", runs["second"]["seconds"],
         "files identical to run 1: " + _yes(all(results["determinism"]["identical_files"].values()))
         + "; manifests equal outside `run`: " + _yes(results["determinism"]["manifest_equal_outside_run"])),
        (f"3: SIGTERM after {runs['killed']['blocks_recorded']} of {results['blocks']} blocks",
         runs["killed"]["seconds"], f"exit {runs['killed']['exit_status']}; `{runs['killed']['last_line']}`"),
        ("4: `--resume`", runs["resumed"]["seconds"],
         "files identical to run 1: " + _yes(all(results["resume"]["identical_files"].values()))
         + "; content_sha256 equal: " + _yes(results["resume"]["content_sha256_equal"])),
    ]  # fmt: skip
    lines = [
        f"Model `{results['model']}`, `{results['command_line']}` (paths elided); one machine, one process "
        "at a time.",
        "",
        "| run | seconds | result |",
        "| --- | ---: | --- |",
        *(f"| {name} | {seconds:.0f} | {what} |" for name, seconds, what in rows),
        "",
        f"Produced by `python benchmarks/reliability.py` on {results['date']}.",
        "",
    ]
    return "\n".join(lines)


def _yes(value: bool) -> str:
    return "yes" if value else "**no**"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--scheme", default="w4a16")
    parser.add_argument("--method", default="boa")
    parser.add_argument("--format", default="qdq")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--blocks", type=int, default=30, help="the model's decoder blocks (SmolLM2: 30)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="edgeq-reliability-") as tmp:
        folders = {name: Path(tmp) / name for name in ("first", "second", "resumed")}
        runs = {
            "first": timed_run(export_command(args, folders["first"])),
            "second": timed_run(export_command(args, folders["second"])),
            "killed": killed_run(
                export_command(args, folders["resumed"]), folders["resumed"], args.blocks // 2
            ),
            "resumed": timed_run([*export_command(args, folders["resumed"]), "--resume"]),
        }
        for name in ("first", "second", "resumed"):
            if runs[name]["exit_status"] != 0:
                raise SystemExit(f"run {name} failed: {runs[name]['last_line']}")
        first, second, resumed = (manifest(folders[n]) for n in ("first", "second", "resumed"))
        outside_run = [{k: v for k, v in m.items() if k != "run"} for m in (first, second)]
        results = {
            "model": args.model,
            "blocks": args.blocks,
            "command_line": " ".join(export_command(args, Path("OUT"))[2:]).replace(sys.executable, "python"),
            "runs": runs,
            "determinism": {
                "identical_files": same_files(folders["first"], folders["second"]),
                "manifest_equal_outside_run": outside_run[0] == outside_run[1],
                "content_sha256": first["content_sha256"],
            },
            "resume": {
                "identical_files": same_files(folders["first"], folders["resumed"]),
                "content_sha256_equal": resumed["content_sha256"] == first["content_sha256"],
            },
            "command": " ".join(["python benchmarks/reliability.py", *sys.argv[1:]]),
            **machine_and_versions(),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(results, indent=2) + "\n")
    publish(markdown(results), args.out / "reliability.md", README_MARKER, not args.no_readme)


if __name__ == "__main__":
    main()
