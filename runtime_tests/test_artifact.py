"""Gates on an exported artifact, per execution provider (see conftest.py for the options)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeq.latency import measure_decode
from edgeq.manifest import verify_bundle
from edgeq.validate import GATES, apply_gates, greedy_generation_is_finite


def _gate(gates: dict[str, float], name: str, value: float | None, provider: str) -> None:
    if name not in gates:
        pytest.skip(f"no {name} gate set")
    (result,) = apply_gates({name: value}, {name: gates[name]}, provider)
    assert result.passed, f"{name} = {value} is not {GATES[name][0]} {gates[name]} ({GATES[name][1]})"


def test_files_match_the_manifest(artifact):
    assert verify_bundle(artifact) == []


def test_model_loads_and_scores_a_window(lm, reference):
    logits = lm.logits(torch.from_numpy(reference.ids[:1, :32].astype(np.int64)))
    assert logits.shape[:2] == (1, 32)
    assert np.isfinite(logits.numpy()).all()


def test_perplexity_ratio_to_fp(fp_comparison, reference, gates, provider):
    _gate(gates, "perplexity_ratio", fp_comparison["perplexity"] / reference.fp_perplexity, provider)


def test_top1_agreement_with_fp(fp_comparison, gates, provider):
    _gate(gates, "top1_agreement", fp_comparison["top1_agreement_fp"], provider)


def test_kl_divergence_from_fp(fp_comparison, gates, provider):
    assert fp_comparison["kl_fp"] >= -1e-6  # a KL divergence (up to float error) is never negative
    _gate(gates, "kl_divergence", fp_comparison["kl_fp"], provider)


def test_greedy_generation_of_32_tokens_is_finite(lm, reference):
    assert greedy_generation_is_finite(lm, reference.ids[:1, :16].astype(np.int64), 32)


def test_decode_speed(lm, report, gates, provider):
    speed = measure_decode(lm, prompt_len=128, new_tokens=64, repeats=3)
    assert speed["prefill_ms"]["p50"] > 0 and speed["decode_tokens_per_s"]["p50"] > 0
    fp32 = report.get("reference_speed", {}).get("fp32_onnx_decode_tokens_per_s")
    _gate(gates, "decode_speedup", speed["decode_tokens_per_s"]["p50"] / fp32 if fp32 else None, provider)


def test_size_ratio(files_bytes, report, gates, provider):
    fp32 = report.get("sizes_bytes", {}).get("fp32_parameters")
    _gate(gates, "size_ratio", files_bytes / fp32 if fp32 else None, provider)
