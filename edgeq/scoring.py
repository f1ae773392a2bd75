"""Next-token scores of evaluation windows whose hidden states were streamed through the blocks.

The streamed pipeline (``edgeq.pipeline.run_blocks``) carries the evaluation windows through every
block and leaves their last hidden states; here the final norm and lm_head turn them into logits,
one window at a time, and only what the checks need is kept: per window the mean next-token NLL,
per position the greedy token, and for the FP reference the top-k log-probabilities. Nothing of
size [windows × length × vocab] is ever held.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from edgeq.models.adapters import Adapter
from edgeq.pipeline import Stream, in_dtype
from edgeq.quant.block import to_device
from edgeq.validate import FPReference

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # input_ids [1, L] -> logits [1, L, vocab]


@dataclass
class WindowScores:
    """nll: per window, the mean next-token NLL; argmax: [n, L] the greedy next token per
    position; top_ids / top_logprobs: [n, L, k] when asked for (the FP reference)."""

    nll: list[float]
    argmax: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(sum(self.nll) / len(self.nll))

    def fp_reference(self, windows: torch.Tensor) -> FPReference:
        """What validation compares with (needs top-k)."""
        assert self.top_ids is not None and self.top_logprobs is not None
        return FPReference(
            ids=windows.numpy().astype(np.int32),
            top_ids=self.top_ids,
            top_logprobs=self.top_logprobs.astype(np.float32),
            fp_perplexity=self.perplexity,
        )


def _window_nll(logprobs: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean NLL of ids[1:] under logprobs[:-1] (a BOS at the start is context, never a target)."""
    return float(-logprobs[:-1].gather(1, ids[1:, None]).mean())


@torch.no_grad()
def score_stream(
    model: torch.nn.Module,
    adapter: Adapter,
    stream: Stream,
    windows: torch.Tensor,
    top_k: int = 0,
    dtype: torch.dtype = torch.float32,
    desc: str = "score",
    progress: bool = True,
) -> WindowScores:
    """Score windows [n, L] from their final hidden states in ``stream`` (batches in window order):
    final norm and lm_head computed in ``dtype`` (on the CPU), log-softmax in float32."""
    norm, head = adapter.final_norm(model), adapter.lm_head(model)
    nll, argmax, top_ids, top_lp = [], [], [], []
    row = 0
    with in_dtype(norm, dtype), in_dtype(head, dtype):
        for hidden in tqdm(stream.hidden, desc=desc, unit="batch", disable=not progress):
            for h in hidden:  # one window at a time: [L, vocab] logits, never [b, L, vocab]
                ids = windows[row]
                row += 1
                logits = head(norm(to_device(h[None], "cpu", dtype)))[0].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                nll.append(_window_nll(logprobs, ids))
                argmax.append(logprobs.argmax(-1).to(torch.int32).numpy())
                if top_k:
                    values, indices = logprobs.topk(top_k, dim=-1)
                    top_ids.append(indices.to(torch.int32).numpy())
                    top_lp.append(values.numpy())
    return WindowScores(
        nll=nll,
        argmax=np.stack(argmax),
        top_ids=np.stack(top_ids) if top_k else None,
        top_logprobs=np.stack(top_lp) if top_k else None,
    )


@torch.no_grad()
def score_logits(
    logits_fn: LogitsFn, windows: torch.Tensor, desc: str = "score", progress: bool = True
) -> WindowScores:
    """Score windows [n, L] with a model's logits function, one window at a time."""
    nll, argmax = [], []
    for ids in tqdm(windows, desc=desc, unit="window", disable=not progress):
        logprobs = torch.log_softmax(logits_fn(ids[None])[0].float(), dim=-1)
        nll.append(_window_nll(logprobs, ids))
        argmax.append(logprobs.argmax(-1).to(torch.int32).numpy())
    return WindowScores(nll=nll, argmax=np.stack(argmax))


def perplexities_and_agreement(
    reference: LogitsFn,
    candidates: dict[str, LogitsFn],
    windows: torch.Tensor,
    desc: str = "compare",
    progress: bool = True,
) -> dict[str, Any]:
    """The reference's perplexity on windows [n, L] and, per candidate, its perplexity and greedy
    top-1 agreement with the reference (for two models held in memory, e.g. PyTorch and ORT)."""
    scores = score_logits(reference, windows, f"{desc}: reference", progress)
    return {"reference": scores.perplexity, **agreement_with(scores, candidates, windows, desc, progress)}


def agreement_with(
    reference: WindowScores,
    candidates: dict[str, LogitsFn],
    windows: torch.Tensor,
    desc: str = "compare",
    progress: bool = True,
) -> dict[str, Any]:
    """Per candidate (e.g. an ORT session), its perplexity on windows [n, L] and its greedy top-1
    agreement with the reference's scores (the share of positions whose argmax token matches)."""
    nll: dict[str, list[float]] = {name: [] for name in candidates}
    agree = dict.fromkeys(candidates, 0)
    for i, ids in enumerate(tqdm(windows, desc=desc, unit="window", disable=not progress)):
        for name, fn in candidates.items():
            logprobs = torch.log_softmax(fn(ids[None])[0].float(), dim=-1)
            nll[name].append(_window_nll(logprobs, ids))
            agree[name] += int((logprobs.argmax(-1).numpy() == reference.argmax[i]).sum())
    return {
        name: {
            "perplexity": math.exp(sum(nll[name]) / len(windows)),
            "top1_agreement": agree[name] / windows.numel(),
        }
        for name in candidates
    }
