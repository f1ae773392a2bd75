"""The handoff bundle of a tiny W4A4 export: report.md with plots, MODEL_CARD.md, manifest.json,
``edgeq verify`` on a tampered file, ``edgeq validate`` with a gate set too tight, and the
runtime_tests suite run against the folder as a receiving team would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
from conftest import byte_tokenizer, load_example, tiny_model, write_text_data

from edgeq.cli import main

ROOT = Path(__file__).resolve().parents[1]


# the qdq W4A4 graph (optimum's, traced block by block) and the fused ort graph, both with their
# weights in model.onnx_data
ARTIFACTS = {
    "qdq-w4a4": ["--scheme", "w4a4", "--method", "gptq", "--kv-bits", "4"],
    "ort-w4a16-external-data": ["--scheme", "w4a16", "--method", "gptq", "--format", "ort"],
}


@pytest.fixture(scope="module", params=sorted(ARTIFACTS))
def artifact(request, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("handoff")
    model_dir = base / "tiny-qwen2"
    # head_dim = hidden / heads, as optimum's ORTModelForCausalLM assumes, and a multiple of 8 for the
    # fused graph's GroupQueryAttention
    tiny_model("qwen2", hidden_size=64, head_dim=16).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    out = base / "art"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEQ_DATA_DIR", str(write_text_data(base / "data")))
        status = main([
            "--no-progress", "export", "--model", str(model_dir), *ARTIFACTS[request.param],
            "--calib-samples", "4", "--calib-seq-len", "32", "--eval-seq-len", "32",
            "--eval-windows", "3", "--max-size-ratio", "1.0", "--out", str(out),
        ])  # fmt: skip
    assert status == 0
    assert (out / "model.onnx_data").exists()  # both writers stream their weights into it
    return out


def test_bundle_holds_report_card_manifest_and_reference(artifact):
    for name in ("report.md", "MODEL_CARD.md", "manifest.json", "report.json", "reference/fp_topk.npz"):
        assert (artifact / name).exists(), name
    report_md = (artifact / "report.md").read_text()
    for link in ("plots/perplexity.png", "plots/layer_errors.png", "plots/latency.png"):
        assert f"]({link})" in report_md
        assert (artifact / link).read_bytes().startswith(b"\x89PNG")
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert "model.onnx" in manifest["files"] and "MODEL_CARD.md" in manifest["run"]["files"]
    exported = json.loads((artifact / "edgeq_config.json").read_text())
    assert manifest["config"]["quant"]["scheme"] == exported["quant"]["scheme"] in ("w4a4", "w4a16")
    assert "model.onnx_data" in manifest["files"]
    assert [i["name"] for i in manifest["onnx"]["io"]["inputs"]][0] == "input_ids"
    report = json.loads((artifact / "report.json").read_text())
    assert report["validation"]["passed"] is True
    # onnxruntime-genai's config beside the ort format's graph only, and the card says how to run it
    ort = report["onnx"]["format"] == "ort"
    assert (artifact / "genai_config.json").exists() == ort == ("genai_config.json" in manifest["files"])
    assert bool(report["genai"]["config"]) == ort and (ort or "ort format only" in report["genai"]["reason"])
    assert ("og.Model(" in (artifact / "MODEL_CARD.md").read_text()) == ort
    assert "CUDAExecutionProvider" in report["validation"]["providers"]  # skipped here, with its reason


def test_verify_passes_then_fails_on_a_tampered_file(artifact, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    assert main(["verify", str(copy)]) == 0
    name = "model.onnx_data"
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 1
    assert f"changed: {name}" in capsys.readouterr().err


def test_validate_exits_non_zero_and_junit_names_the_failed_gate(artifact, tmp_path, capsys):
    junit = tmp_path / "junit.xml"
    status = main(["--no-progress", "validate", str(artifact), "--providers", "cpu", "--min-top1", "0.999",
                   "--max-size-ratio", "1.0", "--junit", str(junit)])  # fmt: skip
    assert status == 1
    assert "FAILED" in capsys.readouterr().out
    root = ElementTree.parse(junit).getroot()
    failed = [c.get("name") for c in root.iter("testcase") if c.find("failure") is not None]
    assert failed == ["top1_agreement"]
    status = main(
        ["--no-progress", "validate", str(artifact), "--providers", "cpu", "--max-size-ratio", "1.0"]
    )
    assert status == 0


def test_runtime_tests_suite_passes_on_the_artifact(artifact, tmp_path):
    gates = tmp_path / "gates.toml"
    gates.write_text("[gates]\nperplexity_ratio = 2.0\ntop1_agreement = 0.3\nsize_ratio = 1.0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "runtime_tests"),
         "--artifact", str(artifact), "--gates", str(gates), "-rs"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "CUDAExecutionProvider" in proc.stdout  # skipped with its reason
    assert " passed" in proc.stdout


def test_the_generate_example_runs_the_bundle(artifact):
    text = load_example("generate_from_bundle").main(str(artifact), "abc", new_tokens=6)
    assert isinstance(text, str) and text.strip()


def test_the_ci_workflow_example_validates_with_gates_and_junit():
    workflow = (ROOT / "examples" / "ci-workflow.yml").read_text()
    assert "edgeq --no-progress export" in workflow and "--gates gates.toml" in workflow
    assert "--junit" in workflow and "edgeq verify" in workflow
