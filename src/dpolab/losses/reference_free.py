"""Preference losses without a reference model: reference-free DPO, SimPO, ORPO and CPO.

Inputs are the policy's summed response log-probs ``(B,)`` and, where a loss averages per token,
the response token counts ``(B,)`` (float or integer, clamped to ≥ 1 so that an empty response,
whose summed log-prob is 0, cannot divide by zero). ``ℓ̄ = log π_θ(y|x)/|y|`` is the mean token
log-prob. Outputs ``(losses, chosen_rewards, rejected_rewards)``, unreduced, rewards detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpolab.losses._common import LossOutput, check_beta, check_shapes, log1mexp, token_mean

SIMPO_BETA, SIMPO_GAMMA = 2.0, 1.0  # Meng et al. 2024: β in [2, 2.5], γ/β = 0.5
ORPO_LAMBDA = 0.1                   # Hong et al. 2024: λ of their main experiments
CPO_BETA, CPO_ALPHA = 0.1, 1.0      # Xu et al. 2024: β = 0.1, L_prefer + L_NLL with weight 1


def reference_free_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, *,
                            beta: float = 0.1) -> LossOutput:
    """Reference-free DPO: DPO with a uniform reference, ``−log σ(β[log π_θ(y_w) − log π_θ(y_l)])``.

    (The ``reference_free`` option of the DPO authors' code, Rafailov et al. 2023.) Rewards are
    ``β·log π_θ(y|x)``, detached; shapes as ``dpo_loss``.
    """
    check_beta(beta)
    check_shapes(policy_chosen_logps, policy_rejected_logps)
    losses = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps))
    return losses, (beta * policy_chosen_logps).detach(), (beta * policy_rejected_logps).detach()


def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
               rejected_lengths: Tensor, *, beta: float = SIMPO_BETA, gamma: float = SIMPO_GAMMA) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734): ``−log σ(β·ℓ̄_w − β·ℓ̄_l − γ)``.

    ``ℓ̄ = log π_θ(y|x) / |y|`` is the mean token log-prob (summed log-prob over the response token
    count) and ``γ`` the target reward margin. No reference model. Defaults: the paper's β = 2.0 and
    γ = 1.0 (γ/β = 0.5; the paper tunes β in [2, 2.5] and γ in [0.5, 1.5]). Lengths ``(B,)`` (float or
    integer) are clamped to at least 1 so that an empty response cannot divide by zero (its summed
    log-prob is 0). Rewards ``β·ℓ̄``, detached.
    """
    check_beta(beta)
    check_shapes(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    mean_w = token_mean(policy_chosen_logps, chosen_lengths)
    mean_l = token_mean(policy_rejected_logps, rejected_lengths)
    losses = -F.logsigmoid(beta * mean_w - beta * mean_l - gamma)
    return losses, (beta * mean_w).detach(), (beta * mean_l).detach()


def log_odds(mean_logps: Tensor) -> Tensor:
    """``log(p/(1 − p))`` for ``p = exp(ℓ̄)``, i.e. ``ℓ̄ − log(1 − e^ℓ̄)``, stable as p → 0 and p → 1.

    ``log(1 − e^ℓ̄)`` goes through ``log1mexp`` (expm1 near p = 1, log1p near p = 0): at ℓ̄ = −1e-10
    the naive ``log(1 − exp(ℓ̄))`` is off by 8e-8 in float64 and is −inf in float32, log1mexp is
    exact to rounding in float64 and within 1e-6 in float32. ℓ̄ is clamped
    to at most ``−tiny`` (the dtype's smallest normal number): at p = 1 exactly (or a rounding error
    above it) the odds would be infinite; there the clamp gives a large finite value and no gradient.
    """
    x = mean_logps.clamp(max=-torch.finfo(mean_logps.dtype).tiny)
    return x - log1mexp(x)


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
              rejected_lengths: Tensor, *, lam: float = ORPO_LAMBDA) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, eqs. 6–7), reference-free::

        −ℓ̄_w − λ·log σ(log odds(y_w) − log odds(y_l)),   odds(y) = p/(1 − p),  p = exp(ℓ̄)

    The first term is the chosen response's mean token NLL (the SFT loss), the second the odds-ratio
    loss ``L_OR`` weighted by λ (default 0.1, the paper's). Log-odds via :func:`log_odds`. Rewards
    ``λ·ℓ̄`` (detached), the quantity TRL's ORPO trainer logs; the chosen and rejected log-odds
    order the pair the same way, since log odds is increasing in ℓ̄. β is not used.
    """
    check_beta(lam, "orpo_lambda")
    check_shapes(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    mean_w = token_mean(policy_chosen_logps, chosen_lengths)
    mean_l = token_mean(policy_rejected_logps, rejected_lengths)
    ratio_loss = -F.logsigmoid(log_odds(mean_w) - log_odds(mean_l))
    losses = -mean_w + lam * ratio_loss
    return losses, (lam * mean_w).detach(), (lam * mean_l).detach()


def cpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor, *,
             beta: float = CPO_BETA, alpha: float = CPO_ALPHA) -> LossOutput:
    """CPO (Xu et al. 2024, arXiv 2401.08417, ``L_CPO = L_prefer + L_NLL``)::

        −log σ(β·[log π_θ(y_w) − log π_θ(y_l)]) − α·ℓ̄_w

    Reference-free DPO on summed log-probs plus α times the chosen response's mean token NLL.
    Defaults: the paper's β = 0.1 and α = 1 (its unweighted sum). Rewards ``β·log π_θ(y|x)``, detached.
    """
    check_beta(beta)
    if not alpha >= 0:
        raise ValueError(f"cpo_alpha must be >= 0, got {alpha}")
    check_shapes(policy_chosen_logps, policy_rejected_logps, chosen_lengths)
    losses, chosen_rewards, rejected_rewards = reference_free_dpo_loss(
        policy_chosen_logps, policy_rejected_logps, beta=beta)
    losses = losses - alpha * token_mean(policy_chosen_logps, chosen_lengths)
    return losses, chosen_rewards, rejected_rewards
