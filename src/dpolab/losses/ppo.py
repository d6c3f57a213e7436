"""PPO losses (Schulman et al. 2017, arXiv 1707.06347), the clipped value loss and KL estimators.

Pure functions over per-sample log-probabilities of the taken actions (any shape, all equal), so
the same code serves the Gymnasium PPO (one sample per environment step) and the language-model
PPO (one sample per response token, reduced with a mask by the caller). They return unreduced
per-element losses and detached per-element stats; the loop reduces.

KL estimators follow J. Schulman, "Approximating KL Divergence" (2020 note): with samples x ~ p
and r = q(x)/p(x), ``k1 = −log r`` (unbiased, high variance, can be negative), ``k2 = ½(log r)²``
(biased, low variance) and ``k3 = (r − 1) − log r`` (unbiased, always ≥ 0), all estimating KL(p‖q).
"""

from __future__ import annotations

import torch

from dpolab.losses._common import check_shapes
from dpolab.losses.pg import entropy_from_logits

__all__ = [
    "AdaptiveKLController", "FixedKLController", "clipped_value_loss", "entropy_from_logits",
    "kl_k1", "kl_k2", "kl_k3", "ppo_clip_loss", "ppo_kl_penalty_loss",
]


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log p(x) − log q(x) for x ~ p: estimates KL(p‖q) with p = ``logp``'s distribution."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log q(x) − log p(x))² for x ~ p (biased, low variance)."""
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r − 1) − log r, r = q(x)/p(x), for x ~ p: unbiased for KL(p‖q) and never negative."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  clip_eps: float = 0.2,
                  clip_eps_high: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, PPO paper eq. 7, as a loss per element:

        −min(r_t Â_t, clip(r_t, 1 − ε, 1 + ε_high) Â_t),   r_t = π_θ(a_t|s_t) / π_θold(a_t|s_t)

    ``clip_eps_high`` defaults to ``clip_eps`` (the paper's symmetric clip). With r ≡ 1 the gradient
    equals the vanilla policy gradient −Â ∇log π_θ (tested).

    Returns ``(loss, stats)``; stats (detached, per element): ``ratio``; ``clipfrac`` (1.0 where r lies
    outside [1 − ε, 1 + ε_high], the usual definition); ``approx_kl`` = k3 estimate of
    KL(π_old‖π_θ) = (r − 1) − log r.
    """
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if not high > 0:
        raise ValueError(f"clip_eps_high must be > 0, got {clip_eps_high}")
    check_shapes(logp=logp, old_logp=old_logp, advantages=advantages)
    log_ratio = logp - old_logp.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * adv
    loss = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "ratio": ratio.detach(),
            "clipfrac": ((ratio < 1.0 - clip_eps) | (ratio > 1.0 + high)).to(logp.dtype),
            "approx_kl": torch.expm1(log_ratio) - log_ratio,
        }
    return loss, stats


def ppo_kl_penalty_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, beta: float,
                        kl: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL-penalised surrogate, PPO paper eq. 8, as a loss per element:

        −(r_t Â_t − β KL[π_θold(·|s_t) ‖ π_θ(·|s_t)])

    ``kl``: the exact per-state KL if the caller has it (e.g. from both logits); otherwise the k3
    estimate from the taken action, (r − 1) − log r with r = π_θ/π_θold, which is unbiased under
    a ~ π_θold and has the right gradient at r = 1 (zero). Returns ``(loss, stats)`` with detached
    per-element ``ratio`` and ``kl``.
    """
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    check_shapes(logp=logp, old_logp=old_logp, advantages=advantages, **({} if kl is None else {"kl": kl}))
    log_ratio = logp - old_logp.detach()
    ratio = torch.exp(log_ratio)
    if kl is None:
        kl = torch.expm1(log_ratio) - log_ratio
    loss = -(ratio * advantages.detach() - beta * kl)
    return loss, {"ratio": ratio.detach(), "kl": kl.detach()}


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pessimistic clipped value loss (the PPO reference implementation, "baselines" ppo2):

        max((V_θ − G)², (V_old + clip(V_θ − V_old, −ε, ε) − G)²)

    per element, no ½ factor (see :func:`dpolab.losses.pg.value_loss`). Stats: ``vf_clipfrac``
    (1.0 where the clipped branch is the larger one).
    """
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    check_shapes(values=values, old_values=old_values, returns=returns)
    returns, old_values = returns.detach(), old_values.detach()
    unclipped = (values - returns) ** 2
    v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    clipped = (v_clip - returns) ** 2
    loss = torch.maximum(unclipped, clipped)
    return loss, {"vf_clipfrac": (clipped > unclipped).to(values.dtype).detach()}


class FixedKLController:
    """A constant penalty coefficient β (the PPO paper's "fixed KL penalty" rows of Table 1)."""

    def __init__(self, beta: float):
        self.beta = float(beta)

    def update(self, kl: float) -> float:
        return self.beta


class AdaptiveKLController:
    """Adaptive β, PPO paper section 4: after each policy update, with d = the measured KL,

        d < d_targ / 1.5  ->  β ← β / 2;      d > d_targ × 1.5  ->  β ← β × 2;   else unchanged.

    The paper notes 1.5 and 2 are heuristic and the result is insensitive to them; both are arguments.
    """

    def __init__(self, init_beta: float, target_kl: float, tolerance: float = 1.5, factor: float = 2.0):
        if target_kl <= 0 or init_beta < 0 or tolerance <= 1 or factor <= 1:
            raise ValueError("AdaptiveKLController needs target_kl > 0, init_beta >= 0, tolerance > 1, factor > 1")
        self.beta, self.target_kl = float(init_beta), float(target_kl)
        self.tolerance, self.factor = float(tolerance), float(factor)

    def update(self, kl: float) -> float:
        """Adjust β from the KL measured over the last update; returns the new β."""
        if kl < self.target_kl / self.tolerance:
            self.beta /= self.factor
        elif kl > self.target_kl * self.tolerance:
            self.beta *= self.factor
        return self.beta
