"""SpinQuant's learned rotations (arXiv 2405.16406): R1 and one R2 per block, optimized on the
orthogonal manifold for the quantized network's loss.

Any orthogonal R1 (and R2) leaves the float model's function unchanged (``edgeq.rotation.rotate``),
but not the quantized one's: how evenly a rotation spreads each token's outliers over the channels
decides what its 4-bit per-token grid loses. So the rotations are fitted, starting from the
randomized Hadamard matrices, to minimize

    L(R1, R2_1 … R2_n) = CE(model with W'_i = Q_w(rotated W_i) and inputs Q_a(x)),

the next-token cross-entropy of the model whose block linears use the rotated weights on their
weight grid and whose activations go through the per-token grid of the scheme (R4's and R5's
online Hadamards in place), on calibration windows. Round-to-nearest has no useful derivative, so both
quantizers pass the gradient straight through (STE): ∂Q(x)/∂x = I.

With ``RotationConfig.objective_weights = "rtn"`` Q_w is RTN, the setting for RTN weights. GPTQ/BoA
replace RTN's rounding afterwards, and a rotation fitted to RTN's errors did not help theirs (on
SmolLM2 with an earlier W4A4 preset, GPTQ reached 54.2 against 49.6 with the Hadamard). So by
default (``"float"``, SpinQuant's choice when GPTQ follows) Q_w is the identity and only the
activations are quantized in the objective. The straight-through gradient of a per-token grid
carries only where its rounding errors point, not how the token's range (which sets their size)
moves with the rotation, and with float weights that is the whole signal; SpinQuant's own GPTQ
gains came from 100 steps of 8 × 2048 tokens, ~400 × the tokens the default here sees on a CPU.
What each setting buys on SmolLM2 is measured by ``benchmarks/w4a4.py``.

Cayley SGD (Li, Li & Todorovic, ICLR 2020) keeps every iterate orthogonal. With G = ∂L/∂R, the
skew-symmetric A = G Rᵀ − R Gᵀ gives the Riemannian gradient A·R (canonical metric); momentum M
accumulates A, and the step is the Cayley transform of −αM,

    R ← (I + α/2·M)⁻¹ (I − α/2·M) R,     α = min(lr_t, 1 / ‖M‖_F),

orthogonal for any α (the cap keeps one step's rotation angle bounded); lr_t decays linearly from
the configured rate to 0 over the steps, so the last iterates settle despite the STE's noise. The
learned matrices are projected back to the nearest orthogonal ones in float64 (polar factor) and
then fused exactly as the Hadamard ones: the exported graph does not change shape.

Activation shifts (``ActQuantConfig.shift``): the objective quantizes Q(x − μ) + μ as the exported
model does, with μ each input's float mean (``edgeq.activation_ranges``). A rotation moves the means
with the inputs: R1 and R2 are exact in float, so an input x R has mean μ R. The means of the
unrotated network are measured once, on the objective's windows before the first step, and each
step's shifts are those means under the step's R1 and R2. (Through the STE the shift gets no
gradient, ∂(Q(x − μ) + μ)/∂μ = −I + I = 0, but it decides where each token's rounding errors fall:
without it the rotations were fitted to a grid the presets do not use.)

Training runs on a float copy of the whole model in memory (the loss is end to end); KV cache
quantization is left out of the objective. Learnable per-channel scales (OSTQuant/FlatQuant) are
not implemented.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from edgeq.activation_ranges import recorded_input_means, set_block_shifts
from edgeq.config import QuantConfig
from edgeq.models.adapters import ATTN_INPUT_ROLES, MLP_INPUT_ROLES, Adapter
from edgeq.pipeline import quantize_block_activations
from edgeq.quant.grid import rtn_quantize
from edgeq.rotation.hadamard import OnlineRotation
from edgeq.rotation.rotate import RotationPlan, add_block_input_rotation, fold_block_norms


@dataclass
class LearningLog:
    """What the optimization did: the loss of every step and the seconds it took."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def cayley(omega: torch.Tensor) -> torch.Tensor:
    """(I − Ω/2)⁻¹ (I + Ω/2) for a skew-symmetric Ω [n, n]: an orthogonal matrix."""
    eye = torch.eye(omega.shape[0], dtype=omega.dtype, device=omega.device)
    return torch.linalg.solve(eye - omega / 2, eye + omega / 2)


