"""Bradley-Terry reward-model training (docs/reward-model.md).

The model is the LM backbone with a scalar head (:mod:`dpolab.reward`); each micro-batch is one
forward pass over chosen and rejected rows concatenated on the batch axis; the loss is
``−log σ(r_w − r_l − m)`` (:func:`dpolab.losses.reward.bradley_terry_loss`) averaged over all pairs
of an optimizer step. Held-out pairwise accuracy is ``eval/accuracy`` in ``summary.json``; the model
is saved to ``final/`` in Hugging Face format (``AutoModelForSequenceClassification``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dpolab.config import opt, parse_config
from dpolab.errors import ConfigError
from dpolab.rundir import RunDir
from dpolab.train.distributed import is_main_process
from dpolab.train.options import BatchOptions, ModelOptions, OptimizerOptions, RunOptions

DESCRIPTION = """Train a Bradley-Terry reward model (LM backbone + scalar head) on preference pairs.

Data: the preference formats of `dpolab dpo` (prompt/chosen/rejected strings, implicit prompt, chat
messages; docs/data-formats.md). Writes the run directory of docs/run-directory.md; summary.json
holds "eval/accuracy" (held-out pairs ranked as labelled) and "eval/loss". Score texts afterwards
with dpolab.reward.score("OUTPUT_DIR/final", prompts, completions).

example:
  dpolab rm --model path/to/sft --data prefs.jsonl --output-dir runs/rm
"""


@dataclass
class RewardConfig(RunOptions, ModelOptions, BatchOptions, OptimizerOptions):
    model: str = opt("", "backbone: a causal LM (a new scalar head is added) or a saved reward model (required)")
    data: str = opt("", "training preference data: file, save_to_disk folder or hub name (required)")
    eval_data: str | None = opt(None, "held-out preference data (default: --eval-fraction of --data)")
    eval_fraction: float = opt(0.05, "fraction of --data held out for evaluation when --eval-data is not given")
    output_dir: str = opt("runs/rm", "run directory")
    margin: float | None = opt(None, "margin m in −log σ(r_w − r_l − m) (off when unset)")
    max_length: int = opt(512, "maximum prompt+response tokens")
    max_prompt_length: int = opt(256, "maximum prompt tokens (prompts are truncated first, keeping their end)")
    gradient_checkpointing: bool = opt(False, "trade compute for memory")

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("--model is required (a Hugging Face name or a local folder)")
        if not self.data:
            raise ConfigError("--data is required (a preference data file, folder or hub name)")
        for name in ("batch_size", "grad_accum", "max_length", "max_prompt_length", "save_total_limit",
                     "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError("--max-prompt-length must be smaller than --max-length")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError("--eval-fraction must be in [0, 1)")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError("--eval-batch-size must be >= 1")


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor, losses: torch.Tensor) -> dict[str, float]:
    """Batch means: ``loss``, ``accuracy`` (fraction with r_w > r_l, ties count as wrong),
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (r_w − r_l)."""
    c, r = chosen.detach().float(), rejected.detach().float()
    return {"loss": losses.detach().float().mean().item(), "accuracy": (c > r).float().mean().item(),
            "rewards/chosen": c.mean().item(), "rewards/rejected": r.mean().item(),
            "rewards/margins": (c - r).mean().item()}


def train(cfg: RewardConfig) -> dict:
    """Train a reward model as configured; returns the summary (also OUTPUT_DIR/summary.json)."""
    from dpolab.data import collate_preference, load_preference_data, pad_token_id_for
    from dpolab.data.bucketing import batch_order, pair_lengths
    from dpolab.losses.reward import bradley_terry_loss
    from dpolab.reward import RewardModel, load_reward_model
    from dpolab.train import common, distributed
    from dpolab.train.supervised_loop import Task, run_loop

    accelerator, tokenizer = distributed.start_run(cfg)
    data = load_preference_data(cfg.data, tokenizer, max_length=cfg.max_length,
                                max_prompt_length=cfg.max_prompt_length, eval_source=cfg.eval_data,
                                eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    report = data.report.as_dict()
    if cfg.dry_run:
        return common.dry_run_report(cfg, report)

    hf_model = load_reward_model(cfg.model, tokenizer, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        hf_model.gradient_checkpointing_enable()
    model = RewardModel(hf_model)
    run = RunDir(cfg.output_dir, keep_last=cfg.save_total_limit)
    ckpt = common.resume_run(run, cfg.resume)
    pad_id = pad_token_id_for(tokenizer)

    order = batch_order(pair_lengths(data.train), cfg, accelerator)
    steps = common.total_steps(cfg.max_steps, cfg.epochs, order.per_epoch, cfg.grad_accum)
    optimizer = common.make_optimizer(model.parameters(), cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    scheduler = common.make_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_steps, steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    def loss(batch):
        """One forward over the (2B, T) batch: rows [0, B) chosen, [B, 2B) rejected."""
        rewards = model(batch.input_ids, batch.attention_mask, batch.position_ids)   # (2B,)
        B = batch.batch_size
        losses = bradley_terry_loss(rewards[:B], rewards[B:], cfg.margin)          # (B,)
        return losses.sum(), pair_stats(rewards[:B], rewards[B:], losses)

    def evaluate() -> dict[str, float]:
        if not data.eval:
            return {}
        rows, weights = [], []
        for idx in distributed.eval_shards(len(data.eval), cfg.eval_batch_size or cfg.batch_size, accelerator):
            batch = collate_preference([data.eval[i] for i in idx or [0]], pad_id).to(accelerator.device)
            rows.append(loss(batch)[1])
            weights.append(len(idx))  # 0: a stand-in batch keeping collective passes aligned
        return distributed.reduce_weighted(accelerator, rows, weights)[0]

    def save_final(path: Path, state_dict) -> None:
        if state_dict is not None:  # gathered from FSDP/DeepSpeed shards: keys of the RewardModel wrapper
            state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        common.save_pretrained_atomic(accelerator.unwrap_model(model).model, tokenizer, path, state_dict=state_dict)

    task = Task(name="rm", make_batch=lambda idx: collate_preference([data.train[i] for i in idx], pad_id)
                .to(accelerator.device), units=lambda b: b.batch_size, tokens=lambda b: int(b.attention_mask.sum()),
                loss=loss, evaluate=evaluate, save_final=save_final, bar_keys=("loss", "accuracy"))
    if accelerator.is_main_process:
        run.create()
        run.write_config(cfg)
        (run.path / "data_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return run_loop(cfg, task, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                    order=order, steps=steps, run=run, ckpt=ckpt, report=report)


def cli_main(argv: list[str], prog: str) -> int:
    cfg = parse_config(RewardConfig, argv, prog=prog, description=DESCRIPTION)
    summary = train(cfg)
    if not summary.get("dry_run") and not summary.get("stopped") and is_main_process():
        print(f"done: {cfg.output_dir} (final reward model in {Path(cfg.output_dir) / 'final'})")
    return 0
