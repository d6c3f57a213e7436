"""Preference losses that are a function of the log-ratio margin ``h = ρ_w − ρ_l`` alone.

DPO (and cDPO), robust DPO, IPO, hinge, EXO and DiscoPOP. Each takes four ``(B,)`` tensors of summed
response log-probs (policy chosen/rejected, reference chosen/rejected) and returns
``(losses, chosen_rewards, rejected_rewards)``, unreduced, rewards ``β·ρ`` detached.

Notation: ``ρ_w = log π_θ(y_w|x) − log π_ref(y_w|x)``, ``ρ_l`` likewise, ``h = ρ_w − ρ_l``; ``σ`` is
the logistic function, computed through ``F.logsigmoid`` so that large ``|βh|`` stays finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dpolab.losses._common import LossOutput, check_beta, margin, rewards, smoothed_logistic

EXO_EPSILON = 1e-3      # Ji et al. 2024: label smoothing of the pairwise EXO objective
DISCOPOP_TAU = 0.05     # Lu et al. 2024: temperature of the log-ratio modulation
DISCOPOP_BETA = 0.05    # Lu et al. 2024: β of their DiscoPOP runs (the zephyr-7b-gemma recipe)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """DPO, and conservative DPO (cDPO) when ``label_smoothing = ε > 0``.

    DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7): ``−log σ(βh)``.
    cDPO (Mitchell 2023, "A note on DPO with noisy preferences"): the preference label is flipped
    with probability ε, so the loss is the cross-entropy against the soft label ``1 − ε``::

        −(1 − ε)·log σ(βh) − ε·log σ(−βh)

    whose minimiser in ``βh`` is ``log((1 − ε)/ε)`` instead of ``+∞``. ``ε ∈ [0, 0.5]``.

    Args: four ``(B,)`` tensors of summed response log-probs. Returns ``(losses, chosen_rewards,
    rejected_rewards)``, each ``(B,)``, rewards ``β·ρ`` detached. At policy = reference every loss
    is ``ln 2`` and every reward 0.
    """
    check_beta(beta)
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for DPO/cDPO, got {label_smoothing}")
    rho_w, rho_l, h = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (smoothed_logistic(beta * h, label_smoothing), *rewards(beta, rho_w, rho_l))


def robust_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                    ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409), ``ε = label_smoothing``::

        [−(1 − ε)·log σ(βh) + ε·log σ(−βh)] / (1 − 2ε)

    An unbiased estimate of the clean DPO loss when labels are flipped with probability ε:
    ``(1 − ε)·L(h) + ε·L(−h) = −log σ(βh)``. ``ε ∈ [0, 0.5)``; at ``ε = 0`` this is DPO.
    Shapes and rewards as :func:`dpo_loss`.
    """
    check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for robust DPO, got {label_smoothing}")
    rho_w, rho_l, h = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return (losses, *rewards(beta, rho_w, rho_l))


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036, the sampled loss of §5.2, eq. 17, with τ = β)::

        (h − 1/(2β))²

    A squared loss that regresses the log-ratio margin to the finite target ``1/(2β)`` instead of
    pushing it to infinity. It acts on whatever log-probs it is given: summed ones (registry name
    ``ipo_sum``, the paper's sequence log-probs), or token-averaged ones (``ipo``, TRL's form).
    Shapes as :func:`dpo_loss`; rewards ``β·ρ`` of the inputs, detached.
    """
    check_beta(beta)
    rho_w, rho_l, h = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return ((h - 1 / (2 * beta)) ** 2, *rewards(beta, rho_w, rho_l))


def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """Hinge loss on the log-ratio margin: ``max(0, 1 − βh)``.

    SLiC (Zhao et al. 2023, arXiv 2305.10425, calibration loss) uses a hinge on the
    log-likelihood margin; RSO (Liu et al. 2023, arXiv 2309.06657) puts it on the
    reference-normalised margin with ``γ = β``, which is this function. Shapes as :func:`dpo_loss`.
    """
    check_beta(beta)
    rho_w, rho_l, h = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (torch.relu(1 - beta * h), *rewards(beta, rho_w, rho_l))


def exo_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = EXO_EPSILON) -> LossOutput:
    """EXO on preference pairs (Ji et al. 2024, arXiv 2402.00856, the pairwise objective, K = 2).

    EXO minimises the *reverse* KL from the policy's implied distribution over the pair,
    ``q = (σ(βh), σ(−βh))`` (a softmax of ``β·ρ`` over ``{y_w, y_l}``), to the label distribution,
    smoothed to ``(1 − ε, ε)``::

        σ(βh)·[log σ(βh) − log(1 − ε)] + σ(−βh)·[log σ(−βh) − log ε]

    It is ≥ 0 and zero exactly at ``βh = log((1 − ε)/ε)``, cDPO's optimum; DPO/cDPO minimise the
    *forward* KL to the same labels. Being mode-seeking, its gradient ``β·q(1−q)·(βh − log((1−ε)/ε))``
    fades for pairs whose margin is very negative. ``ε ∈ (0, 0.5]``: at ε = 0 the label is hard and
    the reverse KL is infinite. Default ε = 10⁻³, the paper's. At h = 0 the loss is
    ``−log 2 − ½·log(ε(1 − ε))``. Shapes and rewards as :func:`dpo_loss`.
    """
    check_beta(beta)
    if not 0.0 < label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in (0, 0.5] for exo_pair (the reverse KL to a hard "
                         f"label is infinite), got {label_smoothing}")
    rho_w, rho_l, h = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * h
    log_q_w, log_q_l = F.logsigmoid(z), F.logsigmoid(-z)
    eps = label_smoothing
    losses = log_q_w.exp() * (log_q_w - math.log1p(-eps)) + log_q_l.exp() * (log_q_l - math.log(eps))
    return (losses, *rewards(beta, rho_w, rho_l))


def discopop_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float = DISCOPOP_BETA, tau: float = DISCOPOP_TAU) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, arXiv 2406.08414, eq. 5)::

        m = σ(βh/τ),   (1 − m)·(−log σ(βh)) + m·exp(−βh)

    A blend of the logistic (DPO) loss, used where the margin is negative, and the exponential loss,
    used where it is positive, switched by a sigmoid of temperature τ. Defaults: the paper's τ = 0.05
    and β = 0.05. Not convex, and not monotone: for τ = 0.05 the gradient in h is *positive* for
    −0.119 < βh < 0.072, a band around h = 0 (at h = 0 with β = 0.05, ∂L/∂h = +0.039; in general
    β·((1 − ln 2)/(4τ) − 3/4), positive for τ < 0.102). So the loss has a local minimum at
    βh ≈ −0.119 (value 0.786) and a local maximum at βh ≈ 0.072 (0.878): from policy = reference,
    gradient descent on one pair *lowers* its margin to the local minimum; above the band it raises
    h like DPO, towards the global infimum 0 at h → ∞.
    ``m·exp(−βh)`` is computed as ``exp(log σ(βh/τ) − βh)`` so that a very negative margin gives
    ``0`` rather than ``0·∞``. At h = 0 the loss is ``½·ln 2 + ½``. Shapes and rewards as
    :func:`dpo_loss`.
    """
    check_beta(beta)
    check_beta(tau, "discopop_tau")
    rho_w, rho_l, h = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * h
    mod = torch.sigmoid(z / tau)
    losses = (1 - mod) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)
    return (losses, *rewards(beta, rho_w, rho_l))
