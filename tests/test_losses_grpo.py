"""GRPO / Dr. GRPO / DAPO / RLOO maths (dpolab.losses.grpo): float64 hand values, micro-batch
equivalence of the aggregations, error cases and the policy-gradient limits."""

from __future__ import annotations

import math

import pytest
import torch

from dpolab.losses.grpo import (
    aggregate,
    group_advantages,
    grpo_token_loss,
    kl_shaped_rewards,
    rloo_advantages,
    token_weights,
    zero_std_fraction,
)
from dpolab.losses.pg import reinforce_loss

D = torch.float64
EPS = 1e-4


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


# ----------------------------------------------------------------------------------------------------
# advantages


def test_group_advantages_every_scale_by_hand():
    # G = 3, two groups: (1, 2, 3) and (0, 0, 3)
    r = t(1.0, 2.0, 3.0, 0.0, 0.0, 3.0)
    # group 1: mean 2, deviations (−1, 0, 1), unbiased var (1 + 0 + 1)/2 = 1, std 1
    # group 2: mean 1, deviations (−1, −1, 2), unbiased var (1 + 1 + 4)/2 = 3, std √3
    expected = torch.cat([t(-1.0, 0.0, 1.0) / (1 + EPS), t(-1.0, -1.0, 2.0) / (math.sqrt(3) + EPS)])
    torch.testing.assert_close(group_advantages(r, 3), expected)
    # batch: the group means are still subtracted; std over all six rewards: mean 1.5, squared
    # deviations .25 + .25 + 2.25 + 2.25 + 2.25 + 2.25 = 9.5, unbiased var 9.5/5 = 1.9
    centred = t(-1.0, 0.0, 1.0, -1.0, -1.0, 2.0)
    torch.testing.assert_close(group_advantages(r, 3, scale="batch"), centred / (math.sqrt(1.9) + EPS))
    # none (Dr. GRPO): the centred rewards themselves
    torch.testing.assert_close(group_advantages(r, 3, scale="none"), centred)
    # eps is an argument: with eps = 0, group 1 is exactly (−1, 0, 1)
    torch.testing.assert_close(group_advantages(r, 3, eps=0.0)[:3], t(-1.0, 0.0, 1.0))


def test_group_advantages_equal_rewards_give_exactly_zero_and_scale_invariance():
    # a group with one reward repeated: numerator 0, std 0 -> 0/(0 + eps) = 0, never NaN
    adv = group_advantages(t(2.0, 2.0, 0.0, 1.0), 2)
    torch.testing.assert_close(adv[:2], t(0.0, 0.0))
    # (0, 1): mean ½, std √((¼ + ¼)/1) = √½ -> ±½/(√½ + eps)
    torch.testing.assert_close(adv[2:], t(-0.5, 0.5) / (math.sqrt(0.5) + EPS))
    # group-std advantages do not change under r -> a·r + b, a > 0 (with eps = 0)
    r = torch.randn(12, generator=torch.Generator().manual_seed(0), dtype=D)
    torch.testing.assert_close(group_advantages(3 * r + 5, 4, eps=0.0), group_advantages(r, 4, eps=0.0))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="G = 1 has no group std.*G >= 2, or scale='none'"):
        group_advantages(t(1.0, 2.0), 1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(t(1.0, 2.0, 3.0), 2)
    with pytest.raises(ValueError, match=r"rewards\[2\] is nan"):
        group_advantages(t(1.0, 2.0, float("nan"), 0.0), 2)
    with pytest.raises(ValueError, match=r"rewards\[0\] is inf"):
        rloo_advantages(t(float("inf"), 2.0), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(t(1.0, 2.0), 2, scale="std")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2, dtype=D), 2)


def test_group_size_one_without_std_is_a_zero_advantage():
    # G = 1: every completion is its own group mean, so A ≡ 0 whatever the scale (no baseline from
    # other samples exists); GRPO with G = 1 does not learn.
    r = t(0.3, -1.0, 2.0)
    torch.testing.assert_close(group_advantages(r, 1, scale="none"), torch.zeros(3, dtype=D))
    torch.testing.assert_close(group_advantages(r, 1, scale="batch"), torch.zeros(3, dtype=D))


