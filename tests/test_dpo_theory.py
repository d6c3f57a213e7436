"""DPO on Bradley-Terry preferences from a known reward recovers π* = π_ref·exp(r/β)/Z.

Setup: 3 prompts × 4 responses, a known reward r(x, y), a random reference π_ref, β = 1. We sample
20,000 pairs (y1, y2) from π_ref (y1 ≠ y2), label them by Bradley-Terry, p(y1 ≻ y2) = σ(r1 − r2),
and train a tabular policy (one logit per (x, y)) with ``dpo_loss`` by full-batch Adam.

Theory (Rafailov et al. 2023, §4–5): the optimum of max_π E[r] − β·KL(π‖π_ref) is
π*(y|x) = π_ref(y|x)·exp(r(x, y)/β)/Z(x), and since β·log π/π_ref is a per-prompt reparametrisation
of the reward, the DPO optimum on finite data is π̂ = π_ref·exp(r̂/β)/Z with r̂ the Bradley-Terry
maximum-likelihood reward on the same pairs. So:

1. DPO must land on π̂ (fit by an independent route: L-BFGS on ``bradley_terry_loss``);
2. KL(π*‖π_DPO) must then be sampling noise only. Its expected size, to second order, is
   ½·tr(Cov(r̂)·(diag π* − π*π*ᵀ))/β² per prompt, with Cov(r̂) the inverse Bradley-Terry Fisher
   information (computed below). We assert KL(π*‖π_DPO) under 4× that, under 0.01 absolutely, and
   far below KL(π*‖π_ref), where training starts.
"""

from __future__ import annotations

import torch

from dpolab.losses import bradley_terry_loss, dpo_loss

D = torch.float64
P, K, BETA, N_PAIRS = 3, 4, 1.0, 20_000


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of KL(p‖q) for (P, K) log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def make_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    reward = 3 * torch.rand(P, K, generator=g, dtype=D) - 1.5                       # r ∈ [−1.5, 1.5]
    ref_logits = 0.5 * torch.randn(P, K, generator=g, dtype=D)
    log_ref = ref_logits.log_softmax(-1)                                             # (P, K)
    x = torch.randint(0, P, (2 * N_PAIRS,), generator=g)
    y1 = torch.multinomial(log_ref.exp()[x], 1, generator=g).squeeze(-1)
    y2 = torch.multinomial(log_ref.exp()[x], 1, generator=g).squeeze(-1)
    keep = (y1 != y2).nonzero().squeeze(-1)[:N_PAIRS]
    x, y1, y2 = x[keep], y1[keep], y2[keep]
    assert x.numel() == N_PAIRS
    p_first = torch.sigmoid(reward[x, y1] - reward[x, y2])                           # Bradley-Terry
    first_wins = torch.rand(N_PAIRS, generator=g, dtype=D) < p_first
    yw, yl = torch.where(first_wins, y1, y2), torch.where(first_wins, y2, y1)
    return reward, ref_logits, log_ref, x, yw, yl


