"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306), pure functions.

KTO learns from *unpaired* examples ``(x, y)`` labelled desirable or undesirable. With the implicit
reward ``ρ = log π_θ(y|x) − log π_ref(y|x)`` (summed response log-probs) and a reference point
``z0``, the per-example loss (the KTO loss of §4.1, ``λ_y − v(x, y)``) is::

    desirable:    λ_D · (1 − σ(β·(ρ − z0)))
    undesirable:  λ_U · (1 − σ(β·(z0 − ρ)))

``z0`` estimates ``KL(π_θ ‖ π_ref)``; the paper uses the biased but cheap estimate::

    z0 = max(0, mean_i [log π_θ(y_j|x_i) − log π_ref(y_j|x_i)])

over *mismatched* pairs of the same batch (prompt ``x_i`` with the completion ``y_j`` of another
example, :func:`kto_mismatched_completions`), clamped at 0 and not back-propagated through. It is a
separate function (:func:`kto_reference_point`) so that a trainer can compute it over a whole
optimizer step or over all processes and pass the one value to every micro-batch.

Defaults (the paper's): β = 0.1, λ_D = λ_U = 1. For imbalanced data the paper recommends weights with
``λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]`` (n_D, n_U the counts of desirable and undesirable examples):
:func:`kto_weights_for_imbalance`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpolab.losses.constants import (
    KTO_BETA,
    KTO_DESIRABLE_WEIGHT,
    KTO_UNDESIRABLE_WEIGHT,
    KTO_WEIGHT_RATIO_RANGE,
)


def kto_mismatched_completions(n: int, device: torch.device | str | None = None) -> Tensor:
    """Which completion to pair with each prompt for the KL estimate: ``j(i) = (i + 1) mod n``.

    Returns a ``(n,)`` long tensor; the mismatched example ``i`` is ``(x_i, y_{j(i)})``. A shift by
    one (a derangement) pairs every prompt with another example's completion and uses every
    completion once. ``n ≥ 2``.
    """
    if n < 2:
        raise ValueError(f"the KTO reference point needs at least 2 examples to mismatch, got {n}")
    return (torch.arange(n, device=device) + 1) % n


def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """``z0 = max(0, mean(log π_θ − log π_ref))`` over mismatched pairs, a detached 0-dim tensor.

    ``policy_kl_logps``/``ref_kl_logps``: summed completion log-probs ``(M,)`` of the mismatched
    pairs ``(x_i, y_{j(i)})`` under the policy and the reference (for a whole step or all processes:
    concatenate them first, or use :func:`kto_reference_point_from_sums`).
    """
    if policy_kl_logps.shape != ref_kl_logps.shape:
        raise ValueError(f"log-prob tensors must share one shape, got {policy_kl_logps.shape} and "
                         f"{ref_kl_logps.shape}")
    if policy_kl_logps.numel() == 0:
        raise ValueError("the KTO reference point needs at least one mismatched pair")
    return (policy_kl_logps.detach() - ref_kl_logps.detach()).mean().clamp_min(0)


