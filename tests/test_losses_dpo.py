"""DPO-family losses against hand-computed float64 values and the limit cases of the theory.

Shorthand: sp(x) = log(1 + e^x) = −log σ(−x), so −log σ(z) = sp(−z); note sp(x) − sp(−x) = x.
"""

from __future__ import annotations

import math

import pytest
import torch

import dpolab.losses as losses_pkg
from dpolab.losses.dpo import (
    PREFERENCE_LOSSES,
    PairLogps,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    needs_reference,
    preference_loss,
    reference_free_dpo_loss,
    robust_dpo_loss,
    simpo_loss,
)

D = torch.float64
LN2 = math.log(2.0)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=D)


# Two pairs, β = 0.1:
#   pair 0: π(y_w) = −1, π(y_l) = −2, ref −1.5/−1.5 → ρ_w = 0.5, ρ_l = −0.5, h = 1,  βh = 0.1
#   pair 1: π(y_w) = −3, π(y_l) = −1, ref −2/−2     → ρ_w = −1,  ρ_l = 1,    h = −2, βh = −0.2
PC, PR, RC, RR = t(-1.0, -3.0), t(-2.0, -1.0), t(-1.5, -2.0), t(-1.5, -2.0)
SP_M01 = 0.6443966600735709  # sp(−0.1) = ln(1 + e^−0.1) = ln 1.9048374180
SP_P02 = 0.7981388693815918  # sp(0.2)  = ln(1 + e^0.2)  = ln 2.2214027582


def test_dpo_hand_values_and_rewards():
    losses, cr, rr = dpo_loss(PC, PR, RC, RR, beta=0.1)
    torch.testing.assert_close(losses, t(SP_M01, SP_P02), rtol=0, atol=1e-12)
    # rewards β·ρ: 0.1·0.5 = 0.05, 0.1·(−1) = −0.1; rejected 0.1·(−0.5) = −0.05, 0.1·1 = 0.1
    torch.testing.assert_close(cr, t(0.05, -0.1), rtol=0, atol=1e-12)
    torch.testing.assert_close(rr, t(-0.05, 0.1), rtol=0, atol=1e-12)
    assert losses.dtype == D


def test_cdpo_hand_values():
    # ε = 0.2: 0.8·sp(−βh) + 0.2·sp(βh) = sp(−βh) + 0.2·βh
    #   pair 0: 0.6443966601 + 0.2·0.1 = 0.6643966601; pair 1: 0.7981388694 − 0.04 = 0.7581388694
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.2)
    torch.testing.assert_close(losses, t(0.6643966600735709, 0.7581388693815918), rtol=0, atol=1e-12)


def test_robust_dpo_hand_values():
    # ε = 0.2: [0.8·sp(−βh) − 0.2·sp(βh)] / 0.6 = [0.6·sp(−βh) − 0.2·βh] / 0.6 = sp(−βh) − βh/3
    #   pair 0: 0.6443966601 − 0.0333333333 = 0.6110633267; pair 1: 0.7981388694 + 0.0666666667 = 0.8648055360
    losses, cr, _ = robust_dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.2)
    torch.testing.assert_close(losses, t(0.6110633267402376, 0.8648055360482586), rtol=0, atol=1e-12)
    torch.testing.assert_close(cr, t(0.05, -0.1), rtol=0, atol=1e-12)
    # ε = 0 is plain DPO
    torch.testing.assert_close(robust_dpo_loss(PC, PR, RC, RR, beta=0.1)[0], t(SP_M01, SP_P02))


