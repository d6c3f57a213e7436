"""PPO / policy-gradient losses and KL estimators: float64 hand values and limit cases."""

from __future__ import annotations

import math

import pytest
import torch

from dpolab.losses.pg import a2c_loss, entropy_from_logits, reinforce_loss, value_loss
from dpolab.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_value_loss,
    kl_k1,
    kl_k2,
    kl_k3,
    ppo_clip_loss,
    ppo_kl_penalty_loss,
)

D = torch.float64


def test_ppo_clip_hand_values():
    # ε = 0.2. Ratios r = (0.5, 1.1, 1.5, 1.5, 0.5), advantages A = (1, 2, 1, −1, −1):
    #   r=0.5, A=1 : min(0.5, 0.8) = 0.5              -> loss −0.5   (|r−1| > ε: clipfrac 1)
    #   r=1.1, A=2 : min(2.2, 2.2) = 2.2              -> loss −2.2   (inside: clipfrac 0)
    #   r=1.5, A=1 : min(1.5, 1.2) = 1.2              -> loss −1.2   (clipfrac 1)
    #   r=1.5, A=−1: min(−1.5, −1.2) = −1.5           -> loss  1.5
    #   r=0.5, A=−1: min(−0.5, −0.8) = −0.8           -> loss  0.8
    ratio = torch.tensor([0.5, 1.1, 1.5, 1.5, 0.5], dtype=D)
    adv = torch.tensor([1.0, 2.0, 1.0, -1.0, -1.0], dtype=D)
    old = torch.zeros(5, dtype=D)
    loss, st = ppo_clip_loss(torch.log(ratio), old, adv, 0.2)
    torch.testing.assert_close(loss, torch.tensor([-0.5, -2.2, -1.2, 1.5, 0.8], dtype=D))
    torch.testing.assert_close(st["clipfrac"], torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], dtype=D))
    # approx_kl = (r − 1) − log r: r = 0.5 -> −0.5 + log 2 = 0.193147...
    assert st["approx_kl"][0].item() == pytest.approx(-0.5 + math.log(2))
    # asymmetric clip (ε_high = 0.6): r = 1.5 now inside, loss −1.5
    loss_hi, _ = ppo_clip_loss(torch.log(ratio), old, adv, 0.2, clip_eps_high=0.6)
    assert loss_hi[2].item() == pytest.approx(-1.5)
    with pytest.raises(ValueError):
        ppo_clip_loss(old, old, adv, 0.0)


def test_ppo_clip_gradient_at_ratio_one_is_vanilla_policy_gradient():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, dtype=D, requires_grad=True)
    actions = torch.tensor([0, 3, 1, 2, 2, 1])
    adv = torch.randn(6, dtype=D)
    logp = torch.log_softmax(logits, -1).gather(1, actions[:, None])[:, 0]
    loss, _ = ppo_clip_loss(logp, logp.detach(), adv, 0.2)  # ratio ≡ 1
    (g_ppo,) = torch.autograd.grad(loss.mean(), logits)
    logp2 = torch.log_softmax(logits, -1).gather(1, actions[:, None])[:, 0]
    (g_pg,) = torch.autograd.grad(reinforce_loss(logp2, adv).mean(), logits)
    torch.testing.assert_close(g_ppo, g_pg)
    assert g_pg.abs().sum() > 0


