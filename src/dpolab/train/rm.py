"""Bradley-Terry reward-model training (Bradley & Terry 1952; for language models Ouyang et al. 2022,
arXiv 2203.02155; docs/reward-model.md). The reward of (prompt, response) is read at the EOS ending
the response: score with ``dpolab.rewards.functions.score``, or with transformers on the prompt and
the response tokenized apart and the tokenizer's EOS appended to the response.

The model is the LM backbone with a scalar head (:mod:`dpolab.lm.reward_model`); each micro-batch is one
forward pass, over each pair as one prefix-shared row ``[prompt | chosen | rejected]`` when a check
shows the model exact that way (:mod:`dpolab.train.pair_layout`: the prompt is computed once), else
over chosen and rejected rows concatenated on the batch axis; the loss is
``−log σ(r_w − r_l − m)`` (:func:`dpolab.losses.bradley_terry.bradley_terry_loss`) averaged over all pairs
of an optimizer step. Held-out pairwise accuracy is ``eval/accuracy`` in ``summary.json``; the model
is saved to ``final/`` in Hugging Face format (``AutoModelForSequenceClassification``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dpolab.config import opt
from dpolab.train.algorithm import Algorithm
from dpolab.train.command import cli, dry_run_report
from dpolab.train.options import (
    BatchOptions,
    ModelOptions,
    OptimizerOptions,
    RunOptions,
    SplitOptions,
    check_pair_positions,
    validate_common,
)

if TYPE_CHECKING:
    import torch

    from dpolab.train.engine import Engine

DESCRIPTION = """Train a Bradley-Terry reward model (LM backbone + scalar head) on preference pairs.

Data: the preference formats of `dpolab dpo` (prompt/chosen/rejected strings, implicit prompt, chat
messages; docs/data-formats.md). Writes the run directory of docs/run-directory.md; summary.json
holds "eval/accuracy" (held-out pairs ranked as labelled) and "eval/loss". Score texts afterwards
with dpolab.rewards.functions.score("OUTPUT_DIR/final", prompts, completions).

example:
  dpolab rm --model path/to/sft --data prefs.jsonl --output-dir runs/rm
"""


@dataclass
class RewardConfig(RunOptions, ModelOptions, BatchOptions, OptimizerOptions, SplitOptions):
    model: str = opt("", "backbone: a causal LM (a new scalar head is added) or a saved reward model (required)")
    data: str = opt("", "training preference data: file, save_to_disk folder or hub name (required)")
    eval_data: str | None = opt(None, "held-out preference data (default: --eval-fraction of --data)")
    eval_fraction: float = opt(0.05, "fraction of --data held out for evaluation when --eval-data is not given")
    output_dir: str = opt("runs/rm", "run directory")
    margin: float | None = opt(None, "margin m in −log σ(r_w − r_l − m) (off when unset)")
    max_length: int = opt(512, "maximum prompt+response tokens")
    max_prompt_length: int | None = opt(None, "maximum prompt tokens (prompts are truncated first, keeping their "
                                        "end) (default: --max-length // 2)")
    prefix_sharing: bool | None = opt(None, "run each pair as one row [prompt|chosen|rejected] with a 4D mask, so the "
                                      "prompt is computed once; unset: on when a check on the first pairs shows "
                                      "the model gives the same rewards that way")
    gradient_checkpointing: bool = opt(False, "trade compute for memory")

    def validate(self) -> None:
        validate_common(self, data_what="a preference data file, folder or hub name")


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor, losses: torch.Tensor) -> dict[str, float]:
    """Batch means: ``loss``, ``accuracy`` (fraction with r_w > r_l, ties count as wrong),
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (r_w − r_l)."""
    c, r = chosen.detach().float(), rejected.detach().float()
    return {"loss": losses.detach().float().mean().item(), "accuracy": (c > r).float().mean().item(),
            "rewards/chosen": c.mean().item(), "rewards/rejected": r.mean().item(),
            "rewards/margins": (c - r).mean().item()}


class RewardModelTraining(Algorithm):
    """Bradley-Terry loss over chosen and rejected rows in one forward pass; the unit is a pair."""

    name = "rm"
    bar_keys = ("loss", "accuracy")
    summary_keys = ("steps", "eval/loss", "eval/accuracy", "loss", "wall_seconds")

    def __init__(self, cfg: RewardConfig, engine: Engine, data, pad_id: int, budget: int, *, prefix: bool,
                 widths: list[int]):
        self.cfg, self.engine, self.data, self.pad_id = cfg, engine, data, pad_id
        self.micro_batches, self.budget, self.prefix, self.widths = cfg.grad_accum, budget, prefix, widths

    def _collate(self, pairs):
        from dpolab.train.pair_layout import collate_pairs

        return collate_pairs(self.prefix, pairs, self.pad_id).to(self.engine.device)

    def passes(self, engine, group):
        from dpolab.data.batching import split_by_tokens
        from dpolab.train.pair_layout import batch_tokens

        return engine.micro_batch_passes(group, lambda idx: self._collate([self.data.train[i] for i in idx]),
                                         lambda b: b.batch_size, batch_tokens,
                                         split=lambda rows: split_by_tokens(rows, self.widths, self.budget))

    def summary(self, engine):
        return {"prefix_sharing": self.prefix, "micro_batch_tokens": self.budget, **super().summary(engine)}

    def loss(self, batch):
        """One forward over the batch (either layout): rewards of rows [0, B) chosen, [B, 2B) rejected."""
        from dpolab.losses.bradley_terry import bradley_terry_loss

        rewards = reward_scores(self.engine.model, batch)[0]                                     # (2B,)
        B = batch.batch_size
        losses = bradley_terry_loss(rewards[:B], rewards[B:], self.cfg.margin)                  # (B,)
        return losses.sum(), pair_stats(rewards[:B], rewards[B:], losses)

    def evaluate(self):
        from dpolab.train import distributed

        if not self.data.eval:
            return {}
        acc, rows, weights = self.engine.accelerator, [], []
        for idx in distributed.eval_shards(len(self.data.eval), self.cfg.eval_batch_size or self.cfg.batch_size, acc):
            rows.append(self.loss(self._collate([self.data.eval[i] for i in idx or [0]]))[1])
            weights.append(len(idx))  # 0: a stand-in batch keeping collective passes aligned
        return distributed.reduce_weighted(acc, rows, weights)[0]

    def save_final(self, engine, path: Path, state_dict) -> None:
        from dpolab.runs.checkpoint import save_pretrained_atomic

        if state_dict is not None:  # gathered from FSDP/DeepSpeed shards: keys of the RewardModel wrapper
            state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        save_pretrained_atomic(self.engine.unwrapped.model, self.engine.tokenizer, path, state_dict=state_dict)



def reward_scores(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) rewards of a batch of pairs in either layout (chosen, then rejected) and a unit scale:
    what the loss reads and what the prefix-sharing check compares."""
    import torch

    rewards = model(batch.input_ids, batch.attention_mask, batch.position_ids, segment=getattr(batch, "segment", None))
    return rewards, torch.ones_like(rewards)


