"""Evaluating policies against a reward: shared by the on-policy trainers, DPO, ``dpolab eval`` and the demo.

Quantities (each estimated from samples y ~ π(·|x), one or more per prompt):

- mean reward  E_x E_{y~π}[r(x, y)];
- sequence-level KL(π‖π_ref)(x) = E_{y~π}[log π(y|x) − log π_ref(y|x)], estimated by the mean over
  samples of Σ_t (log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)) over response tokens (EOS included):
  the k1 estimator, unbiased (a single sample can be negative);
- win rate of model A over model B: P(r(x, y_A) > r(x, y_B)) + ½ P(r(x, y_A) = r(x, y_B)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpolab.errors import DpolabError
from dpolab.lm.generation import sample_completions
from dpolab.lm.logps import sequence_kl
from dpolab.rewards.functions import RewardFn, compute_rewards

__all__ = ["evaluate_policy", "mean_reward", "model_win_rate", "win_rate", "win_rate_from_rewards"]


def mean_reward(fn: RewardFn, prompts: list[str], completions: list[str]) -> float:
    """Mean of ``fn`` over the (prompt, completion) pairs."""
    return float(compute_rewards(fn, prompts, completions, dtype=torch.float64).mean())


def win_rate_from_rewards(rewards_a: torch.Tensor, rewards_b: torch.Tensor) -> float:
    """mean(1[a > b] + ½·1[a = b]) over paired rewards (ties count half)."""
    a, b = torch.as_tensor(rewards_a, dtype=torch.float64), torch.as_tensor(rewards_b, dtype=torch.float64)
    if a.shape != b.shape or a.numel() == 0:
        raise DpolabError(f"win rate needs equal, non-empty reward lists, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(((a > b).double() + 0.5 * (a == b).double()).mean())


def win_rate(fn: RewardFn, prompts: list[str], completions_a: list[str], completions_b: list[str]) -> float:
    """How often completion A beats completion B for the same prompt under ``fn`` (ties count half)."""
    # float64: float32 would round rewards that differ by little into ties
    return win_rate_from_rewards(compute_rewards(fn, prompts, completions_a, dtype=torch.float64),
                                 compute_rewards(fn, prompts, completions_b, dtype=torch.float64))


@torch.no_grad()
def evaluate_policy(policy, tokenizer, prompt_texts: list[str], prompts_ids: Sequence[Sequence[int]],
                    reward_fn: RewardFn, *, ref_model=None, compute_kl: bool = True, max_new_tokens: int,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    batch_size: int = 32, columns: dict[str, list] | None = None, fast: bool = True) -> dict[str, float]:
    """Sample from ``policy`` on the prompts; return ``reward`` (mean), ``reward_std``, ``kl``
    (sequence KL to the reference, if ``compute_kl``), ``response_length`` and ``eos_fraction``.
    ``columns``: the prompt rows' other fields, for reward functions that take them; ``fast``:
    ``generate``'s (False: sample through the model's own forward)."""
    was_training = policy.training
    policy.eval()
    try:
        texts, gens = sample_completions(policy, tokenizer, prompts_ids, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                         batch_size=batch_size, fast=fast)
        rewards = compute_rewards(reward_fn, list(prompt_texts), texts, columns, dtype=torch.float64)
        out = {"reward": float(rewards.mean()),
               "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
               "response_length": float(torch.cat([g.response_lengths for g in gens]).double().mean()),
               "eos_fraction": float(torch.cat([g.finished for g in gens]).double().mean())}
        if compute_kl:
            kls = torch.cat([sequence_kl(policy, ref_model, g, temperature=temperature) for g in gens])
            out["kl"] = float(kls.double().mean())
    finally:
        policy.train(was_training)
    return out


@torch.no_grad()
def model_win_rate(model_a, model_b, tokenizer, prompt_texts: list[str], prompts_ids: Sequence[Sequence[int]],
                   reward_fn: RewardFn, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, seed: int = 0, batch_size: int = 32) -> float:
    """Win rate of ``model_a`` over ``model_b``: one sample from each per prompt, compared under
    ``reward_fn`` (ties count half)."""
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              batch_size=batch_size)
    texts_a, _ = sample_completions(model_a, tokenizer, prompts_ids, seed=seed, **kw)
    texts_b, _ = sample_completions(model_b, tokenizer, prompts_ids, seed=seed + 1, **kw)
    return win_rate(reward_fn, list(prompt_texts), texts_a, texts_b)
