"""AOT: alignment via optimal transport (Melnyk et al. 2024, arXiv 2406.05882). BATCH-LEVEL losses.

AOT asks for *first-order stochastic dominance* of one distribution of log-ratios over another
instead of a per-pair margin. In one dimension the optimal-transport relaxation of that constraint
has a closed form: sort both samples and compare them quantile by quantile, ``u_(i)`` against
``v_(i)``, through a convex surrogate, here the (optionally label-smoothed) logistic loss::

    −(1 − ε)·log σ(β·(u_(i) − v_(i))) − ε·log σ(−β·(u_(i) − v_(i)))

* ``aot`` (paired): ``u = log π_θ(y_w) − log π_θ(y_l)``, the policy's chosen-vs-rejected margin,
  must dominate ``v = log π_ref(y_w) − log π_ref(y_l)``, the reference's.
* ``aot_unpaired``: ``u = ρ_w``, the chosen log-ratios, must dominate ``v = ρ_l``, the rejected
  ones; the pairing of y_w with y_l is never used.

**Batch-level.** ``losses[i]`` is the loss at the i-th quantile of the batch, not the loss of pair i,
and its value depends on which pairs share the batch: the mean over one batch of 8 is not the mean of
two batches of 4. A trainer must evaluate these losses on the whole batch it means (the registry marks
them ``batch_level=True``; split a batch into passes only with this in mind). The rewards are
per pair (``β·ρ`` of pair i, detached), unsorted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpolab.losses._common import LossOutput, check_beta, margin, rewards, smoothed_logistic


def _check_eps(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for AOT, got {label_smoothing}")


def _check_batch(x: Tensor) -> None:
    if x.dim() != 1:
        raise ValueError(f"AOT sorts over the batch: inputs must be (B,), got shape {tuple(x.shape)}")


def aot_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Paired AOT: ``sort(log π_θ(y_w) − log π_θ(y_l))`` must dominate ``sort(log π_ref(y_w) −
    log π_ref(y_l))``, logistic surrogate on the sorted differences (module docstring). With one
    pair per batch it is DPO/cDPO. Batch-level: see the module docstring."""
    check_beta(beta)
    _check_eps(label_smoothing)
    rho_w, rho_l, _ = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_batch(rho_w)
    u = torch.sort(policy_chosen_logps - policy_rejected_logps).values
    v = torch.sort(ref_chosen_logps - ref_rejected_logps).values
    return (smoothed_logistic(beta * (u - v), label_smoothing), *rewards(beta, rho_w, rho_l))


def aot_unpaired_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                      ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Unpaired AOT: ``sort(ρ_w)`` must dominate ``sort(ρ_l)``, logistic surrogate on the sorted
    differences (module docstring). With one pair per batch it is DPO/cDPO. Batch-level."""
    check_beta(beta)
    _check_eps(label_smoothing)
    rho_w, rho_l, _ = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_batch(rho_w)
    diff = torch.sort(rho_w).values - torch.sort(rho_l).values
    return (smoothed_logistic(beta * diff, label_smoothing), *rewards(beta, rho_w, rho_l))
