"""The CLI's contract for bad input: exit status 2, one ``edgeq: error:`` line on stderr, and no
output folder (nor a hidden ``.NAME.partial-*`` one) left behind. Plus one end-to-end export + eval."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, tiny_model, write_text_data

import edgeq.export  # noqa: F401  (imported up front so the timing checks below exclude import time)
from edgeq.cli import main
from edgeq.config import ExportConfig

# Bad input must be rejected before any heavy work; on the tiny fixtures every case takes well under this.
FAST_SECONDS = 10.0
# calibration and evaluation sizes for the cases found while writing, after some work was done
SMALL_DATA = ["--calib-samples", "4", "--calib-seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2"]


def run_cli(argv: list[str]) -> int:
    """``edgeq.cli.main`` in-process; argparse-level errors raise SystemExit, the rest return."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def assert_clean_failure(
    capsys, args: list[str], out: Path, leave: tuple[str, ...] = (), early: bool = True
) -> str:
    """Run ``edgeq --no-progress export ARGS --out OUT`` and check the error contract.

    ``leave``: names that were in ``out.parent`` before the call and must still be its only entries.
    ``early``: the input can be checked before any heavy work (not so what is found while writing).
    Returns the error message (after the ``edgeq: error:`` prefix).
    """
    start = time.perf_counter()
    code = run_cli(["--no-progress", "export", *args, "--out", str(out)])
    elapsed = time.perf_counter() - start
    captured = capsys.readouterr()

    assert code == 2, f"exit status {code}, stderr:\n{captured.err}"
    lines = captured.err.strip().splitlines()
    assert lines, "nothing on stderr"
    # The last line is the error, and it is the only one: a multi-line message would push its first
    # line (the one with the prefix) off the end.
    assert lines[-1].startswith("edgeq: error:"), captured.err
    assert sum("edgeq: error:" in line for line in lines) == 1, captured.err
    assert captured.out == ""

    if not leave:
        assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(leave), "something was left behind"

    if early:
        assert elapsed < FAST_SECONDS, f"took {elapsed:.1f} s: the input is validated too late"
    return lines[-1].removeprefix("edgeq: error:").strip()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An output path whose parent exists and starts empty, so leftovers are visible."""
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent / "art"


# --- the model ----------------------------------------------------------------------------------


def test_missing_model_path(capsys, out, text_data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = assert_clean_failure(capsys, ["--model", "./does/not/exist"], out)
    assert "./does/not/exist" in msg
    assert "not found" in msg


def test_model_path_is_a_plain_file(capsys, out, text_data_dir, tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x00" * 64)
    msg = assert_clean_failure(capsys, ["--model", str(weights)], out)
    assert str(weights) in msg
    assert ".gguf" in msg


def test_model_folder_without_config(capsys, out, text_data_dir, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("hello\n")
    msg = assert_clean_failure(capsys, ["--model", str(folder)], out)
    assert str(folder) in msg
    assert "config.json" in msg


def _save_bert(folder: Path) -> None:
    from transformers import BertConfig

    BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(folder)


def test_non_causal_model_fails_cleanly(capsys, out, text_data_dir, tmp_path):
    folder = tmp_path / "tiny-bert"
    _save_bert(folder)
    msg = assert_clean_failure(capsys, ["--model", str(folder)], out)
    assert "bert" in msg


def test_non_causal_model_says_so(capsys, out, text_data_dir, tmp_path):
    folder = tmp_path / "tiny-bert"
    _save_bert(folder)
    msg = assert_clean_failure(capsys, ["--model", str(folder)], out)
    assert "not a causal language model" in msg


def test_unsupported_causal_architecture(capsys, out, text_data_dir, tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "tiny-gpt2"
    GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=64).save_pretrained(folder)
    msg = assert_clean_failure(capsys, ["--model", str(folder)], out)
    assert "gpt2" in msg
    assert "llama" in msg  # names the supported architectures


def test_hub_id_while_offline(capsys, out, text_data_dir, monkeypatch):
    import huggingface_hub.constants
    import transformers.utils.hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read HF_HUB_OFFLINE once, at import; in a fresh `edgeq` process the variable is
    # seen there. In-process, mirror what that import would have set.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(transformers.utils.hub, "_is_offline_mode", True)
    spec = "someorg/some-model-that-does-not-exist"
    msg = assert_clean_failure(capsys, ["--model", spec], out)  # also checks it fails fast
    assert spec in msg
    assert "hub" in msg.lower()


# --- quantization options ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--scheme", "w9a9"], "unknown scheme 'w9a9'"),
        (["--method", "magic"], "unknown method 'magic'"),
        (["--group-size", "100"], "group size 100"),
        (["--bits", "5"], "bits must be"),
        (["--act-bits", "5"], "activation and KV cache bits must be"),
        (["--scheme", "w4a4", "--down-act-bits", "3"], "activation and KV cache bits must be"),
        (["--scheme", "w4a4", "--act-clip", "most"], "expected a ratio in (0, 1] or 'search'"),
        (["--scheme", "w4a4", "--rotation", "learned", "--rotation-steps", "0"], "rotation learning needs"),
        (["--act-bits", "4", "--act-clip", "0"], "clip ratio"),
        (["--format", "tflite"], "unknown format 'tflite'"),
        (["--kv-bits", "2"], "KV cache bits must be"),
        (["--latency-runs", "0"], "--latency-runs and --decode-tokens must be at least 1"),
        (["--scheme", "w4a4", "--method", "rtn", "--act-compensate"], "--act-compensate works with"),
    ],
    ids=[
        "scheme",
        "method",
        "group-size",
        "bits",
        "act-bits",
        "down-act-bits",
        "act-clip-word",
        "rotation-steps",
        "act-clip",
        "format",
        "kv-bits",
        "latency-runs",
        "act-compensate-rtn",
    ],
)
def test_bad_quantization_option(capsys, out, text_data_dir, tiny_model_dir, args, expected):
    msg = assert_clean_failure(capsys, ["--model", str(tiny_model_dir), *args], out)
    assert expected in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_device_without_a_gpu(capsys, out, text_data_dir, tiny_model_dir):
    msg = assert_clean_failure(capsys, ["--model", str(tiny_model_dir), "--device", "cuda"], out)
    assert "--device cuda" in msg and "no CUDA GPU" in msg


def test_argparse_error_in_subcommand(capsys, out, text_data_dir, tiny_model_dir):
    assert_clean_failure(capsys, ["--model", str(tiny_model_dir), "--group-size", "abc"], out)


# --- calibration data -------------------------------------------------------------------------


def test_empty_calibration_file(capsys, out, text_data_dir, tiny_model_dir, tmp_path):
    calib = tmp_path / "empty.txt"
    calib.write_text("")
    msg = assert_clean_failure(capsys, ["--model", str(tiny_model_dir), "--calib", str(calib)], out)
    assert str(calib) in msg
    assert "no text" in msg


def test_calibration_file_too_short(capsys, out, text_data_dir, tiny_model_dir, tmp_path):
    calib = tmp_path / "short.txt"
    calib.write_text("just a few words\n")
    args = ["--model", str(tiny_model_dir), "--calib", str(calib), "--calib-seq-len", "512"]
    msg = assert_clean_failure(capsys, args, out)
    assert "too short" in msg
    assert "512" in msg


def test_missing_calibration_file(capsys, out, text_data_dir, tiny_model_dir, tmp_path):
    calib = tmp_path / "nope.txt"
    msg = assert_clean_failure(capsys, ["--model", str(tiny_model_dir), "--calib", str(calib)], out)
    assert str(calib) in msg
    assert "not found" in msg


# --- the output folder ------------------------------------------------------------------------


def test_output_folder_exists(capsys, out, text_data_dir, tiny_model_dir):
    out.mkdir()
    marker = out / "keep-me.txt"
    marker.write_text("precious\n")
    msg = assert_clean_failure(capsys, ["--model", str(tiny_model_dir)], out, leave=(out.name,))
    assert "--overwrite" in msg
    assert str(out) in msg
    assert sorted(p.name for p in out.iterdir()) == ["keep-me.txt"]
    assert marker.read_text() == "precious\n"


# --- the happy path -----------------------------------------------------------------------------


def test_export_then_eval(capsys, tmp_path, text_data_dir, tiny_model_dir):
    art = tmp_path / "art"
    code = run_cli(
        [
            "--no-progress",
            "export",
            "--model",
            str(tiny_model_dir),
            "--group-size",
            "16",
            "--calib-samples",
            "4",
            "--calib-seq-len",
            "32",
            "--eval-seq-len",
            "32",
            "--eval-windows",
            "3",
            "--max-size-ratio",  # a tiny model is mostly its float embedding and lm_head
            "1.0",
            "--out",
            str(art),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"wrote {art}" in captured.out

    names = {p.name for p in art.iterdir()}
    for name in ("model.onnx", "edgeq_config.json", "report.json", "config.json", "tokenizer_config.json"):
        assert name in names, sorted(names)
    assert "tokenizer.json" in names, sorted(names)
    assert not list(tmp_path.glob(".art.partial-*"))

    report = json.loads((art / "report.json").read_text())
    ppl = report["perplexity"]
    onnx_ppl = ppl["quant_onnx"]["CPUExecutionProvider"]["accuracy_level_0"]
    for value in (ppl["fp_torch"], ppl["quant_torch"], onnx_ppl):
        assert math.isfinite(value) and value > 1, ppl
    assert report["onnx_parity"]["passed"] is True, report["onnx_parity"]

    saved = json.loads((art / "edgeq_config.json").read_text())
    config = ExportConfig.from_dict(saved)
    assert config.to_dict() == saved
    assert ExportConfig.from_dict(config.to_dict()) == config
    assert config.quant.weights.group_size == 16
    assert config.model == str(tiny_model_dir)
    assert (config.calibration.num_sequences, config.calibration.seq_len) == (4, 32)
    assert (config.evaluation.seq_len, config.evaluation.max_windows) == (32, 3)

    code = run_cli(
        ["--no-progress", "eval", "--model", str(art), "--eval-seq-len", "32", "--eval-windows", "3"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["windows"] == 3 and result["seq_len"] == 32
    assert result["perplexity"] == pytest.approx(onnx_ppl, rel=1e-6)


# --- damaged model files ------------------------------------------------------------------------


def _gguf_file(path: Path) -> Path:
    """A small GGUF with a Llama header, some metadata and one tensor (written by gguf's writer)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((96, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncate(path: Path, keep: float) -> Path:
    """Cut the file to its first ``keep`` share, as an interrupted copy or download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_corrupt_gguf(capsys, out, text_data_dir, tmp_path):
    gguf_path = tmp_path / "model.gguf"
    gguf_path.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    msg = assert_clean_failure(capsys, ["--model", str(gguf_path)], out)
    assert str(gguf_path) in msg and "GGUF" in msg


def test_truncated_gguf(capsys, out, text_data_dir, tmp_path):
    gguf_path = truncate(_gguf_file(tmp_path / "model.gguf"), keep=1 / 3)
    msg = assert_clean_failure(capsys, ["--model", str(gguf_path)], out)
    assert str(gguf_path) in msg and "GGUF" in msg


def test_truncated_safetensors(capsys, out, text_data_dir, tiny_model_dir):
    weights = truncate(tiny_model_dir / "model.safetensors", keep=1 / 2)
    msg = assert_clean_failure(capsys, ["--model", str(tiny_model_dir)], out)
    assert str(weights) in msg and "safetensors" in msg


def test_config_missing_a_required_field(capsys, out, text_data_dir, tiny_model_dir):
    path = tiny_model_dir / "config.json"
    config = json.loads(path.read_text())
    del config["intermediate_size"]  # transformers would default it to 11008 without a word
    path.write_text(json.dumps(config))
    msg = assert_clean_failure(capsys, ["--model", str(tiny_model_dir)], out)
    assert "intermediate_size" in msg and str(path) in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_is_named(capsys, out, text_data_dir, tiny_model_dir, bad):
    from safetensors.torch import load_file, save_file

    path = tiny_model_dir / "model.safetensors"
    state = load_file(path)
    name = "model.layers.1.mlp.down_proj.weight"
    state[name][3, 5] = bad
    save_file(state, path, metadata={"format": "pt"})
    # found when block 1 is read, after block 0 was quantized: small data keeps that quick
    args = ["--model", str(tiny_model_dir), "--no-validate", *SMALL_DATA]
    msg = assert_clean_failure(capsys, args, out, early=False)
    assert name in msg and "NaN or Inf" in msg


def test_tokenizer_of_another_vocabulary(capsys, out, text_data_dir, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens([f"<extra{i}>" for i in range(8)])  # 104 tokens for a 96-row embedding
    tokenizer.save_pretrained(tiny_model_dir)
    msg = assert_clean_failure(capsys, ["--model", str(tiny_model_dir)], out)
    assert "104 tokens" in msg and "vocab_size is 96" in msg


# --- calibration text, continued --------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"\x00" * 4096, "binary"), (b"\xff\xfe caf\xe9 \x81\x82" * 200, "not UTF-8")],
    ids=["binary", "non-utf8"],
)
def test_calibration_file_that_is_not_text(capsys, out, text_data_dir, tiny_model_dir, tmp_path, content,
                                           expected):  # fmt: skip
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    msg = assert_clean_failure(capsys, ["--model", str(tiny_model_dir), "--calib", str(calib)], out)
    assert str(calib) in msg and expected in msg


# --- the output location, continued -----------------------------------------------------------


def test_output_under_a_file(capsys, out, text_data_dir, tiny_model_dir):
    blocker = out.parent / "a-file"
    blocker.write_text("not a folder\n")
    args = ["--no-progress", "export", "--model", str(tiny_model_dir), "--out", str(blocker / "art")]
    line = assert_one_line_failure(capsys, args)
    assert "is a file" in line
    assert [p.name for p in out.parent.iterdir()] == ["a-file"]
    assert blocker.read_text() == "not a folder\n"


def test_read_only_output_location(capsys, text_data_dir, tiny_model_dir):
    # sysfs refuses new entries even to root, which permission bits do not (CI may run as root)
    target = Path("/sys/edgeq-test-artifact")
    if not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    code = run_cli(["--no-progress", "export", "--model", str(tiny_model_dir), "--out", str(target)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().splitlines() == [captured.err.strip()]
    assert captured.err.startswith("edgeq: error:") and "not writable" in captured.err
    assert not target.exists()


def test_full_disk_while_writing(capsys, out, text_data_dir, tiny_model_dir, monkeypatch):
    import errno

    from exporters.ort_fused import ExternalData

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(ExternalData, "move", no_space)
    args = ["--model", str(tiny_model_dir), "--no-validate", *SMALL_DATA]
    msg = assert_clean_failure(capsys, args, out, early=False)
    assert "no space left" in msg and "model.onnx_data" in msg


# --- gates files --------------------------------------------------------------------------------

BAD_GATES = {
    "unknown-gate": ("[gates]\nperplexity_ratio = 1.2\nspeedup = 2\n", "unknown gate 'speedup'"),
    "unknown-table": ("[gates]\nperplexity_ratio = 1.2\n[extra]\nx = 1\n", "unknown key 'extra'"),
    "string": ('[gates]\nperplexity_ratio = "1.2"\n', "must be a finite number"),
    "bool": ("[gates]\ntop1_agreement = true\n", "must be a finite number"),
}


@pytest.mark.parametrize("case", sorted(BAD_GATES))
def test_bad_gates_file_for_export(capsys, out, text_data_dir, tiny_model_dir, tmp_path, case):
    text, expected = BAD_GATES[case]
    gates = tmp_path / "gates.toml"
    gates.write_text(text)
    msg = assert_clean_failure(capsys, ["--model", str(tiny_model_dir), "--gates", str(gates)], out)
    assert expected in msg


# --- validate and verify on damaged artifact folders ----------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """One tiny w4a16 export, copied by the tests that damage it."""
    base = tmp_path_factory.mktemp("artifact")
    model_dir = base / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEQ_DATA_DIR", str(write_text_data(base / "data")))
        status = main(["--no-progress", "export", "--model", str(model_dir), "--no-validate",
                       "--calib-samples", "4", "--calib-seq-len", "32", "--eval-seq-len", "32",
                       "--eval-windows", "3", "--out", str(base / "art")])  # fmt: skip
    assert status == 0
    return base / "art"


def _damaged(artifact: Path, tmp_path: Path, damage: str) -> Path:
    import shutil

    folder = tmp_path / "art"
    shutil.copytree(artifact, folder)
    if damage == "missing":
        (folder / "report.md").unlink()
    elif damage == "extra":
        (folder / "notes.txt").write_text("added after the export\n")
    elif damage == "not-onnx":
        (folder / "model.onnx").write_bytes(b"this is not a protobuf" * 10)
    return folder


def assert_one_line_failure(capsys, argv: list[str]) -> str:
    code = run_cli(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeq: error:"), captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("command", "damage", "expected"),
    [
        ("validate", "not-onnx", "is not an ONNX model"),
        ("validate", "missing", "missing: report.md"),
        ("validate", "extra", "extra: notes.txt"),
        ("verify", "missing", "missing: report.md"),
        ("verify", "extra", "extra: notes.txt"),
    ],
)
def test_damaged_artifact_folder(capsys, tmp_path, artifact, command, damage, expected):
    folder = _damaged(artifact, tmp_path, damage)
    junit = tmp_path / "junit.xml"
    extra = ["--providers", "cpu", "--junit", str(junit)] if command == "validate" else []
    line = assert_one_line_failure(capsys, ["--no-progress", command, str(folder), *extra])
    assert expected in line
    assert not junit.exists()


@pytest.mark.parametrize("case", sorted(BAD_GATES))
def test_bad_gates_file_for_validate(capsys, tmp_path, artifact, case):
    text, expected = BAD_GATES[case]
    gates = tmp_path / "gates.toml"
    gates.write_text(text)
    line = assert_one_line_failure(
        capsys, ["--no-progress", "validate", str(artifact), "--gates", str(gates)]
    )
    assert expected in line
