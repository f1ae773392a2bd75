"""Hadamard matrices of the widths real models use, and the factored transform built from them."""

from __future__ import annotations

import pytest
import torch

from edgeq.rotation.hadamard import (
    MAX_FACTOR,
    OnlineRotation,
    hadamard_split,
    hadamard_transform,
    paley_hadamard,
    random_hadamard_matrix,
    small_hadamard,
    sylvester,
)


@pytest.mark.parametrize("n", [12, 20, 28, 36, 44, 60, 76, 108])
def test_paley_matrices_are_hadamard(n):
    h = small_hadamard(n)
    assert h is not None, n
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, n * torch.eye(n), rtol=0, atol=0)


@pytest.mark.parametrize("n", [6, 10, 14, 18, 22])
def test_orders_with_no_construction_are_refused(n):
    assert paley_hadamard(n) is None


@pytest.mark.parametrize(
    ("width", "split"),
    [
        (576, (36, 16)),  # SmolLM2 hidden
        (1536, (12, 128)),  # SmolLM2 MLP
        (640, (20, 32)),  # Gemma3-270M hidden
        (896, (28, 32)),  # Qwen2.5-0.5B hidden
        (4864, (76, 64)),  # Qwen2.5-0.5B MLP
        (4096, (1, 4096)),
        (72, (36, 2)),
    ],
)
def test_model_widths_factor_into_known_hadamards(width, split):
    assert hadamard_split(width) == split


@pytest.mark.parametrize("width", [576, 1536, 4096, 96])
def test_factored_transform_is_orthogonal_and_matches_its_dense_matrix(width):
    transform = hadamard_transform(width)
    assert all(f.shape[0] <= max(MAX_FACTOR, 76) for f in transform.factors)  # never dense d x d
    m = transform.matrix()
    torch.testing.assert_close(m @ m.T, torch.eye(width, dtype=m.dtype), rtol=0, atol=1e-12)
    x = torch.randn(3, 5, width, dtype=torch.float64)
    torch.testing.assert_close(transform.apply(x), x @ m.T)
    assert torch.allclose(m.abs(), torch.full_like(m, width**-0.5))  # a scaled ±1 matrix


def test_power_of_two_transform_is_sylvester():
    m = hadamard_transform(256).matrix()
    torch.testing.assert_close(m, sylvester(256).double() / 16)


def test_no_known_hadamard_falls_back_to_a_seeded_random_orthogonal_matrix():
    transform = hadamard_transform(18, seed=5)
    assert "random orthogonal" in transform.kind
    m = transform.matrix()
    torch.testing.assert_close(m @ m.T, torch.eye(18, dtype=m.dtype))
    torch.testing.assert_close(m, hadamard_transform(18, seed=5).matrix())
    assert not torch.allclose(m, hadamard_transform(18, seed=6).matrix())


def test_randomized_hadamard_is_seeded_and_orthogonal():
    q, kind = random_hadamard_matrix(576, seed=0)
    assert kind == "randomized Hadamard 36 x 16"
    torch.testing.assert_close(q @ q.T, torch.eye(576, dtype=q.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(q, random_hadamard_matrix(576, seed=0)[0])
    assert not torch.allclose(q, random_hadamard_matrix(576, seed=1)[0])


def test_online_rotation_module_runs_in_float32():
    transform = hadamard_transform(1536)
    module = OnlineRotation(transform)
    x = torch.randn(2, 7, 1536)
    y = module(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, (x.double() @ transform.matrix().T).float(), rtol=1e-5, atol=1e-5)
    assert not module.state_dict()  # buffers are derived, not saved with the weights
