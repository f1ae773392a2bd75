"""Same seed, same bytes; a killed export resumes from its last finished block and writes the
uninterrupted run's bytes; a resume that does not belong to the run is refused."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import byte_tokenizer, tiny_model

import edgeq.export
import edgeq.pipeline
from edgeq.cli import main
from edgeq.resume import Journal

DATA = ["--calib-samples", "4", "--calib-seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "3"]
MODEL_FILES = ("model.onnx", "model.onnx_data")
LAYERS = 3


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-qwen2"
    # head_dim = hidden / heads and a multiple of 8: the fused graph's GroupQueryAttention takes it
    model = tiny_model("qwen2", hidden_size=64, head_dim=16, config_kwargs={"num_hidden_layers": LAYERS})
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def export(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--no-progress", "export", "--model", str(model_dir), *DATA, "--no-validate", "--out", str(out),
            *extra]  # fmt: skip


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def partials(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.partial-*"))


# --- determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [["--format", "qdq"], ["--format", "ort"], ["--scheme", "w4a4", "--format", "qdq"]],
    ids=["qdq", "ort-fused", "w4a4-rotated"],
)
def test_two_runs_write_the_same_bytes(capsys, text_data_dir, model_dir, tmp_path, options):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run(export(model_dir, first, *options)) == 0
    assert run(export(model_dir, second, *options)) == 0
    capsys.readouterr()
    for name in MODEL_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    a, b = (json.loads((folder / "manifest.json").read_text()) for folder in (first, second))
    assert a["content_sha256"] == b["content_sha256"]
    assert {k: v for k, v in a.items() if k != "run"} == {k: v for k, v in b.items() if k != "run"}
    # what differs lives under "run": the creation time, the timings and the files that print them
    assert set(a["run"]) == {"created", "timings_s", "files"}
    assert set(a["run"]["files"]) == {"report.json", "report.md", "MODEL_CARD.md"}
    assert a["files"]["model.onnx_data"]["sha256"] == b["files"]["model.onnx_data"]["sha256"]


# --- resume ---------------------------------------------------------------------------------------


def stop_after_block(monkeypatch, block: int, how: str) -> None:
    """Interrupt the export right after block ``block`` was recorded: SIGTERM to this process (the
    CLI's handler turns it into an exception where the run is) or Ctrl-C's KeyboardInterrupt."""
    record = Journal.record

    def record_then_stop(self, index, *args, **kwargs):
        record(self, index, *args, **kwargs)
        if index == block:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "record", record_then_stop)


def count_calibrated_blocks(monkeypatch) -> list[int]:
    """The indices of the blocks the pass calibrates (each gets a BlockContext)."""
    seen: list[int] = []
    context = edgeq.pipeline.BlockContext

    def spy(index, *args, **kwargs):
        seen.append(index)
        return context(index, *args, **kwargs)

    monkeypatch.setattr(edgeq.pipeline, "BlockContext", spy)
    return seen


@pytest.mark.parametrize(
    ("options", "how"),
    [
        (["--format", "qdq", "--method", "boa"], "sigterm"),
        (["--format", "ort", "--method", "gptq"], "ctrl-c"),
        (["--format", "qdq", "--method", "oac", "--avg-bits", "3.5"], "sigterm"),
        (["--scheme", "w4a4", "--act-shift", "--format", "ort", "--method", "rtn"], "sigterm"),
        (
            ["--scheme", "w4a4", "--kv-bits", "4", "--kv-shift", "--format", "qdq", "--method", "rtn"],
            "ctrl-c",
        ),
    ],
    ids=[
        "qdq-boa-sigterm",
        "ort-gptq-ctrl-c",
        "qdq-aptq-oac-sigterm",
        "ort-w4a4-shift-sigterm",
        "qdq-w4a4-kv4-shift-ctrl-c",
    ],
)
def test_resume_after_a_kill_gives_the_uninterrupted_bytes(
    capsys, text_data_dir, model_dir, tmp_path, monkeypatch, options, how
):
    whole, out = tmp_path / "whole", tmp_path / "resumed"
    assert run(export(model_dir, whole, *options)) == 0
    capsys.readouterr()

    with monkeypatch.context() as patch:
        stop_after_block(patch, 1, how)
        code = run(export(model_dir, out, *options))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == (143 if how == "sigterm" else 130)
    assert err[-1].startswith("edgeq: interrupted; resume with: edgeq --no-progress export")
    assert err[-1].endswith("--resume")
    assert not out.exists()
    (partial,) = partials(out)
    assert json.loads((partial / ".resume" / "journal.json").read_text())["finished"] == 2

    calibrated = count_calibrated_blocks(monkeypatch)
    assert run(export(model_dir, out, *options, "--resume")) == 0
    assert calibrated == [2], "finished blocks must be replayed from their records, not calibrated"
    assert not partials(out)
    for name in MODEL_FILES:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert not (out / ".resume").exists()
    a, b = (json.loads((folder / "manifest.json").read_text()) for folder in (whole, out))
    assert a["content_sha256"] == b["content_sha256"]


@pytest.mark.parametrize("change", ["config", "weights"])
def test_resume_of_another_run_is_refused(capsys, text_data_dir, model_dir, tmp_path, monkeypatch, change):
    out = tmp_path / "art"
    with monkeypatch.context() as patch:
        stop_after_block(patch, 0, "ctrl-c")
        assert run(export(model_dir, out, "--group-size", "32")) == 130
    capsys.readouterr()
    (partial,) = partials(out)

    if change == "weights":  # the same path and config, other weights: another model hash
        from safetensors.torch import load_file, save_file

        state = load_file(model_dir / "model.safetensors")
        state["model.norm.weight"] += 0.5
        save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})
    group = "16" if change == "config" else "32"
    assert run(export(model_dir, out, "--group-size", group, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgeq: error: --resume:") and "another config, model" in err[-1]
    assert sum("edgeq: error:" in line for line in err) == 1
    assert partials(out) == [partial], "the other run's records are left alone"
    assert not out.exists()


def test_interrupted_before_any_block_leaves_nothing(capsys, text_data_dir, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "art"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(edgeq.export, "capture_block_inputs", interrupt)
    assert run(export(model_dir, out)) == 130
    capsys.readouterr()
    assert not out.exists() and not partials(out)