def test_ipo_hinge_hand_values():
    # IPO, β = 0.1, target 1/(2β) = 5: (1 − 5)² = 16, (−2 − 5)² = 49
    torch.testing.assert_close(ipo_loss(PC, PR, RC, RR, beta=0.1)[0], t(16.0, 49.0), rtol=0, atol=1e-12)
    # hinge, β = 0.1: max(0, 1 − 0.1) = 0.9, max(0, 1 + 0.2) = 1.2
    torch.testing.assert_close(hinge_loss(PC, PR, RC, RR, beta=0.1)[0], t(0.9, 1.2), rtol=0, atol=1e-12)
    # β = 0.5: βh = 0.5 → 0.5; βh = −1 → 2. With h = 3 (pair below), βh = 1.5 → max(0, −0.5) = 0
    torch.testing.assert_close(hinge_loss(PC, PR, RC, RR, beta=0.5)[0], t(0.5, 2.0), rtol=0, atol=1e-12)
    assert hinge_loss(t(0.0), t(-3.0), t(0.0), t(0.0), beta=0.5)[0].item() == 0.0


def test_simpo_hand_value():
    # ℓ̄_w = −6/3 = −2, ℓ̄_l = −12/4 = −3; β = 2, γ = 1: 2·(−2) − 2·(−3) − 1 = 1 → sp(−1) = 0.3132616875
    losses, cr, rr = simpo_loss(t(-6.0), t(-12.0), t(3.0), torch.tensor([4]), beta=2.0, gamma=1.0)
    torch.testing.assert_close(losses, t(0.31326168751822286), rtol=0, atol=1e-12)
    torch.testing.assert_close(cr, t(-4.0), rtol=0, atol=1e-12)   # β·ℓ̄_w
    torch.testing.assert_close(rr, t(-6.0), rtol=0, atol=1e-12)   # β·ℓ̄_l


def test_simpo_empty_response_length_clamped_to_one():
    """Docstring: lengths are clamped to ≥ 1, so an empty response (summed log-prob 0) gives ℓ̄ = 0, not 0/0."""
    # ℓ̄_w = 0/max(0, 1) = 0, ℓ̄_l = −12/4 = −3; β = 2, γ = 1: z = 0 + 6 − 1 = 5 → sp(−5) = ln(1 + e^−5) = 0.0067153485
    pc = t(0.0).requires_grad_(True)
    losses, cr, rr = simpo_loss(pc, t(-12.0), t(0.0), torch.tensor([4]), beta=2.0, gamma=1.0)
    torch.testing.assert_close(losses, t(math.log1p(math.exp(-5.0))), rtol=0, atol=1e-12)
    torch.testing.assert_close((cr, rr), (t(0.0), t(-6.0)), rtol=0, atol=1e-12)
    # ∂/∂ log π(y_w) = −β·σ(−z)/1 = −2/(1 + e^5) = −0.0133857018, finite
    losses.sum().backward()
    torch.testing.assert_close(pc.grad, t(-2.0 / (1.0 + math.exp(5.0))), rtol=0, atol=1e-12)


def test_reference_free_hand_value_and_equals_dpo_with_zero_reference():
    # β(−1 − (−2)) = 0.1 → sp(−0.1)
    losses, cr, rr = reference_free_dpo_loss(t(-1.0), t(-2.0), beta=0.1)
    torch.testing.assert_close(losses, t(SP_M01), rtol=0, atol=1e-12)
    torch.testing.assert_close((cr, rr), (t(-0.1), t(-0.2)), rtol=0, atol=1e-12)
    zeros = torch.zeros(2, dtype=D)
    torch.testing.assert_close(reference_free_dpo_loss(PC, PR, beta=0.3)[0],
                               dpo_loss(PC, PR, zeros, zeros, beta=0.3)[0])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_policy_equals_reference_gives_ln2_and_zero_rewards(eps):
    g = torch.Generator().manual_seed(0)
    logp_w, logp_l = -10 * torch.rand(5, generator=g, dtype=D), -10 * torch.rand(5, generator=g, dtype=D)
    for fn in (dpo_loss, robust_dpo_loss):
        losses, cr, rr = fn(logp_w, logp_l, logp_w.clone(), logp_l.clone(), beta=0.7, label_smoothing=eps)
        torch.testing.assert_close(losses, torch.full((5,), LN2, dtype=D), rtol=0, atol=1e-12)
        assert torch.all(cr == 0) and torch.all(rr == 0)
    # at h = 0: IPO = (1/(2β))² and hinge = 1
    torch.testing.assert_close(ipo_loss(logp_w, logp_l, logp_w, logp_l, beta=0.5)[0], torch.ones(5, dtype=D))
    torch.testing.assert_close(hinge_loss(logp_w, logp_l, logp_w, logp_l, beta=0.5)[0], torch.ones(5, dtype=D))


