"""Evaluating policies against a reward: shared by LM PPO (``dpolab ppo``), DPO and the demo.

A *reward function* is any ``f(prompts: list[str], completions: list[str]) -> list[float]`` (one
finite number per pair). It can be a Python callable named ``module:function`` (or
``path/to/file.py:function``), see :func:`load_reward_function`, or a trained reward model folder,
see :func:`reward_model_function`.

Quantities (each estimated from samples y ~ π(·|x), one or more per prompt):

- mean reward  E_x E_{y~π}[r(x, y)];
- sequence-level KL(π‖π_ref)(x) = E_{y~π}[log π(y|x) − log π_ref(y|x)], estimated by the mean over
  samples of Σ_t (log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)) over response tokens (EOS included):
  the k1 estimator, unbiased (a single sample can be negative);
- win rate of model A over model B: P(r(x, y_A) > r(x, y_B)) + ½ P(r(x, y_A) = r(x, y_B)).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from dpolab.errors import DpolabError
from dpolab.generation import Generation, decode_responses, generate

RewardFn = Callable[[list[str], list[str]], Sequence[float]]

__all__ = [
    "RewardFn", "compute_rewards", "evaluate_policy", "load_reward_function", "mean_reward",
    "model_win_rate", "response_token_logps", "reward_model_function", "sample_completions",
    "sequence_kl", "win_rate", "win_rate_from_rewards",
]


# -- reward functions -------------------------------------------------------------------------------
def load_reward_function(spec: str) -> RewardFn:
    """Import ``module:function`` (the current directory and PYTHONPATH are searched) or
    ``path/to/file.py:function``. Raises :class:`DpolabError` for a malformed spec, a module that
    cannot be imported, or a missing / non-callable attribute."""
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise DpolabError(f"--reward {spec!r}: expected 'module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise DpolabError(f"--reward {spec!r}: file not found: {path}")
            mod_spec = importlib.util.spec_from_file_location(f"_dpolab_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except DpolabError:
        raise
    except Exception as err:  # an import error, or any error raised by the module's own code
        raise DpolabError(f"--reward {spec!r}: cannot import '{module_name}': "
                          f"{type(err).__name__}: {err}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise DpolabError(f"--reward {spec!r}: module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise DpolabError(f"--reward {spec!r}: '{attr}' is not callable")
    return fn


def reward_model_function(model, tokenizer, *, batch_size: int = 16) -> RewardFn:
    """A reward function scoring with a trained reward model through ``dpolab.reward.score``."""
    from dpolab import reward as reward_mod

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        out = reward_mod.score(model, prompts, completions, tokenizer=tokenizer, batch_size=batch_size)
        return [float(x) for x in (out.tolist() if hasattr(out, "tolist") else out)]

    return score


def compute_rewards(fn: RewardFn, prompts: list[str], completions: list[str]) -> torch.Tensor:
    """Call ``fn`` and check its answer: one finite real number per completion. Returns (B,) float32.

    Raises :class:`DpolabError` naming the function for an exception inside it, a non-sequence, a
    wrong length, a non-number or a NaN/inf."""
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        out = fn(list(prompts), list(completions))
    except Exception as err:
        raise DpolabError(f"reward function {name} raised {type(err).__name__}: {err}") from None
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().reshape(-1).tolist() if out.dim() <= 1 else out
    elif hasattr(out, "tolist") and getattr(out, "ndim", 1) <= 1:
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise DpolabError(f"reward function {name} must return a list of floats, got {type(out).__name__}")
    if len(out) != len(completions):
        raise DpolabError(f"reward function {name} returned {len(out)} values for {len(completions)} completions")
    values = []
    for i, v in enumerate(out):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DpolabError(f"reward function {name} returned {type(v).__name__} at position {i}; "
                              "expected a float")
        if not math.isfinite(float(v)):
            raise DpolabError(f"reward function {name} returned a non-finite value ({v}) at position {i}")
        values.append(float(v))
    return torch.tensor(values, dtype=torch.float32)


def mean_reward(fn: RewardFn, prompts: list[str], completions: list[str]) -> float:
    """Mean of ``fn`` over the (prompt, completion) pairs."""
    return float(compute_rewards(fn, prompts, completions).double().mean())


def win_rate_from_rewards(rewards_a: torch.Tensor, rewards_b: torch.Tensor) -> float:
    """mean(1[a > b] + ½·1[a = b]) over paired rewards (ties count half)."""
    a, b = torch.as_tensor(rewards_a, dtype=torch.float64), torch.as_tensor(rewards_b, dtype=torch.float64)
    if a.shape != b.shape or a.numel() == 0:
        raise DpolabError(f"win rate needs equal, non-empty reward lists, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(((a > b).double() + 0.5 * (a == b).double()).mean())


def win_rate(fn: RewardFn, prompts: list[str], completions_a: list[str], completions_b: list[str]) -> float:
    """How often completion A beats completion B for the same prompt under ``fn`` (ties count half)."""
    return win_rate_from_rewards(compute_rewards(fn, prompts, completions_a),
                                 compute_rewards(fn, prompts, completions_b))


# -- sampling and log-probs -------------------------------------------------------------------------
def response_token_logps(model, gen: Generation, *, temperature: float = 1.0) -> torch.Tensor:
    """log π(y_t | x, y_<t) of each response token, 0 after EOS. Returns (B, R) float32.

    The logits at position P − 1 + t predict response token t; they are divided by ``temperature``
    (> 0) to match the distribution the tokens were sampled from (0, i.e. greedy, counts as 1).
    """
    from dpolab.lm import gather_token_logps

    P = gen.prompt_length
    out = model(input_ids=gen.input_ids, attention_mask=gen.attention_mask, position_ids=gen.position_ids,
                use_cache=False)
    logits = out.logits[:, P - 1:-1]  # (B, R, V)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logps = gather_token_logps(logits, gen.response_ids).float()
    return logps * gen.response_mask


def _reference_context(policy, ref_model):
    """(model to run, context) for the reference: ``ref_model``, or a PEFT policy with adapters off."""
    if ref_model is not None:
        return ref_model, nullcontext()
    if hasattr(policy, "disable_adapter"):
        return policy, policy.disable_adapter()
    raise DpolabError("no reference model given and the policy is not a PEFT (LoRA) model")


@torch.no_grad()
def sequence_kl(policy, ref_model, gen: Generation, *, temperature: float = 1.0) -> torch.Tensor:
    """Per-sample Σ_t (log π − log π_ref) over response tokens. Returns (B,) float32; its mean
    estimates KL(π‖π_ref) when ``gen`` was sampled from ``policy``. ``ref_model=None`` uses a PEFT
    policy's base (adapters disabled)."""
    logp = response_token_logps(policy, gen, temperature=temperature)
    model, ctx = _reference_context(policy, ref_model)
    with ctx:
        ref_logp = response_token_logps(model, gen, temperature=temperature)
    return ((logp - ref_logp) * gen.response_mask).sum(dim=1)


