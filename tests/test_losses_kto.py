"""KTO (Ethayarajh et al. 2024) against hand-computed float64 values, its limits and gradient signs.

σ(x) = 1/(1 + e^−x); 1 − σ(a) = σ(−a). The arithmetic of each hand value is written with ``math``.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpolab.losses import kto as kto_mod
from dpolab.losses.kto import (
    kto_loss,
    kto_metric_means,
    kto_metric_sums,
    kto_mismatched_completions,
    kto_reference_point,
    kto_reference_point_from_sums,
    kto_weight_ratio,
    kto_weight_ratio_warning,
    kto_weights_for_imbalance,
)

D = torch.float64


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=D)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def close(actual, expected, atol: float = 1e-12) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=D), torch.as_tensor(expected, dtype=D),
                               rtol=0, atol=atol)


# Four examples: ρ = π − ref = [0.5, −1, 1, −0.5]; desirable, desirable, undesirable, undesirable
POL, REF = t(-1.0, -3.0, -1.0, -2.0), t(-1.5, -2.0, -2.0, -1.5)
DES = torch.tensor([True, True, False, False])


def test_kto_hand_values_rewards_and_stats():
    # β = 0.1, z0 = 0.2, λ_D = 1.5, λ_U = 1:
    #   desirable:   1.5·(1 − σ(0.1·(0.5 − 0.2)))  = 1.5·σ(−0.03);  1.5·σ(−0.1·(−1 − 0.2)) = 1.5·σ(0.12)
    #   undesirable: 1 − σ(0.1·(0.2 − 1)) = σ(0.08);  1 − σ(0.1·(0.2 + 0.5)) = σ(−0.07)
    losses, rewards, stats = kto_loss(POL, REF, DES, 0.2, beta=0.1, desirable_weight=1.5)
    close(losses, [1.5 * sig(-0.03), 1.5 * sig(0.12), sig(0.08), sig(-0.07)])
    close(rewards, [0.05, -0.1, 0.1, -0.05])
    assert not rewards.requires_grad
    close(stats["z0"], 0.2)
    close(stats["rewards/chosen_sum"], 0.05 - 0.1)
    close(stats["rewards/rejected_sum"], 0.1 - 0.05)
    assert stats["count/chosen"].item() == 2 and stats["count/rejected"].item() == 2
    # defaults: the paper's β = 0.1, λ_D = λ_U = 1
    close(kto_loss(POL, REF, DES, 0.0)[0], [sig(-0.05), sig(0.1), sig(0.1), sig(-0.05)])
    assert (kto_mod.KTO_BETA, kto_mod.KTO_DESIRABLE_WEIGHT, kto_mod.KTO_UNDESIRABLE_WEIGHT) == (0.1, 1.0, 1.0)


def test_kto_policy_equals_reference_gives_half_lambda():
    g = torch.Generator().manual_seed(0)
    logps = -10 * torch.rand(6, generator=g, dtype=D)
    des = torch.tensor([True, False, True, False, False, True])
    losses, rewards, _ = kto_loss(logps, logps.clone(), des, 0.0, desirable_weight=2.0, undesirable_weight=3.0)
    close(losses, torch.where(des, t(1.0), t(1.5)))                # λ·(1 − σ(0)) = λ/2
    assert torch.all(rewards == 0)


def test_kto_gradient_signs_and_z0_carries_no_gradient():
    pol = POL.clone().requires_grad_(True)
    z0 = torch.tensor(0.2, dtype=D, requires_grad=True)
    kto_loss(pol, REF, DES, z0, beta=0.1, desirable_weight=1.5)[0].sum().backward()
    # desirable: −λ_D·β·σ'(β(ρ − z0)); undesirable: +λ_U·β·σ'(β(z0 − ρ)), σ'(a) = σ(a)σ(−a)
    ds = [sig(a) * sig(-a) for a in (0.03, -0.12, -0.08, 0.07)]
    close(pol.grad, [-1.5 * 0.1 * ds[0], -1.5 * 0.1 * ds[1], 0.1 * ds[2], 0.1 * ds[3]])
    assert (pol.grad[:2] < 0).all() and (pol.grad[2:] > 0).all()
    assert z0.grad is None


def test_kto_gradient_vanishes_for_saturated_examples():
    """Paper §4 (KTO does not learn from examples that are already too easy or too hard): the
    gradient is λβ·σ'(β(ρ − z0)) → 0 as |β(ρ − z0)| → ∞."""
    rho = t(200.0, -200.0, 200.0, -200.0).requires_grad_(True)
    kto_loss(rho, torch.zeros(4, dtype=D), DES, 0.0, beta=0.1)[0].sum().backward()
    bound = 0.1 * sig(20.0) * sig(-20.0)                           # β·σ'(20) = 2.1e-10
    close(rho.grad.abs(), [bound] * 4, atol=1e-16)                   # σ(20)·(1 − σ(20)) rounds at 1e-7


def test_reference_point_from_mismatched_pairs():
    # mismatched log-ratios [1, −0.5, 0.8]: mean 1.3/3 = 0.4333 > 0; [−1, −0.5]: mean < 0 → 0
    pol = t(-1.0, -2.5, -1.2).requires_grad_(True)
    z0 = kto_reference_point(pol, t(-2.0, -2.0, -2.0))
    close(z0, 1.3 / 3)
    assert not z0.requires_grad and z0.dim() == 0
    close(kto_reference_point(t(-3.0, -2.5), t(-2.0, -2.0)), 0.0)
    close(kto_reference_point_from_sums(torch.tensor(1.3, dtype=D), 3), 1.3 / 3)
    close(kto_reference_point_from_sums(-4.0, torch.tensor(8)), 0.0)
    # a whole step = the concatenation of its micro-batches = sum and count reduced separately
    a, b = t(0.3, -0.1, 0.9), t(0.2, 0.4)
    close(kto_reference_point(torch.cat([a, b]), torch.zeros(5, dtype=D)),
          kto_reference_point_from_sums(a.sum() + b.sum(), 5))