def test_ppo_kl_penalty_hand_values_and_gradient_at_ratio_one():
    # r = 2, A = 1, β = 0.5: k3 KL = (2 − 1) − log 2 = 0.306853; loss = −(2 − 0.5·0.306853) = −1.846574
    logp = torch.tensor([math.log(2.0)], dtype=D)
    loss, st = ppo_kl_penalty_loss(logp, torch.zeros(1, dtype=D), torch.ones(1, dtype=D), beta=0.5)
    assert loss.item() == pytest.approx(-(2 - 0.5 * (1 - math.log(2))))
    assert st["kl"].item() == pytest.approx(1 - math.log(2))
    # an exact KL passed in is used as is: −(2 − 0.5·0.1) = −1.95
    loss, _ = ppo_kl_penalty_loss(logp, torch.zeros(1, dtype=D), torch.ones(1, dtype=D), 0.5,
                                  kl=torch.tensor([0.1], dtype=D))
    assert loss.item() == pytest.approx(-1.95)
    # at r = 1 the k3 penalty has zero gradient: the gradient is the vanilla policy gradient
    x = torch.tensor([0.3, -0.2], dtype=D, requires_grad=True)
    adv = torch.tensor([1.5, -0.5], dtype=D)
    loss, _ = ppo_kl_penalty_loss(x, x.detach(), adv, beta=3.0)
    (g,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(g, -adv)


def test_ppo_kl_penalty_gradient_away_from_ratio_one():
    """The k3 penalty is differentiated: d/dlogp of −(rA − β((r − 1) − log r)) = −rA + β(r − 1)."""
    # r = 2, A = 1, β = 0.5: −2·1 + 0.5·(2 − 1) = −1.5 (a detached penalty would give −2);
    # r = ½, A = −1, β = 2: −½·(−1) + 2·(½ − 1) = 0.5 − 1 = −0.5
    x = torch.tensor([math.log(2.0)], dtype=D, requires_grad=True)
    loss, _ = ppo_kl_penalty_loss(x, torch.zeros(1, dtype=D), torch.ones(1, dtype=D), beta=0.5)
    (g,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(g, torch.tensor([-1.5], dtype=D))
    x = torch.tensor([-math.log(2.0)], dtype=D, requires_grad=True)
    loss, _ = ppo_kl_penalty_loss(x, torch.zeros(1, dtype=D), -torch.ones(1, dtype=D), beta=2.0)
    (g,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(g, torch.tensor([-0.5], dtype=D))


def test_ppo_clip_asymmetric_clipfrac_uses_clip_eps_high():
    # ε = 0.2, ε_high = 0.6: the range is [0.8, 1.6]; r = (0.5, 1.1, 1.5, 1.7):
    #   0.5 < 0.8 -> 1;  1.1 inside -> 0;  1.5 ≤ 1.6 inside -> 0 (symmetric ε would say 1);  1.7 > 1.6 -> 1
    ratio = torch.tensor([0.5, 1.1, 1.5, 1.7], dtype=D)
    _, st = ppo_clip_loss(torch.log(ratio), torch.zeros(4, dtype=D), torch.ones(4, dtype=D), 0.2,
                          clip_eps_high=0.6)
    torch.testing.assert_close(st["clipfrac"], torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=D))


def test_adaptive_kl_controller_follows_ppo_paper_section_4():
    ctl = AdaptiveKLController(init_beta=1.0, target_kl=0.01)
    assert ctl.update(0.02) == 2.0  # 0.02 > 0.015: double
    assert ctl.update(0.01) == 2.0  # inside [0.00667, 0.015]: unchanged
    assert ctl.update(0.015) == 2.0  # the boundary is inside
    assert ctl.update(0.005) == 1.0  # < 0.00667: halve
    assert FixedKLController(0.3).update(10.0) == 0.3
    with pytest.raises(ValueError):
        AdaptiveKLController(1.0, target_kl=0.0)


def test_adaptive_kl_controller_lower_boundary_is_inside():
    """PPO paper section 4 halves β only when d < d_targ/1.5: d = d_targ/1.5 leaves β unchanged."""
    # d_targ = 0.75, tolerance 1.5: 0.75/1.5 = 0.5, exact in binary floating point
    ctl = AdaptiveKLController(init_beta=1.0, target_kl=0.75)
    assert ctl.update(0.5) == 1.0
    assert ctl.update(0.4999) == 0.5  # just below: 1/2


def test_kl_estimators_hand_values_and_unbiasedness():
    # log p = log 0.5, log q = log 0.25 (one sample): k1 = log 2 = 0.693147; r = q/p = 0.5:
    # k2 = ½ (log 0.5)² = 0.240227; k3 = (0.5 − 1) − log 0.5 = 0.193147
    lp, lq = torch.tensor([math.log(0.5)], dtype=D), torch.tensor([math.log(0.25)], dtype=D)
    assert kl_k1(lp, lq).item() == pytest.approx(math.log(2))
    assert kl_k2(lp, lq).item() == pytest.approx(0.5 * math.log(0.5) ** 2)
    assert kl_k3(lp, lq).item() == pytest.approx(-0.5 + math.log(2))
    # exact expectation under p over a 3-outcome distribution: E_p[k1] = E_p[k3] = KL(p‖q)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=D)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=D)
    kl = (p * (p / q).log()).sum()
    torch.testing.assert_close((p * kl_k1(p.log(), q.log())).sum(), kl)
    torch.testing.assert_close((p * kl_k3(p.log(), q.log())).sum(), kl)
    assert torch.all(kl_k3(p.log(), q.log()) >= 0)
    assert torch.all(kl_k3(p.log(), p.log()) == 0)


def test_clipped_value_loss_hand_values():
    # ε = 0.2, G = 1:
    #   V_old = 0,   V = 0.5 : unclipped (0.5−1)² = 0.25; clipped V = 0.2 -> (0.2−1)² = 0.64; max 0.64
    #   V_old = 0.9, V = 1.0 : unclipped 0; clipped (1.0−1)² = 0 (inside)                    -> 0
    #   V_old = 2.0, V = 1.0 : unclipped 0; clipped V = 1.8 -> 0.64                           -> 0.64
    v = torch.tensor([0.5, 1.0, 1.0], dtype=D)
    old = torch.tensor([0.0, 0.9, 2.0], dtype=D)
    loss, st = clipped_value_loss(v, old, torch.ones(3, dtype=D), 0.2)
    torch.testing.assert_close(loss, torch.tensor([0.64, 0.0, 0.64], dtype=D))
    torch.testing.assert_close(st["vf_clipfrac"], torch.tensor([1.0, 0.0, 1.0], dtype=D))
    # a huge ε recovers the plain squared error
    loss, _ = clipped_value_loss(v, old, torch.ones(3, dtype=D), 1e9)
    torch.testing.assert_close(loss, value_loss(v, torch.ones(3, dtype=D)))


def test_reinforce_weights_and_value_returns_are_detached():
    """Ψ_t and G_t may come with a graph (an advantage from the critic): the losses cut it, so
    ∂/∂logp (−logp·Ψ) = −Ψ and ∂/∂V (V − G)² = 2(V − G) only, and Ψ, G get no gradient."""
    logp = torch.tensor([-0.5, -2.0], dtype=D, requires_grad=True)
    psi = torch.tensor([2.0, -1.0], dtype=D, requires_grad=True)
    reinforce_loss(logp, psi).sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-2.0, 1.0], dtype=D))  # −Ψ
    assert psi.grad is None
    v = torch.tensor([1.0, 0.5], dtype=D, requires_grad=True)
    g = torch.tensor([3.0, 0.0], dtype=D, requires_grad=True)
    value_loss(v, g).sum().backward()
    torch.testing.assert_close(v.grad, torch.tensor([-4.0, 1.0], dtype=D))  # 2(1 − 3), 2(0.5 − 0)
    assert g.grad is None
    # through A2C too: Â and G built from the same critic value get no gradient from L
    logp2 = torch.tensor([-0.5], dtype=D, requires_grad=True)
    v2 = torch.tensor([1.0], dtype=D, requires_grad=True)
    returns = 3.0 + 0 * v2            # G = 3, but on v2's graph
    adv = returns - v2                # Â = 2, on v2's graph
    loss, _ = a2c_loss(logp2, adv, v2, returns, torch.zeros(1, dtype=D), vf_coef=0.5)
    loss.sum().backward()
    torch.testing.assert_close(logp2.grad, torch.tensor([-2.0], dtype=D))  # −Â
    torch.testing.assert_close(v2.grad, torch.tensor([-2.0], dtype=D))     # 0.5·2(1 − 3)


