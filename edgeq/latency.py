"""Prefill latency and KV-cache decode speed of an ONNX decoder in ONNX Runtime."""

from __future__ import annotations

import time

import numpy as np

from edgeq.evaluation import OrtCausalLM


def _percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90))}


def measure_decode(
    lm: OrtCausalLM, prompt_len: int = 128, new_tokens: int = 64, repeats: int = 5, seed: int = 0
) -> dict[str, object]:
    """Time ``repeats`` runs (after one warm-up) of: a prefill of a random ``prompt_len``-token prompt,
    then ``new_tokens`` greedy decode steps with the KV cache. Prefill in ms, decode in tokens/s
    (p50 and p90 over the runs)."""
    rng = np.random.default_rng(seed)
    vocab = lm.vocab_size
    prefill_ms, tokens_per_s = [], []
    for run in range(repeats + 1):
        prompt = rng.integers(0, vocab, (1, prompt_len))
        start = time.perf_counter()
        logits, past = lm.step(prompt, lm.empty_past(1), 0)
        prefilled = time.perf_counter()
        token = int(logits[0, -1].argmax())
        for t in range(new_tokens):
            logits, past = lm.step(np.array([[token]]), past, prompt_len + t)
            token = int(logits[0, -1].argmax())
        done = time.perf_counter()
        if run:  # the first run warms up the session
            prefill_ms.append((prefilled - start) * 1000)
            tokens_per_s.append(new_tokens / (done - prefilled))
    return {
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_ms": _percentiles(prefill_ms),
        "decode_tokens_per_s": _percentiles(tokens_per_s),
    }
