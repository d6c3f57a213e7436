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

The same bandit and pairs test the optima that IPO and KTO state for themselves:

3. IPO (Azar et al. 2023, arXiv 2310.12036, §5): with pairs drawn from μ = π_ref, the minimiser of
   the population IPO loss E[(h − 1/(2τ))²] is π_IPO(y|x) ∝ π_ref(y|x)·exp(p*(y ≻ μ|x)/τ), where
   p*(y ≻ μ|x) = Σ_y' μ(y'|x)·σ(r(x, y) − r(x, y')) (derived in `ipo_population_optimum`). On the
   finite data IPO is a least-squares problem whose solution we compute in closed form; trained IPO
   must land on it, and its distance to π_IPO must be sampling noise of the second-order size
   (sandwich covariance of the least-squares estimate). π_IPO is *not* the RLHF π* for the same τ.
4. KTO (Ethayarajh et al. 2024, arXiv 2402.01306): the paper states a property, not a closed form
   (Theorem 4.3: on contradictory preferences with a majority p for y_a, if
   p^(1/β)·π_ref(y_a) < (1 − p)^(1/β)·π_ref(y_b), DPO's optimum prefers the minority y_b while KTO's,
   with λ_D = λ_U, produces y_a only); `test_kto_theorem_contradictory_preferences` checks it. On the
   4-response bandit we derive KTO's fixed point (`kto_fixed_point`) and check that training reaches it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpolab.losses import (
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_mismatched_completions,
    kto_reference_point,
)

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


# ---------------------------------------------------------------------------------------------------
# IPO's regularised optimum

IPO_TAU = 0.25


def weighted_triples(x, yw, yl):
    """The distinct (x, y_w, y_l) of the pairs and their frequencies: the same loss, 500× cheaper."""
    triples, counts = torch.unique(torch.stack([x, yw, yl], dim=1), dim=0, return_counts=True)
    return (*triples.unbind(1), counts.to(D) / counts.sum())


def train_tabular(ref_logits, loss_fn, steps, lr=0.05):
    """Full-batch Adam (cosine schedule) on ``loss_fn(log π)`` from π = π_ref; returns (log π, first loss)."""
    theta = ref_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    first = None
    for _ in range(steps):
        loss = loss_fn(theta.log_softmax(-1))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return theta.detach().log_softmax(-1), first


def ipo_population_optimum(reward, log_ref, tau):
    """argmin of E_{y,y'∼μ}[(h − 1/(2τ))²] over tabular π, with μ = π_ref and BT labels σ(r − r').

    Write g(y) = log π(y)/π_ref(y) (free up to a constant per prompt), so h(y, y') = g(y) − g(y').
    Ordering each sampled pair as (y, y') with I = 1 if y wins, the loss is (g(y) − g(y') − (2I − 1)c)²
    with c = 1/(2τ); its expectation over I is minimised by the least-squares fit of g(y) − g(y') to
    c·(2p(y ≻ y') − 1) = (p(y ≻ y') − ½)/τ. Setting the derivative in g(z) to zero and using
    p(y ≻ z) = 1 − p(z ≻ y): E_{y∼μ}[g(z) − g(y) − (p(z ≻ y) − ½)/τ] = 0, i.e.
    g(z) = p*(z ≻ μ)/τ + const (the y = z term is 0, so drawing y1 ≠ y2 changes nothing).
    """
    pref = torch.sigmoid(reward[:, :, None] - reward[:, None, :])                    # (P, K, K): p(y ≻ y')
    win_vs_mu = (pref * log_ref.exp()[:, None, :]).sum(-1)                            # p*(y ≻ μ)
    return (log_ref + win_vs_mu / tau).log_softmax(-1), win_vs_mu


def ipo_empirical_optimum(log_ref, tx, tw, tl, weights, tau):
    """Closed-form minimiser of the weighted IPO loss on the data: per prompt, weighted least squares
    of g(y_w) − g(y_l) on the constant 1/(2τ) (gauge g[0] = 0)."""
    g = torch.zeros(P, K, dtype=D)
    for p in range(P):
        sel = tx == p
        rows = torch.zeros(int(sel.sum()), K, dtype=D)
        idx = torch.arange(rows.shape[0])
        rows[idx, tw[sel]] += 1
        rows[idx, tl[sel]] -= 1
        gram = (rows.T * weights[sel]) @ rows
        rhs = (rows.T * weights[sel]).sum(-1) / (2 * tau)
        g[p, 1:] = torch.linalg.solve(gram[1:, 1:], rhs[1:])
    return (log_ref + g).log_softmax(-1)


def ipo_expected_sampling_kl(g_pop, log_pop, x, yw, yl, tau):
    """Second-order E[KL(π_IPO‖π̂)] = mean_x ½·tr(Cov(ĝ_x)·(diag π − ππᵀ)), with Cov the sandwich
    (A⁻¹·Σ_i d_i d_iᵀ e_i²·A⁻¹, A = Σ_i d_i d_iᵀ) of the least-squares estimate on the N pairs,
    residuals e_i = 1/(2τ) − (g(y_w) − g(y_l)) at the population optimum."""
    total = 0.0
    for p in range(P):
        sel = x == p
        a, b = yw[sel], yl[sel]
        rows = torch.zeros(a.numel(), K, dtype=D)
        idx = torch.arange(a.numel())
        rows[idx, a] += 1
        rows[idx, b] -= 1
        resid = 1 / (2 * tau) - (g_pop[p, a] - g_pop[p, b])
        inv = torch.linalg.inv((rows.T @ rows)[1:, 1:])
        cov = torch.zeros(K, K, dtype=D)
        cov[1:, 1:] = inv @ ((rows.T * resid**2) @ rows)[1:, 1:] @ inv
        pi = log_pop[p].exp()
        total += 0.5 * torch.trace(cov @ (torch.diag(pi) - torch.outer(pi, pi))).item()
    return total / P


def test_ipo_reaches_its_regularised_optimum():
    reward, ref_logits, log_ref, x, yw, yl = make_problem()
    tx, tw, tl, weights = weighted_triples(x, yw, yl)

    def loss_fn(log_pi):
        losses = ipo_loss(log_pi[tx, tw], log_pi[tx, tl], log_ref[tx, tw], log_ref[tx, tl], beta=IPO_TAU)[0]
        return (weights * losses).sum()

    log_ipo, first_loss = train_tabular(ref_logits, loss_fn, steps=500)
    log_pop, win_vs_mu = ipo_population_optimum(reward, log_ref, IPO_TAU)
    log_emp = ipo_empirical_optimum(log_ref, tx, tw, tl, weights, IPO_TAU)
    log_rlhf = (log_ref + reward / IPO_TAU).log_softmax(-1)                          # RLHF π* at β = τ
    noise = ipo_expected_sampling_kl(win_vs_mu / IPO_TAU, log_pop, x, yw, yl, IPO_TAU)
    kl_emp, kl_pop = kl(log_emp, log_ipo).item(), kl(log_pop, log_ipo).item()
    kl_ref, kl_rlhf = kl(log_pop, log_ref).item(), kl(log_rlhf, log_ipo).item()
    msg = (f"KL(pi_emp||pi_ipo)={kl_emp:.3g}  KL(pi_IPO||pi_ipo)={kl_pop:.4g}  expected sampling KL={noise:.4g}  "
           f"KL(pi_IPO||pi_ref)={kl_ref:.4g}  KL(pi*_RLHF||pi_ipo)={kl_rlhf:.4g}")
    print("\n" + msg)

    assert abs(first_loss - (1 / (2 * IPO_TAU)) ** 2) < 1e-12, msg   # policy = reference: (1/(2τ))²
    assert abs(kl_emp) < 1e-10, msg                                  # the data's least-squares optimum
    assert kl_pop < 4 * noise, msg                                   # what is left is sampling noise
    assert kl_pop < 0.02 * kl_ref, msg                               # far from where it started
    assert kl_rlhf > 100 * kl_pop, msg                               # and not RLHF's π* for β = τ


# ---------------------------------------------------------------------------------------------------
# KTO: the paper's Theorem 4.3, and its fixed point on the bandit

KTO_BETA = 0.1  # the paper's default; β ≤ 1 makes the fixed point below unique


def test_kto_theorem_contradictory_preferences():
    """Ethayarajh et al., Theorem 4.3, on one prompt with y_a, y_b: a fraction p = 0.6 of the pairs
    says y_a ≻ y_b, the rest y_b ≻ y_a; π_ref(y_a) = 0.3, β = 1, so p^(1/β)·π_ref(y_a) = 0.18 <
    (1 − p)^(1/β)·π_ref(y_b) = 0.28. DPO's optimum π(a)/π(b) = (π_ref(a)/π_ref(b))·(p/(1−p))^(1/β)
    = 9/14 prefers the minority y_b; KTO (λ_D = λ_U) puts its mass on y_a."""
    p, beta = 0.6, 1.0
    log_ref = torch.tensor([0.3, 0.7], dtype=D).log()
    pair_w, pair_l = torch.tensor([0, 1]), torch.tensor([1, 0])                     # (a ≻ b), (b ≻ a)
    pair_weight = torch.tensor([p, 1 - p], dtype=D)

    def dpo_objective(log_pi):
        losses = dpo_loss(log_pi[pair_w], log_pi[pair_l], log_ref[pair_w], log_ref[pair_l], beta=beta)[0]
        return (pair_weight * losses).sum()

    # KTO sees each pair as a desirable y_w and an undesirable y_l; the mismatched completions of
    # the KL estimate follow the data's marginal over responses, ½ y_a + ½ y_b
    y = torch.tensor([0, 1, 1, 0])
    desirable = torch.tensor([True, False, True, False])
    weight = torch.tensor([p, p, 1 - p, 1 - p], dtype=D) / 2

    def kto_objective(log_pi):
        z0 = kto_reference_point(log_pi, log_ref)
        return (weight * kto_loss(log_pi[y], log_ref[y], desirable, z0, beta=beta)[0]).sum()

    pi_dpo = train_tabular(log_ref, dpo_objective, steps=800, lr=0.1)[0].exp()
    pi_kto = train_tabular(log_ref, kto_objective, steps=800, lr=0.1)[0].exp()
    odds = 0.3 / 0.7 * (p / (1 - p)) ** (1 / beta)
    msg = f"pi_DPO(a)={pi_dpo[0]:.6f} (theory {odds / (1 + odds):.6f})  pi_KTO(a)={pi_kto[0]:.6f}"
    print("\n" + msg)
    assert abs(pi_dpo[0].item() - odds / (1 + odds)) < 1e-6, msg
    assert pi_dpo[0] < 0.5 < 0.999 < pi_kto[0], msg


def kto_fixed_point(log_ref, net, beta):
    """KTO's fixed point on a tabular bandit, with z0 detached as in the paper.

    ``net(x, y) = λ_D·n_D(x, y) − λ_U·n_U(x, y)`` from the data's desirable/undesirable counts. With
    z0 held fixed, the loss of cell (x, y) is const − net·σ(β(ρ − z0)), so ∂L/∂ρ = −β·net·σ'(β(ρ − z0)):
    its sign is that of −net whatever ρ. Hence every response with net ≤ 0 is driven to π = 0
    (ρ → −∞), and as soon as one mismatched completion is such a response the batch estimate of the
    KL is −∞ and z0 = max(0, ·) = 0. On D+ = {net > 0} the softmax stationarity condition is
    net_y·σ'(βρ_y) = κ·π(y) for one κ per prompt, with Σ_{D+} π = 1 (the maximiser of the concave
    Σ_y net_y·σ(β·log(π(y)/π_ref(y))) over the simplex for β ≤ 1). For β ≤ 1, log σ'(βρ) − ρ is
    strictly decreasing, so ρ_y(κ) is unique and found by bisection, and κ by bisection on the mass.
    """
    support = net > 0
    ref = log_ref.exp()
    safe_net = torch.where(support, net, torch.ones_like(net))

    def rho_of(log_kappa):                                                           # (P,) -> (P, K)
        lo, hi = torch.full_like(net, -200.0), torch.full_like(net, 200.0)
        for _ in range(80):
            mid = (lo + hi) / 2
            f = safe_net.log() + F.logsigmoid(beta * mid) + F.logsigmoid(-beta * mid) - mid - log_kappa[:, None] - log_ref
            lo, hi = torch.where(f > 0, mid, lo), torch.where(f > 0, hi, mid)
        return (lo + hi) / 2

    a, b = torch.full((P,), -100.0, dtype=D), torch.full((P,), 100.0, dtype=D)
    for _ in range(80):
        m = (a + b) / 2
        mass = torch.where(support, ref * rho_of(m).exp(), torch.zeros_like(ref)).sum(-1)
        a, b = torch.where(mass > 1, m, a), torch.where(mass > 1, b, m)
    log_pi = torch.where(support, log_ref + rho_of((a + b) / 2), torch.full_like(ref, -math.inf))
    return log_pi, support


def test_kto_reaches_its_fixed_point_on_the_bandit():
    reward, ref_logits, log_ref, x, yw, yl = make_problem()
    n = x.numel()
    # the pairs as unpaired data: every chosen response desirable, every rejected one undesirable
    ux, uy = torch.cat([x, x]), torch.cat([yw, yl])
    desirable = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    cells, counts = torch.unique(torch.stack([ux, uy, desirable.long()], 1), dim=0, return_counts=True)
    cx, cy, cd = cells[:, 0], cells[:, 1], cells[:, 2].bool()
    cw = counts.to(D) / counts.sum()
    # the KL estimate's mismatched pairs: prompt i with the completion of example i + 1
    j = kto_mismatched_completions(2 * n)
    kl_cells, kl_counts = torch.unique(torch.stack([ux, uy[j]], 1), dim=0, return_counts=True)
    z0s = []

    def loss_fn(log_pi):
        logratio = (log_pi - log_ref)[kl_cells[:, 0], kl_cells[:, 1]]
        z0 = kto_reference_point(torch.repeat_interleave(logratio, kl_counts), torch.zeros(2 * n, dtype=D))
        z0s.append(z0.item())
        return (cw * kto_loss(log_pi[cx, cy], log_ref[cx, cy], cd, z0, beta=KTO_BETA)[0]).sum()

    log_kto, first_loss = train_tabular(ref_logits, loss_fn, steps=1500)
    net = torch.zeros(P, K, dtype=D)
    net.index_put_((x, yw), torch.ones(n, dtype=D), accumulate=True)
    net.index_put_((x, yl), -torch.ones(n, dtype=D), accumulate=True)                 # λ_D = λ_U = 1
    log_fp, support = kto_fixed_point(log_ref, net, KTO_BETA)
    fp = log_fp.exp()
    kl_fp = (fp * (log_fp - log_kto)).nan_to_num(0.0).sum(-1).mean().item()          # 0·log 0 = 0 off D+
    off_support = (log_kto.exp() * ~support).sum(-1).max().item()
    log_star = (log_ref + reward / KTO_BETA).log_softmax(-1)
    kl_star = kl(log_star, log_kto).item()
    msg = (f"KL(pi_fp||pi_kto)={kl_fp:.3g}  mass off D+={off_support:.3g}  z0: max {max(z0s):.3g}, last "
           f"{z0s[-1]:.3g}  KL(pi*_RLHF||pi_kto)={kl_star:.4g}  |D+| per prompt={support.sum(-1).tolist()}")
    print("\n" + msg)

    assert abs(first_loss - 0.5) < 1e-12, msg                       # policy = reference, z0 = 0: λ/2
    assert z0s[-1] == 0.0, msg                                       # the clamp is active at the fixed point
    assert off_support < 1e-6, msg                                   # net-undesirable responses vanish
    assert kl_fp < 1e-4, msg                                         # and the rest is the derived fixed point
    assert kl_star > 100 * kl_fp, msg                                # and it is not RLHF's π* at the same β
