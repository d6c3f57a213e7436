"""Critic-free online RL maths: GRPO / Dr. GRPO / DAPO advantages and losses, RLOO's baseline.

Pure functions over tensors. Completions are laid out prompt by prompt: a batch of ``N = P·G``
completions holds, for each of the P prompts, ``G`` consecutive completions (a "group").

* :func:`group_advantages` — GRPO's outcome-supervised advantage (Shao et al. 2024, arXiv 2402.03300,
  §4.1.2) and the batch-std / no-std variants;
* :func:`rloo_advantages`, :func:`kl_shaped_rewards` — RLOO (Kool et al. 2019; Ahmadian et al. 2024,
  arXiv 2402.14740);
* :func:`token_weights`, :func:`aggregate` — the three loss aggregations (per sequence, per token, by a
  constant), written as per-token weights plus a count of "units" so that a batch split into any
  micro-batches or processes gives exactly the whole-batch gradient;
* :func:`grpo_token_loss` — the clipped surrogate with DAPO's clip-higher plus GRPO's k3 penalty.

docs/online-rl-theory.md derives the fixed points of these objectives on a bandit and says where they
differ from the KL-regularised optimum π* (tests/test_online_theory.py checks them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpolab.losses.constants import ADVANTAGE_SCALES, AGGREGATIONS
from dpolab.losses.ppo import kl_k3, ppo_clip_loss

__all__ = [
    "AGGREGATIONS", "ADVANTAGE_SCALES", "aggregate", "group_advantages", "grpo_token_loss",
    "kl_shaped_rewards", "rloo_advantages", "token_weights", "zero_std_fraction",
]



def _check_rewards(rewards: Tensor, name: str = "rewards") -> None:
    if rewards.dim() != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(rewards.shape)}")
    bad = ~torch.isfinite(rewards)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] is {rewards[i].item()}: rewards must be finite "
                         f"({int(bad.sum())} non-finite value(s) in the batch)")


def _groups(rewards: Tensor, group_size: int, name: str = "group_size") -> Tensor:
    """Validate and view ``rewards`` (N,) as (P, G)."""
    _check_rewards(rewards)
    if group_size < 1:
        raise ValueError(f"{name} must be >= 1, got {group_size}")
    n = rewards.numel()
    if n == 0 or n % group_size:
        raise ValueError(f"the number of rewards ({n}) must be a positive multiple of {name} ({group_size}): "
                         "the batch holds consecutive groups of completions of one prompt")
    return rewards.view(n // group_size, group_size)  # (P, G)


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO advantages, ``A_i = (r_i − mean_group(r)) / (s + eps)``, shape (N,) -> (N,).

    ``scale`` chooses ``s``:

    * ``"group"``: the std of the completion's own group — GRPO's outcome supervision (Shao et al. 2024,
      arXiv 2402.03300, §4.1.2: ``Â_i = (r_i − mean(r)) / std(r)`` over the G outputs of one question);
    * ``"batch"``: the std of all N rewards of the batch, the group mean still subtracted — the
      "group-level mean, batch-level std" normalisation of Lite PPO (Liu et al. 2025, arXiv 2508.08221;
      TRL's ``scale_rewards="batch"``), motivated by REINFORCE++'s global normalisation (Hu 2025,
      arXiv 2501.03262). (REINFORCE++-baseline divides by the batch std of the *centred* rewards
      instead, which is not this.);
    * ``"none"``: no division, ``A_i = r_i − mean_group(r)`` (Dr. GRPO, Liu et al. 2025, arXiv
      2503.20783: the std term weights questions by the inverse spread of their rewards).

    Every std is the unbiased one (divisor n − 1, torch's default), as the public GRPO implementations
    compute it. ``eps`` keeps groups whose rewards are all equal finite: their numerators are 0, so
    their advantages are exactly 0 (see :func:`zero_std_fraction`).

    Example (G = 2, group std): r = (1, 0) -> mean ½, std = √(((½)² + (½)²)/1) = √½ = 0.7071,
    A = (±½)/(0.7071 + eps) ≈ (0.7070, −0.7070).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if scale == "group" and group_size == 1:
        raise ValueError("group_size G = 1 has no group std (one sample per prompt), so the group-normalised "
                         "advantage is undefined; use G >= 2, or scale='none' (or 'batch')")
    r = _groups(rewards, group_size)                          # (P, G)
    centred = r - r.mean(dim=1, keepdim=True)                 # (P, G)
    if scale == "group":
        s = r.std(dim=1, keepdim=True)                        # (P, 1), unbiased
    elif scale == "batch":
        if rewards.numel() < 2:
            raise ValueError("scale='batch' needs at least 2 rewards for a std")
        s = rewards.std()                                     # (), unbiased over all N
    else:
        return centred.reshape(-1)
    return (centred / (s + eps)).reshape(-1)


def zero_std_fraction(rewards: Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal: they get zero advantage and teach nothing.

    A logged metric (GRPO users report it, TRL issue #2688; DAPO's dynamic sampling filters such
    groups, Yu et al. 2025, arXiv 2503.14476, §3.2). Example: r = (1, 1, 0, 1), G = 2 -> groups
    (1, 1) and (0, 1) -> 1/2.
    """
    r = _groups(rewards, group_size)                          # (P, G)
    flat = (r == r[:, :1]).all(dim=1)                         # (P,)
    return float(flat.to(torch.float64).mean())


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """RLOO's leave-one-out advantage within each block of k samples of one prompt, (N,) -> (N,):

        A_i = r_i − (1/(k−1)) Σ_{j≠i} r_j

    (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; Ahmadian et al. 2024, arXiv
    2402.14740, §3.3 RLOO estimator.) The baseline of sample i uses only the other samples, so it is
    independent of y_i and the REINFORCE estimate stays unbiased. Since Σ_{j≠i} r_j = k·mean − r_i,

        A_i = r_i − (k·mean − r_i)/(k−1) = k/(k−1) · (r_i − mean).

    Example (k = 3): r = (3, 0, 0) -> A = (3 − 0, 0 − 1.5, 0 − 1.5) = (3, −1.5, −1.5) = 3/2·(2, −1, −1).
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 for a leave-one-out baseline, got {k}")
    r = _groups(rewards, k, name="k")                         # (P, k)
    others = (r.sum(dim=1, keepdim=True) - r) / (k - 1)       # (P, k) mean of the other k − 1
    return (r - others).reshape(-1)


def kl_shaped_rewards(scores: Tensor, seq_kl: Tensor, beta: float) -> Tensor:
    """RLOO's sequence reward ``r(x, y) − β·KL(y)``, shape (B,), detached.

    ``seq_kl`` is Σ_t (log π_θ(y_t|·) − log π_ref(y_t|·)) over the sampled completion's real tokens,
    the single-sample (k1) estimate of KL(π_θ‖π_ref) (Ahmadian et al. 2024, arXiv 2402.14740, §3: the
    whole completion is one action; Ziegler et al. 2019). The result is a fixed REINFORCE weight, so it
    is detached: differentiating the KL inside it adds only E[∇log π] = 0 in expectation, plus noise.
    Example: scores (1, 0), seq_kl (0.5, −0.2), β = 0.1 -> (0.95, 0.02).
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if scores.shape != seq_kl.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and seq_kl {tuple(seq_kl.shape)} must share one shape")
    return (scores - beta * seq_kl).detach()


