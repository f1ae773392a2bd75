"""Learned rotations: Cayley SGD stays on the orthogonal group and descends; the objective's model
computes the rotated network; the learned plan is exact in float and lowers the quantized loss."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch
from conftest import VOCAB, tiny_model

from edgeq.activation_ranges import recorded_input_means
from edgeq.config import ActQuantConfig, WeightQuantConfig, scheme_preset
from edgeq.models.adapters import INPUT_GROUPS, adapter_for
from edgeq.rotation.learned import (
    cayley,
    cayley_sgd_step,
    install_objective,
    learn_rotations,
    r5_matrix,
    set_objective_shifts,
    unrotated_input_means,
)
from edgeq.rotation.rotate import apply_plan, plan_rotations


def _orthogonality_error(r: torch.Tensor) -> float:
    return float((r.T @ r - torch.eye(r.shape[0], dtype=r.dtype)).abs().max())


def test_cayley_steps_stay_orthogonal_and_reach_a_target_rotation():
    """min ‖R − T‖²_F over orthogonal R, from the identity: every iterate orthogonal, the distance
    to T falls."""
    gen = torch.Generator().manual_seed(0)
    target, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    skew = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    assert _orthogonality_error(cayley(skew - skew.T)) < 1e-12
    r = torch.eye(16, dtype=torch.float64)
    momentum = torch.zeros_like(r)
    start = float((r - target).norm())
    for _ in range(200):
        r, momentum = cayley_sgd_step(r, 2 * (r - target), momentum, lr=0.1)
        assert _orthogonality_error(r) < 1e-9
    assert float((r - target).norm()) < 0.5 * start


def _w4a4(steps: int = 8, r5: bool = False, **activations):
    quant = scheme_preset("w4a4")
    act = dataclasses.replace(quant.activations, clip_search=False, **activations)
    rotation = dataclasses.replace(quant.rotation, kind="learned", steps=steps, samples=2, lr=0.5, r5=r5)
    # symmetric weight grids, the ones the losses these tests bound were measured with (the preset's
    # asymmetric grids lose less to rounding, so learning has less to win on a tiny model)
    weights = dataclasses.replace(quant.weights, symmetric=True)
    return dataclasses.replace(quant, method="rtn", activations=act, rotation=rotation, weights=weights)


@pytest.mark.parametrize("r5", [False, True], ids=["r4", "r4-r5"])
def test_the_objective_model_is_the_rotated_model(r5):
    """With 8-bit weights and float activations, the parametrized model (R1 at the embedding and
    undone before the final norm, every linear's weight rotated; R5 online on o_proj's input and
    in its weight after R2) gives the float model's logits."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    adapter = adapter_for(model)
    weights = WeightQuantConfig(bits=8, group_size=-1, symmetric=True)
    quant = dataclasses.replace(_w4a4(r5=r5), weights=weights, activations=ActQuantConfig())
    plan = plan_rotations(adapter, model.config, quant.rotation)
    assert (plan.r5 is not None) == r5
    r1 = torch.nn.Parameter(plan.r1.float())
    r2 = [torch.nn.Parameter(plan.r2.float()) for _ in adapter.blocks(model)]
    install_objective(model, adapter, quant, plan, r1, r2)
    o_rotation = adapter.input_quantizer(adapter.blocks(model)[0], "o").rotation
    assert (o_rotation is not None) == r5
    with torch.no_grad():
        got = model(ids).logits
    assert float((got - expected).abs().max()) < 0.05 * float(expected.abs().max())


@pytest.mark.parametrize("objective_weights", ["float", "rtn"])
def test_objective_weights_are_float_or_on_their_grid(objective_weights):
    """ "rtn": each rotated weight row sits on its 4-bit per-channel grid (≤ 16 values); "float":
    the rotated float weight itself (GPTQ/BoA round it after the learning)."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    quant = _w4a4()
    quant = dataclasses.replace(
        quant, rotation=dataclasses.replace(quant.rotation, objective_weights=objective_weights)
    )
    plan = plan_rotations(adapter, model.config, quant.rotation)
    r1 = torch.nn.Parameter(plan.r1.float())
    install_objective(model, adapter, quant, plan, r1, [])
    weight = adapter.linears(adapter.blocks(model)[0])["q"].weight.detach()
    distinct = max(len(torch.unique(row)) for row in weight)
    assert (distinct <= 16) == (objective_weights == "rtn")


@pytest.mark.parametrize("r5", [False, True], ids=["r4", "r4-r5"])
def test_objective_shifts_follow_the_rotations(r5):
    """The shifts set for new R1 and R2 from the means measured under the old ones are the means of
    the inputs the objective's model then reads (measured again, quantizers off); with R5, o_proj's
    input is R2's rotation seen through R5's fixed one."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    quant = _w4a4(r5=r5)
    assert quant.activations.shift
    plan = plan_rotations(adapter, model.config, quant.rotation)
    blocks = adapter.blocks(model)
    r1 = torch.nn.Parameter(plan.r1.float())
    r2 = [torch.nn.Parameter(plan.r2.float().clone()) for _ in blocks]
    install_objective(model, adapter, quant, plan, r1, r2)
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, VOCAB, (2, 16), generator=gen)
    r5_m = r5_matrix(plan)
    means = unrotated_input_means(model, adapter, windows, r1, r2, r5_m)
    with torch.no_grad():
        r1.copy_(torch.linalg.qr(torch.randn(r1.shape, generator=gen))[0])
        for r in r2:
            r.copy_(torch.linalg.qr(torch.randn(r.shape, generator=gen))[0])
    set_objective_shifts(adapter, blocks, means, r1, r2, r5_m)
    with contextlib.ExitStack() as stack, torch.no_grad():
        measured = [stack.enter_context(recorded_input_means(adapter, block)) for block in blocks]
        for ids in windows:
            model(input_ids=ids[None], use_cache=False)
    for block, block_means in zip(blocks, measured, strict=True):
        for group in INPUT_GROUPS:
            expected = block_means[group[0]]
            for role in group:
                shift = adapter.input_quantizer(block, role).shift
                assert torch.allclose(shift, expected, atol=1e-4 * float(expected.abs().max()))
    # the rotations moved the residual stream's and o_proj's means; down_proj's (after R4) stayed
    start = means[0]["q"] @ plan.r1.float()
    assert not torch.allclose(adapter.input_quantizer(blocks[0], "q").shift, start, atol=1e-3)


