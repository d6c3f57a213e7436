"""REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv 2402.14740; Kool et al. 2019) on the shared
engine (docs/rloo.md).

What is RLOO's own: the KL penalty folded into the sequence reward, ``R = r − β·KL`` with KL the
sampled completion's summed log-ratio ``log π − log π_ref`` (k1), and each completion baselined by
the mean reward of the other ``k − 1`` of its prompt (:mod:`dpolab.losses.grpo`). The update is
REINFORCE on the sequence log-probability, ``−A·Σ_t log π(y_t)`` averaged over completions, or the
same with PPO's clipped ratio per token (``--update clip``). Sampling, rewards, the optimization
loop and multi-process exactness are shared (:mod:`dpolab.train.critic_free`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dpolab.config import opt
from dpolab.errors import ConfigError
from dpolab.train.command import cli
from dpolab.train.critic_free import CriticFree, train_critic_free
from dpolab.train.options import (
    GroupOptions,
    OnPolicyOptions,
    PromptSharingOptions,
    validate_groups,
    validate_on_policy,
)

DESCRIPTION = """Train a causal LM with RLOO: k sampled completions per prompt, each baselined by the other k − 1.

Prompts, rewards and built-in tasks as for `dpolab grpo` (docs/rloo.md). The reward each completion
is credited with is its score minus β times its sequence KL to the reference.

example:
  dpolab rloo --model runs/sft/final --data data/reverse/train.jsonl --reward dpolab.rewards.tasks:exact_match \\
      --num-generations 4 --beta 0.05 --output-dir runs/rloo
"""


@dataclass
class RLOOConfig(OnPolicyOptions, GroupOptions, PromptSharingOptions):
    model: str = opt("", "policy to train (and default reference): a Hugging Face name or local folder (required)")
    ref_model: str | None = opt(None, "reference model of the KL penalty (default: a frozen copy of --model; "
                                "with --lora, the base with adapters off)")
    output_dir: str = opt("runs/rloo", "run directory")
    num_generations: int = opt(4, "k: completions sampled per prompt (k >= 2: each is baselined by the others)")
    beta: float = opt(0.05, "β: the KL penalty folded into the sequence reward, r − β·KL(π‖π_ref)")
    update: str = opt("reinforce", "REINFORCE on the sequence log-prob, or PPO's clipped ratio per token",
                      choices=("reinforce", "clip"))
    epsilon: float = opt(0.2, "ε of --update clip")
    READ_ONLY_WITH = {"epsilon": (lambda cfg: cfg.update == "clip", "--update clip")}
    learning_rate: float = opt(1e-6, "peak learning rate")

    def validate(self) -> None:
        validate_on_policy(self)
        validate_groups(self)
        if self.num_generations < 2:
            raise ConfigError("--num-generations must be >= 2: RLOO baselines each completion by the other k − 1")
        if self.beta < 0 or self.epsilon <= 0:
            raise ConfigError("need --beta >= 0 and --epsilon > 0")
        if self.epsilon >= 1:  # 1 − ε <= 0: the low clip never binds (a typo: 2 for 0.2)
            raise ConfigError(f"--epsilon must be < 1 (the ratio's lower clip is 1 − ε), got {self.epsilon}")


class RLOO(CriticFree):
    name = "rloo"
    @classmethod
    def needs_old_logps(cls, cfg) -> bool:
        return cfg.beta > 0  # the KL of the reward is the sampling policy's

    @classmethod
    def uses_reference_for(cls, cfg) -> bool:
        return cfg.beta > 0

    def advantages(self, s, old, ref):
        import torch

        from dpolab.losses.grpo import kl_shaped_rewards, rloo_advantages
        from dpolab.train.rollouts import global_moments

        mask = s.gen.response_mask
        seq_kl = ((old - ref) * mask).sum(1) if ref is not None else torch.zeros_like(s.scores)
        shaped = kl_shaped_rewards(s.scores, seq_kl, self.cfg.beta)
        acc = self.engine.accelerator
        return rloo_advantages(shaped.double(), self.cfg.num_generations).to(torch.float32), {
            "kl": global_moments(acc, seq_kl, s.real)[1], "rlhf_reward": global_moments(acc, shaped, s.real)[1]}

    def token_loss(self, logp, old, ref, adv):
        from dpolab.losses.ppo import ppo_clip_loss

        if self.cfg.update == "clip":
            loss, st = ppo_clip_loss(logp, old, adv[:, None].expand_as(logp), self.cfg.epsilon)
            return loss, {"clip_ratio/region": st["clipfrac"]}
        return -adv[:, None] * logp, {}

    def weights(self, mask, counted):
        # the sequence log-prob is the sum over its tokens; the loss is the mean over completions
        # (a masked truncated one counts, with no loss)
        import torch

        return mask.to(torch.float32), int((counted | mask.any(1)).sum())


def train(cfg: RLOOConfig) -> dict:
    """Run RLOO as configured; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    return train_critic_free(cfg, RLOO)


def cli_main(argv: list[str], prog: str) -> int:
    return cli(RLOOConfig, train, argv, prog, DESCRIPTION)
