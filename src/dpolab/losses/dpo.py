"""The DPO family of preference losses: pure functions over per-pair sequence log-probs.

Every function takes per-example tensors of shape ``(B,)`` (summed response-token log-probs of the
chosen ``y_w`` and rejected ``y_l`` responses, under the policy and, where needed, the frozen
reference) and returns three ``(B,)`` tensors, unreduced::

    (losses, chosen_rewards, rejected_rewards)

The rewards are the *implicit rewards* of the loss, detached (statistics for logging, no gradient):
``β·(log π_θ(y|x) − log π_ref(y|x))`` for reference-based losses, ``β·log π_θ(y|x)`` for
reference-free DPO and ``β·mean-token log π_θ(y|x)`` for SimPO. The training loop reduces.

Notation (docs/dpo.md): ``ρ_w = log π_θ(y_w|x) − log π_ref(y_w|x)``, ``ρ_l`` likewise,
``h = ρ_w − ρ_l``; ``σ`` is the logistic function, computed through ``F.logsigmoid`` so that large
``|βh|`` stays finite.

:func:`preference_loss` dispatches by name through :data:`LOSS_REGISTRY` (no if-chain in a
trainer) and adds the optional RPO negative log-likelihood term on the chosen response.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

LossOutput = tuple[Tensor, Tensor, Tensor]

SIMPO_BETA, SIMPO_GAMMA = 2.0, 1.0  # Meng et al. 2024: β in [2, 2.5], γ/β = 0.5


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_shapes(*tensors: Tensor) -> None:
    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"log-prob tensors must share one shape, got {shape} and {t.shape}")


def _margin(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
            ref_rejected_logps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(ρ_w, ρ_l, h = ρ_w − ρ_l)``, each ``(B,)``."""
    _check_shapes(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    rho_w = policy_chosen_logps - ref_chosen_logps
    rho_l = policy_rejected_logps - ref_rejected_logps
    return rho_w, rho_l, rho_w - rho_l


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
    _check_beta(beta)
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for DPO/cDPO, got {label_smoothing}")
    rho_w, rho_l, h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * h
    losses = -F.logsigmoid(logits)
    if label_smoothing > 0:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses, (beta * rho_w).detach(), (beta * rho_l).detach()


def robust_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                    ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409), ``ε = label_smoothing``::

        [−(1 − ε)·log σ(βh) + ε·log σ(−βh)] / (1 − 2ε)

    An unbiased estimate of the clean DPO loss when labels are flipped with probability ε:
    ``(1 − ε)·L(h) + ε·L(−h) = −log σ(βh)``. ``ε ∈ [0, 0.5)``; at ``ε = 0`` this is DPO.
    Shapes and rewards as :func:`dpo_loss`.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for robust DPO, got {label_smoothing}")
    rho_w, rho_l, h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return losses, (beta * rho_w).detach(), (beta * rho_l).detach()


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036, with τ = β): ``(h − 1/(2β))²``.

    A squared loss that regresses the log-ratio margin to the finite target ``1/(2β)`` instead of
    pushing it to infinity. It acts on whatever log-probs it is given: summed ones, or
    length-averaged ones (as :func:`preference_loss` does with ``ipo_length_normalize=True``).
    Shapes as :func:`dpo_loss`; rewards ``β·ρ`` of the inputs, detached.
    """
    _check_beta(beta)
    rho_w, rho_l, h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (h - 1 / (2 * beta)) ** 2
    return losses, (beta * rho_w).detach(), (beta * rho_l).detach()


def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """Hinge loss on the log-ratio margin: ``max(0, 1 − βh)``.

    SLiC (Zhao et al. 2023, arXiv 2305.10425, calibration loss) uses a hinge on the
    log-likelihood margin; RSO (Liu et al. 2023, arXiv 2309.06657) puts it on the
    reference-normalised margin with ``γ = β``, which is this function. Shapes as :func:`dpo_loss`.
    """
    _check_beta(beta)
    rho_w, rho_l, h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1 - beta * h)
    return losses, (beta * rho_w).detach(), (beta * rho_l).detach()


def reference_free_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, *,
                            beta: float = 0.1) -> LossOutput:
    """Reference-free DPO: DPO with a uniform reference, ``−log σ(β[log π_θ(y_w) − log π_θ(y_l)])``.

    (The ``reference_free`` option of the DPO authors' code, Rafailov et al. 2023.) Rewards are
    ``β·log π_θ(y|x)``, detached; shapes as :func:`dpo_loss`.
    """
    _check_beta(beta)
    _check_shapes(policy_chosen_logps, policy_rejected_logps)
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
    _check_beta(beta)
    _check_shapes(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    mean_w = policy_chosen_logps / chosen_lengths.clamp_min(1)
    mean_l = policy_rejected_logps / rejected_lengths.clamp_min(1)
    losses = -F.logsigmoid(beta * mean_w - beta * mean_l - gamma)
    return losses, (beta * mean_w).detach(), (beta * mean_l).detach()


# ----------------------------------------------------------------------------------------------------
# Dispatch by name


@dataclass
class PairLogps:
    """Per-pair sequence log-probs of one preference batch, every tensor of shape ``(B,)``.

    ``policy_chosen``/``policy_rejected``: summed response-token log-probs under the policy;
    ``chosen_lengths``/``rejected_lengths``: response token counts (float or integer);
    ``ref_chosen``/``ref_rejected``: the same sums under the reference (``None`` for
    reference-free losses).
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None


@dataclass(frozen=True)
class _Options:
    beta: float
    label_smoothing: float
    simpo_gamma: float
    ipo_length_normalize: bool


def _refs(name: str, p: PairLogps) -> tuple[Tensor, Tensor]:
    if p.ref_chosen is None or p.ref_rejected is None:
        raise ValueError(f"loss '{name}' needs reference log-probs (ref_chosen and ref_rejected)")
    return p.ref_chosen, p.ref_rejected


def _sigmoid(p: PairLogps, o: _Options) -> LossOutput:
    return dpo_loss(p.policy_chosen, p.policy_rejected, *_refs("sigmoid", p), beta=o.beta,
                    label_smoothing=o.label_smoothing)


def _robust(p: PairLogps, o: _Options) -> LossOutput:
    return robust_dpo_loss(p.policy_chosen, p.policy_rejected, *_refs("robust", p), beta=o.beta,
                           label_smoothing=o.label_smoothing)


def _ipo(p: PairLogps, o: _Options) -> LossOutput:
    ref_c, ref_r = _refs("ipo", p)
    if not o.ipo_length_normalize:
        return ipo_loss(p.policy_chosen, p.policy_rejected, ref_c, ref_r, beta=o.beta)
    lc, lr = p.chosen_lengths.clamp_min(1), p.rejected_lengths.clamp_min(1)
    losses, _, _ = ipo_loss(p.policy_chosen / lc, p.policy_rejected / lr, ref_c / lc, ref_r / lr, beta=o.beta)
    # Report the implicit rewards on summed log-probs, like every other reference-based loss.
    return losses, (o.beta * (p.policy_chosen - ref_c)).detach(), (o.beta * (p.policy_rejected - ref_r)).detach()


def _hinge(p: PairLogps, o: _Options) -> LossOutput:
    return hinge_loss(p.policy_chosen, p.policy_rejected, *_refs("hinge", p), beta=o.beta)


def _simpo(p: PairLogps, o: _Options) -> LossOutput:
    return simpo_loss(p.policy_chosen, p.policy_rejected, p.chosen_lengths, p.rejected_lengths,
                      beta=o.beta, gamma=o.simpo_gamma)


def _ref_free(p: PairLogps, o: _Options) -> LossOutput:
    return reference_free_dpo_loss(p.policy_chosen, p.policy_rejected, beta=o.beta)


@dataclass(frozen=True)
class LossSpec:
    """A registered preference loss: the function over a :class:`PairLogps`, whether it needs the
    reference's log-probs, and its own defaults for the shared options (``beta``, ``simpo_gamma``),
    used wherever the caller gives none."""

    fn: Callable[[PairLogps, _Options], LossOutput]
    needs_reference: bool
    defaults: dict[str, float] = field(default_factory=dict)


DEFAULT_BETA = 0.1  # DPO paper §6: β = 0.1 for most of its experiments

#: name -> its :class:`LossSpec`
LOSS_REGISTRY: dict[str, LossSpec] = {
    "sigmoid": LossSpec(_sigmoid, True),     # DPO; cDPO when label_smoothing > 0
    "robust": LossSpec(_robust, True),
    "ipo": LossSpec(_ipo, True),
    "hinge": LossSpec(_hinge, True),
    "simpo": LossSpec(_simpo, False, {"beta": SIMPO_BETA, "simpo_gamma": SIMPO_GAMMA}),
    "ref_free": LossSpec(_ref_free, False),
}

PREFERENCE_LOSSES: tuple[str, ...] = tuple(LOSS_REGISTRY)


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _lookup(name: str) -> LossSpec:
    try:
        return LOSS_REGISTRY[name]
    except KeyError:
        valid = list(LOSS_REGISTRY)
        raise ValueError(f"unknown loss type '{name}'{_suggest(str(name), valid)}; "
                         f"valid: {', '.join(valid)}") from None


def needs_reference(name: str) -> bool:
    """Whether the loss ``name`` uses reference-model log-probs (unknown name: ValueError)."""
    return _lookup(name).needs_reference


def loss_defaults(name: str) -> dict[str, float]:
    """The defaults of the shared options for loss ``name``: ``beta`` (0.1 unless the loss's paper
    says otherwise) and ``simpo_gamma``, SimPO's margin."""
    return {"beta": DEFAULT_BETA, "simpo_gamma": SIMPO_GAMMA, **_lookup(name).defaults}


def preference_loss(name: str, logps: PairLogps, *, beta: float | None = None, label_smoothing: float = 0.0,
                    simpo_gamma: float | None = None, rpo_alpha: float | None = None,
                    ipo_length_normalize: bool = True) -> LossOutput:
    """The preference loss ``name`` (one of :data:`PREFERENCE_LOSSES`) on one batch.

    ``beta`` and ``simpo_gamma`` left at ``None`` take the loss's own defaults
    (:func:`loss_defaults`: β = 0.1, SimPO's β = 2.0 and γ = 1.0). ``label_smoothing`` is ε of cDPO
    ("sigmoid") and robust DPO; ``simpo_gamma`` is SimPO's target margin γ; ``ipo_length_normalize``
    makes IPO act on mean token log-probs (the IPO paper's setting has no lengths; averaging keeps
    the target ``1/(2β)`` comparable across lengths). ``rpo_alpha = α`` adds the RPO term (Pang et
    al. 2024, arXiv 2404.19733), the per-token negative log-likelihood of the chosen response:
    ``α·(−log π_θ(y_w|x) / |y_w|)``.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; rewards are the implicit
    rewards ``β·(log π_θ − log π_ref)`` on summed log-probs (reference-free DPO: ``β·log π_θ``,
    SimPO: ``β·mean-token log π_θ``), detached. Unknown names raise ValueError.
    """
    spec = _lookup(name)
    defaults = loss_defaults(name)
    beta = defaults["beta"] if beta is None else beta
    simpo_gamma = defaults["simpo_gamma"] if simpo_gamma is None else simpo_gamma
    losses, chosen_rewards, rejected_rewards = spec.fn(
        logps, _Options(beta, label_smoothing, simpo_gamma, ipo_length_normalize))
    if rpo_alpha:
        if rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
        nll = -logps.policy_chosen / logps.chosen_lengths.clamp_min(1)
        losses = losses + rpo_alpha * nll
    return losses, chosen_rewards, rejected_rewards
