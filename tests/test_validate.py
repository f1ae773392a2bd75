"""Validation math and gates: KL over the stored top-k, agreement, gate semantics, gates files, JUnit."""

from __future__ import annotations

from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from conftest import tiny_model

from edgeq.errors import EdgeqError
from edgeq.validate import (
    GateResult,
    ValidationResult,
    apply_gates,
    compare_with_fp,
    fp_reference,
    junit_xml,
    kl_top_k,
    load_gates,
)


def _logprobs(shape, seed):
    return torch.log_softmax(torch.randn(shape, generator=torch.Generator().manual_seed(seed)), -1).numpy()


def test_kl_over_the_whole_vocabulary_is_the_exact_kl():
    p, q = _logprobs((5, 12), 0), _logprobs((5, 12), 1)
    exact = (np.exp(p) * (p - q)).sum(-1)
    np.testing.assert_allclose(kl_top_k(p, q), exact, rtol=1e-5, atol=1e-5)  # float32 sums to 1 ± 1e-7


def test_kl_over_top_k_is_a_lower_bound_and_zero_for_equal_distributions():
    p, q = _logprobs((5, 50), 2), _logprobs((5, 50), 3)
    exact = (np.exp(p) * (p - q)).sum(-1)
    order = np.argsort(-p, axis=-1)[:, :8]
    top_p, top_q = np.take_along_axis(p, order, -1), np.take_along_axis(q, order, -1)
    approx = kl_top_k(top_p, top_q)
    assert np.all(approx <= exact + 1e-9) and np.all(approx > 0)
    np.testing.assert_allclose(kl_top_k(top_p, top_p), 0, atol=1e-9)


def test_the_fp_model_agrees_with_its_own_reference():
    model = tiny_model("llama")
    windows = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))

    def logits(ids):
        with torch.no_grad():
            return model(ids).logits

    ref = fp_reference(windows, logits, k=8, progress=False)
    got = compare_with_fp(logits, ref, progress=False)
    assert got["top1_agreement_fp"] == 1.0
    assert abs(got["kl_fp"]) < 1e-6
    assert got["perplexity"] == pytest.approx(ref.fp_perplexity, rel=1e-6)

    def noisy(ids):
        out = logits(ids)
        return out + 3.0 * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))

    worse = compare_with_fp(noisy, ref, progress=False)
    assert worse["top1_agreement_fp"] < 1.0 and worse["kl_fp"] > 0.01


def test_gates_compare_in_their_direction():
    values = {"perplexity_ratio": 1.2, "top1_agreement": 0.9, "decode_speedup": None}
    results = apply_gates(
        values, {"perplexity_ratio": 1.1, "top1_agreement": 0.8, "decode_speedup": 2.5}, "cpu"
    )
    by_name = {r.name: r for r in results}
    assert not by_name["perplexity_ratio"].passed
    assert by_name["top1_agreement"].passed
    assert not by_name["decode_speedup"].passed and "not measurable" in by_name["decode_speedup"].note


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[gates]\nperplexity_ratio = 1.1\nspeed = 3\n", "unknown gate 'speed'"),
        ("perplexity_ratio = 1.1\n", "no [gates] table"),
        ("[gates\n", "not valid TOML"),
    ],
)
def test_bad_gates_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "gates.toml"
    path.write_text(text)
    with pytest.raises(EdgeqError, match=message.replace("[", r"\[")):
        load_gates(path)
    with pytest.raises(EdgeqError, match="not found"):
        load_gates(tmp_path / "missing.toml")


def test_gates_file_is_read():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.toml"
        path.write_text("[gates]\nperplexity_ratio = 1.1\ndecode_speedup = 2.5\n")
        assert load_gates(path) == {"perplexity_ratio": 1.1, "decode_speedup": 2.5}


def test_junit_names_the_failed_gate_and_the_skipped_provider():
    result = ValidationResult(
        providers={
            "CPUExecutionProvider": {"generation_ok": True},
            "CUDAExecutionProvider": {"skipped": "no GPU here"},
        },
        gates=[
            GateResult("perplexity_ratio", "CPUExecutionProvider", 1.3, "<=", 1.1, False),
            GateResult("size_ratio", "CPUExecutionProvider", 0.2, "<=", 0.3, True),
        ],
    )
    assert not result.passed
    root = ElementTree.fromstring(junit_xml(result))
    assert root.get("failures") == "1" and root.get("tests") == "4"
    failures = [c for c in root.iter("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failures] == ["perplexity_ratio"]
    assert "perplexity_ratio" in failures[0].find("failure").get("message")
    skipped = [c for c in root.iter("testcase") if c.find("skipped") is not None]
    assert skipped[0].get("classname") == "CUDAExecutionProvider"
