"""Bandit theory for the critic-free online methods: RLOO, GRPO (β = 0 and β > 0), online DPO.

The bandit of tests/test_ppo_theory.py: 3 prompts × 5 responses, the reward table ``REWARD``, a tabular
softmax policy (float64 logits per prompt), π_ref = softmax of random logits, the policy started at
π_ref. The optimum of max_π E_π[r] − β KL(π‖π_ref) is π* = π_ref·exp(r/β)/Z (DPO paper, arXiv
2305.18290, eq. 4). One response is one token, so a sequence log-prob is the token log-prob.

Only the pure functions of ``dpolab.losses`` are used (``grpo``, ``dpo.dpo_loss``, ``pg``); sampling
goes through a seeded ``torch.Generator``. docs/online-rl-theory.md derives every fixed point tested
here and tabulates the KL values (run ``pytest -s`` to see them printed).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dpolab.losses.dpo import dpo_loss
from dpolab.losses.grpo import (
    aggregate,
    group_advantages,
    grpo_token_loss,
    kl_shaped_rewards,
    rloo_advantages,
)
from dpolab.losses.pg import reinforce_loss

D = torch.float64
REWARD = torch.tensor([[1.0, 0.0, 0.5, -0.5, 0.2],
                       [0.0, 1.5, 0.3, 0.3, -1.0],
                       [-0.2, 0.4, 0.0, 1.2, 0.8]], dtype=D)
X, A = REWARD.shape
SEEDS = [0, 1, 2]  # the first is the one the other theory tests use; all three must pass


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row of (X, A) probability tables."""
    return (p * (p.log() - q.log())).sum(-1)


def _reference(seed: int) -> tuple[torch.Generator, torch.Tensor]:
    """The generator used for all sampling, and π_ref's logits (X, A) drawn from it first."""
    g = torch.Generator().manual_seed(seed)
    return g, torch.randn(X, A, generator=g, dtype=D)