def test_zero_std_fraction():
    # G = 2: groups (1, 1), (0, 1), (5, 5) -> 2 of 3 all-equal
    assert zero_std_fraction(t(1.0, 1.0, 0.0, 1.0, 5.0, 5.0), 2) == pytest.approx(2 / 3)
    assert zero_std_fraction(t(0.0, 1.0, 2.0, 3.0), 4) == 0.0
    assert isinstance(zero_std_fraction(t(1.0, 1.0), 2), float)
    with pytest.raises(ValueError):
        zero_std_fraction(t(1.0, 1.0, 1.0), 2)


def test_rloo_advantages_by_hand_and_the_k_over_k_minus_one_identity():
    # k = 3. Block (3, 0, 0): 3 − (0+0)/2 = 3, 0 − (3+0)/2 = −1.5, −1.5.
    # Block (1, 2, 3):        1 − (2+3)/2 = −1.5, 2 − (1+3)/2 = 0, 3 − (1+2)/2 = 1.5.
    r = t(3.0, 0.0, 0.0, 1.0, 2.0, 3.0)
    adv = rloo_advantages(r, 3)
    torch.testing.assert_close(adv, t(3.0, -1.5, -1.5, -1.5, 0.0, 1.5))
    # A_i = k/(k−1)·(r_i − mean): the no-std group advantage scaled by 3/2
    torch.testing.assert_close(adv, 1.5 * group_advantages(r, 3, scale="none"))
    # k = 2: A = ±(r_1 − r_2)
    torch.testing.assert_close(rloo_advantages(t(1.0, 4.0), 2), t(-3.0, 3.0))
    with pytest.raises(ValueError, match="k must be >= 2"):
        rloo_advantages(r, 1)
    with pytest.raises(ValueError, match="multiple of k"):
        rloo_advantages(r, 4)


def test_kl_shaped_rewards():
    # scores (1, 0), summed log-ratios (0.5, −0.2), β = 0.1: 1 − 0.05 = 0.95, 0 + 0.02 = 0.02
    kl = t(0.5, -0.2).requires_grad_(True)
    out = kl_shaped_rewards(t(1.0, 0.0), kl, 0.1)
    torch.testing.assert_close(out, t(0.95, 0.02))
    assert not out.requires_grad  # a fixed REINFORCE weight
    with pytest.raises(ValueError):
        kl_shaped_rewards(t(1.0), t(1.0, 2.0), 0.1)
    with pytest.raises(ValueError):
        kl_shaped_rewards(t(1.0), t(1.0), -0.1)


# ----------------------------------------------------------------------------------------------------
# aggregation

MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)  # lengths 3, 1, 2
LOSS = t([1.0, 2.0, 3.0], [4.0, float("nan"), 9.0], [5.0, 6.0, float("inf")])  # padding holds junk


def test_token_weights_by_hand():
    w, units = token_weights(MASK, "sequence", dtype=D)
    torch.testing.assert_close(w, t([1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]))
    assert units == 3
    w, units = token_weights(MASK, "token", dtype=D)
    torch.testing.assert_close(w, MASK.to(D))
    assert units == 6
    w, units = token_weights(MASK, "constant", max_tokens=4, dtype=D)
    torch.testing.assert_close(w, MASK.to(D) / 4)
    assert units == 3
    assert token_weights(MASK, "token")[0].dtype == torch.get_default_dtype()