def test_entropy_and_pg_losses_hand_values():
    # uniform over 4: H = log 4; logits (0, log 3) -> p = (1/4, 3/4): H = −(.25 log .25 + .75 log .75) = 0.562335
    assert entropy_from_logits(torch.zeros(4, dtype=D)).item() == pytest.approx(math.log(4))
    h = entropy_from_logits(torch.tensor([0.0, math.log(3)], dtype=D)).item()
    assert h == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    # saturated logits stay finite: H -> 0
    assert entropy_from_logits(torch.tensor([0.0, 1e4], dtype=D)).item() == pytest.approx(0.0, abs=1e-12)
    # A2C: logp = −0.5, Â = 2, V = 1, G = 3, H = 0.7, c₁ = 0.5, c₂ = 0.1:
    #   pg = 0.5·2 = 1; vf = (1 − 3)² = 4; L = 1 + 0.5·4 − 0.1·0.7 = 2.93
    one = torch.ones(1, dtype=D)
    loss, st = a2c_loss(-0.5 * one, 2 * one, one, 3 * one, 0.7 * one, vf_coef=0.5, ent_coef=0.1)
    assert loss.item() == pytest.approx(2.93)
    assert (st["policy"].item(), st["value"].item()) == pytest.approx((1.0, 4.0))


def test_ppo_losses_refuse_unequal_shapes_and_out_of_range_coefficients():
    """A (B,) advantage against (B, T) log-probs would broadcast silently (rows mixed with positions
    when T == B)."""
    from dpolab.losses.ppo import clipped_value_loss, ppo_clip_loss, ppo_kl_penalty_loss

    logp, adv_rows = torch.zeros(3, 3, dtype=D), torch.ones(3, dtype=D)
    with pytest.raises(ValueError, match=r"shapes must be equal, got logp \(3, 3\), old_logp \(3, 3\), "
                                         r"advantages \(3,\)"):
        ppo_clip_loss(logp, logp, adv_rows)
    with pytest.raises(ValueError, match="shapes must be equal"):
        ppo_kl_penalty_loss(logp, logp, adv_rows, beta=0.1)
    with pytest.raises(ValueError, match="shapes must be equal"):
        clipped_value_loss(logp, logp, adv_rows, clip_eps=0.2)
    with pytest.raises(ValueError, match="clip_eps_high must be > 0"):
        ppo_clip_loss(logp, logp, logp, clip_eps=0.2, clip_eps_high=-0.1)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        ppo_kl_penalty_loss(logp, logp, logp, beta=-0.5)
    with pytest.raises(ValueError, match="clip_eps must be > 0"):
        clipped_value_loss(logp, logp, logp, clip_eps=0.0)
