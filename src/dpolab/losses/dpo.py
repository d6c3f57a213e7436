"""The DPO family of preference losses, by name: the registry, dispatch and weighted combinations.

The loss functions live in modules by job and are re-exported here (trainers import them from this
module): ``margin`` (functions of h alone: DPO/cDPO, robust, IPO, hinge, EXO, DiscoPOP), ``anchored``
(separate terms on ρ_w and ρ_l: NCA, BCO, SPPO, APO), ``aot`` (batch-level), ``reference_free``
(reference-free DPO, SimPO, ORPO, CPO), ``weighting`` (WPO weights). KTO, which is unpaired, is in
``dpolab.losses.kto``.

Every loss takes per-pair ``(B,)`` tensors and returns ``(losses, chosen_rewards,
rejected_rewards)``, unreduced, the rewards detached. :func:`preference_loss` dispatches by name
through :data:`LOSS_REGISTRY` (no if-chain in a trainer), fills each loss's own defaults
(:func:`loss_defaults`) and adds the optional RPO negative log-likelihood term;
:func:`combined_preference_loss` sums several losses with weights.

Notation (docs/dpo.md): ``ρ_w = log π_θ(y_w|x) − log π_ref(y_w|x)``, ``ρ_l`` likewise,
``h = ρ_w − ρ_l``; ``σ`` is the logistic function.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from dpolab.losses._common import LossOutput, token_mean
from dpolab.losses.anchored import (
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    bco_running_delta,
    nca_pair_loss,
    sppo_hard_loss,
)
from dpolab.losses.aot import aot_loss, aot_unpaired_loss
from dpolab.losses.margin import (
    DISCOPOP_BETA,
    DISCOPOP_TAU,
    EXO_EPSILON,
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    robust_dpo_loss,
)
from dpolab.losses.reference_free import (
    CPO_ALPHA,
    CPO_BETA,
    ORPO_LAMBDA,
    SIMPO_BETA,
    SIMPO_GAMMA,
    cpo_loss,
    log_odds,
    orpo_loss,
    reference_free_dpo_loss,
    simpo_loss,
)
from dpolab.losses.weighting import wpo_token_log_normalizer, wpo_weights

__all__ = [
    "DEFAULT_BETA", "LOSS_OPTIONS", "LOSS_REGISTRY", "PREFERENCE_LOSSES", "CombinedLoss", "LossOutput",
    "LossSpec", "PairLogps", "apo_down_loss", "apo_zero_loss", "aot_loss", "aot_unpaired_loss",
    "bco_pair_loss", "bco_running_delta", "combined_preference_loss", "cpo_loss", "discopop_loss",
    "dpo_loss", "exo_pair_loss", "hinge_loss", "ipo_loss", "is_batch_level", "log_odds", "loss_defaults",
    "nca_pair_loss", "needs_reference", "orpo_loss", "preference_loss", "reference_free_dpo_loss",
    "robust_dpo_loss", "simpo_loss", "sppo_hard_loss", "unused_options", "validate_loss_options",
    "wpo_token_log_normalizer", "wpo_weights",
]


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


Options = dict[str, Any]


def _refs(name: str, p: PairLogps) -> tuple[Tensor, Tensor]:
    if p.ref_chosen is None or p.ref_rejected is None:
        raise ValueError(f"loss '{name}' needs reference log-probs (ref_chosen and ref_rejected)")
    return p.ref_chosen, p.ref_rejected


def _per_token(name: str, p: PairLogps) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four log-probs averaged over their response's tokens (policy and reference alike)."""
    ref_c, ref_r = _refs(name, p)
    return (token_mean(p.policy_chosen, p.chosen_lengths), token_mean(p.policy_rejected, p.rejected_lengths),
            token_mean(ref_c, p.chosen_lengths), token_mean(ref_r, p.rejected_lengths))


def _sum_rewards(name: str, p: PairLogps, beta: float) -> tuple[Tensor, Tensor]:
    # Losses on token means still report β·ρ on sums, comparable with every other reference loss.
    ref_c, ref_r = _refs(name, p)
    return (beta * (p.policy_chosen - ref_c)).detach(), (beta * (p.policy_rejected - ref_r)).detach()


def _with_refs(loss: Callable[..., LossOutput], name: str, *keys: str) -> Callable[[PairLogps, Options], LossOutput]:
    """Adapter: ``loss(policy_c, policy_r, ref_c, ref_r, **{k: options[k]})`` on summed log-probs."""
    def fn(p: PairLogps, o: Options) -> LossOutput:
        return loss(p.policy_chosen, p.policy_rejected, *_refs(name, p), **{k: o[k] for k in keys})
    return fn


def _ipo(p: PairLogps, o: Options) -> LossOutput:
    losses, _, _ = ipo_loss(*_per_token("ipo", p), beta=o["beta"])
    return (losses, *_sum_rewards("ipo", p, o["beta"]))


