"""``edgeq validate --providers cuda``: every gate on onnxruntime-gpu where a GPU is usable, a clean skip
with its reason everywhere else, on the tiny hand-made float16-cache decoder of test_ort_fp16."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_ort_fp16 import VOCAB, write_tiny_kv_graph

from edgeq import cli
from edgeq.evaluation import OrtCausalLM
from edgeq.validate import format_table, fp_reference, junit_xml, validate, write_fp_reference

CUDA = "CUDAExecutionProvider"
HAS_CUDA_EP = CUDA in ort.get_available_providers()
CUDA_USABLE = HAS_CUDA_EP and torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(
    not CUDA_USABLE, reason="needs onnxruntime-gpu (CUDAExecutionProvider) and a CUDA GPU torch can see"
)
GATES = {"perplexity_ratio": 1.01, "top1_agreement": 0.99, "kl_divergence": 1e-3}
FAST = {"progress": False, "latency_runs": 1, "decode_tokens": 2}


def _artifact(folder: Path, kv_dtype=np.float16, logits_dtype=np.float32) -> Path:
    """The tiny graph as an artifact folder: model.onnx, config.json and its own FP reference."""
    write_tiny_kv_graph(folder, kv_dtype, logits_dtype)
    windows = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    write_fp_reference(folder, fp_reference(windows, OrtCausalLM(folder).logits, k=4, progress=False))
    return folder


@pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime build has the CUDA provider")
def test_without_onnxruntime_gpu_cuda_is_skipped_with_its_reason(tmp_path):
    result = validate(_artifact(tmp_path / "a"), ["cpu", "cuda"], GATES, **FAST)
    why = result.providers[CUDA]["skipped"]
    assert "not available in this onnxruntime build" in why and "onnxruntime-gpu" in why
    assert {g.provider for g in result.gates} == {"CPUExecutionProvider"}
    assert result.passed  # the missing provider is reported, not failed
    assert f"{CUDA:22s} skipped: " in format_table(result)
    case = ElementTree.fromstring(junit_xml(result)).find(f"testcase[@classname='{CUDA}']")
    assert case.find("skipped").get("message") == why


@pytest.mark.skipif(CUDA_USABLE, reason="CUDA is usable here")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
def test_a_listed_cuda_provider_that_falls_back_to_the_cpu_is_skipped(tmp_path, monkeypatch):
    """onnxruntime-gpu lists CUDAExecutionProvider even without a GPU or its libraries; ORT then runs
    the session on the CPU. That is a skip with the reason, not a CPU measurement under CUDA's name."""
    listed = [*ort.get_available_providers(), CUDA]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    result = validate(_artifact(tmp_path / "a"), ["cpu", "cuda"], GATES, **FAST)
    assert result.providers[CUDA] == {
        "skipped": f"ONNX Runtime could not start {CUDA} here and ran the session on CPUExecutionProvider "
        "(no usable GPU, or the CUDA / cuDNN libraries that onnxruntime-gpu needs are missing)"
    }
    assert {g.provider for g in result.gates} == {"CPUExecutionProvider"} and result.passed


@pytest.mark.skipif(CUDA_USABLE, reason="CUDA is usable here")
def test_cli_validate_with_cuda_requested_passes_on_a_cpu_machine(tmp_path, capsys):
    folder = _artifact(tmp_path / "a")
    gates = tmp_path / "gates.toml"
    gates.write_text("[gates]\nperplexity_ratio = 1.01\ntop1_agreement = 0.99\n")
    argv = ["--no-progress", "validate", str(folder), "--providers", "cpu,cuda", "--gates", str(gates),
            "--latency-runs", "1", "--decode-tokens", "2", "--junit", str(tmp_path / "j.xml")]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"{CUDA:22s} skipped: " in out and out.rstrip().endswith("PASSED")
    assert "<skipped" in (tmp_path / "j.xml").read_text()


@requires_cuda
@pytest.mark.parametrize("logits_dtype", [np.float16, np.float32])
def test_float16_cache_on_cuda_matches_the_cpu(tmp_path, logits_dtype):
    folder = write_tiny_kv_graph(tmp_path / "m", np.float16, logits_dtype)
    gpu, cpu = OrtCausalLM(folder, provider=CUDA), OrtCausalLM(folder)
    assert gpu.active_providers[0] == CUDA
    ids = torch.tensor([[3, 4, 5, 6]])
    logits = gpu.logits(ids)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, cpu.logits(ids))
    assert gpu.empty_past(1)["past_key_values.0.key"].dtype == np.float16
    np.testing.assert_array_equal(gpu.generate_greedy(np.array([[7, 8]]), 4), [9, 10, 0, 1])


@requires_cuda
def test_every_gate_runs_on_cuda(tmp_path):
    result = validate(_artifact(tmp_path / "a"), ["cpu", "cuda"], GATES, **FAST)
    metrics = result.providers[CUDA]
    assert "skipped" not in metrics and metrics["generation_ok"]
    assert metrics["decode_tokens_per_s"]["p50"] > 0
    assert sorted(g.name for g in result.gates if g.provider == CUDA) == sorted(GATES)
    assert result.passed
