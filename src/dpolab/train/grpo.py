"""Group Relative Policy Optimization (Shao et al. 2024, arXiv 2402.03300) and its variants, on the
shared engine (docs/grpo.md).

What is GRPO's own: the group-relative advantage ``A_i = (r_i − mean_G r) / (s + ε)`` with ``s`` the
group std, the batch std or 1 (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783), and the per-token loss:
the clipped surrogate with separate low and high ranges (DAPO's clip-higher, Yu et al. 2025, arXiv
2503.14476) plus ``β·k3(π_θ, π_ref)``, aggregated per sequence (the paper), per token over the
batch (DAPO) or by a constant (Dr. GRPO) — :mod:`dpolab.losses.grpo`. Sampling, rewards, the
optimization loop and multi-process exactness are shared (:mod:`dpolab.train.critic_free`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dpolab.config import opt
from dpolab.errors import ConfigError
from dpolab.losses.constants import ADVANTAGE_SCALES, AGGREGATIONS
from dpolab.train.command import cli
from dpolab.train.critic_free import CriticFree, train_critic_free
from dpolab.train.options import (
    GroupOptions,
    OnPolicyOptions,
    PromptSharingOptions,
    validate_groups,
    validate_on_policy,
)

DESCRIPTION = """Train a causal LM with GRPO: group-relative advantages from several sampled completions per prompt.

Prompts: rows with a `prompt` string or chat `messages`; every other field of a row (e.g. `answer`)
is passed to reward functions that name it. Rewards: --reward module:function (several, comma
separated, weighted by --reward-weights) and/or --reward-model DIR. Built-in verifiable tasks:
`dpolab task` writes prompt files whose exact-match reward is dpolab.rewards.tasks:exact_match.

example:
  dpolab task reverse --output-dir data/reverse
  dpolab grpo --model runs/sft/final --data data/reverse/train.jsonl --eval-data data/reverse/eval.jsonl \\
      --reward dpolab.rewards.tasks:exact_match --num-generations 8 --output-dir runs/grpo
"""


@dataclass
class GRPOConfig(OnPolicyOptions, GroupOptions, PromptSharingOptions):
    model: str = opt("", "policy to train (and default reference): a Hugging Face name or local folder (required)")
    ref_model: str | None = opt(None, "reference model for the KL term and eval/kl (default: a frozen copy of "
                                "--model; with --lora, the base with adapters off)")
    output_dir: str = opt("runs/grpo", "run directory")
    beta: float = opt(0.0, "β: weight of the k3 KL penalty to the reference (0: none, current practice)")
    epsilon: float = opt(0.2, "ε_low: the ratio is clipped below at 1 − ε_low")
    epsilon_high: float | None = opt(None, "ε_high: clipped above at 1 + ε_high (DAPO's clip-higher; default ε_low)")
    scale_rewards: str = opt("group", "divide the centred rewards by the group std, the batch std, or nothing "
                             "(Dr. GRPO)", choices=ADVANTAGE_SCALES)
    loss_aggregation: str = opt("sequence", "mean over each completion's tokens then over completions (the paper), "
                                "over all tokens of the batch (DAPO), or the sum over tokens / --max-new-tokens "
                                "(Dr. GRPO)", choices=AGGREGATIONS)
    learning_rate: float = opt(1e-6, "peak learning rate")

    def validate(self) -> None:
        validate_on_policy(self)
        validate_groups(self)
        if self.beta < 0 or self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ConfigError("need --beta >= 0, --epsilon > 0 and --epsilon-high > 0")
        if self.epsilon >= 1:  # 1 − ε <= 0: the low clip never binds (a typo: 2 for 0.2)
            raise ConfigError(f"--epsilon must be < 1 (the ratio's lower clip is 1 − ε), got {self.epsilon}")
        if self.num_generations < 2:  # r − mean over a group of one is 0: nothing to learn from the rewards
            raise ConfigError("--num-generations 1: every advantage r - mean(group) is 0, and there is no group std "
                              "to divide by; GRPO needs --num-generations >= 2")


class GRPO(CriticFree):
    name = "grpo"

    def advantages(self, s, old, ref):
        import torch

        from dpolab.losses.grpo import group_advantages
        from dpolab.train import distributed
        from dpolab.train.rollouts import global_moments

        cfg, G = self.cfg, self.cfg.num_generations
        scale = "none" if cfg.scale_rewards == "batch" else cfg.scale_rewards
        adv = group_advantages(s.scores.double(), G, scale=scale)
        if cfg.scale_rewards == "batch":  # the std of every completion of the step, all processes
            adv = adv / (global_moments(self.engine.accelerator, s.scores, s.real)[2] + 1e-4)
        spread = s.scores.view(-1, G).double()
        zero = float((spread.max(1).values == spread.min(1).values).sum()) * s.real
        zero, groups = distributed.global_sum(self.engine.accelerator, [zero, spread.shape[0] * float(s.real)])
        return adv.to(torch.float32), {"frac_reward_zero_std": zero / max(groups, 1)}

    def token_loss(self, logp, old, ref, adv):
        from dpolab.losses.grpo import grpo_token_loss

        cfg = self.cfg
        loss, st = grpo_token_loss(logp, old, ref, adv, eps_low=cfg.epsilon, eps_high=cfg.epsilon_high, beta=cfg.beta)
        out = {"clip_ratio/low": st["clipfrac_low"], "clip_ratio/high": st["clipfrac_high"],
               "clip_ratio/region": st["clipfrac"]}
        if cfg.beta > 0:
            out["kl"] = st["kl"]
        return loss, out

    def weights(self, mask, counted):
        from dpolab.losses.grpo import token_weights

        return token_weights(mask, self.cfg.loss_aggregation, self.cfg.max_new_tokens, counted=counted)


def train(cfg: GRPOConfig) -> dict:
    """Run GRPO as configured; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    return train_critic_free(cfg, GRPO)


def cli_main(argv: list[str], prog: str) -> int:
    return cli(GRPOConfig, train, argv, prog, DESCRIPTION)
