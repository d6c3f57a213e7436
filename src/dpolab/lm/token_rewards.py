"""RLHF reward shaping and token-level advantages for language-model PPO: pure tensor functions.

Per-token rewards (Ziegler et al. 2019, arXiv 1909.08593, eq. 2; the seed deck's
R = r − β·KL(π‖π_ref)):

    R_t = −β · kl_t            on every response token (kl_t = k1 or k3 of log π_old vs log π_ref)
    R_T += r(x, y)             on the last real token (EOS, or the last token of a truncated response)

and advantages by the same GAE as the Gymnasium PPO (``dpolab.rl.advantages.gae``), one episode per
row. Used by ``dpolab.train.ppo``; tested in tests/test_ppo_lm_rewards.py and tests/test_ppo_theory.py.
"""

from __future__ import annotations

import torch

from dpolab.errors import ConfigError
from dpolab.rl.advantages import gae, shift_values

__all__ = ["explained_variance", "last_token_index", "masked_mean", "per_token_rewards", "shape_scores",
           "token_advantages"]


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True of each row of a (B, T) mask (any padding side). Returns (B,) long."""
    m = mask.bool()
    if not bool(m.any(dim=1).all()):
        raise ValueError("every row needs at least one real token")
    T = m.shape[1]
    return (T - 1) - m.flip(dims=[1]).long().argmax(dim=1)


def shape_scores(scores: torch.Tensor, finished: torch.Tensor, *, missing_eos_penalty: float | None = None,
                 reward_clip: float = 0.0) -> torch.Tensor:
    """Scores as PPO uses them: ``missing_eos_penalty`` subtracted where the response has no EOS
    (``finished`` False), then clipped to [−reward_clip, reward_clip] (0: no clipping). (B,) -> (B,)."""
    out = scores.clone()
    if missing_eos_penalty is not None:
        out = torch.where(finished.to(out.device), out, out - missing_eos_penalty)
    if reward_clip > 0:
        out = out.clamp(-reward_clip, reward_clip)
    return out


def per_token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                      *, kl_coef: float, kl_estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """RLHF rewards per response token: −β·kl_t on every real token, plus the scalar score on the
    last real token (never on a pad; the last generated token when the response has no EOS).

    Args: scores (B,); logps, ref_logps (B, T) log-probs of the sampled tokens under the rollout
    policy and the reference; mask (B, T) real response tokens (left or right padding).
    kl_t: k1 = log π − log π_ref, or k3 = (ρ − 1) − log ρ with ρ = π_ref/π (Schulman 2020 note).
    Returns ``(rewards, kl)``, both (B, T), zero where ``mask`` is 0.
    """
    from dpolab.losses.ppo import kl_k1, kl_k3

    estimators = {"k1": kl_k1, "k3": kl_k3}
    if kl_estimator not in estimators:
        raise ConfigError(f"unknown KL estimator {kl_estimator!r}; choose from {list(estimators)}")
    m = mask.to(logps.dtype)
    kl = estimators[kl_estimator](logps, ref_logps) * m
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def token_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
                     lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over response tokens, one episode per row that ends at the last real token.

    rewards, values, mask: (B, T). Calls :func:`dpolab.rl.advantages.gae` time-first as documented
    there (terminated at the last real token, masked elsewhere). Returns (advantages, returns), (B, T).
    """
    B = rewards.shape[0]
    terminated = torch.zeros_like(mask, dtype=torch.bool)
    terminated[torch.arange(B, device=mask.device), last_token_index(mask)] = True
    adv, ret = gae(rewards.T, values.T, shift_values(values.T), terminated.T, gamma=gamma, lam=lam,
                   mask=mask.T)
    return adv.T, ret.T


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var[G − V] / Var[G] over real tokens (1: perfect critic, 0: no better than a constant)."""
    var_ret = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_err = masked_mean((err - masked_mean(err, mask)) ** 2, mask)
    return float("nan") if var_ret == 0 else float(1 - var_err / var_ret)
