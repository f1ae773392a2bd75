"""manifest.json and MODEL_CARD.md on a fake artifact folder (a tiny ONNX graph, no real model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import EdgeqError
from edgeq.manifest import (
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    calibration_sha256,
    content_sha256,
    onnx_io,
    sha256_file,
    verify_bundle,
    weights_sha256,
    write_manifest,
    write_model_card,
)

REPORT = {
    "edgeq_version": "0.1.0",
    "created": "2026-01-01T00:00:00+00:00",
    "model": {"spec": "tiny-llama", "model_type": "llama", "adapter": "llama", "parameters": 86760},
    "config": {
        "quant": {
            "scheme": "w4a4",
            "method": "rtn",
            "weights": {"bits": 4, "group_size": -1, "symmetric": True},
            "activations": {"bits": 4, "symmetric": True, "clip_ratio": 0.9, "kv_bits": 8},
            "rotation": {"enabled": True},
        },
        "calibration": {"source": None, "num_sequences": 4, "seq_len": 64, "seed": 0},
        "evaluation": {"text": None, "seq_len": 64, "max_windows": 4},
        "format": "ort",
        "onnx_opset": 21,
    },
    "calibration": {"file": "c4.parquet", "documents": 20, "shape": [4, 64]},
    "evaluation": {"text": "WikiText-2 raw test", "windows": 4, "seq_len": 64},
    "rotation": {
        "applied": {"r1": "Hadamard 72", "r3": "online 18", "r4": "online 96", "r5": "online 72"},
        "skipped": {},
    },
    "perplexity": {
        "fp_torch": 100.0436,
        "rotated_torch": 100.0435,
        "quant_torch": 100.6246,
        "quant_onnx": {"CPUExecutionProvider": {"accuracy_level_0": 100.6245, "accuracy_level_4": 100.6072}},
    },
    "top1_agreement_with_pytorch": {
        "CPUExecutionProvider": {"accuracy_level_0": 1.0, "accuracy_level_4": 0.93}
    },
    "onnx_parity": {"relative_difference": 1.2e-7, "tolerance": 0.005, "top1_agreement": 1.0, "passed": True},
    "sizes_bytes": {"fp32_parameters": 347040, "onnx_model": 261950, "onnx_components": {"blocks": 65568}},
    "onnx": {"format": "ort", "opset": 21, "quantized_weights": 14},
    "validation": {
        "providers": {
            "CPUExecutionProvider": {
                "perplexity": 100.6072,
                "top1_agreement_fp": 0.91,
                "kl_fp": 0.0123,
                "prefill_ms": {"p50": 3.5, "p90": 4.25},
                "decode_tokens_per_s": {"p50": 812.5, "p90": 790.0},
            }
        },
        "gates": [
            {
                "name": "perplexity_ratio",
                "provider": "CPUExecutionProvider",
                "value": 1.006,
                "op": "<=",
                "limit": 1.05,
                "passed": True,
                "note": "",
            },
        ],  # fmt: skip
        "passed": True,
    },
}


def _tiny_onnx(path: Path, external: bool = False) -> None:
    """input_ids int64 [batch, seq] -> logits float32 [batch, seq, 4] via Cast and Unsqueeze/Expand."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 4])
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["f", "axes"], ["u"]),
        helper.make_node("Mul", ["u", "w"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"),  # raw_data: can go external
        numpy_helper.from_array(np.arange(1, 5, dtype=np.float32), "w"),
    ]
    graph = helper.make_graph(nodes, "tiny", [ids], [logits], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    else:
        onnx.save(model, str(path))


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    folder = tmp_path / "artifact"
    folder.mkdir()
    _tiny_onnx(folder / "model.onnx")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "report.json").write_text(json.dumps(REPORT))
    (folder / "tokenizer").mkdir()  # a nested file: listed with a posix relative path
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    write_model_card(folder, REPORT)
    write_manifest(
        folder,
        source={"spec": "tiny-llama", "model_type": "llama", "weights_sha256": "0" * 64},
        calibration_hash=calibration_sha256(np.arange(8).reshape(2, 4)),
        metrics={"perplexity": REPORT["perplexity"]},
        config=REPORT["config"],
    )
    return folder


def test_fresh_bundle_verifies(bundle: Path):
    assert verify_bundle(bundle) == []
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    files = manifest["files"]
    assert set(files) == {"model.onnx", "config.json", "tokenizer/vocab.txt"}
    # the files that print timings are hashed apart, with the run's creation time
    assert set(manifest["run"]["files"]) == {"report.json", MODEL_CARD_FILE}
    assert set(manifest["run"]) == {"created", "files"}
    assert manifest["content_sha256"] == content_sha256(manifest)
    assert files["config.json"]["sha256"] == sha256_file(bundle / "config.json")
    assert files["config.json"]["bytes"] == (bundle / "config.json").stat().st_size
    assert manifest["onnx"]["opset"] == 21 and manifest["onnx"]["external_data"] is False
    assert manifest["onnx_version"] == onnx.__version__
    assert manifest["config"]["quant"]["scheme"] == "w4a4"


def test_manifest_lists_graph_io(bundle: Path):
    io = json.loads((bundle / MANIFEST_FILE).read_text())["onnx"]["io"]
    assert io["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
    assert io["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", 4]}]
    assert onnx_io(bundle / "model.onnx") == io