@torch.no_grad()
def sample_completions(model, tokenizer, prompts_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                       batch_size: int = 32) -> tuple[list[str], list[Generation]]:
    """Sample one completion per prompt (seeded), in batches. Returns (texts, per-batch Generations)."""
    device = next(model.parameters()).device
    gen_rng = torch.Generator(device=device).manual_seed(seed)
    texts, gens = [], []
    for i in range(0, len(prompts_ids), batch_size):
        gen = generate(model, tokenizer, prompts_ids[i:i + batch_size], max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, generator=gen_rng)
        texts.extend(decode_responses(tokenizer, gen))
        gens.append(gen)
    return texts, gens


@torch.no_grad()
def evaluate_policy(policy, tokenizer, prompt_texts: list[str], prompts_ids: Sequence[Sequence[int]],
                    reward_fn: RewardFn, *, ref_model=None, compute_kl: bool = True, max_new_tokens: int,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    batch_size: int = 32) -> dict[str, float]:
    """Sample from ``policy`` on the prompts; return ``reward`` (mean), ``reward_std``, ``kl``
    (sequence KL to the reference, if ``compute_kl``), ``response_length`` and ``eos_fraction``."""
    was_training = policy.training
    policy.eval()
    try:
        texts, gens = sample_completions(policy, tokenizer, prompts_ids, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                         batch_size=batch_size)
        rewards = compute_rewards(reward_fn, list(prompt_texts), texts).double()
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
