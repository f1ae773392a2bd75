"""OAC (Edalati et al., 2024, arXiv 2405.15025): output-adaptive Hessians for layer-wise quantization.

GPTQ weighs a linear's rounding error ΔW by its own output error, tr(ΔW H ΔWᵀ) with H = 2E[x xᵀ].
OAC weighs it by what it does to the model's output cross-entropy L instead. To second order
around the calibrated weights,

    δL ≈ ½ vec(ΔW)ᵀ F vec(ΔW),    F = E_s[ vec(G_s) vec(G_s)ᵀ ]   (Fisher identity)

where G_s = ∂L_s/∂W [d_out, d_in] is the gradient of calibration sequence s's mean token
cross-entropy. F is (d_out·d_in)² — far too large — so OAC assumes the rows of W independent
(only the diagonal blocks F_i = E_s[g_s,i g_s,iᵀ] of rows i stay, with g_s,i row i of G_s) and sums
the row blocks into one Hessian shared by every row, the shape GPTQ's column sweep needs:

    H_OAC = Σ_i F_i = E_s[ G_sᵀ G_s ]      [d_in, d_in]

For a linear y_t = W x_t applied at the tokens t of sequence s, G_s = Σ_t δ_t x_tᵀ with δ_t =
∂L_s/∂y_t. So one backward pass per sequence gives every linear's G_s from its input and its output
gradient, with no gradient of any weight ever formed: the hooks below turn (x, δ) into G_sᵀ G_s as
the backward pass reaches each linear, add it to that linear's running sum and drop both.

The backward passes run on the float model (rotated, when the scheme rotates it, since the rotations
are fixed before any weight is quantized); H_OAC then replaces 2E[x xᵀ] in GPTQ (``--method oac``),
or in BoA's o_proj and MLP linears (``--method boa-oac``: BoA's attention-aware Kronecker Hessians
stay on q/k/v, whose error BoA already measures through the attention output).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from edgeq.models.adapters import Adapter


class OutputHessianAccumulator:
    """Running Σ_s G_sᵀ G_s of one linear over calibration sequences (float32, on the CPU)."""

    def __init__(self, d_in: int):
        self.sum = torch.zeros(d_in, d_in)
        self.count = 0

    def add(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """x [b, L, d_in] the linear's inputs, grad_out [b, L, d_out] ∂L_s/∂y for each sequence s of
        the batch (the loss of each sequence on its own: see ``sequence_losses``)."""
        g = torch.einsum("blo,bli->boi", grad_out.float(), x.float())  # G_s [b, d_out, d_in]
        self.sum += torch.einsum("boi,boj->ij", g, g).cpu()
        self.count += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """[d_in, d_in] = E_s[G_sᵀ G_s]."""
        if self.count == 0:
            raise RuntimeError("no calibration sequences were seen")
        return self.sum / self.count


def sequence_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each sequence's mean next-token cross-entropy: its gradient with respect
    to sequence s's activations is ∂L_s/∂(·), each sequence's own, in one backward pass."""
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
    )
    return nll.view(ids.shape[0], -1).mean(dim=1).sum()


@contextmanager
def _hooked(linears: dict[str, nn.Linear], acc: dict[str, OutputHessianAccumulator]) -> Iterator[None]:
    """Forward hooks keep each linear's input; its backward hook pairs it with the output gradient."""
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, linear in linears.items():

        def forward(_module, args, _output, name=name) -> None:
            inputs[name] = args[0].detach()

        def backward(_module, _grad_input, grad_output, name=name) -> None:
            acc[name].add(inputs.pop(name), grad_output[0].detach())

        handles.append(linear.register_forward_hook(forward))
        handles.append(linear.register_full_backward_hook(backward))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def collect_output_hessians(
    model: nn.Module, adapter: Adapter, ids: torch.Tensor, batch_size: int = 1, progress: bool = True
) -> dict[str, torch.Tensor]:
    """H_OAC of every decoder-block linear (by module name, as ``adapter.linear_name``) from one
    forward and backward pass of ``model`` per batch of calibration windows ids [N, L].

    No weight gradient is formed: the weights are frozen and the backward pass is driven from the
    embedding output, so autograd keeps only the activations of the batch being run.
    """
    linears = adapter.named_linears(model)
    acc = {name: OutputHessianAccumulator(linear.in_features) for name, linear in linears.items()}
    saved = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    embedding = adapter.embedding(model)
    try:
        with _hooked(linears, acc), torch.enable_grad():  # callers may run under no_grad
            batches = range(0, ids.shape[0], batch_size)
            for start in tqdm(batches, desc="OAC gradients", unit="batch", disable=not progress):
                batch = ids[start : start + batch_size]
                embeds = embedding(batch).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, use_cache=False).logits
                sequence_losses(logits, batch).backward()
    finally:
        for param, flag in zip(model.parameters(), saved, strict=True):
            param.requires_grad_(flag)
    return {name: a.hessian for name, a in acc.items()}


class OutputHessianStore:
    """The H_OAC of each block's linears in a folder, one file per block, so the streamed pass holds
    one block's at a time: ``block(i)`` → {role: H}."""

    def __init__(self, folder: Path, adapter: Adapter):
        self.folder, self.adapter = folder, adapter
        folder.mkdir(parents=True, exist_ok=True)

    def save(self, hessians: dict[str, torch.Tensor], blocks: int) -> None:
        for index in range(blocks):
            names = {role: self.adapter.linear_name(index, role) for role in _roles(self.adapter)}
            torch.save({role: hessians[name] for role, name in names.items()}, self.folder / f"{index}.pt")

    def block(self, index: int) -> dict[str, torch.Tensor]:
        return torch.load(self.folder / f"{index}.pt", weights_only=True)


def _roles(adapter: Adapter) -> tuple[str, ...]:
    return tuple(adapter.linear_paths)


def resident_provider(hessians: dict[str, torch.Tensor], adapter: Adapter) -> Callable[[int], dict]:
    """``block(i)`` → {role: H} for Hessians held in memory (a model quantized whole)."""

    def block(index: int) -> dict[str, torch.Tensor]:
        return {role: hessians[adapter.linear_name(index, role)] for role in _roles(adapter)}

    return block