def cayley_sgd_step(
    r: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, lr: float, beta: float = 0.9
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Cayley SGD step on an orthogonal r [n, n] with Euclidean gradient ``grad`` [n, n] and
    skew momentum ``momentum`` [n, n]; returns (new r, new momentum)."""
    a = grad @ r.T - r @ grad.T
    momentum = beta * momentum + a
    alpha = min(lr, 1.0 / (float(momentum.norm()) + 1e-12))
    return cayley(-alpha * momentum) @ r, momentum


def nearest_orthogonal(r: torch.Tensor) -> torch.Tensor:
    """The polar factor U Vᵀ of r = U S Vᵀ, in float64: float32 drift removed before fusing."""
    u, _, vh = torch.linalg.svd(r.double())
    return u @ vh


def fake_quant_weight(w: torch.Tensor, grid) -> torch.Tensor:
    """w on its grid (``WeightQuantConfig``), round to nearest, with a straight-through gradient."""
    q = rtn_quantize(w.detach(), grid).dequantize().to(w.dtype)
    return w + (q - w).detach()


class RotatedWeight(nn.Module):
    """The parametrization W ↦ Q_w(W R1) for the linears reading the residual stream (side "in"),
    Q_w(R1ᵀ W) for those writing it (side "out"), with value heads' rows (v_proj: R2ᵀ W_h) or
    o_proj's per-head columns (W_o,h R2) rotated by ``r2`` [hd, hd], and then o_proj's columns by
    R5's fixed ``r5`` = M [in, in] (W·Mᵀ, as ``rotate_block`` fuses it after R2). r1
    and r2 are Parameters shared by every linear that uses them; W is the float weight [out, in],
    its norm folded in."""

    def __init__(self, grid, r1: nn.Parameter | None, side: str | None, r2: nn.Parameter | None,
                 role: str, r5: torch.Tensor | None = None) -> None:  # fmt: skip
        """grid: the weight grid (RTN with STE in the forward), or None for float weights."""
        super().__init__()
        self.grid, self.side, self.role = grid, side, role
        self.r1, self.r2 = r1, r2
        self.r5 = r5 if role == "o" else None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.r1 is not None and self.side == "in":
            w = w @ self.r1
        elif self.r1 is not None and self.side == "out":
            w = self.r1.T @ w
        if self.r2 is not None and self.role == "v":
            hd = self.r2.shape[0]
            w = (self.r2.T @ w.reshape(-1, hd, w.shape[1])).reshape(w.shape)
        elif self.r2 is not None and self.role == "o":
            hd = self.r2.shape[0]
            w = (w.reshape(w.shape[0], -1, hd) @ self.r2).reshape(w.shape)
        if self.r5 is not None:
            w = w @ self.r5.T
        return w if self.grid is None else fake_quant_weight(w, self.grid)


def r5_matrix(plan: RotationPlan) -> torch.Tensor | None:
    """R5's M [in, in] in float32 (o_proj's input becomes x·Mᵀ), or None where it is not applied."""
    return plan.r5.matrix().float() if plan.r5 is not None else None


def install_objective(
    model: nn.Module, adapter: Adapter, quant: QuantConfig, plan: RotationPlan,
    r1: nn.Parameter | None, r2: list[nn.Parameter],
) -> list[torch.utils.hooks.RemovableHandle]:  # fmt: skip
    """Make ``model`` (float, in memory; changed in place) compute the objective's quantized
    network: block norms folded, R4 fused and online, R5 online (its W·Mᵀ in the parametrization,
    after R2), activation quantizers on (KV cache float),
    every block linear's weight parametrized by the rotations (``RotatedWeight``); R1 applied to the
    embedding's output and undone at the final norm's input, so lm_head stays as it is (it is not
    in the objective). Returns the hooks' handles."""
    act = dataclasses.replace(quant.activations, kv_bits=16)
    r5 = r5_matrix(plan)
    for i, block in enumerate(adapter.blocks(model)):
        fold_block_norms(block, adapter)
        if plan.r4 is not None:
            add_block_input_rotation(block, adapter, "down", plan.r4)
        if plan.r5 is not None:
            adapter.input_quantizer(block, "o").rotation = OnlineRotation(plan.r5)
        quantize_block_activations(model, adapter, block, act)
        for role, linear in adapter.linears(block).items():
            side = "in" if role in (*ATTN_INPUT_ROLES, *MLP_INPUT_ROLES) else "out"
            head_r = r2[i] if r2 and role in ("v", "o") else None
            rounded = quant.rotation.objective_weights == "rtn"
            grid = quant.weights_for(adapter.linear_name(i, role)) if rounded else None
            parametrize.register_parametrization(
                linear, "weight", RotatedWeight(grid, r1, side, head_r, role, r5), unsafe=True
            )
    if r1 is None:
        return []
    return [
        adapter.embedding(model).register_forward_hook(lambda _m, _a, out: out @ r1),
        adapter.final_norm(model).register_forward_pre_hook(lambda _m, args: (args[0] @ r1.T, *args[1:])),
    ]


@torch.no_grad()
def unrotated_input_means(
    model: nn.Module, adapter: Adapter, windows: torch.Tensor, r1: torch.Tensor | None,
    r2: list[torch.Tensor], r5: torch.Tensor | None = None,
) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """Each block's input means (``recorded_input_means``, by group) in the objective's model
    (``install_objective``, rotated by r1 [d, d] and r2, one [hd, hd] per block or none, with R5's
    fixed r5 [in, in] or none on o_proj's input) over
    ``windows`` [N, L] in float, with the rotations taken back out: the means of the unrotated
    network, which ``rotated_means`` turns into any rotation's."""
    blocks = adapter.blocks(model)
    with contextlib.ExitStack() as stack:
        means = [stack.enter_context(recorded_input_means(adapter, block)) for block in blocks]
        for ids in windows:
            model(input_ids=ids[None], use_cache=False)
    back = r1.T if r1 is not None else None
    return [rotated_means(m, back, r2[i].T if r2 else None, r5) for i, m in enumerate(means)]