def test_a_masked_truncated_completion_stays_one_of_the_completions():
    """--mask-truncated-completions zeroes the tokens of row 1 (truncated): it has no loss, but it is
    still one of the G completions of 'sequence' and 'constant' (Dr. GRPO's 1/(G·L)); 'token' counts
    only the tokens that carry a loss. A filler row (not counted) still counts for nothing."""
    loss_mask = MASK.clone()
    loss_mask[1] = False
    counted = torch.tensor([True, True, True])
    for mode, units in (("sequence", 3), ("constant", 3), ("token", 5)):
        w, u = token_weights(loss_mask, mode, max_tokens=4, dtype=D, counted=counted)
        assert u == units and not w[1].any(), mode
        assert token_weights(loss_mask, mode, max_tokens=4, dtype=D)[1] == (units if mode == "token" else 2)
    # constant, L = 4, G = 3: (6/4 + 0 + 11/4)/3 = 17/12 (before: /2, as if G were 2)
    w, u = token_weights(loss_mask, "constant", max_tokens=4, dtype=D, counted=counted)
    assert (w * LOSS.masked_fill(~loss_mask, 0.0)).sum().item() / u == pytest.approx(17 / 12)
    filler = torch.zeros(1, 3, dtype=torch.bool)
    assert token_weights(torch.cat([loss_mask, filler]), "sequence", dtype=D,
                         counted=torch.cat([counted, torch.tensor([False])]))[1] == 3


def test_aggregate_by_hand():
    # sequence: row means 6/3 = 2, 4/1 = 4, 11/2 = 5.5 -> (2 + 4 + 5.5)/3 = 11.5/3
    assert aggregate(LOSS, MASK, "sequence").item() == pytest.approx(11.5 / 3)
    # token: (1 + 2 + 3 + 4 + 5 + 6)/6 = 3.5
    assert aggregate(LOSS, MASK, "token").item() == pytest.approx(3.5)
    # constant, L = 4: (6/4 + 4/4 + 11/4)/3 = 21/12 = 1.75
    assert aggregate(LOSS, MASK, "constant", max_tokens=4).item() == pytest.approx(1.75)


@pytest.mark.parametrize("mode", ["sequence", "token", "constant"])
def test_micro_batches_sum_to_the_whole_batch(mode):
    """Σ_pieces Σ w·ℓ / Σ_pieces units = the whole-batch value, for any split, for pieces padded to
    different lengths, and with an all-padding filler row added to one piece."""
    whole = aggregate(LOSS, MASK, mode, max_tokens=4)
    pieces = [(LOSS[:1], MASK[:1]), (LOSS[1:, :2], MASK[1:, :2])]  # second piece trimmed to T = 2
    filler = torch.zeros(1, 2, dtype=torch.bool)
    pieces[1] = (torch.cat([pieces[1][0], torch.ones(1, 2, dtype=D)]), torch.cat([pieces[1][1], filler]))
    total, units = torch.zeros((), dtype=D), 0
    for loss, mask in pieces:
        w, u = token_weights(mask, mode, max_tokens=4, dtype=D)
        total = total + (w * loss.masked_fill(~mask, 0.0)).sum()
        units += u
    assert units == (6 if mode == "token" else 3)
    torch.testing.assert_close(total / units, whole)


def test_aggregation_errors():
    with pytest.raises(ValueError, match="max_tokens"):
        token_weights(MASK, "constant")
    with pytest.raises(ValueError, match="more than max_tokens"):
        token_weights(MASK, "constant", max_tokens=2)
    with pytest.raises(ValueError, match="mode"):
        token_weights(MASK, "mean")
    with pytest.raises(ValueError, match="bool"):
        token_weights(MASK.long(), "token")
    with pytest.raises(ValueError, match="no real completion token"):
        aggregate(LOSS, torch.zeros_like(MASK), "token")
    with pytest.raises(ValueError, match="must match"):
        aggregate(LOSS[:, :2], MASK, "token")


# ----------------------------------------------------------------------------------------------------
# the token loss