def _sigmoid_norm(p: PairLogps, o: Options) -> LossOutput:
    losses, _, _ = dpo_loss(*_per_token("sigmoid_norm", p), beta=o["beta"], label_smoothing=o["label_smoothing"])
    return (losses, *_sum_rewards("sigmoid_norm", p, o["beta"]))


def _bco_pair(p: PairLogps, o: Options) -> LossOutput:
    return bco_pair_loss(p.policy_chosen, p.policy_rejected, *_refs("bco_pair", p), beta=o["beta"],
                         delta=o["bco_delta"])


def _discopop(p: PairLogps, o: Options) -> LossOutput:
    return discopop_loss(p.policy_chosen, p.policy_rejected, *_refs("discopop", p), beta=o["beta"],
                         tau=o["discopop_tau"])


def _simpo(p: PairLogps, o: Options) -> LossOutput:
    return simpo_loss(p.policy_chosen, p.policy_rejected, p.chosen_lengths, p.rejected_lengths,
                      beta=o["beta"], gamma=o["simpo_gamma"])


def _ref_free(p: PairLogps, o: Options) -> LossOutput:
    return reference_free_dpo_loss(p.policy_chosen, p.policy_rejected, beta=o["beta"])


def _orpo(p: PairLogps, o: Options) -> LossOutput:
    return orpo_loss(p.policy_chosen, p.policy_rejected, p.chosen_lengths, p.rejected_lengths,
                     lam=o["orpo_lambda"])


def _cpo(p: PairLogps, o: Options) -> LossOutput:
    return cpo_loss(p.policy_chosen, p.policy_rejected, p.chosen_lengths, beta=o["beta"], alpha=o["cpo_alpha"])


@dataclass(frozen=True)
class LossSpec:
    """A registered preference loss.

    ``fn``: the loss over a :class:`PairLogps` and the resolved options; ``needs_reference``:
    whether it reads the reference's log-probs; ``defaults``: every option it reads, with its own
    default (the paper's value where the paper gives one); ``required``: options it reads that have
    no default and must be given (BCO's running mean ``bco_delta``); ``batch_level``: its per-pair
    values depend on the rest of the batch (AOT sorts across it), so a trainer must not split a
    batch into passes and expect the same mean.
    """

    fn: Callable[[PairLogps, Options], LossOutput]
    needs_reference: bool
    defaults: dict[str, float] = field(default_factory=dict)
    batch_level: bool = False
    required: tuple[str, ...] = ()

    @property
    def options(self) -> tuple[str, ...]:
        """The names of the options this loss reads."""
        return (*self.defaults, *self.required)


DEFAULT_BETA = 0.1  # DPO paper §6: β = 0.1 for most of its experiments

#: every option :func:`preference_loss` accepts besides ``rpo_alpha``
LOSS_OPTIONS = ("beta", "label_smoothing", "simpo_gamma", "discopop_tau", "orpo_lambda", "cpo_alpha", "bco_delta")

_B = {"beta": DEFAULT_BETA}
_B_EPS = {"beta": DEFAULT_BETA, "label_smoothing": 0.0}

#: name -> its :class:`LossSpec`. Names follow TRL's ``loss_type`` where TRL has the loss.
LOSS_REGISTRY: dict[str, LossSpec] = {
    "sigmoid": LossSpec(_with_refs(dpo_loss, "sigmoid", "beta", "label_smoothing"), True, _B_EPS),  # DPO/cDPO
    "robust": LossSpec(_with_refs(robust_dpo_loss, "robust", "beta", "label_smoothing"), True, _B_EPS),
    "ipo": LossSpec(_ipo, True, _B),                                   # per-token averages (TRL's ipo)
    "hinge": LossSpec(_with_refs(hinge_loss, "hinge", "beta"), True, _B),
    "simpo": LossSpec(_simpo, False, {"beta": SIMPO_BETA, "simpo_gamma": SIMPO_GAMMA}),
    "ref_free": LossSpec(_ref_free, False, _B),
    "ipo_sum": LossSpec(_with_refs(ipo_loss, "ipo_sum", "beta"), True, _B),  # summed: the IPO paper's
    "sigmoid_norm": LossSpec(_sigmoid_norm, True, _B_EPS),
    "exo_pair": LossSpec(_with_refs(exo_pair_loss, "exo_pair", "beta", "label_smoothing"), True,
                         {"beta": DEFAULT_BETA, "label_smoothing": EXO_EPSILON}),
    "nca_pair": LossSpec(_with_refs(nca_pair_loss, "nca_pair", "beta"), True, _B),
    "bco_pair": LossSpec(_bco_pair, True, _B, required=("bco_delta",)),
    "sppo_hard": LossSpec(_with_refs(sppo_hard_loss, "sppo_hard", "beta"), True, _B),
    "aot": LossSpec(_with_refs(aot_loss, "aot", "beta", "label_smoothing"), True, _B_EPS, batch_level=True),
    "aot_unpaired": LossSpec(_with_refs(aot_unpaired_loss, "aot_unpaired", "beta", "label_smoothing"), True,
                             _B_EPS, batch_level=True),
    "apo_zero": LossSpec(_with_refs(apo_zero_loss, "apo_zero", "beta"), True, _B),
    "apo_down": LossSpec(_with_refs(apo_down_loss, "apo_down", "beta"), True, _B),
    "discopop": LossSpec(_discopop, True, {"beta": DISCOPOP_BETA, "discopop_tau": DISCOPOP_TAU}),
    "orpo": LossSpec(_orpo, False, {"orpo_lambda": ORPO_LAMBDA}),
    "cpo": LossSpec(_cpo, False, {"beta": CPO_BETA, "cpo_alpha": CPO_ALPHA}),
}

