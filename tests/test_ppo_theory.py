"""PPO with a fixed KL penalty reaches the closed-form optimum of the KL-regularised objective.

For max_π E_{y~π}[r(x, y)] − β KL(π(·|x) ‖ π_ref(·|x)) the optimum is
π*(y|x) = π_ref(y|x) exp(r(x, y)/β) / Z(x) (the seed lecture's eq. 12-14; DPO paper eq. 4).
We check it on a bandit: 3 prompts × 5 responses, a tabular softmax policy, single-step episodes,
and exactly the pieces the LM trainer uses: ``per_token_rewards`` (score on the last (only) token,
−β·k1 penalty), ``token_advantages`` (``dpolab.rl.advantages.gae``), ``whiten``, ``ppo_clip_loss``
and ``clipped_value_loss``.
"""

from __future__ import annotations

import torch

from dpolab.lm.token_rewards import masked_mean, per_token_rewards, token_advantages
from dpolab.losses.ppo import clipped_value_loss, ppo_clip_loss
from dpolab.rl.advantages import whiten

BETA = 0.5
REWARD = torch.tensor([[1.0, 0.0, 0.5, -0.5, 0.2],
                       [0.0, 1.5, 0.3, 0.3, -1.0],
                       [-0.2, 0.4, 0.0, 1.2, 0.8]], dtype=torch.float64)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row of (X, A) probability tables."""
    return (p * (p.log() - q.log())).sum(-1)


def _run_ppo(iterations: int = 60, n_per_prompt: int = 256, epochs: int = 4, minibatch: int = 192,
             lr: float = 0.05, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X, A = REWARD.shape
    ref_logits = torch.randn(X, A, generator=g, dtype=torch.float64)
    ref_logp_table = torch.log_softmax(ref_logits, -1)
    theta = ref_logits.clone().requires_grad_(True)       # PPO starts from the reference
    v_table = torch.zeros(X, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta, v_table], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / (iterations * epochs * 4))
    prompts = torch.arange(X).repeat_interleave(n_per_prompt)  # (B,)
    B = prompts.numel()
    mask = torch.ones(B, 1, dtype=torch.bool)              # one "token" per episode
    for _ in range(iterations):
        with torch.no_grad():
            logp_table = torch.log_softmax(theta, -1)
            actions = torch.multinomial(logp_table.exp()[prompts], 1, generator=g).squeeze(1)  # (B,)
            old_logp = logp_table[prompts, actions].unsqueeze(1)       # (B, 1)
            ref_logp = ref_logp_table[prompts, actions].unsqueeze(1)
            old_values = v_table[prompts].unsqueeze(1)
            rewards, _ = per_token_rewards(REWARD[prompts, actions], old_logp, ref_logp, mask, kl_coef=BETA)
            adv, ret = token_advantages(rewards, old_values, mask, gamma=1.0, lam=0.95)
            adv = whiten(adv, mask)
        for _ in range(epochs):
            perm = torch.randperm(B, generator=g)
            for start in range(0, B, minibatch):
                rows = perm[start:start + minibatch]
                logp = torch.log_softmax(theta, -1)[prompts[rows], actions[rows]].unsqueeze(1)
                values = v_table[prompts[rows]].unsqueeze(1)
                pg, _ = ppo_clip_loss(logp, old_logp[rows], adv[rows], 0.2)
                vf, _ = clipped_value_loss(values, old_values[rows], ret[rows], 0.2)
                loss = masked_mean(pg, mask[rows]) + 0.5 * masked_mean(vf, mask[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    pi = torch.softmax(theta.detach(), -1)
    pi_ref = ref_logp_table.exp()
    pi_star = pi_ref * torch.exp(REWARD / BETA)
    pi_star = pi_star / pi_star.sum(-1, keepdim=True)
    return pi, pi_ref, pi_star, v_table.detach()


def test_ppo_with_fixed_kl_penalty_approaches_the_closed_form_optimum():
    pi, pi_ref, pi_star, values = _run_ppo()
    kl_to_opt = _kl(pi_star, pi)          # (X,)
    kl_ref_to_opt = _kl(pi_star, pi_ref)  # (X,) where PPO started
    assert kl_ref_to_opt.min() > 0.25, kl_ref_to_opt  # the problem is not trivial
    assert kl_to_opt.max() < 0.005, (kl_to_opt, pi, pi_star)  # measured ≤ 4e-5
    assert (kl_to_opt < 0.05 * kl_ref_to_opt).all()
    # The critic learns the value of the regularised objective under π: E_π[r] − β KL(π‖π_ref),
    # which at π* equals β log Z(x).
    target = (pi * REWARD).sum(-1) - BETA * _kl(pi, pi_ref)
    assert torch.allclose(values, target, atol=0.05), (values, target)
