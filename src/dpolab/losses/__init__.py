"""Pure loss functions over tensors: unreduced per-element values plus detached stats; each cites its paper.

Modules: ``ppo`` and ``pg`` (policy gradient, A2C, PPO, value, KL estimators), ``dpo``, ``reward``.
"""

from dpolab.losses.dpo import (
    PREFERENCE_LOSSES,
    PairLogps,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    needs_reference,
    preference_loss,
    reference_free_dpo_loss,
    robust_dpo_loss,
    simpo_loss,
)
from dpolab.losses.reward import bradley_terry_loss

__all__ = [
    "PREFERENCE_LOSSES",
    "PairLogps",
    "bradley_terry_loss",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "needs_reference",
    "preference_loss",
    "reference_free_dpo_loss",
    "robust_dpo_loss",
    "simpo_loss",
]