def token_weights(mask: Tensor, mode: str, max_tokens: int | None = None, *,
                  dtype: torch.dtype | None = None, counted: Tensor | None = None) -> tuple[Tensor, int]:
    """Per-token weights ``w`` (B, T) and a count of units, with loss = Σ_bt w_bt·ℓ_bt / U.

    U is the number of units of the whole optimizer step, summed over every micro-batch and process,
    so an engine that backpropagates ``Σ w·ℓ / U_global`` on each piece gets the whole-batch gradient
    however the batch is split. ``mask`` (B, T) bool marks real completion tokens; |o_i| = Σ_t mask_it.

    * ``"sequence"`` — GRPO, Shao et al. 2024 eq. 3: (1/G) Σ_i (1/|o_i|) Σ_t ℓ_it, a mean per completion
      then over completions: ``w = mask/|o_i|``, units = completions;
    * ``"token"`` — DAPO, Yu et al. 2025, arXiv 2503.14476, eq. 8: (1/Σ_i|o_i|) Σ_i Σ_t ℓ_it, one mean
      over all tokens, so long completions weigh in proportion to their length: ``w = mask``,
      units = real tokens;
    * ``"constant"`` — Dr. GRPO, Liu et al. 2025, arXiv 2503.20783: (1/(G·L)) Σ_i Σ_t ℓ_it with L the
      maximum completion length ``max_tokens``, so no length-dependent factor biases the gradient:
      ``w = mask/L``, units = completions.

    "Completions" counts rows with at least one real token: a row of padding only (a filler row of an
    uneven split) has no loss and counts for nothing in any mode, so adding one changes nothing.
    ``counted`` (B,) bool, when given, says which rows are completions instead: a completion whose
    tokens ``mask`` leaves out (a masked truncated one) is then one of the G, with no loss, as the
    formulas above have it (it does not shrink G in "sequence" and "constant").
    Example: lengths (2, 1), T = 2, "sequence" -> w = ((½, ½), (1, 0)), units 2; "token" -> w = mask,
    units 3; "constant", L = 4 -> w = ((¼, ¼), (¼, 0)), units 2.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"mode must be one of {AGGREGATIONS}, got {mode!r}")
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a 2-D (B, T) bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    lengths = mask.sum(dim=1)                                  # (B,) |o_i|
    sequences = int((lengths > 0).sum()) if counted is None else int((counted | (lengths > 0)).sum())
    m = mask.to(dtype)                                         # (B, T)
    if mode == "sequence":
        return m / lengths.clamp_min(1).to(dtype)[:, None], sequences
    if mode == "token":
        return m, int(lengths.sum())
    if max_tokens is None or max_tokens < 1:
        raise ValueError(f"mode='constant' needs max_tokens (the maximum completion length L) >= 1, got {max_tokens}")
    if lengths.numel() and int(lengths.max()) > max_tokens:
        raise ValueError(f"a completion has {int(lengths.max())} tokens, more than max_tokens = {max_tokens}; "
                         "L must be the maximum completion length")
    return m / max_tokens, sequences


def aggregate(per_token_loss: Tensor, mask: Tensor, mode: str, max_tokens: int | None = None) -> Tensor:
    """The single-batch reduction ``Σ_bt w_bt·ℓ_bt / units`` of :func:`token_weights`, a scalar.

    Padding positions are zeroed before weighting, so a NaN/inf there cannot leak into the sum.
    """
    if per_token_loss.shape != mask.shape:
        raise ValueError(f"per_token_loss {tuple(per_token_loss.shape)} and mask {tuple(mask.shape)} must match")
    w, units = token_weights(mask, mode, max_tokens, dtype=per_token_loss.dtype)
    if units == 0:
        raise ValueError("the batch has no real completion token: nothing to average")
    return (w * per_token_loss.masked_fill(~mask, 0.0)).sum() / units


def grpo_token_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor, *,
                    eps_low: float = 0.2, eps_high: float | None = None,
                    beta: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's per-token loss (Shao et al. 2024, arXiv 2402.03300, eq. 3 inside the sums), (B, T):

        ℓ_it = −min(ρ_it Â_i, clip(ρ_it, 1 − ε_low, 1 + ε_high) Â_i) + β·k3_it,
        ρ_it = π_θ(o_it|·)/π_θold(o_it|·),    k3_it = π_ref/π_θ − log(π_ref/π_θ) − 1   (eq. 4)

    ``ε_high > ε_low`` is DAPO's clip-higher (Yu et al. 2025, arXiv 2503.14476, §3.1, in the
    objective eq. 8); ``eps_high`` defaults to ``eps_low``. The surrogate is :func:`dpolab.losses.ppo.ppo_clip_loss`; k3 is
    :func:`dpolab.losses.ppo.kl_k3` evaluated at the sampled tokens and differentiated through π_θ,
    as GRPO does (its expected gradient is that of the reverse KL(π_ref‖π_θ), see
    docs/online-rl-theory.md). ``logp``, ``old_logp``, ``ref_logp``: (B, T) log-probs of the sampled
    tokens; ``advantages``: (B,), one per completion, broadcast over its tokens; ``ref_logp`` may be
    None when ``beta == 0``. Reduce with :func:`aggregate` / :func:`token_weights`.

    Stats, detached, (B, T): ``ratio``; ``clipfrac_low`` (ρ < 1 − ε_low where Â < 0: the low clip
    binds, no gradient); ``clipfrac_high`` (ρ > 1 + ε_high where Â > 0); ``clipfrac`` (either; unlike
    ``ppo_clip_loss``'s, a ratio outside the range on the side that does not bind is not counted);
    ``kl`` (k3, zeros without a reference).

    Example: ρ = 1.5, Â = 1, ε = 0.2 -> ℓ = −min(1.5, 1.2) = −1.2, clipfrac_high 1; with ρ = 2,
    π_ref/π_θ = ½, β = 0.1: k3 = ½ + log 2 − 1 = 0.19315, ℓ = −1.2 + 0.019315.
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape:
        raise ValueError(f"logp and old_logp must be (B, T) of one shape, got {tuple(logp.shape)} "
                         f"and {tuple(old_logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be (B,) = ({logp.shape[0]},), got {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not eps_low > 0:
        raise ValueError(f"eps_low must be > 0, got {eps_low}")
    high = eps_low if eps_high is None else eps_high
    if not high > 0:
        raise ValueError(f"eps_high must be > 0, got {eps_high}")
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp (the reference log-probs of the sampled tokens)")
        if ref_logp.shape != logp.shape:
            raise ValueError(f"ref_logp {tuple(ref_logp.shape)} must match logp {tuple(logp.shape)}")
    adv = advantages.detach()[:, None].expand_as(logp)         # (B, T)
    loss, pstats = ppo_clip_loss(logp, old_logp, adv, eps_low, high)
    if beta > 0:
        kl = kl_k3(logp, ref_logp.detach())                    # (B, T) gradient through logp only
        loss = loss + beta * kl
        kl = kl.detach()
    else:
        kl = torch.zeros_like(logp).detach()
    with torch.no_grad():
        ratio = pstats["ratio"]
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).to(logp.dtype)
        high_hit = ((ratio > 1.0 + high) & (adv > 0)).to(logp.dtype)
        stats = {"ratio": ratio, "clipfrac_low": low, "clipfrac_high": high_hit,
                 "clipfrac": torch.maximum(low, high_hit), "kl": kl}
    return loss, stats
