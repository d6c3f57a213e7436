"""The rest of the preference-loss family (TRL's loss types, ORPO, CPO, combinations, WPO weights)
against hand-computed float64 values, their limit cases and gradient signs.

Shorthand: sp(x) = log(1 + e^x), so −log σ(z) = sp(−z); σ(x) = 1/(1 + e^−x). The arithmetic of each
hand value is written with ``math`` on the scalars, independently of the torch code under test.

Two pairs, as in tests/test_losses_dpo.py:
  pair 0: π(y_w) = −1, π(y_l) = −2, ref −1.5/−1.5 → ρ_w = 0.5, ρ_l = −0.5, h = 1
  pair 1: π(y_w) = −3, π(y_l) = −1, ref −2/−2     → ρ_w = −1,  ρ_l = 1,    h = −2
"""

from __future__ import annotations

import math

import pytest
import torch

import dpolab.losses as losses_pkg
from dpolab.losses.dpo import (
    LOSS_REGISTRY,
    PREFERENCE_LOSSES,
    PairLogps,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    bco_running_delta,
    combined_preference_loss,
    cpo_loss,
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    ipo_loss,
    is_batch_level,
    log_odds,
    loss_defaults,
    nca_pair_loss,
    needs_reference,
    orpo_loss,
    preference_loss,
    sppo_hard_loss,
    unused_options,
    wpo_token_log_normalizer,
    wpo_weights,
)

D = torch.float64
LN2 = math.log(2.0)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=D)


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def close(actual: torch.Tensor, expected: list[float] | torch.Tensor, atol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=D), rtol=0, atol=atol)


PC, PR, RC, RR = t(-1.0, -3.0), t(-2.0, -1.0), t(-1.5, -2.0), t(-1.5, -2.0)
RHO_W, RHO_L = [0.5, -1.0], [-0.5, 1.0]
LC, LR = t(2.0, 4.0), t(5.0, 1.0)


