"""WPO pair weights (Zhou et al. 2024, arXiv 2406.11827): reweight off-policy preference pairs by how
likely the current policy is to produce them.

WPO multiplies each pair's preference loss by a detached weight::

    loss_WPO(pair) = w(x, y_w) · w(x, y_l) · loss(pair)

    w(x, y) = exp( (1/|y|) · Σ_t a_t ),   a_t = log π_θ(y_t | x, y_<t) − log Σ_v π_θ(v | x, y_<t)²

(the paper's weight with its *alignment* of the sampling distribution, eq. 2). ``Σ_v π_θ(v)²`` is
the expected probability of a token the policy samples itself, ``E_{v∼π}[π(v)]``, so dividing by it
makes the expected per-token ratio under the policy's own sampling exactly 1 whatever the entropy of
that position; without it (``a_t = log π_θ(y_t)``) high-entropy positions would drive every weight
towards 0. The weights are computed with the current policy and carry no gradient.

What the trainer must sum, per response token t (``z`` the policy's logits at the position that
predicts ``y_t``): ``a_t = log_softmax(z)[y_t] − wpo_token_log_normalizer(z)``, and
``wpo_token_log_normalizer(z) = logsumexp(2z) − 2·logsumexp(z) = log Σ_v softmax(z)_v²``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpolab.losses._common import check_shapes, token_mean


def wpo_token_log_normalizer(logits: Tensor) -> Tensor:
    """``log Σ_v π(v)²`` over the last dimension, for logits ``(..., V)`` → ``(...)``, detached.

    ``= logsumexp(2z) − 2·logsumexp(z)``, never forming the probabilities; computed in at least
    float32. ≤ 0, and 0 only for a one-hot distribution. For long sequences and large vocabularies
    the caller chunks the positions, as it does for the log-probs themselves.
    """
    z = logits.detach()
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1)


def wpo_weights(chosen_aligned_logps: Tensor, chosen_lengths: Tensor, rejected_aligned_logps: Tensor,
                rejected_lengths: Tensor, *, max_weight: float | None = None) -> Tensor:
    """The WPO pair weights ``w(x, y_w)·w(x, y_l)``, ``(B,)``, detached.

    ``*_aligned_logps``: ``Σ_t a_t`` over each response's tokens (module docstring), ``(B,)``;
    ``*_lengths``: the response token counts, clamped to ≥ 1. ``w = exp(mean_t a_t)``, so the pair
    weight is ``exp(ā_w + ā_l)``. ``max_weight``: clip the pair weight from above (older TRL clipped
    at 1; the paper does not clip, the default). Multiply the per-pair losses by it:
    ``losses * wpo_weights(...)``.
    """
    check_shapes(chosen_aligned_logps, rejected_aligned_logps, chosen_lengths, rejected_lengths)
    if max_weight is not None and not max_weight > 0:
        raise ValueError(f"max_weight must be > 0 or None, got {max_weight}")
    log_w = token_mean(chosen_aligned_logps.detach(), chosen_lengths) + token_mean(
        rejected_aligned_logps.detach(), rejected_lengths)
    weights = torch.exp(log_w)
    return weights if max_weight is None else weights.clamp(max=max_weight)
