"""What the peer runners share: reading the benchmark's token windows, timing and peak memory around
a toolkit's quantization call, scoring windows, and writing the result for ``benchmarks/compare.py``.

The runners execute in the toolkits' own virtual environments (``benchmarks/peers/setup.sh``), whose
torch and transformers pins differ from edgeq's, so this module needs only torch, safetensors and
psutil, never edgeq: ``window_nll`` is a copy of ``edgeq.evaluation.window_nll`` (a test checks that
the two agree) and ``PeakRSS`` samples like ``edgeq.latency.PeakRSS``.

Files (all in the folder ``--out``):
    inputs  ``--data``: a safetensors file with ``calibration`` [n, L] and ``evaluation`` [w, L] int64
            token ids, written by compare.py from edgeq's data code
    result.json       what the runner measured (``PeerResult``)
    weights.safetensors   for weight-only recipes: every quantized linear's dequantized weight
            [out, in], float32, under the name it has in the Hugging Face state dict
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import resource
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

RESULT_FILE, WEIGHTS_FILE = "result.json", "weights.safetensors"


@dataclasses.dataclass
class PeerResult:
    """One runner's outcome. ``window_nll`` [w]: the mean next-token NLL of every evaluation window
    through the toolkit's own quantized forward pass; ``weights_file``: the dequantized weights' file
    name inside the output folder (None when the recipe quantizes activations, whose effect no weight
    file carries); ``error``: the first line of the exception that stopped the runner."""

    toolkit: str
    recipe: str
    versions: dict
    settings: dict = dataclasses.field(default_factory=dict)
    quantization_seconds: float | None = None
    peak_rss_bytes: int | None = None
    process_peak_rss_bytes: int | None = None
    window_nll: list[float] | None = None
    eval_seconds: float | None = None
    weights_file: str | None = None
    quantized_linears: int | None = None
    error: str | None = None
    traceback: str | None = None


def parse_args(description: str, recipes: tuple[str, ...]) -> argparse.Namespace:
    """The runners' common command line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-dir", type=Path, required=True, help="Hugging Face folder of the model")
    parser.add_argument("--data", type=Path, required=True, help="safetensors file of token windows")
    parser.add_argument("--out", type=Path, required=True, help="folder for result.json and weights")
    parser.add_argument("--recipe", choices=recipes, default=recipes[0])
    return parser.parse_args()


def load_windows(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration [n, L] and evaluation [w, L] token ids (int64) compare.py wrote."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return tensors["calibration"].long(), tensors["evaluation"].long()


def versions(*packages: str) -> dict:
    """Installed versions of the packages the result depends on (None when absent)."""
    found = {}
    for name in ("torch", "transformers", *packages):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms), as
    ``edgeq.latency.PeakRSS`` measures edgeq's and ONNX Runtime's rows."""

    def __enter__(self) -> PeakRSS:
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def timed(result: PeerResult, quantize: Callable[[], object]) -> object:
    """Run ``quantize()`` with its wall time and peak RSS recorded in ``result``; returns its value."""
    with PeakRSS() as peak:
        start = time.perf_counter()
        value = quantize()
        result.quantization_seconds = time.perf_counter() - start
    result.peak_rss_bytes = peak.peak
    return value


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood. logits [L, vocab], ids [L]. A copy of
    ``edgeq.evaluation.window_nll`` (edgeq does not import under the toolkits' pins)."""
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="mean"))


@torch.no_grad()
def score_windows(model: torch.nn.Module, windows: torch.Tensor) -> list[float]:
    """Every window's mean NLL [w] through ``model``'s own forward pass, each window on its own, no
    KV cache: what ``edgeq.evaluation.perplexity(torch_logits_fn(model), windows)`` averages."""
    return [window_nll(model(ids[None], use_cache=False).logits[0], ids) for ids in windows]


def score(result: PeerResult, model: torch.nn.Module, windows: torch.Tensor) -> None:
    start = time.perf_counter()
    result.window_nll = score_windows(model, windows)
    result.eval_seconds = time.perf_counter() - start


def save_weights(result: PeerResult, out: Path, weights: dict[str, torch.Tensor]) -> None:
    """The dequantized weights [out, in] as float32 safetensors in ``out``."""
    from safetensors.torch import save_file

    save_file({name: w.detach().float().contiguous() for name, w in weights.items()}, str(out / WEIGHTS_FILE))
    result.weights_file, result.quantized_linears = WEIGHTS_FILE, len(weights)


def write_result(result: PeerResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).write_text(json.dumps(dataclasses.asdict(result), indent=2, default=str) + "\n")


def run(result: PeerResult, out: Path, body: Callable[[PeerResult], None]) -> int:
    """Run a runner's body, recording any failure in result.json (as compare.py records a failed
    row) and the process's lifetime peak RSS; the exit status is 1 on failure."""
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    try:
        body(result)
    except Exception as err:  # a toolkit that cannot quantize the model is a result too
        text = str(err).strip()
        result.error = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
        result.traceback = traceback.format_exc()
        traceback.print_exc()
        status = 1
    result.process_peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    write_result(result, out)
    return status