def rotated_means(
    means: dict[str, torch.Tensor], r1: torch.Tensor | None, r2: torch.Tensor | None,
    r5: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """``means`` (by input group, as ``recorded_input_means`` gives them) of inputs rotated by
    r1 [d, d] (the residual stream's readers: x ↦ x R1) and r2 [hd, hd] (o_proj's input, head by
    head); down_proj's input (after R4, which is not learned) is unchanged. With R5's fixed
    r5 = M [in, in], o_proj's input is x·(I ⊗ R2)·Mᵀ: its mean is taken back through M, rotated
    head by head, and put through Mᵀ again."""
    out = dict(means)
    if r1 is not None:
        for role in (ATTN_INPUT_ROLES[0], MLP_INPUT_ROLES[0]):
            out[role] = means[role] @ r1
    if r2 is not None:
        o = means["o"] if r5 is None else means["o"] @ r5
        o = (o.reshape(-1, r2.shape[0]) @ r2).reshape(-1)
        out["o"] = o if r5 is None else o @ r5.T
    return out


@torch.no_grad()
def set_objective_shifts(
    adapter: Adapter, blocks: list[nn.Module], means: list[dict[str, torch.Tensor]],
    r1: torch.Tensor | None, r2: list[torch.Tensor], r5: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """Every block's shifts: its unrotated input ``means`` under the current r1 and its r2 (and
    R5's fixed r5 on o_proj's input, or none)."""
    for i, block in enumerate(blocks):
        set_block_shifts(adapter, block, rotated_means(means[i], r1, r2[i] if r2 else None, r5))


def learn_rotations(
    model: nn.Module, adapter: Adapter, quant: QuantConfig, plan: RotationPlan, calibration_ids: torch.Tensor,
    progress: bool = True,
) -> tuple[RotationPlan, LearningLog]:  # fmt: skip
    """Fit ``plan``'s R1 and R2 (one per block, each starting from the plan's matrix) with Cayley
    SGD on the quantized network's loss over ``calibration_ids`` [N, L] (``quant.rotation``: steps,
    samples, lr). ``model`` is a float copy of the whole model in memory and is consumed (its blocks
    are changed). Returns the plan with the learned matrices (float64) and the log."""
    config = quant.rotation
    log = LearningLog()
    if plan.r1 is None and plan.r2 is None:
        return plan, log
    start = time.perf_counter()
    count = len(adapter.blocks(model))
    for p in model.parameters():
        p.requires_grad_(False)
    r1 = nn.Parameter(plan.r1.float()) if plan.r1 is not None else None
    r2 = [nn.Parameter(plan.r2.float().clone()) for _ in range(count)] if plan.r2 is not None else []
    learned = [p for p in (r1, *r2) if p is not None]
    handles = install_objective(model, adapter, quant, plan, r1, r2)
    momenta = [torch.zeros_like(p) for p in learned]
    windows = calibration_ids[: max(1, config.samples), : config.seq_len]
    model.train(False)
    blocks = adapter.blocks(model)
    try:
        r5 = r5_matrix(plan)
        means = (
            unrotated_input_means(model, adapter, windows, r1, r2, r5) if quant.activations.shift else None
        )
        bar = tqdm(range(config.steps), desc="learn rotations", unit="step", disable=not progress)
        for step in bar:
            if means:  # the shifts move with this step's rotations
                set_objective_shifts(adapter, blocks, means, r1, r2, r5)
            ids = windows[step % windows.shape[0]][None]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, learned)
            lr = config.lr * (1 - step / config.steps)  # linear decay: the last steps settle
            with torch.no_grad():
                for k, (p, g) in enumerate(zip(learned, grads, strict=True)):
                    new, momenta[k] = cayley_sgd_step(p.data, g, momenta[k], lr)
                    p.data.copy_(new)
            log.losses.append(loss.item())
            bar.set_postfix(loss=f"{log.losses[-1]:.3f}")
    finally:
        for handle in handles:
            handle.remove()
    log.seconds = time.perf_counter() - start
    how = (f"learned ({config.objective_weights} weights in the objective): Cayley SGD, "
           f"{config.steps} steps on {windows.shape[0]} windows, from the ")  # fmt: skip
    applied = dict(plan.report.applied)
    if r1 is not None:
        applied["r1"] = how + plan.report.applied["r1"]
    if r2:
        applied["r2"] = how + plan.report.applied["r2"] + ", one per block"
    report = dataclasses.replace(plan.report, applied=applied)
    return dataclasses.replace(
        plan,
        report=report,
        r1=nearest_orthogonal(r1.detach()) if r1 is not None else None,
        r2=None,
        r2_blocks=[nearest_orthogonal(r.detach()) for r in r2] or None,
    ), log