def _confident_model(seed: int = 0):
    """A tiny Llama whose lm_head is sharpened 20×, and a window it generated greedily: the float
    model predicts the window well, so what the 4-bit grids cost shows in its loss (a random model's
    loss sits at log(vocab) whatever its precision)."""
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    prompt = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    return model, model.generate(prompt, max_new_tokens=60, do_sample=False, pad_token_id=0)


def _learn_on_one_window(seed: int, objective_weights: str):
    """Thirty Cayley SGD steps on confident model ``seed``'s window; returns (ids, plan, learned, log)."""
    model, ids = _confident_model(seed)
    adapter = adapter_for(model)
    quant = _w4a4(steps=30)
    rotation = dataclasses.replace(quant.rotation, samples=1, lr=0.1, objective_weights=objective_weights)
    quant = dataclasses.replace(quant, rotation=rotation)
    plan = plan_rotations(adapter, model.config, quant.rotation)
    learned, log = learn_rotations(model, adapter, quant, plan, ids, progress=False)
    return ids, plan, learned, log


@pytest.mark.parametrize("objective_weights", ["rtn", "float"])
def test_learned_plan_is_exact_in_float_and_lowers_the_quantized_loss(objective_weights):
    # Step 0 is the Hadamard start, the last steps the learned rotations. On one tiny model the
    # path is chaotic (4-bit activations under a straight-through gradient, steps of up to a radian):
    # the mean of the last five over the start, measured on models 0-4, was 0.99 0.94 0.85 0.93 0.88
    # with float weights and 0.83 0.94 0.90 0.96 0.84 with RTN ones; with model 0 alone, one commit
    # passed CI on one machine and failed it (0.99) on the next, the same code. So the bound is on
    # the mean over five.
    ratios = []
    for seed in range(5):
        ids, plan, learned, log = _learn_on_one_window(seed, objective_weights)
        assert len(log.losses) == 30 and log.seconds > 0
        ratios.append(sum(log.losses[-5:]) / 5 / log.losses[0])
        if seed == 0:
            first = (ids, plan, learned)
    assert sum(ratios) / len(ratios) < 0.97, ratios
    ids, plan, learned = first
    model, _ = _confident_model(0)
    adapter = adapter_for(model)
    assert learned.r2 is None and len(learned.r2_blocks) == len(adapter.blocks(model))
    for r in (learned.r1, *learned.r2_blocks):
        assert r.dtype == torch.float64 and _orthogonality_error(r) < 1e-12
    assert not torch.allclose(learned.r1, plan.r1)
    assert learned.report.applied["r1"].startswith("learned")
    # fused exactly: the float model's function is unchanged
    with torch.no_grad():
        expected = model(ids).logits
        apply_plan(model, adapter, learned)
        got = model(ids).logits
    assert torch.allclose(got, expected, atol=1e-3 * float(expected.abs().max()))


def test_export_with_learned_rotations_reports_the_learning(tiny_model_dir, text_data_dir, tmp_path):
    from edgeq.cli import main

    out = tmp_path / "learned"
    argv = ["--no-progress", "export", "--model", str(tiny_model_dir), "--scheme", "w4a4", "--method", "rtn",
            "--rotation", "learned", "--rotation-steps", "3", "--rotation-samples", "2",
            "--calib-samples", "4", "--calib-seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2",
            "--no-validate", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rotation"]["learning"]["steps"] == 3
    assert report["rotation"]["applied"]["r1"].startswith("learned")
    assert "learn_rotations_s" in report["timings_s"]
    config = json.loads((out / "edgeq_config.json").read_text())
    assert config["quant"]["rotation"]["kind"] == "learned"
    assert config["quant"]["rotation"]["objective_weights"] == "rtn"  # --method rtn's default