def test_dpo_gradient_matches_paper():
    """Rafailov et al. eq. 7 gradient: ∂L/∂log π(y_w) = −β·σ(−βh) = −∂L/∂log π(y_l)."""
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(pc, pr, RC, RR, beta=0.1)
    losses.sum().backward()
    # σ(−0.1) = 0.4750208125, σ(0.2) = 0.5498339973
    expected = -0.1 * t(0.47502081252106, 0.549833997312478)
    torch.testing.assert_close(pc.grad, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(pr.grad, -expected, rtol=0, atol=1e-12)


def test_robust_dpo_is_unbiased_under_label_flips():
    """Chowdhury et al.: (1 − ε)·L_rob(h) + ε·L_rob(−h) = −log σ(βh) for every h."""
    h = torch.linspace(-30, 30, 41, dtype=D)
    zeros = torch.zeros_like(h)
    eps, beta = 0.25, 0.3
    clean = dpo_loss(h, zeros, zeros, zeros, beta=beta)[0]
    rob = robust_dpo_loss(h, zeros, zeros, zeros, beta=beta, label_smoothing=eps)[0]
    rob_flipped = robust_dpo_loss(zeros, h, zeros, zeros, beta=beta, label_smoothing=eps)[0]
    torch.testing.assert_close((1 - eps) * rob + eps * rob_flipped, clean, rtol=0, atol=1e-10)


def test_cdpo_minimum_is_at_soft_label():
    """cDPO's gradient vanishes where σ(βh) = 1 − ε, i.e. βh = log((1 − ε)/ε); plain DPO's never does."""
    eps, beta = 0.1, 0.5
    h = torch.tensor([math.log((1 - eps) / eps) / beta], dtype=D, requires_grad=True)
    zero = torch.zeros(1, dtype=D)
    dpo_loss(h, zero, zero, zero, beta=beta, label_smoothing=eps)[0].sum().backward()
    assert abs(h.grad.item()) < 1e-12
    h2 = h.detach().clone().requires_grad_(True)
    dpo_loss(h2, zero, zero, zero, beta=beta)[0].sum().backward()
    assert h2.grad.item() < -1e-3


def test_ipo_minimum_at_target():
    beta = 0.25
    h = torch.tensor([1 / (2 * beta)], dtype=D, requires_grad=True)
    zero = torch.zeros(1, dtype=D)
    loss = ipo_loss(h, zero, zero, zero, beta=beta)[0]
    loss.sum().backward()
    assert loss.item() == 0.0 and h.grad.item() == 0.0


def test_extreme_margins_stay_finite():
    big = t(1e4, -1e4)
    zeros = torch.zeros(2, dtype=D)
    for fn in (dpo_loss, robust_dpo_loss):
        losses = fn(big, zeros, zeros, zeros, beta=1.0, label_smoothing=0.1)[0]
        assert torch.isfinite(losses).all()
    losses = dpo_loss(big, zeros, zeros, zeros, beta=1.0)[0]
    torch.testing.assert_close(losses, t(0.0, 1e4), rtol=1e-12, atol=1e-12)  # sp(−1e4) ≈ 0, sp(1e4) = 1e4


def test_rewards_are_detached_and_losses_carry_gradient():
    pc = PC.clone().requires_grad_(True)
    for name in PREFERENCE_LOSSES:
        p = PairLogps(pc, PR, t(2.0, 3.0), t(2.0, 3.0), RC, RR)
        losses, cr, rr = preference_loss(name, p, beta=0.1, bco_delta=0.0)  # bco_pair needs its δ
        assert losses.requires_grad and not cr.requires_grad and not rr.requires_grad, name
        assert losses.shape == cr.shape == rr.shape == (2,), name


def test_registry_dispatch_equals_direct_calls():
    lc, lr = t(2.0, 4.0), t(5.0, 1.0)
    p = PairLogps(PC, PR, lc, lr, RC, RR)

    def same(a, b):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12)

    same(preference_loss("sigmoid", p, beta=0.1, label_smoothing=0.2),
         dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.2))
    same(preference_loss("robust", p, beta=0.1, label_smoothing=0.2),
         robust_dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.2))
    same(preference_loss("hinge", p, beta=0.1), hinge_loss(PC, PR, RC, RR, beta=0.1))
    # The summed-log-prob IPO was `ipo` with ipo_length_normalize=False; it is now the name `ipo_sum`
    # (`ipo` keeps its per-token default, TRL's definition; see test_ipo_length_normalized_hand_value).
    same(preference_loss("ipo_sum", p, beta=0.1), ipo_loss(PC, PR, RC, RR, beta=0.1))
    same(preference_loss("simpo", p, beta=2.0, simpo_gamma=0.5), simpo_loss(PC, PR, lc, lr, beta=2.0, gamma=0.5))
    same(preference_loss("ref_free", PairLogps(PC, PR, lc, lr), beta=0.1),
         reference_free_dpo_loss(PC, PR, beta=0.1))


