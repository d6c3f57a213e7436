"""The finite-response check of the theory, as the demo reports it.

A contextual bandit with P prompts and K responses each, a known reward r(x, y) and a reference
π_ref. The KL-regularised objective max_π E[r] − β·KL(π‖π_ref) has the closed-form optimum
π*(y|x) = π_ref(y|x)·exp(r(x, y)/β)/Z(x) (Rafailov et al. 2023, eq. 4). Two tabular policies (one
logit per (x, y)) are trained with the library's own losses and must approach it:

- DPO: ``dpolab.losses.dpo.dpo_loss`` on pairs y1, y2 ~ π_ref labelled by Bradley-Terry with r;
- PPO: ``dpolab.losses.ppo.ppo_clip_loss`` on single-step episodes y ~ π with the RLHF reward
  R = r − β·(log π − log π_ref) (seed deck; Ziegler et al. 2019), advantages from
  ``dpolab.rl.advantages.gae`` (T = 1, so Â = R − V) with a learned per-prompt value.

Both report KL(π*‖π); the starting point π = π_ref has KL(π*‖π_ref).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpolab.losses.dpo import dpo_loss
from dpolab.losses.ppo import ppo_clip_loss
from dpolab.rl.advantages import gae

D = torch.float64


@dataclass
class Bandit:
    reward: torch.Tensor    # (P, K) r(x, y)
    log_ref: torch.Tensor   # (P, K) log π_ref(y|x)

    def optimal(self, beta: float) -> torch.Tensor:
        """log π* = log softmax(log π_ref + r/β), (P, K)."""
        return (self.log_ref + self.reward / beta).log_softmax(-1)


def make_bandit(n_prompts: int = 3, n_responses: int = 5, seed: int = 0) -> Bandit:
    g = torch.Generator().manual_seed(seed)
    reward = 2 * torch.rand(n_prompts, n_responses, generator=g, dtype=D) - 1
    log_ref = (0.5 * torch.randn(n_prompts, n_responses, generator=g, dtype=D)).log_softmax(-1)
    return Bandit(reward, log_ref)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Mean over prompts of KL(p‖q) for (P, K) log-probabilities."""
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def train_dpo(bandit: Bandit, beta: float, *, n_pairs: int = 20_000, steps: int = 400, seed: int = 0) -> torch.Tensor:
    """Tabular DPO on Bradley-Terry preferences from ``bandit.reward``; returns log π (P, K)."""
    g = torch.Generator().manual_seed(seed)
    P, K = bandit.reward.shape
    x = torch.randint(0, P, (n_pairs,), generator=g)
    ref = bandit.log_ref.exp()[x]
    y1 = torch.multinomial(ref, 1, generator=g).squeeze(-1)
    y2 = torch.multinomial(ref, 1, generator=g).squeeze(-1)
    keep = y1 != y2
    x, y1, y2 = x[keep], y1[keep], y2[keep]
    first = torch.rand(x.numel(), generator=g, dtype=D) < torch.sigmoid(bandit.reward[x, y1] - bandit.reward[x, y2])
    yw, yl = torch.where(first, y1, y2), torch.where(first, y2, y1)
    # The pairs hold few distinct (x, y_w, y_l) triples: weight them by count (same loss, far cheaper).
    triples, counts = torch.unique(torch.stack([x, yw, yl], 1), dim=0, return_counts=True)
    tx, tw, tl = triples.unbind(1)
    weights = counts.to(D) / counts.sum()
    theta = bandit.log_ref.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        lp = theta.log_softmax(-1)
        losses, _, _ = dpo_loss(lp[tx, tw], lp[tx, tl], bandit.log_ref[tx, tw], bandit.log_ref[tx, tl], beta=beta)
        opt.zero_grad()
        (weights * losses).sum().backward()
        opt.step()
        sched.step()
    return theta.detach().log_softmax(-1)


def train_ppo(bandit: Bandit, beta: float, *, iterations: int = 300, samples: int = 256, epochs: int = 4,
              lr: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Tabular PPO against R = r − β·(log π − log π_ref); returns log π (P, K)."""
    g = torch.Generator().manual_seed(seed)
    P, K = bandit.reward.shape
    theta = bandit.log_ref.clone().requires_grad_(True)
    value = torch.zeros(P, dtype=D, requires_grad=True)
    opt = torch.optim.Adam([theta, value], lr=lr)
    for _ in range(iterations):
        with torch.no_grad():
            lp = theta.log_softmax(-1)
            x = torch.randint(0, P, (samples,), generator=g)
            y = torch.multinomial(lp.exp()[x], 1, generator=g).squeeze(-1)
            old_logp = lp[x, y]
            R = bandit.reward[x, y] - beta * (old_logp - bandit.log_ref[x, y])       # k1 penalty per sample
            # one-step episodes: (T=1, N=samples), terminated after the single action
            adv, ret = gae(R[None], value[x][None], torch.zeros(1, samples, dtype=D),
                           torch.ones(1, samples, dtype=torch.bool), gamma=1.0, lam=1.0)
            adv = adv[0]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        for _ in range(epochs):
            new_logp = theta.log_softmax(-1)[x, y]
            pg, _ = ppo_clip_loss(new_logp, old_logp, adv, clip_eps=0.2)
            v_loss = (value[x] - ret[0]) ** 2
            loss = pg.mean() + 0.5 * v_loss.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return theta.detach().log_softmax(-1)


def run_bandit_check(beta: float = 0.5, *, seed: int = 0, quick: bool = False) -> dict[str, float]:
    """Train DPO and PPO on one bandit; return KL(π*‖π) for each and for the reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation
    try:
        bandit = make_bandit(seed=seed)
        log_star = bandit.optimal(beta)
        log_dpo = train_dpo(bandit, beta, n_pairs=5_000 if quick else 20_000, steps=200 if quick else 400, seed=seed)
        log_ppo = train_ppo(bandit, beta, iterations=150 if quick else 400, seed=seed)
    finally:
        torch.set_num_threads(threads)
    return {"beta": beta, "kl_star_ref": kl(log_star, bandit.log_ref), "kl_star_dpo": kl(log_star, log_dpo),
            "kl_star_ppo": kl(log_star, log_ppo),
            "reward_star": float((log_star.exp() * bandit.reward).sum(-1).mean()),
            "reward_dpo": float((log_dpo.exp() * bandit.reward).sum(-1).mean()),
            "reward_ppo": float((log_ppo.exp() * bandit.reward).sum(-1).mean())}
