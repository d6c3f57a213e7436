"""Pure loss functions over tensors: unreduced per-element values plus detached stats; each cites its paper.

Modules: ``ppo`` and ``pg`` (policy gradient, A2C, PPO, value, KL estimators), ``dpo`` (the
preference-loss registry, dispatch and combinations; re-exports the losses of ``margin``,
``anchored``, ``aot``, ``reference_free`` and ``weighting``), ``kto``, ``grpo`` (GRPO and RLOO
group advantages and the token loss), ``bradley_terry`` (the reward model's loss), ``constants``.
"""

import importlib

# Lazy re-exports (PEP 562): ``from dpolab.losses import dpo_loss`` works, and importing a submodule
# for its names (``dpolab.losses.constants``) does not import torch through this package.
_EXPORTS = {
    "CombinedLoss": "dpolab.losses.dpo",
    "LOSS_REGISTRY": "dpolab.losses.dpo",
    "LossSpec": "dpolab.losses.dpo",
    "PREFERENCE_LOSSES": "dpolab.losses.dpo",
    "PairLogps": "dpolab.losses.dpo",
    "aot_loss": "dpolab.losses.dpo",
    "aot_unpaired_loss": "dpolab.losses.dpo",
    "apo_down_loss": "dpolab.losses.dpo",
    "apo_zero_loss": "dpolab.losses.dpo",
    "bco_pair_loss": "dpolab.losses.dpo",
    "bco_running_delta": "dpolab.losses.dpo",
    "bradley_terry_loss": "dpolab.losses.bradley_terry",
    "combined_preference_loss": "dpolab.losses.dpo",
    "cpo_loss": "dpolab.losses.dpo",
    "discopop_loss": "dpolab.losses.dpo",
    "dpo_loss": "dpolab.losses.dpo",
    "exo_pair_loss": "dpolab.losses.dpo",
    "hinge_loss": "dpolab.losses.dpo",
    "ipo_loss": "dpolab.losses.dpo",
    "is_batch_level": "dpolab.losses.dpo",
    "kto_loss": "dpolab.losses.kto",
    "kto_mismatched_completions": "dpolab.losses.kto",
    "kto_reference_point": "dpolab.losses.kto",
    "kto_reference_point_from_sums": "dpolab.losses.kto",
    "kto_weight_ratio": "dpolab.losses.kto",
    "kto_weights_for_imbalance": "dpolab.losses.kto",
    "log_odds": "dpolab.losses.dpo",
    "loss_defaults": "dpolab.losses.dpo",
    "nca_pair_loss": "dpolab.losses.dpo",
    "needs_reference": "dpolab.losses.dpo",
    "orpo_loss": "dpolab.losses.dpo",
    "preference_loss": "dpolab.losses.dpo",
    "reference_free_dpo_loss": "dpolab.losses.dpo",
    "robust_dpo_loss": "dpolab.losses.dpo",
    "simpo_loss": "dpolab.losses.dpo",
    "sppo_hard_loss": "dpolab.losses.dpo",
    "unused_options": "dpolab.losses.dpo",
    "validate_loss_options": "dpolab.losses.dpo",
    "wpo_token_log_normalizer": "dpolab.losses.dpo",
    "wpo_weights": "dpolab.losses.dpo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dpolab.losses' has no attribute {name!r}")