def train(cfg: RewardConfig) -> dict:
    """Train a reward model as configured; returns the summary (also OUTPUT_DIR/summary.json)."""
    from dpolab.config import check_config
    from dpolab.data import pad_token_id_for
    from dpolab.data.batching import batch_order, pair_lengths
    from dpolab.lm.loading import enable_checkpointing
    from dpolab.lm.reward_model import RewardModel, load_reward_model
    from dpolab.train import distributed
    from dpolab.train.engine import Engine
    from dpolab.train.memory import resolve_micro_batch_tokens
    from dpolab.train.pair_layout import load_pairs, pair_widths, resolve_prefix_sharing

    cfg = check_config(cfg)  # a config built in Python: converted and checked as the command line's
    accelerator, tokenizer = distributed.start_run(cfg, RewardModelTraining.name)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        from dpolab.lm.reward_model import pad_apart_from_eos

        token = pad_apart_from_eos(tokenizer)
        if distributed.is_main_process():
            print(f"note: the tokenizer pads with its EOS; final/ pads with {token!r} instead, so that transformers' "
                  "AutoModelForSequenceClassification reads the reward at the EOS, where it is trained" if token else
                  "note: the tokenizer pads with its EOS and has no other special token to pad with: transformers' "
                  "AutoModelForSequenceClassification forward of final/ reads the reward one token before the EOS, "
                  "where it is not trained; score with dpolab.rewards.functions.score", file=sys.stderr)
    data = load_pairs(cfg, tokenizer)
    report = data.report.as_dict()
    check_pair_positions(cfg, data)
    if cfg.dry_run:
        return dry_run_report(cfg, report)

    hf_model = load_reward_model(cfg.model, tokenizer, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        enable_checkpointing(hf_model)
    engine = Engine(cfg, accelerator, RewardModel(hf_model), tokenizer=tokenizer, report=report)
    pad_id = pad_token_id_for(tokenizer)
    prefix = resolve_prefix_sharing(cfg, engine.model, data.train, pad_id, accelerator, inner=hf_model,
                                    score=reward_scores)
    # the steps' pairs as in the plain layout, whichever runs (the same batches either way); the
    # passes within a step split by the width each pair has in the layout that runs
    engine.plan(batch_order(pair_lengths(data.train), cfg, accelerator), micro_batches=cfg.grad_accum)
    widths = pair_widths(data.train, prefix)
    budget = resolve_micro_batch_tokens(cfg, hf_model)  # the backbone's shape sets the activations
    return engine.run(RewardModelTraining(cfg, engine, data, pad_id, budget, prefix=prefix, widths=widths))


def cli_main(argv: list[str], prog: str) -> int:
    return cli(RewardConfig, train, argv, prog, DESCRIPTION, final='final reward model')