def test_grpo_token_loss_hand_values_and_clip_fractions():
    # ε_low = ε_high = 0.2. ratios ρ and advantages A = (1, −1) per row:
    #   ρ=1.5, A=1 : −min(1.5, 1.2) = −1.2   high clip binds      -> clipfrac_high 1
    #   ρ=0.5, A=1 : −min(0.5, 0.8) = −0.5   outside, not binding  -> 0 (ppo's clipfrac would say 1)
    #   ρ=1.5, A=−1: −min(−1.5, −1.2) = 1.5  outside, not binding  -> 0
    #   ρ=0.7, A=−1: −min(−0.7, −0.8) = 0.8  low clip binds       -> clipfrac_low 1
    ratio = t([1.5, 0.5], [1.5, 0.7])
    old = torch.zeros(2, 2, dtype=D)
    adv = t(1.0, -1.0)
    loss, st = grpo_token_loss(ratio.log(), old, None, adv)
    torch.testing.assert_close(loss, t([-1.2, -0.5], [1.5, 0.8]))
    torch.testing.assert_close(st["clipfrac_high"], t([1.0, 0.0], [0.0, 0.0]))
    torch.testing.assert_close(st["clipfrac_low"], t([0.0, 0.0], [0.0, 1.0]))
    torch.testing.assert_close(st["clipfrac"], t([1.0, 0.0], [0.0, 1.0]))
    torch.testing.assert_close(st["ratio"], ratio)
    torch.testing.assert_close(st["kl"], torch.zeros(2, 2, dtype=D))
    # clip-higher ε_high = 0.6 (DAPO): ρ = 1.5 with A = 1 is now inside -> −1.5, nothing clipped high
    loss, st = grpo_token_loss(ratio.log(), old, None, adv, eps_high=0.6)
    assert loss[0, 0].item() == pytest.approx(-1.5)
    assert st["clipfrac_high"].sum().item() == 0.0
    # β = 0.1 with π_ref/π = ½ everywhere: k3 = ½ − log ½ − 1 = log 2 − ½ = 0.193147
    ref = ratio.log() - math.log(2.0)
    loss_kl, st = grpo_token_loss(ratio.log(), old, ref, adv, beta=0.1)
    k3 = math.log(2.0) - 0.5
    torch.testing.assert_close(st["kl"], torch.full((2, 2), k3, dtype=D))
    torch.testing.assert_close(loss_kl, t([-1.2, -0.5], [1.5, 0.8]) + 0.1 * k3)
    assert all(not v.requires_grad for v in st.values())


def test_grpo_clip_higher_keeps_the_low_clip_at_eps_low():
    # DAPO clip-higher, ε_low = 0.2, ε_high = 0.6: the range is [0.8, 1.6]. Rows A = (1, −1):
    #   ρ=1.7, A=1 : −min(1.7, 1.6) = −1.6     high clip binds -> clipfrac_high 1
    #   ρ=1.5, A=1 : −min(1.5, 1.5) = −1.5     inside          -> 0
    #   ρ=0.7, A=−1: −min(−0.7, −0.8) = 0.8    low clip binds  -> clipfrac_low 1 (1 − ε_high = 0.4 would say 0)
    #   ρ=1.5, A=−1: −min(−1.5, −1.5) = 1.5    inside          -> 0
    ratio = t([1.7, 1.5], [0.7, 1.5])
    loss, st = grpo_token_loss(ratio.log(), torch.zeros(2, 2, dtype=D), None, t(1.0, -1.0),
                               eps_low=0.2, eps_high=0.6)
    torch.testing.assert_close(loss, t([-1.6, -1.5], [0.8, 1.5]))
    torch.testing.assert_close(st["clipfrac_low"], t([0.0, 0.0], [1.0, 0.0]))
    torch.testing.assert_close(st["clipfrac_high"], t([1.0, 0.0], [0.0, 0.0]))
    torch.testing.assert_close(st["clipfrac"], t([1.0, 0.0], [1.0, 0.0]))


def test_grpo_token_loss_errors():
    z = torch.zeros(2, 3, dtype=D)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_token_loss(z, z, None, torch.zeros(2, dtype=D), beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_token_loss(z, z, None, torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match="beta"):
        grpo_token_loss(z, z, z, torch.zeros(2, dtype=D), beta=-1.0)
    with pytest.raises(ValueError, match="eps_high"):
        grpo_token_loss(z, z, None, torch.zeros(2, dtype=D), eps_high=0.0)
    with pytest.raises(ValueError, match="eps_low"):
        grpo_token_loss(z, z, None, torch.zeros(2, dtype=D), eps_low=0.0)


def _token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]  # (B, T)