def test_ipo_length_normalized_hand_value():
    # means: π_w = −1/2, ref_w = −1.5/2 → ρ_w = 0.25; π_l = −2/5, ref_l = −1.5/5 → ρ_l = −0.1; h = 0.35
    # β = 0.1: (0.35 − 5)² = 21.6225. Rewards stay on sums: β·ρ = 0.05 / −0.05
    p = PairLogps(t(-1.0), t(-2.0), t(2.0), t(5.0), t(-1.5), t(-1.5))
    losses, cr, rr = preference_loss("ipo", p, beta=0.1)
    torch.testing.assert_close(losses, t(21.6225), rtol=0, atol=1e-12)
    torch.testing.assert_close((cr, rr), (t(0.05), t(-0.05)), rtol=0, atol=1e-12)


def test_rpo_adds_per_token_nll_of_chosen():
    # α = 0.5: NLL = −π_w/|y_w| = 1/2 = 0.5, 3/4 = 0.75 → adds 0.25, 0.375 to the DPO losses
    p = PairLogps(PC, PR, t(2.0, 4.0), t(5.0, 1.0), RC, RR)
    losses, _, _ = preference_loss("sigmoid", p, beta=0.1, rpo_alpha=0.5)
    torch.testing.assert_close(losses, t(SP_M01 + 0.25, SP_P02 + 0.375), rtol=0, atol=1e-12)


def test_needs_reference_and_names():
    # The registry grew with the rest of TRL's loss types (tests/test_losses_dpo_family.py); the
    # original six keep their names and come first.
    assert PREFERENCE_LOSSES[:6] == ("sigmoid", "robust", "ipo", "hinge", "simpo", "ref_free")
    assert [n for n in PREFERENCE_LOSSES if not needs_reference(n)] == ["simpo", "ref_free", "orpo", "cpo"]


def test_user_errors():
    with pytest.raises(ValueError, match=r"unknown loss type 'sigmod'.*did you mean 'sigmoid'.*valid: sigmoid"):
        preference_loss("sigmod", PairLogps(PC, PR, t(1.0, 1.0), t(1.0, 1.0), RC, RR), beta=0.1)
    with pytest.raises(ValueError, match="unknown loss type"):
        needs_reference("kto")
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss("sigmoid", PairLogps(PC, PR, t(1.0, 1.0), t(1.0, 1.0)), beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="rpo_alpha"):
        preference_loss("sigmoid", PairLogps(PC, PR, t(1.0, 1.0), t(1.0, 1.0), RC, RR), beta=0.1, rpo_alpha=-1)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(PC, t(1.0), RC, RR)


def test_package_reexports():
    assert losses_pkg.dpo_loss is dpo_loss and losses_pkg.preference_loss is preference_loss
