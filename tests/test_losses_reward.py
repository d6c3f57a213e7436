"""Bradley-Terry loss against hand-computed float64 values; sp(x) = log(1 + e^x)."""

from __future__ import annotations

import math

import pytest
import torch

from dpolab.losses import bradley_terry_loss

D = torch.float64


def test_hand_values_without_margin():
    # r_w − r_l = 1, 0, −2 → sp(−1) = 0.3132616875, ln 2 = 0.6931471806, sp(2) = 2.1269280110
    chosen, rejected = torch.tensor([1.0, 0.5, -1.0], dtype=D), torch.tensor([0.0, 0.5, 1.0], dtype=D)
    losses = bradley_terry_loss(chosen, rejected)
    expected = torch.tensor([0.31326168751822286, math.log(2), 2.1269280110429727], dtype=D)
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-12)


def test_hand_values_with_margin():
    # r_w − r_l − m: 1 − 1 = 0 → ln 2; 1 − 3 = −2 → sp(2) = 2.1269280110; scalar m = 0.5: 0.5 → sp(−0.5) = 0.4740769842
    chosen, rejected = torch.tensor([1.0, 1.0], dtype=D), torch.zeros(2, dtype=D)
    losses = bradley_terry_loss(chosen, rejected, torch.tensor([1.0, 3.0], dtype=D))
    torch.testing.assert_close(losses, torch.tensor([math.log(2), 2.1269280110429727], dtype=D), rtol=0, atol=1e-12)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, 0.5),
                               torch.full((2,), 0.47407698418010663, dtype=D), rtol=0, atol=1e-12)


def test_gradient_and_probability():
    """∂/∂r_w = −σ(−Δ) = −(1 − p(y_w ≻ y_l)); Δ = 1: −σ(−1) = −0.2689414214; and ∂/∂r_l = +0.2689414214."""
    chosen = torch.tensor([1.0], dtype=D, requires_grad=True)
    rejected = torch.tensor([0.0], dtype=D, requires_grad=True)
    bradley_terry_loss(chosen, rejected).sum().backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.2689414213699951], dtype=D), rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected.grad, torch.tensor([0.2689414213699951], dtype=D), rtol=0, atol=1e-12)


def test_large_differences_are_finite():
    losses = bradley_terry_loss(torch.tensor([1e4, -1e4], dtype=D), torch.zeros(2, dtype=D))
    torch.testing.assert_close(losses, torch.tensor([0.0, 1e4], dtype=D), rtol=1e-12, atol=1e-12)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