def kto_reference_point_from_sums(logratio_sum: Tensor | float, count: Tensor | int) -> Tensor:
    """``max(0, Σ(log π_θ − log π_ref) / M)`` from a sum and a count already reduced (e.g. an
    all-reduce over processes), detached."""
    total = torch.as_tensor(logratio_sum).detach()
    count = torch.as_tensor(count, dtype=total.dtype if total.is_floating_point() else None)
    if not count > 0:
        raise ValueError(f"the KTO reference point needs count > 0, got {count}")
    return (total / count).clamp_min(0)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, reference_point: Tensor | float, *,
             beta: float = KTO_BETA, desirable_weight: float = KTO_DESIRABLE_WEIGHT,
             undesirable_weight: float = KTO_UNDESIRABLE_WEIGHT) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The KTO loss per example (module docstring), unreduced.

    Args: ``policy_logps``, ``ref_logps``: summed response log-probs ``(N,)``; ``desirable``: bool
    ``(N,)``; ``reference_point``: z0 (from :func:`kto_reference_point`; detached here whatever is
    passed); β, λ_D, λ_U > 0.

    Returns ``(losses (N,), rewards (N,), stats)``: rewards ``β·ρ`` detached; stats (detached 0-dim
    tensors, sums and counts so that they reduce across batches and processes): ``z0``,
    ``rewards/chosen_sum``, ``rewards/rejected_sum``, ``count/chosen``, ``count/rejected``.
    At policy = reference with z0 = 0 every loss is ``λ/2``; the gradient in ρ is negative for a
    desirable and positive for an undesirable example, and vanishes as ``|β(ρ − z0)| → ∞``.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not (desirable_weight > 0 and undesirable_weight > 0):
        raise ValueError(f"desirable_weight and undesirable_weight must be > 0, got {desirable_weight}, "
                         f"{undesirable_weight}")
    if not (policy_logps.shape == ref_logps.shape == desirable.shape):
        raise ValueError(f"policy_logps, ref_logps and desirable must share one shape, got {policy_logps.shape}, "
                         f"{ref_logps.shape}, {desirable.shape}")
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    z0 = torch.as_tensor(reference_point, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    rho = policy_logps - ref_logps
    # 1 − σ(a) = σ(−a), exact in floating point where 1 − σ(a) would cancel
    losses = torch.where(desirable, desirable_weight * torch.sigmoid(-beta * (rho - z0)),
                         undesirable_weight * torch.sigmoid(-beta * (z0 - rho)))
    rewards = (beta * rho).detach()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    stats = {
        "z0": z0,
        "rewards/chosen_sum": torch.where(desirable, rewards, zero).sum(),
        "rewards/rejected_sum": torch.where(desirable, zero, rewards).sum(),
        "count/chosen": desirable.sum(),
        "count/rejected": (~desirable).sum(),
    }
    return losses, rewards, stats


def kto_weight_ratio(n_desirable: int, n_undesirable: int, desirable_weight: float,
                     undesirable_weight: float) -> float:
    """``λ_D·n_D / (λ_U·n_U)``; the paper recommends a value in ``[1, 4/3]``."""
    if n_desirable <= 0 or n_undesirable <= 0:
        raise ValueError(f"need desirable and undesirable examples, got {n_desirable} and {n_undesirable}")
    return desirable_weight * n_desirable / (undesirable_weight * n_undesirable)


def kto_weights_for_imbalance(n_desirable: int, n_undesirable: int, *, ratio: float = 1.0) -> tuple[float, float]:
    """``(λ_D, λ_U)`` with ``λ_D·n_D / (λ_U·n_U) = ratio``, ratio in the paper's ``[1, 4/3]``.

    One weight is 1 and the other ≥ 1: the minority class is up-weighted (e.g. 1 desirable to 10
    undesirable, ratio 1: λ_D = 10, λ_U = 1; 10 to 1: λ_D = 1, λ_U = 10). Balanced data gives
    ``(ratio, 1)``, the defaults at ratio 1.
    """
    lo, hi = KTO_WEIGHT_RATIO_RANGE
    if not lo <= ratio <= hi:
        raise ValueError(f"ratio must be in the paper's recommended [1, 4/3], got {ratio}")
    if n_desirable <= 0 or n_undesirable <= 0:
        raise ValueError(f"need desirable and undesirable examples, got {n_desirable} and {n_undesirable}")
    # exactly one of the two choices keeps both weights >= 1 (both give (1, 1) at equality)
    if ratio * n_undesirable >= n_desirable:
        return ratio * n_undesirable / n_desirable, 1.0
    return 1.0, n_desirable / (ratio * n_undesirable)


def kto_weight_ratio_warning(n_desirable: int, n_undesirable: int, desirable_weight: float,
                             undesirable_weight: float) -> str | None:
    """The paper's rule for imbalanced data, λ_D·n_D/(λ_U·n_U) in [1, 4/3], as one warning line; None if it holds."""
    if not (n_desirable and n_undesirable):
        return (f"warning: the training data holds only {'un' if not n_desirable else ''}desirable examples "
                f"({n_desirable + n_undesirable}); KTO then learns only relative to its reference point")
    ratio = kto_weight_ratio(n_desirable, n_undesirable, desirable_weight, undesirable_weight)
    if KTO_WEIGHT_RATIO_RANGE[0] <= ratio <= KTO_WEIGHT_RATIO_RANGE[1]:
        return None
    wd, wu = kto_weights_for_imbalance(n_desirable, n_undesirable)
    return (f"warning: λ_D·n_D/(λ_U·n_U) = {ratio:.3g} ({n_desirable} desirable, {n_undesirable} undesirable) is "
            f"outside the paper's recommended [1, 4/3]; e.g. --desirable-weight {wd:.4g} --undesirable-weight {wu:.4g}")


def kto_metric_sums(losses: Tensor, logps: Tensor, desirable: Tensor, stats: dict[str, Tensor]) -> dict[str, float]:
    """Sums over a batch's rows (of :func:`kto_loss`'s losses and stats and the policy log-probs), to be
    added across passes and processes before :func:`kto_metric_means` divides."""
    lp = logps.detach()
    return {"loss": losses.detach().sum().item(), "count/chosen": stats["count/chosen"].item(),
            "count/rejected": stats["count/rejected"].item(), "rewards/chosen": stats["rewards/chosen_sum"].item(),
            "rewards/rejected": stats["rewards/rejected_sum"].item(), "logps/chosen": lp[desirable].sum().item(),
            "logps/rejected": lp[~desirable].sum().item()}


def kto_metric_means(sums: dict[str, float], n: float) -> dict[str, float]:
    """The logged metrics from :func:`kto_metric_sums` over ``n`` rows: ``loss`` per row, ``rewards/*`` and
    ``logps/*`` per desirable ("chosen") / undesirable ("rejected") row (0 for a class with none), counts."""
    out = {"loss": sums["loss"] / n}
    for side in ("chosen", "rejected"):
        count = sums[f"count/{side}"]
        out[f"count/{side}"] = round(count)
        for what in ("rewards", "logps"):
            out[f"{what}/{side}"] = sums[f"{what}/{side}"] / count if count else 0.0
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