def train_dpo(ref_logits, log_ref, x, yw, yl, steps=500):
    """Full-batch Adam on the mean ``dpo_loss`` over all pairs.

    The N pairs hold only P·K·(K−1) distinct triples (x, y_w, y_l), so the batch is evaluated as
    those triples weighted by their counts: the same loss and gradient, 500× cheaper per step."""
    triples, counts = torch.unique(torch.stack([x, yw, yl], dim=1), dim=0, return_counts=True)
    tx, tw, tl = triples.unbind(1)
    weights = counts.to(D) / counts.sum()
    theta = ref_logits.clone().requires_grad_(True)                                  # start at π = π_ref
    opt = torch.optim.Adam([theta], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    first_loss = None
    for _ in range(steps):
        log_pi = theta.log_softmax(-1)
        losses, _, _ = dpo_loss(log_pi[tx, tw], log_pi[tx, tl], log_ref[tx, tw], log_ref[tx, tl], beta=BETA)
        loss = (weights * losses).sum()
        first_loss = loss.item() if first_loss is None else first_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    log_pi = theta.detach().log_softmax(-1)
    per_pair = dpo_loss(log_pi[x, yw], log_pi[x, yl], log_ref[x, yw], log_ref[x, yl], beta=BETA)[0].mean()
    weighted = (weights * dpo_loss(log_pi[tx, tw], log_pi[tx, tl], log_ref[tx, tw], log_ref[tx, tl],
                                   beta=BETA)[0]).sum()
    assert abs(per_pair.item() - weighted.item()) < 1e-12  # the weighted triples are the per-pair batch
    return log_pi, first_loss


def fit_bradley_terry(x, yw, yl):
    """Maximum-likelihood Bradley-Terry reward r̂ (P, K) on the pairs (gauge: r̂[:, 0] = 0)."""
    free = torch.zeros(P, K - 1, dtype=D, requires_grad=True)
    opt = torch.optim.LBFGS([free], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        r = torch.cat([torch.zeros(P, 1, dtype=D), free], dim=1)
        loss = bradley_terry_loss(r[x, yw], r[x, yl]).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return torch.cat([torch.zeros(P, 1, dtype=D), free.detach()], dim=1)


def expected_sampling_kl(reward, log_ref, log_star, x, yw, yl):
    """Second-order E[KL(π*‖π̂)] = mean_x ½·tr(Cov(r̂_x)·(diag π* − π*π*ᵀ))/β², Cov = Fisher⁻¹ (gauge-fixed)."""
    total = 0.0
    for p in range(P):
        sel = x == p
        a, b = yw[sel], yl[sel]
        s = torch.sigmoid(reward[p, a] - reward[p, b])
        w = s * (1 - s)                                                              # per-pair information
        diff = torch.zeros(a.numel(), K, dtype=D)
        diff[torch.arange(a.numel()), a] += 1
        diff[torch.arange(a.numel()), b] -= 1
        fisher = (diff * w[:, None]).T @ diff                                        # (K, K), rank K−1
        cov = torch.zeros(K, K, dtype=D)
        cov[1:, 1:] = torch.linalg.inv(fisher[1:, 1:])                               # gauge r̂[0] = 0
        pi = log_star[p].exp()
        curvature = torch.diag(pi) - torch.outer(pi, pi)
        total += 0.5 * torch.trace(cov @ curvature).item() / BETA**2
    return total / P


def test_dpo_recovers_the_optimal_policy():
    reward, ref_logits, log_ref, x, yw, yl = make_problem()
    log_star = (log_ref + reward / BETA).log_softmax(-1)                             # π* ∝ π_ref·exp(r/β)

    log_dpo, first_loss = train_dpo(ref_logits, log_ref, x, yw, yl)
    r_hat = fit_bradley_terry(x, yw, yl)
    log_mle = (log_ref + r_hat / BETA).log_softmax(-1)                               # best fit from the data

    kl_dpo, kl_mle, kl_ref = kl(log_star, log_dpo).item(), kl(log_star, log_mle).item(), kl(log_star, log_ref).item()
    kl_dpo_to_mle = kl(log_mle, log_dpo).item()
    noise = expected_sampling_kl(reward, log_ref, log_star, x, yw, yl)
    print(f"\nKL(pi*||pi_ref)={kl_ref:.4g}  KL(pi*||pi_dpo)={kl_dpo:.4g}  KL(pi*||pi_mle)={kl_mle:.4g}  "
          f"expected sampling KL={noise:.4g}  KL(pi_mle||pi_dpo)={kl_dpo_to_mle:.2g}")

    assert abs(first_loss - 0.6931471805599453) < 1e-12        # policy = reference: loss ln 2
    assert kl_dpo_to_mle < 1e-5                                # DPO reached the empirical optimum
    assert kl_dpo < 4 * noise                                  # what is left is sampling noise
    assert kl_dpo < 0.01
    assert kl_dpo < 0.02 * kl_ref                              # far from where it started
    # the implicit reward β·log π/π_ref recovers r up to a per-prompt constant
    implicit = BETA * (log_dpo - log_ref)
    centred = lambda r: r - r.mean(-1, keepdim=True)           # noqa: E731
    assert (centred(implicit) - centred(reward)).abs().max() < 0.15