PREFERENCE_LOSSES: tuple[str, ...] = tuple(LOSS_REGISTRY)


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _lookup(name: str) -> LossSpec:
    try:
        return LOSS_REGISTRY[name]
    except (KeyError, TypeError):
        valid = list(LOSS_REGISTRY)
        raise ValueError(f"unknown loss type '{name}'{_suggest(str(name), valid)}; "
                         f"valid: {', '.join(valid)}") from None


def needs_reference(name: str) -> bool:
    """Whether the loss ``name`` uses reference-model log-probs (unknown name: ValueError)."""
    return _lookup(name).needs_reference


def is_batch_level(name: str) -> bool:
    """Whether the loss ``name``'s per-pair values depend on the rest of its batch (AOT)."""
    return _lookup(name).batch_level


def loss_defaults(name: str) -> dict[str, float]:
    """The options loss ``name`` reads, with their defaults (a new dict): ``beta`` is 0.1 unless the
    loss's paper says otherwise (SimPO 2.0, DiscoPOP 0.05; ORPO has no β but ``orpo_lambda``), and
    each loss's own options (``label_smoothing``, ``simpo_gamma``, ``discopop_tau``, ``cpo_alpha``).
    Required options without a default (``bco_delta``) are in ``LOSS_REGISTRY[name].required``."""
    return dict(_lookup(name).defaults)


def unused_options(name: str, **given: Any) -> list[str]:
    """The options in ``given`` set (not ``None``) that loss ``name`` does not read, so that a config
    layer can warn or refuse; :func:`preference_loss` itself ignores them."""
    reads = set(_lookup(name).options) | {"rpo_alpha"}  # RPO's term is added to every loss
    return [k for k, v in given.items() if v is not None and k not in reads]


def _resolve(name: str, spec: LossSpec, given: dict[str, Any]) -> Options:
    options = dict(spec.defaults)
    options.update({k: v for k, v in given.items() if v is not None and k in spec.options})
    missing = [k for k in spec.required if options.get(k) is None]
    if missing:
        hint = " (the running mean of the implicit rewards; see bco_running_delta)" if "bco_delta" in missing else ""
        raise ValueError(f"loss '{name}' needs {', '.join(missing)}{hint}")
    return options


def preference_loss(name: str, logps: PairLogps, *, beta: float | None = None,
                    label_smoothing: float | None = None, simpo_gamma: float | None = None,
                    rpo_alpha: float | None = None, discopop_tau: float | None = None,
                    orpo_lambda: float | None = None, cpo_alpha: float | None = None,
                    bco_delta: Tensor | float | None = None) -> LossOutput:
    """The preference loss ``name`` (one of :data:`PREFERENCE_LOSSES`) on one batch.

    Options left at ``None`` take the loss's own defaults (:func:`loss_defaults`); options the loss
    does not read are ignored (:func:`unused_options` lists them). ``beta``: β of every loss but
    ORPO. ``label_smoothing``: ε of cDPO (``sigmoid``, ``sigmoid_norm``), robust DPO, AOT (cDPO-style)
    and EXO (default 10⁻³, must be > 0). ``simpo_gamma``: SimPO's target margin γ.
    ``discopop_tau``: DiscoPOP's τ. ``orpo_lambda``: ORPO's λ. ``cpo_alpha``: CPO's NLL weight.
    ``bco_delta``: BCO's reward shift δ, required by ``bco_pair`` (:func:`bco_running_delta`).
    ``rpo_alpha = α`` adds the RPO term (Pang et al. 2024, arXiv 2404.19733), the per-token negative
    log-likelihood of the chosen response: ``α·(−log π_θ(y_w|x) / |y_w|)``.

    ``ipo`` averages the log-probs per token before the IPO loss (TRL's form); ``ipo_sum`` uses the
    summed ones (the IPO paper's sequence log-probs). Batch-level losses (:func:`is_batch_level`:
    ``aot``, ``aot_unpaired``) must get the whole batch they are meant to be computed on.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; rewards are the implicit
    rewards ``β·(log π_θ − log π_ref)`` on summed log-probs (reference-free DPO and CPO:
    ``β·log π_θ``, SimPO: ``β·mean-token log π_θ``, ORPO: ``λ·mean-token log π_θ``), detached.
    Unknown names and bad options raise ValueError.
    """
    spec = _lookup(name)
    given = {"beta": beta, "label_smoothing": label_smoothing, "simpo_gamma": simpo_gamma,
             "discopop_tau": discopop_tau, "orpo_lambda": orpo_lambda, "cpo_alpha": cpo_alpha,
             "bco_delta": bco_delta}
    losses, chosen_rewards, rejected_rewards = spec.fn(logps, _resolve(name, spec, given))
    if rpo_alpha:
        losses = losses + rpo_alpha * _rpo_nll(logps, rpo_alpha)
    return losses, chosen_rewards, rejected_rewards


