"""Prefill latency and KV-cache decode speed of an ONNX decoder (in ORT or OpenVINO), and peak memory."""

from __future__ import annotations

import threading
import time

import numpy as np
import psutil

from edgeq.evaluation import DecoderLM


def _percentiles(values: list[float], higher_is_better: bool = False) -> dict[str, float]:
    """p50 and p90 in the latency sense: p90 is the slow tail (for a speed, its 10th percentile)."""
    tail = 10 if higher_is_better else 90
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, tail))}


def measure_decode(
    lm: DecoderLM, prompt_len: int = 128, new_tokens: int = 64, repeats: int = 5, seed: int = 0
) -> dict[str, object]:
    """Time ``repeats`` runs (after one warm-up) of: a prefill of a random ``prompt_len``-token prompt,
    then ``new_tokens`` greedy decode steps with the KV cache. Prefill in ms, decode in tokens/s
    (p50 and p90 over the runs; p90 is the slow tail: the prefill time 90% of runs beat, the
    decode speed 90% of runs reach)."""
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
        "decode_tokens_per_s": _percentiles(tokens_per_s, higher_is_better=True),
    }


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