def _pi_star(ref_logits: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.softmax(ref_logits + REWARD / beta, -1)  # π_ref·exp(r/β)/Z


def _sample(theta: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n responses per prompt from softmax(θ): (X, n) indices."""
    with torch.no_grad():
        return torch.multinomial(torch.softmax(theta, -1), n, replacement=True, generator=g)


def _linear_decay(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    # decaying the step size averages out the sampling noise near the fixed point
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / steps)


# ----------------------------------------------------------------------------------------------------
# a. RLOO with the KL-shaped reward


def _run_rloo(seed: int, beta: float = 0.5, k: int = 4, groups: int = 64, steps: int = 150,
              lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, ref_logits = _reference(seed)
    ref_logp = torch.log_softmax(ref_logits, -1)                            # (X, A)
    theta = ref_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    sched = _linear_decay(opt, steps)
    prompts = torch.arange(X)[:, None].expand(X, groups * k).reshape(-1)   # (N,), blocks of k per prompt
    for _ in range(steps):
        y = _sample(theta, groups * k, g).reshape(-1)                        # (N,)
        logp = torch.log_softmax(theta, -1)[prompts, y]                      # (N,)
        seq_kl = logp.detach() - ref_logp[prompts, y]                        # one token: the k1 log-ratio
        rewards = kl_shaped_rewards(REWARD[prompts, y], seq_kl, beta)
        adv = rloo_advantages(rewards, k)
        loss = reinforce_loss(logp, adv).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return torch.softmax(theta.detach(), -1), torch.softmax(ref_logits, -1), _pi_star(ref_logits, beta)


@pytest.mark.parametrize("seed", SEEDS)
def test_rloo_with_kl_shaped_reward_reaches_the_kl_regularised_optimum(seed):
    """E[(r̃(y) − b_i)∇log π(y)] with r̃ = r − β log(π/π_ref) and a baseline b_i independent of y_i is
    ∇(E_π r − β KL(π‖π_ref)) (the −β∇log π term from differentiating r̃ has mean E_π[∇log π] = 0), so
    RLOO's fixed point is π*."""
    pi, pi_ref, pi_star = _run_rloo(seed)
    start, end = _kl(pi_star, pi_ref), _kl(pi_star, pi)
    print(f"\nRLOO seed {seed}: KL(π*‖π_ref) = {start.numpy().round(4)}, KL(π*‖π) = {end.numpy().round(6)}")
    assert start.min() > 0.1, start  # the problem is not trivial
    assert end.max() < 0.01, f"KL(π*‖π) = {end} from KL(π*‖π_ref) = {start}"
    assert (end < 0.02 * start).all(), (end, start)


# ----------------------------------------------------------------------------------------------------
# b, c. GRPO


def _grpo_step_loss(theta: torch.Tensor, y: torch.Tensor, prompts: torch.Tensor, group: int,
                    ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """The GRPO loss of one on-policy batch (ratio 1): group-std advantages, clipped surrogate, β·k3."""
    logp = torch.log_softmax(theta, -1)[prompts, y][:, None]                 # (N, 1): one token each
    adv = group_advantages(REWARD[prompts, y], group, scale="group")
    ref = ref_logp[prompts, y][:, None] if beta > 0 else None
    per_token, _ = grpo_token_loss(logp, logp.detach(), ref, adv, beta=beta)
    return aggregate(per_token, torch.ones_like(per_token, dtype=torch.bool), "sequence")


def _run_grpo(seed: int, beta: float, group: int = 16, groups: int = 16, steps: int = 200,
              lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    g, ref_logits = _reference(seed)
    ref_logp = torch.log_softmax(ref_logits, -1)
    theta = ref_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    sched = _linear_decay(opt, steps)
    prompts = torch.arange(X)[:, None].expand(X, groups * group).reshape(-1)  # (N,), groups of G
    for _ in range(steps):
        y = _sample(theta, groups * group, g).reshape(-1)
        loss = _grpo_step_loss(theta, y, prompts, group, ref_logp, beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return torch.softmax(theta.detach(), -1), ref_logits


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_without_kl_puts_its_mass_on_the_best_response(seed):
    """β = 0: the expected update is ∝ π ⊙ (r − r̄_π)/σ_π, which raises every response above the mean
    until all mass sits on the argmax (there is no other fixed point with full support)."""
    pi, ref_logits = _run_grpo(seed, beta=0.0)
    best = pi[torch.arange(X), REWARD.argmax(-1)]
    print(f"\nGRPO β=0 seed {seed}: π(best) = {best.numpy().round(4)}")
    assert (best > 0.98).all(), (best, pi)  # measured ≥ 0.995 over seeds 0–11


# The fixed point of GRPO with β > 0 (docs/online-rl-theory.md). For one prompt, with y ~ π:
#   E[∇_θ k3(y)] = Σ_y π(y)(1 − π_ref(y)/π(y))(e_y − π) = π − π_ref      (∇ of the reverse KL(π_ref‖π));
#   E[Â ∇_θ log π(y)] = F_G(π), which for G → ∞ is π ⊙ (r − r̄_π)/σ_π.
# A stationary point has β(π − π_ref) = F_G(π); for G → ∞: π(y) = π_ref(y) / (1 − (r(y) − r̄_π)/(βσ_π)).


def _asymptotic_field(pi: torch.Tensor, reward: torch.Tensor = REWARD) -> torch.Tensor:
    """π ⊙ (r − r̄_π)/σ_π, (X, A): the expected advantage gradient of GRPO for G → ∞."""
    mean = (pi * reward).sum(-1, keepdim=True)
    std = (pi * (reward - mean) ** 2).sum(-1, keepdim=True).sqrt()
    return pi * (reward - mean) / std


def _compositions(group: int) -> torch.Tensor:
    """Every count vector n ∈ ℕ^A with Σn = G (stars and bars): (C, A), C = binom(G + A − 1, A − 1)."""
    rows = []
    for bars in itertools.combinations(range(group + A - 1), A - 1):
        edges = (-1, *bars, group + A - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(A)])
    return torch.tensor(rows, dtype=D)


def _exact_field(group: int):
    """F_G(π) = E[(1/G) Σ_i Â_i e_{y_i}] exactly, by enumerating every group of G samples as its
    counts n: P(n) = G!/Π n_a! Π π_a^{n_a}; the advantages come from ``group_advantages`` itself."""
    n = _compositions(group)                                                  # (C, A)
    log_coef = math.lgamma(group + 1) - torch.lgamma(n + 1).sum(-1)           # (C,)
    members = torch.repeat_interleave(torch.arange(A).expand(n.shape[0], A).reshape(-1),
                                      n.long().reshape(-1)).view(-1, group)    # (C, G) sorted responses
    first = torch.cumsum(n, -1) - n                                           # (C, A) where a's run starts
    adv = []
    for x in range(X):
        a_all = group_advantages(REWARD[x][members].reshape(-1), group, scale="group").view(-1, group)
        # all members of one response type share one advantage: read it at the start of its run
        adv.append(a_all.gather(1, first.long().clamp_max(group - 1)))        # (C, A)
    weight = n[None] * torch.stack(adv) / group                               # (X, C, A)

    def field(pi: torch.Tensor) -> torch.Tensor:
        prob = torch.exp(log_coef[None] + torch.xlogy(n[None], pi[:, None, :]).sum(-1))  # (X, C)
        return (prob[..., None] * weight).sum(1)                              # (X, A)
    return field


def _stationary_point(pi_ref: torch.Tensor, beta: float, field, tol: float = 1e-12) -> torch.Tensor:
    """Solve β(π − π_ref) = F(π) over softmax logits by the iteration θ ← θ − η·(β(1 − π_ref/π) − F/π)
    (the residual divided by π, a mirror-descent step); η halves whenever the residual grows."""
    theta, eta, last = pi_ref.log().clone(), 0.3, math.inf
    for _ in range(5000):
        pi = torch.softmax(theta, -1)
        res = beta * (pi - pi_ref) - field(pi)
        size = res.abs().max().item()
        if size < tol:
            return pi
        if size > last:
            eta /= 2
        last = size
        theta = theta - eta * res / pi
    raise AssertionError(f"fixed-point iteration did not converge: residual {size}")


def test_grpo_expected_gradient_matches_the_derivation():
    """Checks the two expectations above against the losses themselves, on a random policy."""
    _, ref_logits = _reference(0)
    pi_ref = torch.softmax(ref_logits, -1)
    theta = torch.randn(X, A, generator=torch.Generator().manual_seed(7), dtype=D, requires_grad=True)
    pi = torch.softmax(theta, -1).detach()
    # k3 term: Σ_y π(y) ∇k3(y), every response y enumerated with its probability as a fixed weight
    logp = torch.log_softmax(theta, -1).reshape(-1, 1)                       # (X·A, 1)
    per_token, _ = grpo_token_loss(logp, logp.detach(), pi_ref.log().reshape(-1, 1), torch.zeros(X * A, dtype=D),
                                   beta=1.0)
    (grad_k3,) = torch.autograd.grad((pi.reshape(-1, 1) * per_token).sum(), theta)
    torch.testing.assert_close(grad_k3, pi - pi_ref)
    # advantage term: the exact finite-G expectation approaches π ⊙ (r − r̄)/σ as G grows, error ~ 1/G
    limit = _asymptotic_field(pi)
    errors = [(_exact_field(G)(pi) - limit).abs().max().item() for G in (4, 8, 16)]
    print(f"\n|F_G − F_∞| for G = 4, 8, 16: {errors}")
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.3 * errors[0], errors
    # G = 2 by hand: a group {a, b}, a ≠ b, has probability 2π_aπ_b; with d = r_a − r_b its unbiased
    # std is |d|/√2 and Â_a = (d/2)/(|d|/√2 + eps), weighted by 1/G = ½, so
    # F_2(a) = Σ_b π_a π_b (d/2)/(|d|/√2 + eps)   (d = 0 gives 0: a tie teaches nothing)
    d = REWARD[:, :, None] - REWARD[:, None, :]                               # (X, A, A)
    hand = (pi[:, :, None] * pi[:, None, :] * (d / 2) / (d.abs() / math.sqrt(2) + 1e-4)).sum(-1)
    torch.testing.assert_close(_exact_field(2)(pi), hand)


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_with_kl_approaches_its_own_fixed_point_not_pi_star(seed):
    """GRPO with β·k3 and group-std advantages converges to the stationary point of its expected
    update, which is not π* (derivation in docs/online-rl-theory.md)."""
    beta, group = 1.0, 16
    pi, ref_logits = _run_grpo(seed, beta=beta, group=group)
    pi_ref, pi_star = torch.softmax(ref_logits, -1), _pi_star(ref_logits, beta)
    pi_inf = _stationary_point(pi_ref, beta, _asymptotic_field)               # G → ∞
    pi_g = _stationary_point(pi_ref, beta, _exact_field(group))               # the G used, exactly
    # the closed form of the G → ∞ fixed point holds at the solution
    mean = (pi_inf * REWARD).sum(-1, keepdim=True)
    std = (pi_inf * (REWARD - mean) ** 2).sum(-1, keepdim=True).sqrt()
    torch.testing.assert_close(pi_inf, pi_ref / (1 - (REWARD - mean) / (beta * std)))
    to_fp, to_inf, to_star = _kl(pi_g, pi), _kl(pi_inf, pi), _kl(pi_star, pi)
    fp_vs_star, finite_g = _kl(pi_star, pi_g), _kl(pi_inf, pi_g)
    print(f"\nGRPO β={beta} G={group} seed {seed}: KL(π_G‖π) = {to_fp.numpy().round(6)}, "
          f"KL(π_∞‖π) = {to_inf.numpy().round(6)}, KL(π*‖π) = {to_star.numpy().round(4)}; "
          f"KL(π*‖π_G) = {fp_vs_star.numpy().round(4)}, KL(π_∞‖π_G) = {finite_g.numpy().round(6)}")
    assert to_fp.max() < 5e-4, f"KL(π_G‖π) = {to_fp}"
    assert to_inf.max() < 1e-2, f"KL(π_∞‖π) = {to_inf} (finite-G shift KL(π_∞‖π_G) = {finite_g})"
    # the run resolves the finite-G shift: it lands on π_G, measurably off π_∞
    assert (to_fp < 0.2 * to_inf).all(), (to_fp, to_inf)
    assert fp_vs_star.max() > 0.03, f"KL(π*‖π_G) = {fp_vs_star}: the fixed point should differ from π*"
    assert to_star.max() > 10 * to_fp.max(), (to_star, to_fp)


def test_grpo_fixed_point_is_invariant_to_reward_scale():
    """Group-std advantages are invariant to r -> a·r + b (a > 0), hence so is GRPO's fixed point, while
    π* changes with the scale of r: π*'s temperature is β, GRPO's is β·σ_π."""
    _, ref_logits = _reference(0)
    pi_ref, scaled = torch.softmax(ref_logits, -1), 3.0 * REWARD + 1.0
    base = _stationary_point(pi_ref, 1.0, _asymptotic_field)
    moved = _stationary_point(pi_ref, 1.0, lambda p: _asymptotic_field(p, scaled))
    torch.testing.assert_close(moved, base)
    star_scaled = torch.softmax(ref_logits + scaled / 1.0, -1)
    assert _kl(star_scaled, _pi_star(ref_logits, 1.0)).min() > 0.1


# ----------------------------------------------------------------------------------------------------
# d. online DPO


def _run_online_dpo(seed: int, beta: float = 0.5, pairs: int = 256, steps: int = 200,
                    lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    g, ref_logits = _reference(seed)
    ref_logp = torch.log_softmax(ref_logits, -1)
    theta = ref_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    sched = _linear_decay(opt, steps)
    prompts = torch.arange(X)[:, None].expand(X, pairs).reshape(-1)          # (P,)
    ties = 0
    for _ in range(steps):
        y = _sample(theta, 2 * pairs, g).view(X, 2, pairs)
        y1, y2 = y[:, 0].reshape(-1), y[:, 1].reshape(-1)                    # (P,) each
        keep = y1 != y2                                                      # the same response twice: no preference
        ties += int((~keep).sum())
        p1 = torch.sigmoid(REWARD[prompts, y1] - REWARD[prompts, y2])        # Bradley-Terry
        first = torch.rand(p1.shape, generator=g, dtype=D) < p1
        chosen, rejected = torch.where(first, y1, y2)[keep], torch.where(first, y2, y1)[keep]
        x = prompts[keep]
        logp = torch.log_softmax(theta, -1)
        losses, _, _ = dpo_loss(logp[x, chosen], logp[x, rejected], ref_logp[x, chosen], ref_logp[x, rejected],
                                beta=beta)
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
        sched.step()
    return torch.softmax(theta.detach(), -1), torch.softmax(ref_logits, -1), _pi_star(ref_logits, beta), ties


@pytest.mark.parametrize("seed", SEEDS)
def test_online_dpo_reaches_the_kl_regularised_optimum(seed):
    """For each pair {y, y'}, the expected DPO loss −P(y≻y') log σ(βh) − P(y'≻y) log σ(−βh),
    h = log π(y)/π_ref(y) − log π(y')/π_ref(y'), is minimised at βh = r(y) − r(y') when the labels are
    Bradley-Terry in r. π* satisfies this for every pair at once, so it minimises the population
    loss under any pair distribution with full support — including pairs drawn from the current π."""
    pi, pi_ref, pi_star, ties = _run_online_dpo(seed)
    start, end = _kl(pi_star, pi_ref), _kl(pi_star, pi)
    print(f"\nonline DPO seed {seed}: KL(π*‖π_ref) = {start.numpy().round(4)}, KL(π*‖π) = {end.numpy().round(6)}, "
          f"ties skipped {ties}")
    assert ties > 0  # ties occur and are skipped, not labelled
    assert end.max() < 0.01, f"KL(π*‖π) = {end} from KL(π*‖π_ref) = {start}"
    assert (end < 0.05 * start).all(), (end, start)
