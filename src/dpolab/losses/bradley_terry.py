"""The Bradley-Terry reward-model loss.

Under the Bradley-Terry model (Bradley & Terry 1952; the seed lecture's reward-model slide;
Ouyang et al. 2022, arXiv 2203.02155, eq. 1) the probability that ``y_w`` is preferred to ``y_l``
is ``σ(r(x, y_w) − r(x, y_l))``. The reward model is fit by minimising the negative log-likelihood

    −log σ(r_w − r_l − m)

with an optional per-pair margin ``m`` (Llama 2, Touvron et al. 2023, arXiv 2307.09288, eq. 2:
a larger margin for pairs rated as clearly different).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor,
                       margin: Tensor | float | None = None) -> Tensor:
    """Per-pair Bradley-Terry loss ``−log σ(r_w − r_l − m)``, unreduced.

    Args:
        chosen_rewards: ``(B,)`` scalar rewards ``r(x, y_w)`` of the preferred responses.
        rejected_rewards: ``(B,)`` rewards ``r(x, y_l)`` of the dispreferred responses.
        margin: ``None`` (no margin), a float, or a ``(B,)`` tensor ``m``.

    Returns:
        ``(B,)`` losses. At ``r_w − r_l = m`` the loss is ``ln 2``; its gradient with respect to
        ``r_w`` is ``−σ(−(r_w − r_l − m))``.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen and rejected rewards must share one shape, got "
                         f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}")
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)
