"""Preference losses with separate terms on ρ_w and ρ_l: NCA, BCO, SPPO (hard labels), APO.

Unlike the margin losses (``dpolab.losses.margin``), these are not invariant to adding the same
constant to ρ_w and ρ_l: each pins the chosen and/or rejected log-ratio to an absolute anchor, which
is how they keep the chosen likelihood from falling while the margin grows. Inputs and outputs as
``dpo_loss``: four ``(B,)`` tensors of summed response log-probs in, ``(losses, chosen_rewards,
rejected_rewards)`` out, rewards ``β·ρ`` detached.

Notation: ``ρ_w = log π_θ(y_w|x) − log π_ref(y_w|x)``, ``ρ_l`` likewise, ``h = ρ_w − ρ_l``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpolab.losses._common import LossOutput, check_beta, margin, rewards


def nca_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """NCA on preference pairs (Chen et al. 2024, arXiv 2402.05369; the NCA loss with K = 2
    responses and the hard label 1 for y_w, 0 for y_l)::

        −log σ(βρ_w) − ½·log σ(−βρ_w) − ½·log σ(−βρ_l)

    Each response is classified against noise on its own reward ``r = βρ`` rather than against the
    other response. The chosen part is minimised at ``βρ_w = ln 2`` (its gradient in ρ_w is
    ``β·(½σ(βρ_w) − σ(−βρ_w))``): NCA stops the chosen likelihood from falling below the reference
    but does not push it up without bound; the rejected part always pushes ρ_l down. At policy =
    reference the loss is ``2·ln 2``.
    """
    check_beta(beta)
    rho_w, rho_l, _ = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    r_w, r_l = beta * rho_w, beta * rho_l
    losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return (losses, *rewards(beta, rho_w, rho_l))


def bco_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, delta: Tensor | float, beta: float = 0.1) -> LossOutput:
    """BCO on preference pairs (Jung et al. 2024, arXiv 2404.04656: the binary cross-entropy loss
    with reward shift, chosen = class 1, rejected = class 0)::

        −log σ(βρ_w − δ) − log σ(−(βρ_l − δ))

    ``δ`` is the *reward shift*: a running mean of the implicit rewards ``βρ`` of chosen and rejected
    responses (the paper sets it to the average of the two classes' rewards, which tightens its
    bound of the DPO loss by this BCE loss). It is state of the training run, so this function takes
    it as an input (a float, a 0-dim or a ``(B,)`` tensor, detached here); :func:`bco_running_delta`
    updates it. At policy = reference and δ = 0 the loss is ``2·ln 2``.
    """
    check_beta(beta)
    rho_w, rho_l, _ = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta = torch.as_tensor(delta, dtype=rho_w.dtype, device=rho_w.device).detach()
    if not torch.isfinite(delta).all():
        raise ValueError(f"bco_pair: delta must be finite, got {delta}")
    losses = -F.logsigmoid(beta * rho_w - delta) - F.logsigmoid(-(beta * rho_l - delta))
    return (losses, *rewards(beta, rho_w, rho_l))


def bco_running_delta(delta: Tensor | float, count: int, chosen_rewards: Tensor,
                      rejected_rewards: Tensor) -> tuple[Tensor, int]:
    """Update BCO's reward shift: the running mean over every implicit reward seen so far.

    ``delta``/``count``: the current mean and how many rewards it averages (start at ``0.0, 0``).
    ``chosen_rewards``/``rejected_rewards``: this step's ``βρ`` (``(B,)`` each; with several
    processes, gathered from all of them first, so that every process holds the same δ). Returns
    ``(new_delta, new_count)``, detached: ``(count·δ + Σ rewards)/(count + n)``. The trainer calls it
    *before* the loss of the step, like TRL, so the step's own rewards count. With equal batch sizes
    this equals TRL's running mean of per-step batch means.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    values = torch.cat([chosen_rewards.detach().reshape(-1), rejected_rewards.detach().reshape(-1)])
    n = values.numel()
    if n == 0:
        return torch.as_tensor(delta, dtype=values.dtype, device=values.device).detach(), count
    delta = torch.as_tensor(delta, dtype=values.dtype, device=values.device).detach()
    new_count = count + n
    # incremental form: exact for count = 0, and no large running sum to lose precision in
    return delta + (values.sum() - n * delta) / new_count, new_count


def sppo_hard_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                   ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv 2405.00675)::

        (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²

    SPPO's per-response regression (Algorithm 1) is ``(log π_θ(y|x)/π_t(y|x) − η·(P̂(y ≻ π_t|x) −
    ½))²`` with a preference model's estimate P̂; the hard version sets P̂ = 1 for y_w and 0 for y_l,
    takes the reference as π_t and η = 1/β. It regresses ρ_w to +1/(2β) and ρ_l to −1/(2β)
    (minimum 0 there); at policy = reference the loss is ``1/(2β²)``.
    """
    check_beta(beta)
    rho_w, rho_l, _ = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    target = 1 / (2 * beta)
    losses = (rho_w - target) ** 2 + (rho_l + target) ** 2
    return (losses, *rewards(beta, rho_w, rho_l))


def apo_zero_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7)::

        (1 − σ(βρ_w)) + σ(βρ_l)

    Anchored at zero: raises the chosen and lowers the rejected likelihood independently. For
    chosen responses better than what the model already writes. At policy = reference: 1.
    """
    check_beta(beta)
    rho_w, rho_l, _ = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (1 - torch.sigmoid(beta * rho_w)) + torch.sigmoid(beta * rho_l)
    return (losses, *rewards(beta, rho_w, rho_l))


def apo_down_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 8)::

        σ(βρ_w) + (1 − σ(βh))

    Lowers the chosen likelihood while widening the margin, i.e. lowers the rejected one more. For
    data whose chosen responses are *worse* than the model's own outputs. The gradient in ρ_w,
    ``β·(σ'(βρ_w) − σ'(βh))``, is 0 at policy = reference and positive whenever |h| > |ρ_w|: it does
    not intend to raise y_w. At policy = reference the loss is 1.
    """
    check_beta(beta)
    rho_w, rho_l, h = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.sigmoid(beta * rho_w) + (1 - torch.sigmoid(beta * h))
    return (losses, *rewards(beta, rho_w, rho_l))