def grads(fn, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂Σloss/∂policy_chosen, ∂Σloss/∂policy_rejected) on the two pairs."""
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    fn(pc, pr, RC, RR, **kw)[0].sum().backward()
    return pc.grad, pr.grad


# ---------------------------------------------------------------------------------------------------
# EXO


def test_exo_pair_hand_values():
    # ε = 0.2, β = 0.1: q = σ(βh); loss = q·(ln q − ln 0.8) + (1 − q)·(ln(1 − q) − ln 0.2)
    def exo(z, eps):
        q = sig(z)
        return q * (math.log(q) - math.log(1 - eps)) + (1 - q) * (math.log(1 - q) - math.log(eps))

    losses, cr, rr = exo_pair_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.2)
    close(losses, [exo(0.1, 0.2), exo(-0.2, 0.2)])       # 0.18976, 0.29720
    close(cr, [0.05, -0.1])
    close(rr, [-0.05, 0.1])
    # the registry default is the paper's ε = 1e-3
    p = PairLogps(PC, PR, LC, LR, RC, RR)
    close(preference_loss("exo_pair", p)[0], [exo(0.1, 1e-3), exo(-0.2, 1e-3)])


def test_exo_pair_limits_and_minimum():
    eps, beta = 0.05, 0.5
    zero = torch.zeros(3, dtype=D)
    # h = 0: ½(ln ½ − ln(1−ε)) + ½(ln ½ − ln ε) = −ln 2 − ½·ln(ε(1−ε))
    close(exo_pair_loss(zero, zero, zero, zero, beta=beta, label_smoothing=eps)[0],
          [-LN2 - 0.5 * math.log(eps * (1 - eps))] * 3)
    # reverse KL ≥ 0, zero with zero gradient at cDPO's optimum βh = ln((1 − ε)/ε)
    h = torch.tensor([math.log((1 - eps) / eps) / beta], dtype=D, requires_grad=True)
    z1 = torch.zeros(1, dtype=D)
    loss = exo_pair_loss(h, z1, z1, z1, beta=beta, label_smoothing=eps)[0]
    loss.sum().backward()
    assert abs(loss.item()) < 1e-14 and abs(h.grad.item()) < 1e-14
    hs = torch.linspace(-40, 40, 81, dtype=D)
    assert (exo_pair_loss(hs, 0 * hs, 0 * hs, 0 * hs, beta=beta, label_smoothing=eps)[0] >= -1e-15).all()


def test_exo_pair_gradient_signs():
    # ∂L/∂h = β·q(1−q)·(βh − ln((1−ε)/ε)) < 0 while βh is below the optimum
    gc, gr = grads(exo_pair_loss, beta=0.1, label_smoothing=0.2)
    q = [sig(0.1), sig(-0.2)]
    expected = [0.1 * qi * (1 - qi) * (z - math.log(0.8 / 0.2)) for qi, z in zip(q, [0.1, -0.2])]
    close(gc, expected)
    close(gr, [-e for e in expected])
    assert (gc < 0).all() and (gr > 0).all()


# ---------------------------------------------------------------------------------------------------
# DiscoPOP


def test_discopop_hand_values_and_limit():
    # β = τ = 0.05 (the defaults): m = σ(βh/τ) = σ(h); loss = (1 − m)·sp(−βh) + m·e^(−βh)
    def disco(z, tau):
        m = sig(z / tau)
        return (1 - m) * sp(-z) + m * math.exp(-z)

    losses, cr, _ = discopop_loss(PC, PR, RC, RR)
    close(losses, [disco(0.05, 0.05), disco(-0.1, 0.05)])
    close(cr, [0.025, -0.05])                                # rewards β·ρ with β = 0.05
    close(discopop_loss(PC, PR, RC, RR, beta=0.1, tau=0.2)[0], [disco(0.1, 0.2), disco(-0.2, 0.2)])
    zero = torch.zeros(2, dtype=D)
    close(discopop_loss(zero, zero, zero, zero)[0], [0.5 * LN2 + 0.5] * 2)  # h = 0: ½·ln 2 + ½
    assert loss_defaults("discopop") == {"beta": 0.05, "discopop_tau": 0.05}


def test_discopop_gradient_signs_and_the_band_where_it_lowers_the_margin():
    """Outside the band −0.119 < βh < 0.072 (τ = 0.05) DiscoPOP raises h like DPO; inside it the
    gradient in h is positive, so it lowers the margin: a property of its formula, not intended
    as 'preference learning' — documented in docs/dpo.md."""
    beta = 0.05
    pc = t(0.0, -4.0).requires_grad_(True)                   # h = +4, −4: βh = ±0.2, outside the band
    pr = t(-4.0, 0.0).requires_grad_(True)
    zero = torch.zeros(2, dtype=D)
    discopop_loss(pc, pr, zero, zero, beta=beta)[0].sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # at h = 0: ∂L/∂h = β·((1 − ln 2)/(4τ) − 3/4) = 0.05·(0.30685/0.2 − 0.75) = +0.0392
    h = torch.zeros(1, dtype=D, requires_grad=True)
    z1 = torch.zeros(1, dtype=D)
    discopop_loss(h, z1, z1, z1, beta=beta)[0].sum().backward()
    close(h.grad, [beta * ((1 - LN2) / (4 * 0.05) - 0.75)])
    assert h.grad.item() > 0


def test_discopop_extreme_margins_are_finite():
    # m·e^(−βh) is exp(log σ(βh/τ) − βh): at βh = −500 it is e^(−9500) = 0, not 0·∞
    big = t(1e4, -1e4)
    zero = torch.zeros(2, dtype=D)
    pc = big.clone().requires_grad_(True)
    losses = discopop_loss(pc, zero, zero, zero)[0]
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    close(losses, [0.0, 500.0], atol=1e-9)                   # e^(−500) ≈ 0; sp(500) = 500


# ---------------------------------------------------------------------------------------------------
# NCA, BCO, SPPO, APO


def test_nca_pair_hand_values_limit_and_gradients():
    # r = βρ; loss = sp(−r_w) + ½·sp(r_w) + ½·sp(r_l)
    losses, cr, rr = nca_pair_loss(PC, PR, RC, RR, beta=0.1)
    close(losses, [sp(-0.05) + 0.5 * sp(0.05) + 0.5 * sp(-0.05), sp(0.1) + 0.5 * sp(-0.1) + 0.5 * sp(0.1)])
    close(cr, [0.05, -0.1])
    zero = torch.zeros(2, dtype=D)
    close(nca_pair_loss(zero, zero, zero, zero)[0], [2 * LN2] * 2)
    gc, gr = grads(nca_pair_loss, beta=0.1)
    # ∂/∂ρ_w = β·(½σ(r_w) − σ(−r_w)); ∂/∂ρ_l = ½β·σ(r_l)
    close(gc, [0.1 * (0.5 * sig(r) - sig(-r)) for r in (0.05, -0.1)])
    close(gr, [0.05 * sig(r) for r in (-0.05, 0.1)])
    assert (gc < 0).all() and (gr > 0).all()
    # not intended: NCA does not raise the chosen reward past ln 2 (its chosen part's minimum)
    w = torch.tensor([LN2 / 0.1, 2 * LN2 / 0.1], dtype=D, requires_grad=True)
    nca_pair_loss(w, torch.zeros(2, dtype=D), torch.zeros(2, dtype=D), torch.zeros(2, dtype=D), beta=0.1)[0].sum().backward()
    assert abs(w.grad[0].item()) < 1e-14 and w.grad[1].item() > 0


def test_bco_pair_hand_values_limit_and_gradients():
    # δ = 0.02: sp(−(βρ_w − δ)) + sp(βρ_l − δ)
    losses, cr, rr = bco_pair_loss(PC, PR, RC, RR, beta=0.1, delta=0.02)
    close(losses, [sp(-0.03) + sp(-0.07), sp(0.12) + sp(0.08)])
    close(cr, [0.05, -0.1])
    zero = torch.zeros(2, dtype=D)
    close(bco_pair_loss(zero, zero, zero, zero, delta=0.0)[0], [2 * LN2] * 2)
    gc, gr = grads(bco_pair_loss, beta=0.1, delta=0.02)
    close(gc, [-0.1 * sig(-0.03), -0.1 * sig(0.12)])         # −β·σ(−(βρ_w − δ))
    close(gr, [0.1 * sig(-0.07), 0.1 * sig(0.08)])           # +β·σ(βρ_l − δ)
    # δ is state, not a parameter: a δ that requires grad gets none
    delta = torch.tensor(0.02, dtype=D, requires_grad=True)
    bco_pair_loss(PC.clone().requires_grad_(True), PR, RC, RR, delta=delta)[0].sum().backward()
    assert delta.grad is None


def test_bco_running_delta_is_the_mean_of_all_rewards_seen():
    delta, count = bco_running_delta(0.0, 0, t(0.05, -0.1), t(-0.05, 0.1))   # mean of 4 = 0
    assert count == 4 and abs(delta.item()) < 1e-15
    delta, count = bco_running_delta(delta, count, t(1.0, 2.0), t(3.0, 4.0))  # (0·4 + 10)/8 = 1.25
    assert count == 8
    close(delta, 1.25)
    # equal batch sizes: the same as TRL's running mean of per-step batch means, (0 + 2.5)/2
    close(delta, (0.0 + 2.5) / 2)
    x = torch.randn(20, dtype=D, generator=torch.Generator().manual_seed(0))
    d, c = 0.0, 0
    for i in range(0, 20, 4):
        d, c = bco_running_delta(d, c, x[i:i + 2], x[i + 2:i + 4])
    close(d, x.mean())
    assert not d.requires_grad
    with pytest.raises(ValueError, match="count"):
        bco_running_delta(0.0, -1, t(1.0), t(1.0))


def test_bco_running_delta_empty_batch_leaves_delta_and_count():
    # no rewards this step: (count·δ + 0)/(count + 0) = δ, count unchanged
    empty = torch.zeros(0, dtype=D)
    delta, count = bco_running_delta(1.25, 8, empty, empty)
    assert count == 8 and not delta.requires_grad
    close(delta, 1.25)
    delta, count = bco_running_delta(0.0, 0, empty, empty)  # before any step: still 0.0, 0
    assert count == 0
    close(delta, 0.0)
    # and the next non-empty step averages as if the empty one never happened: (8·1.25 + 2)/10 = 1.2
    delta, count = bco_running_delta(*bco_running_delta(1.25, 8, empty, empty), t(1.0), t(1.0))
    assert count == 10
    close(delta, 1.2)


def test_bco_pair_needs_delta_through_the_registry():
    p = PairLogps(PC, PR, LC, LR, RC, RR)
    with pytest.raises(ValueError, match="bco_delta"):
        preference_loss("bco_pair", p)
    close(preference_loss("bco_pair", p, bco_delta=0.02)[0], bco_pair_loss(PC, PR, RC, RR, delta=0.02)[0])
    with pytest.raises(ValueError, match="finite"):
        bco_pair_loss(PC, PR, RC, RR, delta=float("nan"))
    assert LOSS_REGISTRY["bco_pair"].required == ("bco_delta",)


def test_sppo_hard_hand_values_limit_and_gradients():
    # β = 0.1, targets ±1/(2β) = ±5: (0.5 − 5)² + (−0.5 + 5)² = 40.5; (−1 − 5)² + (1 + 5)² = 72
    losses, cr, _ = sppo_hard_loss(PC, PR, RC, RR, beta=0.1)
    close(losses, [40.5, 72.0])
    close(cr, [0.05, -0.1])
    zero = torch.zeros(2, dtype=D)
    close(sppo_hard_loss(zero, zero, zero, zero, beta=0.1)[0], [50.0, 50.0])   # 1/(2β²)
    close(sppo_hard_loss(t(5.0), t(-5.0), t(0.0), t(0.0), beta=0.1)[0], [0.0])  # its minimum
    gc, gr = grads(sppo_hard_loss, beta=0.1)
    close(gc, [2 * (0.5 - 5), 2 * (-1 - 5)])
    close(gr, [2 * (-0.5 + 5), 2 * (1 + 5)])


def test_apo_zero_hand_values_limit_and_gradients():
    # 1 − σ(βρ_w) + σ(βρ_l)
    losses, cr, _ = apo_zero_loss(PC, PR, RC, RR, beta=0.1)
    close(losses, [1 - sig(0.05) + sig(-0.05), 1 - sig(-0.1) + sig(0.1)])
    close(cr, [0.05, -0.1])
    zero = torch.zeros(2, dtype=D)
    close(apo_zero_loss(zero, zero, zero, zero)[0], [1.0, 1.0])
    gc, gr = grads(apo_zero_loss, beta=0.1)
    close(gc, [-0.1 * sig(r) * sig(-r) for r in (0.05, -0.1)])
    close(gr, [0.1 * sig(r) * sig(-r) for r in (-0.05, 0.1)])


def test_apo_down_hand_values_limit_and_gradients():
    # σ(βρ_w) + 1 − σ(βh)
    losses, _, _ = apo_down_loss(PC, PR, RC, RR, beta=0.1)
    close(losses, [sig(0.05) + 1 - sig(0.1), sig(-0.1) + 1 - sig(-0.2)])
    zero = torch.zeros(2, dtype=D)
    close(apo_down_loss(zero, zero, zero, zero)[0], [1.0, 1.0])
    gc, gr = grads(apo_down_loss, beta=0.1)

    def ds(z):
        return sig(z) * sig(-z)

    # ∂/∂ρ_w = β(σ'(βρ_w) − σ'(βh)): positive here (|h| > |ρ_w| on both pairs). APO-down does not
    # intend to raise y_w: it lowers it while widening the margin. ∂/∂ρ_l = β·σ'(βh) > 0.
    close(gc, [0.1 * (ds(0.05) - ds(0.1)), 0.1 * (ds(-0.1) - ds(-0.2))])
    close(gr, [0.1 * ds(0.1), 0.1 * ds(-0.2)])
    assert (gc > 0).all() and (gr > 0).all()
    pc = torch.zeros(1, dtype=D, requires_grad=True)
    apo_down_loss(pc, torch.zeros(1, dtype=D), torch.zeros(1, dtype=D), torch.zeros(1, dtype=D))[0].sum().backward()
    assert pc.grad.item() == 0.0                              # at policy = reference: exactly 0


# ---------------------------------------------------------------------------------------------------
# AOT (batch-level)

# three pairs: policy margins u = π_w − π_l = [1.5, −2, 2], reference margins v = [1.5, −0.25, 0.5],
#              h = u − v = [0, −1.75, 1.5]; ρ_w = [0.5, −0.75, −1], ρ_l = [0.5, 1, −2.5]
APC, APR, ARC, ARR = t(-1.0, -3.0, -2.0), t(-2.5, -1.0, -4.0), t(-1.5, -2.25, -1.0), t(-3.0, -2.0, -1.5)


def test_aot_hand_values():
    # sorted u = [−2, 1.5, 2], sorted v = [−0.25, 0.5, 1.5] → d = [−1.75, 1, 0.5];
    # β = 0.1: sp(0.175), sp(−0.1), sp(−0.05)
    losses, cr, rr = aot_loss(APC, APR, ARC, ARR, beta=0.1)
    close(losses, [sp(0.175), sp(-0.1), sp(-0.05)])
    close(cr, [0.05, -0.075, -0.1])                          # per pair, unsorted
    close(rr, [0.05, 0.1, -0.25])
    # with ε = 0.2, cDPO-style: 0.8·sp(−βd) + 0.2·sp(βd)
    close(aot_loss(APC, APR, ARC, ARR, beta=0.1, label_smoothing=0.2)[0],
          [0.8 * sp(-0.1 * d) + 0.2 * sp(0.1 * d) for d in (-1.75, 1.0, 0.5)])


def test_aot_unpaired_hand_values():
    # sorted ρ_w = [−1, −0.75, 0.5], sorted ρ_l = [−2.5, 0.5, 1] → d = [1.5, −1.25, −0.5]:
    # β = 0.1: sp(−0.15), sp(0.125), sp(0.05)
    losses, _, _ = aot_unpaired_loss(APC, APR, ARC, ARR, beta=0.1)
    close(losses, [sp(-0.15), sp(0.125), sp(0.05)])


def test_aot_is_batch_level_one_pair_is_dpo():
    for fn in (aot_loss, aot_unpaired_loss):
        per_pair = torch.cat([fn(APC[i:i + 1], APR[i:i + 1], ARC[i:i + 1], ARR[i:i + 1], beta=1.0)[0]
                              for i in range(3)])
        close(per_pair, dpo_loss(APC, APR, ARC, ARR, beta=1.0)[0])           # B = 1: it is DPO
        whole = fn(APC, APR, ARC, ARR, beta=1.0)[0]
        # splitting the batch changes the mean: paired (sp(1.75) + sp(−1) + sp(−0.5))/3 = 0.8992 and
        # unpaired (sp(−1.5) + sp(1.25) + sp(0.5))/3 = 0.8925, against (ln 2 + sp(1.75) + sp(−1.5))/3
        # = 0.9349 for the same pairs in three batches of one
        assert abs(whole.mean().item() - per_pair.mean().item()) > 0.03, fn.__name__
        close(fn(APC.flip(0), APR.flip(0), ARC.flip(0), ARR.flip(0), beta=1.0)[0], whole)  # order-free
    assert is_batch_level("aot") and is_batch_level("aot_unpaired")
    assert [n for n in PREFERENCE_LOSSES if is_batch_level(n)] == ["aot", "aot_unpaired"]


def test_aot_gradient_signs():
    for fn in (aot_loss, aot_unpaired_loss):
        pc, pr = APC.clone().requires_grad_(True), APR.clone().requires_grad_(True)
        fn(pc, pr, ARC, ARR, beta=0.1)[0].sum().backward()
        assert (pc.grad < 0).all() and (pr.grad > 0).all(), fn.__name__
    # paired: each pair's gradient is −β·σ(−β·d) at the sorted position of its u: pair 0 (u = 1.5)
    # at position 1 (d = 1), pair 1 (u = −2) at 0 (d = −1.75), pair 2 (u = 2) at 2 (d = 0.5)
    pc = APC.clone().requires_grad_(True)
    aot_loss(pc, APR, ARC, ARR, beta=0.1)[0].sum().backward()
    close(pc.grad, [-0.1 * sig(-0.1), -0.1 * sig(0.175), -0.1 * sig(-0.05)])


# ---------------------------------------------------------------------------------------------------
# Length-normalised DPO and the two IPOs


def test_sigmoid_norm_hand_value():
    # token means, lengths (2, 4) and (5, 1):
    #   pair 0: ρ_w = −1/2 + 1.5/2 = 0.25, ρ_l = −2/5 + 1.5/5 = −0.1, h = 0.35 → sp(−0.035)
    #   pair 1: ρ_w = −3/4 + 2/4 = −0.25, ρ_l = −1 + 2 = 1,      h = −1.25 → sp(0.125)
    p = PairLogps(PC, PR, LC, LR, RC, RR)
    losses, cr, rr = preference_loss("sigmoid_norm", p, beta=0.1)
    close(losses, [sp(-0.035), sp(0.125)])
    close(cr, [0.05, -0.1])                                   # rewards on sums, as every reference loss
    close(rr, [-0.05, 0.1])
    eq = PairLogps(PC, PR, t(1.0, 1.0), t(1.0, 1.0), RC, RR)  # unit lengths: plain DPO
    close(preference_loss("sigmoid_norm", eq, beta=0.1)[0], dpo_loss(PC, PR, RC, RR, beta=0.1)[0])
    pc = PC.clone().requires_grad_(True)
    pr = PR.clone().requires_grad_(True)
    preference_loss("sigmoid_norm", PairLogps(pc, pr, LC, LR, RC, RR))[0].sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_sigmoid_norm_applies_cdpo_label_smoothing():
    # docs/dpo.md: sigmoid_norm is cDPO with ε > 0 on the token means. ε = 0.2, β = 0.1, βh̄ = (0.035, −0.125)
    # as above: 0.8·sp(−z) + 0.2·sp(z) = sp(−z) + 0.2·z (since sp(z) − sp(−z) = z):
    #   pair 0: sp(−0.035) + 0.007;  pair 1: sp(0.125) − 0.025
    p = PairLogps(PC, PR, LC, LR, RC, RR)
    losses, cr, rr = preference_loss("sigmoid_norm", p, beta=0.1, label_smoothing=0.2)
    close(losses, [0.8 * sp(-0.035) + 0.2 * sp(0.035), 0.8 * sp(0.125) + 0.2 * sp(-0.125)])
    close(losses, [sp(-0.035) + 0.007, sp(0.125) - 0.025])
    close(cr, [0.05, -0.1])                                   # rewards do not depend on ε
    close(rr, [-0.05, 0.1])


def test_ipo_token_and_ipo_sum():
    # `ipo` (TRL's) regresses the per-token margin to 1/(2β); `ipo_sum` (the paper's) the summed one.
    # Equal lengths L: ipo's margin is h/L. L = 2, β = 0.1: ((1/2) − 5)² = 20.25, (−1 − 5)² = 36
    p2 = PairLogps(PC, PR, t(2.0, 2.0), t(2.0, 2.0), RC, RR)
    close(preference_loss("ipo", p2, beta=0.1)[0], [20.25, 36.0])
    close(preference_loss("ipo_sum", p2, beta=0.1)[0], [16.0, 49.0])            # (1 − 5)², (−2 − 5)²
    close(preference_loss("ipo_sum", p2, beta=0.1)[0], ipo_loss(PC, PR, RC, RR, beta=0.1)[0])
    pc = PC.clone().requires_grad_(True)
    pr = PR.clone().requires_grad_(True)
    preference_loss("ipo_sum", PairLogps(pc, pr, LC, LR, RC, RR), beta=0.1)[0].sum().backward()
    close(pc.grad, [2 * (1 - 5), 2 * (-2 - 5)])              # 2(h − 1/(2β)) < 0 below the target
    close(pr.grad, [-2 * (1 - 5), -2 * (-2 - 5)])


# ---------------------------------------------------------------------------------------------------
# ORPO and CPO


def test_log_odds_stable_at_both_ends():
    # p → 1: ℓ̄ = −1e-10; log(1 − e^x) = log(−x) + log1p(x/2 + x²/6) (series of (1 − e^x)/(−x))
    x = -1e-10
    exact = x - (math.log(-x) + math.log1p(x / 2 + x * x / 6))   # 23.0258509299...
    close(log_odds(t(x)), [exact], atol=1e-14)
    naive = torch.log(1 - torch.exp(t(x)))                       # the cancellation this avoids
    assert abs((t(x) - naive).item() - exact) > 1e-8
    # float32: the naive form is −inf; ours keeps 6 digits
    lo32 = log_odds(torch.tensor([x], dtype=torch.float32))
    assert torch.isfinite(lo32).all() and abs(lo32.item() - exact) < 1e-5
    # p → 0: ℓ̄ = −50, log odds = −50 − log1p(−e^−50) ≈ −50 + 1.9e-22; ℓ̄ = −800: e^ℓ̄ underflows, −800
    close(log_odds(t(-50.0, -800.0)), [-50.0 - math.log1p(-math.exp(-50.0)), -800.0], atol=1e-13)
    # gradients d/dℓ̄ log odds = 1/(1 − p): finite at both ends, and at p = 1 exactly (clamped)
    v = t(-1e-10, -0.5, -50.0, -800.0, 0.0).requires_grad_(True)
    lo = log_odds(v)
    lo.sum().backward()
    assert torch.isfinite(lo).all() and torch.isfinite(v.grad).all()
    close(v.grad[1:4], [1 / (1 - math.exp(-0.5)), 1.0, 1.0], atol=1e-9)
    assert abs(v.grad[0].item() - 1e10) / 1e10 < 1e-5
    assert v.grad[4].item() == 0.0                               # the clamp: no gradient at p = 1


def test_orpo_hand_value_and_gradients():
    # ℓ̄_w = −1/2 = −0.5, ℓ̄_l = −4/2 = −2
    # log odds(ℓ̄) = ℓ̄ − ln(1 − e^ℓ̄): −0.5 − ln(0.3934693) = 0.4327521; −2 − ln(0.8646647) = −1.8545865
    # L_OR = sp(−(0.4327521 + 1.8545865)) = 0.0967059; λ = 0.1: 0.5 + 0.1·0.0967059 = 0.5096706
    def lo(m):
        return m - math.log(1 - math.exp(m))

    losses, cr, rr = orpo_loss(t(-1.0), t(-4.0), t(2.0), t(2.0), lam=0.1)
    expected = 0.5 + 0.1 * sp(-(lo(-0.5) - lo(-2.0)))
    close(losses, [expected])
    assert abs(expected - 0.5096706) < 1e-7
    close(cr, [-0.05])                                            # λ·ℓ̄
    close(rr, [-0.2])
    # equal ℓ̄: L_OR = ln 2, loss = −ℓ̄_w + λ·ln 2
    close(orpo_loss(t(-3.0), t(-6.0), t(2.0), t(4.0), lam=0.25)[0], [1.5 + 0.25 * LN2])
    p = PairLogps(PC, PR, LC, LR)                                # no reference needed
    close(preference_loss("orpo", p)[0], orpo_loss(PC, PR, LC, LR, lam=0.1)[0])
    assert loss_defaults("orpo") == {"orpo_lambda": 0.1}
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    orpo_loss(pc, pr, LC, LR)[0].sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_orpo_near_certain_and_near_impossible_responses():
    # p_w → 1 (ℓ̄_w = −1e-12) and p_l → 0 (ℓ̄_l = −60): log odds ≈ 27.63 − (−60) → L_OR ≈ 0
    pc = t(-2e-12).requires_grad_(True)
    pr = t(-120.0).requires_grad_(True)
    losses = orpo_loss(pc, pr, t(2.0), t(2.0), lam=0.1)[0]
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    close(losses, [1e-12 + 0.1 * sp(-(-1e-12 - math.log(1e-12) + 60.0))], atol=1e-12)


def test_cpo_hand_values_and_equals_ref_free_plus_rpo():
    # β = 0.1: sp(−β(π_w − π_l)) + α·(−π_w/|y_w|): sp(−0.1) + 0.5, sp(0.2) + 0.75
    losses, cr, rr = cpo_loss(PC, PR, LC)
    close(losses, [sp(-0.1) + 0.5, sp(0.2) + 0.75])
    close(cr, [-0.1, -0.3])                                       # β·log π_θ
    close(cpo_loss(PC, PR, LC, alpha=2.0)[0], [sp(-0.1) + 1.0, sp(0.2) + 1.5])
    p = PairLogps(PC, PR, LC, LR)
    close(preference_loss("cpo", p)[0], preference_loss("ref_free", p, beta=0.1, rpo_alpha=1.0)[0])
    assert loss_defaults("cpo") == {"beta": 0.1, "cpo_alpha": 1.0}
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    cpo_loss(pc, pr, LC)[0].sum().backward()
    close(pc.grad, [-0.1 * sig(-0.1) - 0.5, -0.1 * sig(0.2) - 0.25])
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


# ---------------------------------------------------------------------------------------------------
# All registered losses


REF_LIMITS = {  # loss at policy = reference (h = 0, ρ = 0), β = 0.5, ε from the registry defaults
    "sigmoid": LN2, "robust": LN2, "sigmoid_norm": LN2, "aot": LN2, "aot_unpaired": LN2,
    "ipo": 1.0, "ipo_sum": 1.0,                                    # (1/(2β))²
    "hinge": 1.0, "nca_pair": 2 * LN2, "bco_pair": 2 * LN2, "sppo_hard": 2.0,  # 1/(2β²)
    "apo_zero": 1.0, "apo_down": 1.0, "discopop": 0.5 * LN2 + 0.5,
    "exo_pair": -LN2 - 0.5 * math.log(1e-3 * (1 - 1e-3)),
}


@pytest.mark.parametrize("name", sorted(REF_LIMITS))
def test_policy_equals_reference_limit(name):
    g = torch.Generator().manual_seed(1)
    w, lo = -10 * torch.rand(4, generator=g, dtype=D), -10 * torch.rand(4, generator=g, dtype=D)
    p = PairLogps(w, lo, t(3.0, 1.0, 7.0, 2.0), t(2.0, 5.0, 1.0, 9.0), w.clone(), lo.clone())
    losses, cr, rr = preference_loss(name, p, beta=0.5, bco_delta=0.0)
    close(losses, [REF_LIMITS[name]] * 4)
    assert torch.all(cr == 0) and torch.all(rr == 0)


def test_every_registered_loss_is_tested_at_its_limit_or_reference_free():
    assert set(REF_LIMITS) == {n for n in PREFERENCE_LOSSES if needs_reference(n)}
    assert [n for n in PREFERENCE_LOSSES if not needs_reference(n)] == ["simpo", "ref_free", "orpo", "cpo"]


@pytest.mark.parametrize("name", PREFERENCE_LOSSES)
def test_extreme_margins_stay_finite(name):
    pc = t(-1e-8, -1e4).requires_grad_(True)                      # log-probs stay ≤ 0
    pr = t(-1e4, -1e-8).requires_grad_(True)
    p = PairLogps(pc, pr, t(3.0, 1.0), t(1.0, 3.0), torch.zeros(2, dtype=D), torch.zeros(2, dtype=D))
    losses = preference_loss(name, p, beta=1.0, bco_delta=0.0)[0]
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_registry_defaults_and_options():
    assert loss_defaults("sigmoid") == {"beta": 0.1, "label_smoothing": 0.0}
    assert loss_defaults("exo_pair") == {"beta": 0.1, "label_smoothing": 1e-3}
    assert loss_defaults("simpo") == {"beta": 2.0, "simpo_gamma": 1.0}
    d = loss_defaults("sigmoid")
    d["beta"] = 9.0
    assert loss_defaults("sigmoid")["beta"] == 0.1                # a copy
    assert LOSS_REGISTRY["bco_pair"].options == ("beta", "bco_delta")
    assert unused_options("ipo", beta=0.1, label_smoothing=0.1, simpo_gamma=None) == ["label_smoothing"]
    assert unused_options("orpo", beta=0.1, orpo_lambda=0.2) == ["beta"]
    assert unused_options("sigmoid", rpo_alpha=0.5, cpo_alpha=1.0) == ["cpo_alpha"]  # RPO applies to every loss
    # label_smoothing=None takes the loss's default: 0 for DPO (cDPO off), 1e-3 for EXO
    p = PairLogps(PC, PR, LC, LR, RC, RR)
    close(preference_loss("sigmoid", p)[0], dpo_loss(PC, PR, RC, RR)[0])
    close(preference_loss("exo_pair", p, label_smoothing=0.3)[0], exo_pair_loss(PC, PR, RC, RR, label_smoothing=0.3)[0])


def test_registry_dispatch_equals_direct_calls():
    p = PairLogps(PC, PR, LC, LR, RC, RR)
    direct = {
        "nca_pair": nca_pair_loss(PC, PR, RC, RR, beta=0.3),
        "sppo_hard": sppo_hard_loss(PC, PR, RC, RR, beta=0.3),
        "apo_zero": apo_zero_loss(PC, PR, RC, RR, beta=0.3),
        "apo_down": apo_down_loss(PC, PR, RC, RR, beta=0.3),
        "aot": aot_loss(PC, PR, RC, RR, beta=0.3, label_smoothing=0.1),
        "aot_unpaired": aot_unpaired_loss(PC, PR, RC, RR, beta=0.3, label_smoothing=0.1),
        "discopop": discopop_loss(PC, PR, RC, RR, beta=0.3, tau=0.1),
        "exo_pair": exo_pair_loss(PC, PR, RC, RR, beta=0.3, label_smoothing=0.1),
        "cpo": cpo_loss(PC, PR, LC, beta=0.3, alpha=0.5),
    }
    for name, expected in direct.items():
        got = preference_loss(name, p, beta=0.3, label_smoothing=0.1, discopop_tau=0.1, cpo_alpha=0.5)
        for a, b in zip(got, expected):
            close(a, b)


# ---------------------------------------------------------------------------------------------------
# Combinations


def test_combination_is_the_weighted_sum_of_its_terms():
    p = PairLogps(PC, PR, LC, LR, RC, RR)
    out = combined_preference_loss(["sigmoid", "ipo", "bco_pair"], [1.0, 0.5, 2.0], p, beta=0.1, bco_delta=0.02)
    parts = {n: preference_loss(n, p, beta=0.1, bco_delta=0.02)[0] for n in ("sigmoid", "ipo", "bco_pair")}
    close(out.losses, parts["sigmoid"] + 0.5 * parts["ipo"] + 2.0 * parts["bco_pair"])
    assert set(out.terms) == {"sigmoid", "ipo", "bco_pair"}
    for n, v in parts.items():
        close(out.terms[n], v)
    s = dpo_loss(PC, PR, RC, RR, beta=0.1)
    close(out.chosen_rewards, s[1])                               # rewards from the first term
    close(out.rejected_rewards, s[2])
    # hand value of pair 0: sp(−0.1) + 0.5·21.6225 + 2·(sp(−0.03) + sp(−0.07))
    close(out.losses[:1], [sp(-0.1) + 0.5 * 21.6225 + 2 * (sp(-0.03) + sp(-0.07))])
    # RPO once on the sum, logged as its own term
    rpo = combined_preference_loss(["sigmoid", "hinge"], None, p, beta=0.1, rpo_alpha=0.5)
    close(rpo.terms["rpo_nll"], [0.5, 0.75])
    close(rpo.losses, rpo.terms["sigmoid"] + rpo.terms["hinge"] + 0.5 * rpo.terms["rpo_nll"])
    # each term takes its own defaults: DiscoPOP β = 0.05 next to DPO's 0.1
    mix = combined_preference_loss(["sigmoid", "discopop"], [1.0, 1.0], p)
    close(mix.terms["discopop"], discopop_loss(PC, PR, RC, RR)[0])
    close(mix.terms["sigmoid"], dpo_loss(PC, PR, RC, RR)[0])


def test_combination_errors():
    p = PairLogps(PC, PR, LC, LR, RC, RR)
    with pytest.raises(ValueError, match="2 loss names but 1 weights"):
        combined_preference_loss(["sigmoid", "ipo"], [1.0], p)
    with pytest.raises(ValueError, match="at least one"):
        combined_preference_loss([], [], p)
    with pytest.raises(ValueError, match="distinct"):
        combined_preference_loss(["sigmoid", "sigmoid"], [1.0, 1.0], p)
    with pytest.raises(ValueError, match="finite and >= 0"):
        combined_preference_loss(["sigmoid", "ipo"], [1.0, -1.0], p)
    with pytest.raises(ValueError, match="finite and >= 0"):
        combined_preference_loss(["sigmoid"], [float("nan")], p)
    with pytest.raises(ValueError, match="unknown loss type 'ipoo'"):
        combined_preference_loss(["sigmoid", "ipoo"], [1.0, 1.0], p)
    with pytest.raises(ValueError, match="unknown loss options"):
        combined_preference_loss(["sigmoid"], None, p, betta=0.1)
    with pytest.raises(ValueError, match="bco_delta"):
        combined_preference_loss(["sigmoid", "bco_pair"], None, p)


# ---------------------------------------------------------------------------------------------------
# WPO weights


def test_wpo_token_normalizer_hand_value():
    # logits (0, ln 2, ln 3): π = (1, 2, 3)/6, Σπ² = 14/36
    z = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]], dtype=D)
    close(wpo_token_log_normalizer(z), [math.log(14 / 36)])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, dtype=D) * 3
    close(wpo_token_log_normalizer(logits), logits.softmax(-1).pow(2).sum(-1).log().reshape(-1).reshape(2, 5))
    # E_{v∼π}[π(v)/Σπ²] = 1: the alignment's point
    logp = logits.log_softmax(-1)
    aligned = logp - wpo_token_log_normalizer(logits)[..., None]
    close((logp.exp() * aligned.exp()).sum(-1), torch.ones(2, 5, dtype=D))
    bf = wpo_token_log_normalizer(logits.to(torch.bfloat16))
    assert bf.dtype == torch.float32


def test_wpo_weights_hand_value_and_use():
    # ā_w = −2/4 = −0.5, ā_l = −3/2 = −1.5: pair weight e^(−2) = 0.1353352832
    w = wpo_weights(t(-2.0, 0.2), t(4.0, 1.0), t(-3.0, 0.4), t(2.0, 2.0))
    close(w, [math.exp(-2.0), math.exp(0.2 + 0.2)])
    close(wpo_weights(t(-2.0, 0.2), t(4.0, 1.0), t(-3.0, 0.4), t(2.0, 2.0), max_weight=1.0),
          [math.exp(-2.0), 1.0])
    # detached, and the weighted loss's gradient is the weight times the loss's gradient
    a = t(-2.0, 0.2).requires_grad_(True)
    w = wpo_weights(a, t(4.0, 1.0), t(-3.0, 0.4), t(2.0, 2.0))
    assert not w.requires_grad
    pc = PC.clone().requires_grad_(True)
    (dpo_loss(pc, PR, RC, RR)[0] * w).sum().backward()
    close(pc.grad, w * (-0.1 * t(sig(-0.1), sig(0.2))))
    with pytest.raises(ValueError, match="max_weight"):
        wpo_weights(t(0.0), t(1.0), t(0.0), t(1.0), max_weight=0.0)


# ---------------------------------------------------------------------------------------------------
# Errors and exports


def test_user_errors():
    with pytest.raises(ValueError, match="label_smoothing must be in \\(0, 0.5\\]"):
        exo_pair_loss(PC, PR, RC, RR, label_smoothing=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        aot_loss(PC, PR, RC, RR, label_smoothing=0.6)
    with pytest.raises(ValueError, match="discopop_tau"):
        discopop_loss(PC, PR, RC, RR, tau=0.0)
    with pytest.raises(ValueError, match="orpo_lambda"):
        orpo_loss(PC, PR, LC, LR, lam=0.0)
    with pytest.raises(ValueError, match="cpo_alpha"):
        cpo_loss(PC, PR, LC, alpha=-1.0)
    with pytest.raises(ValueError, match="must be \\(B,\\)"):
        aot_loss(PC[None], PR[None], RC[None], RR[None])
    for fn in (exo_pair_loss, nca_pair_loss, sppo_hard_loss, apo_zero_loss, apo_down_loss, aot_loss,
               aot_unpaired_loss, discopop_loss):
        with pytest.raises(ValueError, match="beta"):
            fn(PC, PR, RC, RR, beta=0.0)
        with pytest.raises(ValueError, match="shape"):
            fn(PC, t(1.0), RC, RR)
    with pytest.raises(ValueError, match="beta"):
        bco_pair_loss(PC, PR, RC, RR, beta=-1.0, delta=0.0)
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss("nca_pair", PairLogps(PC, PR, LC, LR))
    with pytest.raises(ValueError, match="did you mean 'exo_pair'"):
        preference_loss("exo_pairs", PairLogps(PC, PR, LC, LR, RC, RR))


def test_package_exports():
    for name in ("combined_preference_loss", "exo_pair_loss", "orpo_loss", "wpo_weights", "kto_loss",
                 "bco_running_delta", "is_batch_level", "LOSS_REGISTRY"):
        assert hasattr(losses_pkg, name), name
    assert losses_pkg.orpo_loss is orpo_loss


def test_validate_loss_options_accepts_every_losss_defaults_and_raises_what_the_loss_raises():
    """The config layer's early check: every registered loss passes with its defaults (BCO without its
    running δ, AOT on a batch), and a value out of a loss's range raises that loss's own ValueError."""
    from dpolab.losses.dpo import validate_loss_options

    for name in PREFERENCE_LOSSES:
        validate_loss_options([name])
    validate_loss_options(list(PREFERENCE_LOSSES[:3]), rpo_alpha=0.5, beta=0.2)
    for names, options, message in [(["exo_pair"], {"label_smoothing": 0.0}, r"\(0, 0.5\] for exo_pair"),
                                     (["robust"], {"label_smoothing": 0.5}, r"\[0, 0.5\) for robust"),
                                     (["orpo"], {"orpo_lambda": 0.0}, "orpo_lambda must be > 0"),
                                     (["sigmoid"], {"rpo_alpha": -0.1}, "rpo_alpha must be >= 0"),
                                     (["ipo", "discopop"], {"discopop_tau": -1.0}, "discopop_tau must be > 0")]:
        with pytest.raises(ValueError, match=message):
            validate_loss_options(names, **options)