def test_external_data_is_flagged_and_hashed(tmp_path: Path):
    _tiny_onnx(tmp_path / "model.onnx", external=True)
    write_manifest(tmp_path, source={}, calibration_hash="", metrics={}, config={})
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["onnx"]["external_data"] is True
    assert set(manifest["files"]) == {"model.onnx", "model.onnx_data"}
    (tmp_path / "model.onnx_data").write_bytes(b"")
    assert verify_bundle(tmp_path) == [
        f"changed: model.onnx_data (size or SHA-256 differs from {MANIFEST_FILE})"
    ]


def test_content_hash_ignores_the_run_and_follows_the_files(bundle: Path):
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    other_run = {**manifest, "run": {"created": "2031-01-01T00:00:00+00:00", "files": {}}}
    assert content_sha256(other_run) == manifest["content_sha256"]
    changed = json.loads(json.dumps(manifest))
    changed["files"]["config.json"]["sha256"] = "0" * 64
    assert content_sha256(changed) != manifest["content_sha256"]


def test_changed_run_file_is_reported(bundle: Path):
    (bundle / "report.json").write_text(json.dumps({**REPORT, "created": "another time"}))
    assert verify_bundle(bundle) == [f"changed: report.json (size or SHA-256 differs from {MANIFEST_FILE})"]


def test_tampered_file_is_reported_changed(bundle: Path):
    path = bundle / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # same size: only the hash can catch it
    path.write_bytes(bytes(data))
    problems = verify_bundle(bundle)
    assert len(problems) == 1 and problems[0].startswith("changed: model.onnx")


def test_missing_and_extra_files_are_reported(bundle: Path):
    (bundle / "tokenizer" / "vocab.txt").unlink()
    (bundle / "notes.txt").write_text("added later")
    problems = verify_bundle(bundle)
    assert any(p.startswith("missing: tokenizer/vocab.txt") for p in problems)
    assert any(p.startswith("extra: notes.txt") for p in problems)
    assert len(problems) == 2


def test_missing_manifest_raises(bundle: Path):
    (bundle / MANIFEST_FILE).unlink()
    with pytest.raises(EdgeqError, match=MANIFEST_FILE):
        verify_bundle(bundle)


def test_model_card_numbers_come_from_the_report(bundle: Path):
    card = (bundle / MODEL_CARD_FILE).read_text()
    expected = ["100.624", "100.607", "ORTModelForCausalLM.from_pretrained", "edgeq verify", "edgeq validate"]
    expected += [
        "emulates",
        "KV cache**: int8",
        "R3, R4, R5",
        "perplexity_ratio on CPUExecutionProvider: 1.006 <= 1.05 — passed",
        "`model.onnx`",
        MANIFEST_FILE,
    ]
    for text in expected:
        assert text in card, text


def test_weights_sha256_order_free_and_byte_sensitive(tmp_path: Path):
    a, b = tmp_path / "model-00001.safetensors", tmp_path / "model-00002.safetensors"
    a.write_bytes(b"first shard")
    b.write_bytes(b"second shard")
    digest = weights_sha256([a, b])
    assert weights_sha256([b, a]) == digest
    assert weights_sha256([a]) == sha256_file(a)  # one file: the Hub's LFS sha256
    b.write_bytes(b"second shard!")
    assert weights_sha256([a, b]) != digest
    with pytest.raises(EdgeqError):
        weights_sha256([])


def test_calibration_sha256_identifies_the_tokens():
    ids = torch.arange(12).reshape(3, 4)
    digest = calibration_sha256(ids)
    assert calibration_sha256(ids.clone()) == digest
    assert calibration_sha256(ids.numpy().astype(np.int32)) == digest  # dtype of the holder is irrelevant
    changed = ids.clone()
    changed[1, 2] += 1
    assert calibration_sha256(changed) != digest
    assert calibration_sha256(ids.reshape(4, 3)) != digest  # same bytes, other shape