@pytest.mark.parametrize("mode", ["sequence", "token", "constant"])
def test_grpo_gradient_at_ratio_one_is_the_policy_gradient(mode):
    """At ρ ≡ 1 and β = 0 the clipped surrogate's gradient is −A ∇log π per token, i.e. REINFORCE's
    with the same advantages and the same reduction."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 5, generator=g, dtype=D, requires_grad=True)  # (B, T, V) parameters
    tokens = torch.randint(0, 5, (4, 3), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    adv = group_advantages(t(1.0, 0.0, 0.5, 2.0), 2)
    logp = _token_logps(logits, tokens)
    per_token, st = grpo_token_loss(logp, logp.detach(), None, adv, eps_low=0.2, eps_high=0.28)
    assert st["clipfrac"].sum().item() == 0.0
    (g_grpo,) = torch.autograd.grad(aggregate(per_token, mask, mode, max_tokens=3), logits)
    pg = reinforce_loss(_token_logps(logits, tokens), adv[:, None].expand(4, 3))
    (g_pg,) = torch.autograd.grad(aggregate(pg, mask, mode, max_tokens=3), logits)
    torch.testing.assert_close(g_grpo, g_pg)
    assert g_pg.abs().sum() > 0


def test_group_of_one_without_std_gives_the_reinforce_gradient_of_its_zero_advantage():
    """G = 1, scale "none", β = 0: A ≡ 0 (each completion is its own baseline), so the GRPO gradient
    equals REINFORCE's with that advantage, which is zero."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, 4, generator=g, dtype=D, requires_grad=True)
    tokens = torch.randint(0, 4, (3, 2), generator=g)
    mask = torch.ones(3, 2, dtype=torch.bool)
    adv = group_advantages(t(0.7, -0.1, 1.3), 1, scale="none")
    logp = _token_logps(logits, tokens)
    per_token, _ = grpo_token_loss(logp, logp.detach(), None, adv)
    (g_grpo,) = torch.autograd.grad(aggregate(per_token, mask, "sequence"), logits)
    (g_pg,) = torch.autograd.grad(aggregate(reinforce_loss(_token_logps(logits, tokens), adv[:, None].expand(3, 2)),
                                            mask, "sequence"), logits)
    torch.testing.assert_close(g_grpo, g_pg)
    torch.testing.assert_close(g_grpo, torch.zeros_like(g_grpo))


def test_constant_normaliser_is_the_sequence_level_policy_gradient():
    """Dr. GRPO's point: with the constant L the gradient is (1/L)·(1/B) Σ_i A_i ∇log π(o_i), the
    policy gradient of whole sequences (log π(o_i) = Σ_t log π(o_it)), with no 1/|o_i| factor; the
    per-sequence mean ("sequence") has that factor."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3, 5, generator=g, dtype=D, requires_grad=True)
    tokens = torch.randint(0, 5, (4, 3), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    adv = group_advantages(t(1.0, 0.0, 0.5, 2.0), 2, scale="none")
    logp = _token_logps(logits, tokens)
    per_token, _ = grpo_token_loss(logp, logp.detach(), None, adv)
    (g_const,) = torch.autograd.grad(aggregate(per_token, mask, "constant", max_tokens=3), logits)
    seq_logp = (_token_logps(logits, tokens) * mask).sum(-1)                   # (B,)
    (g_seq,) = torch.autograd.grad(reinforce_loss(seq_logp, adv).mean() / 3, logits)
    torch.testing.assert_close(g_const, g_seq)
    (g_mean,) = torch.autograd.grad(aggregate(grpo_token_loss(_token_logps(logits, tokens), logp.detach(), None,
                                                              adv)[0], mask, "sequence"), logits)
    assert (g_mean - 3 * g_const).abs().max() > 1e-3  # unequal lengths: not a rescaling


def test_k3_term_vanishes_with_zero_gradient_at_the_reference():
    # k3 = π_ref/π − log(π_ref/π) − 1 = 0 at π = π_ref, and ∇k3 = (1 − π_ref/π)∇log π = 0 there
    x = torch.tensor([[0.3, -1.2]], dtype=D, requires_grad=True)
    loss, st = grpo_token_loss(x, x.detach(), x.detach(), torch.zeros(1, dtype=D), beta=0.5)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(st["kl"], torch.zeros(1, 2, dtype=D))
    torch.testing.assert_close(grad, torch.zeros(1, 2, dtype=D))