def test_mismatched_completions_shift_by_one():
    idx = kto_mismatched_completions(4)
    assert idx.tolist() == [1, 2, 3, 0]
    assert (idx != torch.arange(4)).all() and sorted(idx.tolist()) == [0, 1, 2, 3]
    # end to end on a batch of 3 tabular examples: prompt i with completion i+1
    logp_policy = t(-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0).reshape(3, 3)   # [x, y]
    logp_ref = torch.full((3, 3), -5.0, dtype=D)
    x, y = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])
    j = kto_mismatched_completions(3)
    z0 = kto_reference_point(logp_policy[x, y[j]], logp_ref[x, y[j]])
    # pairs (0, y=0), (1, y=1), (2, y=2): log-ratios −1 + 5, −5 + 5, −9 + 5 → mean 0 → z0 = 0
    close(z0, 0.0)


def test_weights_for_imbalanced_data():
    """The paper's rule: λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]."""
    assert kto_weights_for_imbalance(100, 1000) == (10.0, 1.0)           # 1:10 desirable: λ_D = 10
    assert kto_weights_for_imbalance(1000, 100) == (1.0, 10.0)
    assert kto_weights_for_imbalance(500, 500) == (1.0, 1.0)
    lam_d, lam_u = kto_weights_for_imbalance(500, 500, ratio=4 / 3)
    assert (lam_d, lam_u) == pytest.approx((4 / 3, 1.0))
    for n_d, n_u, r in [(100, 1000, 1.0), (100, 1000, 1.2), (1000, 100, 1.3), (110, 100, 4 / 3), (130, 100, 1.1)]:
        lam_d, lam_u = kto_weights_for_imbalance(n_d, n_u, ratio=r)
        assert kto_weight_ratio(n_d, n_u, lam_d, lam_u) == pytest.approx(r)
        assert min(lam_d, lam_u) == 1.0 and max(lam_d, lam_u) >= 1.0
    with pytest.raises(ValueError, match="4/3"):
        kto_weights_for_imbalance(10, 10, ratio=2.0)
    with pytest.raises(ValueError, match="need desirable and undesirable"):
        kto_weights_for_imbalance(0, 10)


def test_user_errors():
    with pytest.raises(ValueError, match="beta"):
        kto_loss(POL, REF, DES, 0.0, beta=0.0)
    with pytest.raises(ValueError, match="weight"):
        kto_loss(POL, REF, DES, 0.0, undesirable_weight=0.0)
    with pytest.raises(ValueError, match="shape"):
        kto_loss(POL, REF[:3], DES, 0.0)
    with pytest.raises(ValueError, match="bool"):
        kto_loss(POL, REF, DES.long(), 0.0)
    with pytest.raises(ValueError, match="at least one"):
        kto_reference_point(t(), t())
    with pytest.raises(ValueError, match="shape"):
        kto_reference_point(t(1.0), t(1.0, 2.0))
    with pytest.raises(ValueError, match="count > 0"):
        kto_reference_point_from_sums(1.0, 0)
    with pytest.raises(ValueError, match="at least 2"):
        kto_mismatched_completions(1)


def test_metric_sums_and_means_by_hand():
    """Rows ρ = [0.5, −1, 1, −0.5] (D, D, U, U), β = 0.1, z0 = 0: rewards β·ρ; per-class means of the
    rewards and policy log-probs, the loss per row, counts; a class with no rows reports 0."""
    desirable = torch.tensor([True, True, False, False])
    losses, _, stats = kto_loss(POL, REF, desirable, 0.0, beta=0.1)
    sums = kto_metric_sums(losses, POL, desirable, stats)
    out = kto_metric_means(sums, 4)
    close(out["loss"], sum(losses.tolist()) / 4)
    close(out["rewards/chosen"], 0.1 * (0.5 - 1.0) / 2)
    close(out["rewards/rejected"], 0.1 * (1.0 - 0.5) / 2)
    close(out["rewards/margins"], -0.025 - 0.025)
    close(out["logps/chosen"], (-1.0 - 3.0) / 2)
    close(out["logps/rejected"], (-1.0 - 2.0) / 2)
    assert (out["count/chosen"], out["count/rejected"]) == (2, 2)
    all_desirable = torch.ones(4, dtype=torch.bool)
    losses, _, stats = kto_loss(POL, REF, all_desirable, 0.0, beta=0.1)
    only = kto_metric_means(kto_metric_sums(losses, POL, all_desirable, stats), 4)
    assert only["count/rejected"] == 0 and only["rewards/rejected"] == 0.0 and only["logps/rejected"] == 0.0


def test_weight_ratio_warning():
    """Silent inside the paper's [1, 4/3]; outside, a line with the ratio and weights that restore 1;
    one class missing, a line saying so."""
    assert kto_weight_ratio_warning(10, 10, 1.0, 1.0) is None
    assert kto_weight_ratio_warning(12, 10, 1.0, 1.0) is None              # 1.2
    line = kto_weight_ratio_warning(1, 10, 1.0, 1.0)                        # 0.1: λ_D = 10 restores 1
    assert "0.1 " in line and "--desirable-weight 10 --undesirable-weight 1" in line
    assert "only desirable" in kto_weight_ratio_warning(5, 0, 1.0, 1.0)
    assert "only undesirable" in kto_weight_ratio_warning(0, 5, 1.0, 1.0)
