"""edgeq export as an Olive pass (``edgeq.olive_pass``), run by Olive's own workflow runner on a tiny
Llama saved as a Hugging Face folder: the example workflow and package config, the ONNX handler and
artifact folder it returns, and options rejected as the CLI rejects them."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import onnxruntime as ort
import pytest
from conftest import byte_tokenizer, tiny_model, write_text_data
from test_resume import count_calibrated_blocks, stop_after_block

pytest.importorskip("olive", reason="olive-ai is an optional extra: pip install -e '.[olive]'")

from olive.workflows import run as olive_run  # noqa: E402

from edgeq.cli import export_config_from_argv, main  # noqa: E402
from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.manifest import verify_bundle  # noqa: E402
from edgeq.olive_pass import PASS_MODULE_CONFIG, GatesFailed, run_workflow  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "olive_workflow.json"
PACKAGE_CONFIG = ROOT / "examples" / "olive_package_config.json"

# One export, written once as pass options and once as the command line they stand for.
PASS_OPTIONS = {
    "scheme": "w4a16", "method": "gptq", "group_size": 16, "symmetric": True, "lm_head_bits": 16,
    "calib_samples": 4, "calib_seq_len": 32, "eval_seq_len": 32, "eval_windows": 3,
    "providers": "cpu", "max_size_ratio": 1.0, "min_top1": 0.4, "latency_runs": 1, "decode_tokens": 4,
    "resume": True,  # nothing to resume: a fresh run
}  # fmt: skip
CLI_FLAGS = [
    "--scheme", "w4a16", "--method", "gptq", "--group-size", "16", "--symmetric", "--lm-head-bits", "16",
    "--calib-samples", "4", "--calib-seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "3",
    "--providers", "cpu", "--max-size-ratio", "1.0", "--min-top1", "0.4", "--latency-runs", "1",
    "--decode-tokens", "4", "--resume",
]  # fmt: skip
# files Olive writes into its output_dir beside the model's
OLIVE_FILES = {"footprint.json", "output_footprint.json", "model_config.json", "run_history.txt"}


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    """Olive's Engine.run sends usage telemetry; its CI detection turns it off before the first event."""
    monkeypatch.setenv("CI", "1")
    monkeypatch.setenv("OLIVE_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("olive") / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def workflow(model: Path, work: Path, options: dict) -> dict:
    """The example workflow on ``model`` with ``options`` for its pass, writing under ``work``."""
    config = json.loads(WORKFLOW.read_text())
    config["input_model"]["model_path"] = str(model)
    (step,) = config["passes"].values()
    config["passes"] = {"edgeq": {"type": step["type"], **options}}
    return {**config, "cache_dir": str(work / "cache"), "output_dir": str(work / "out")}


def test_workflow_returns_the_onnx_handler_on_the_artifact(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_DATA_DIR", str(write_text_data(tmp_path / "data")))
    # the runner `olive run --package-config examples/olive_package_config.json` calls
    output = olive_run(workflow(model_dir, tmp_path, PASS_OPTIONS), package_config=str(PACKAGE_CONFIG))

    (model,) = output.get_output_models()
    assert model.model_type == "onnxmodel" and model.from_pass() == "edgeqexport"
    out = Path(model.model_path)
    assert model.model_config["onnx_file_name"] == "model.onnx"
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()][:2] == ["input_ids", "attention_mask"]

    # the whole artifact folder is the output, and edgeq_config.json is the CLI's config for the flags
    exported = json.loads((out / "edgeq_config.json").read_text())
    assert exported == export_config_from_argv(["--model", str(model_dir), *CLI_FLAGS]).to_dict()
    report = json.loads((out / "report.json").read_text())
    quant, validation = report["config"]["quant"], report["validation"]
    assert (quant["method"], quant["weights"]["group_size"], quant["weights"]["symmetric"]) == (
        "gptq",
        16,
        True,
    )
    assert report["calibration"]["shape"] == [4, 32]
    assert validation["passed"] and set(validation["providers"]) == {"CPUExecutionProvider"}
    limits = {g["name"]: g["limit"] for g in validation["gates"]}
    assert (limits["size_ratio"], limits["top1_agreement"]) == (1.0, 0.4)
    assert (out / "tokenizer.json").exists()
    # every exported file is there unchanged; Olive adds its own bookkeeping beside them
    problems = verify_bundle(out)
    assert {p.removeprefix("extra: ").split(" ")[0] for p in problems} == OLIVE_FILES


REJECTED = {
    "group size": ({"group_size": 100}, ["--group-size", "100"]),
    "choice": ({"dtype": "bfloat16"}, ["--dtype", "bfloat16"]),
    "exclusive flags": ({"symmetric": True, "asymmetric": True}, ["--symmetric", "--asymmetric"]),
    "scheme": ({"scheme": "w5a16"}, ["--scheme", "w5a16"]),
    "eval windows": ({"eval_windows": 0}, ["--eval-windows", "0"]),
    # found while the pass runs, once the model's tokenizer is loaded
    "calibration file": ({"calib": "no-such-text.txt"}, ["--calib", "no-such-text.txt"]),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_an_option_the_cli_rejects_fails_the_workflow_with_its_message(case, model_dir, tmp_path, capsys):
    options, flags = REJECTED[case]
    try:
        status = main(["export", "--model", str(model_dir), *flags, "--out", str(tmp_path / "cli")])
    except SystemExit as exit:  # argparse's own rejections
        status = exit.code
    assert status == 2
    cli_line = capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(EdgeqError) as err:
        run_workflow(workflow(model_dir, tmp_path, options))
    assert f"edgeq: error: {err.value}" == cli_line
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_a_failed_gate_fails_the_workflow_and_keeps_the_artifact(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_DATA_DIR", str(write_text_data(tmp_path / "data")))
    options = {**PASS_OPTIONS, "method": "rtn", "min_top1": 1.01}  # agreement is at most 1
    with pytest.raises(GatesFailed, match="top1_agreement"):
        run_workflow(workflow(model_dir, tmp_path, options))
    (report,) = (tmp_path / "cache").rglob("report.json")  # in the pass's folder in Olive's cache
    validation = json.loads(report.read_text())["validation"]
    failed = [g["name"] for g in validation["gates"] if not g["passed"]]
    assert not validation["passed"] and failed == ["top1_agreement"]


def test_resume_continues_an_interrupted_workflow(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_DATA_DIR", str(write_text_data(tmp_path / "data")))
    config = workflow(model_dir, tmp_path, {**PASS_OPTIONS, "no_validate": True})
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        stop_after_block(patch, 0, "ctrl-c")
        run_workflow(config)
    calibrated = count_calibrated_blocks(monkeypatch)
    (model,) = run_workflow(config).get_output_models()  # Olive gives the rerun the same folder
    assert calibrated == [1], "block 0 must be replayed from its record"
    assert (Path(model.model_path) / "model.onnx").exists()


@pytest.mark.parametrize(
    "name, message",
    [
        ("group_sise", "unrecognized arguments: --group-sise=64"),
        ("out", "the pass's output folder stands for --out"),
    ],
)
def test_a_name_that_is_not_a_pass_option_is_rejected(name, message, model_dir, tmp_path):
    with pytest.raises(EdgeqError, match=message):  # Olive alone would drop it with a warning
        run_workflow(workflow(model_dir, tmp_path, {name: 64}))
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_example_files_match_the_pass():
    assert json.loads(PACKAGE_CONFIG.read_text())["passes"]["EdgeqExport"] == PASS_MODULE_CONFIG
    from olive.hardware import DEFAULT_CPU_ACCELERATOR

    from edgeq.olive_pass import EdgeqExport

    (step,) = json.loads(WORKFLOW.read_text())["passes"].values()
    options = {k: v for k, v in step.items() if k != "type"}
    config = EdgeqExport.generate_config(DEFAULT_CPU_ACCELERATOR, options, disable_search=True)
    assert {k: getattr(config, k) for k in options} == options


def test_only_the_pass_imports_olive():
    """olive is an optional extra: the core package imports without it."""
    for path in (ROOT / "edgeq").rglob("*.py"):
        if path.name == "olive_pass.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "olive" or n.startswith("olive.") for n in names), path