def validate_loss_options(names: Sequence[str], *, rpo_alpha: float | None = None, **options: Any) -> None:
    """Raise the ValueError a loss of ``names`` would raise for ``options`` (each loss checks its own
    ranges when computed), by computing each once on two made-up pairs: a config layer can then
    refuse a bad value before any model loads. ``bco_delta`` may be left out."""
    logps = torch.tensor([-2.0, -3.0], dtype=torch.float64)  # two pairs: AOT sorts over the batch
    lengths = torch.full((2,), 2.0, dtype=torch.float64)
    probe = PairLogps(logps, logps - 1, lengths, lengths, logps, logps - 1)
    given = {"bco_delta": 0.0, **{k: v for k, v in options.items() if v is not None}}
    for name in names:
        spec = _lookup(name)
        spec.fn(probe, _resolve(name, spec, given))
    if rpo_alpha:
        _rpo_nll(probe, rpo_alpha)


def _rpo_nll(logps: PairLogps, rpo_alpha: float) -> Tensor:
    if rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
    return -token_mean(logps.policy_chosen, logps.chosen_lengths)


class CombinedLoss(NamedTuple):
    """A weighted sum of preference losses: ``losses`` = Σ_k w_k·``terms[k]`` (+ α·NLL with RPO),
    ``(B,)``; rewards from the first term; ``terms``: name → that term's unweighted ``(B,)`` losses
    (plus ``"rpo_nll"`` → the chosen mean-token NLL when ``rpo_alpha`` is on); ``term_rewards``:
    name → that term's ``(chosen, rejected)`` rewards."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    terms: dict[str, Tensor]
    term_rewards: dict[str, tuple[Tensor, Tensor]]


def combined_preference_loss(names: Sequence[str], weights: Sequence[float] | None, logps: PairLogps, *,
                             rpo_alpha: float | None = None, **options: Any) -> CombinedLoss:
    """Σ_k w_k · loss_k per pair, like TRL's list-valued ``loss_type`` with ``loss_weights``.

    ``names``: distinct registry names, at least one; ``weights``: one finite weight ≥ 0 per name
    (``None``: all 1). ``options``: as :func:`preference_loss` (each term reads the ones it uses and
    takes its own defaults for the rest, so e.g. ``beta=None`` gives DiscoPOP its 0.05 and DPO its
    0.1; TRL shares one β). ``rpo_alpha`` is added once to the sum, not per term. The combination
    is batch-level if any term is. Returns a :class:`CombinedLoss`; rewards from the first term.
    """
    names = list(names)
    if not names:
        raise ValueError("combined_preference_loss needs at least one loss name")
    if len(set(names)) != len(names):
        raise ValueError(f"loss names must be distinct, got {names}")
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"got {len(names)} loss names but {len(weights)} weights")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"loss weights must be finite and >= 0, got {weights}")
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise ValueError(f"unknown loss options {unknown}; valid: {', '.join(LOSS_OPTIONS)}")
    for name in names:
        _lookup(name)  # every name checked before any is computed
    terms: dict[str, Tensor] = {}
    term_rewards: dict[str, tuple[Tensor, Tensor]] = {}
    total = None
    for name, weight in zip(names, weights):
        losses, chosen_rewards, rejected_rewards = preference_loss(name, logps, **options)
        terms[name], term_rewards[name] = losses, (chosen_rewards, rejected_rewards)
        total = weight * losses if total is None else total + weight * losses
    if rpo_alpha:
        terms["rpo_nll"] = _rpo_nll(logps, rpo_alpha)
        total = total + rpo_alpha * terms["rpo_nll"]
    return CombinedLoss(total, *term_rewards[names[0]], terms, term_rewards)
