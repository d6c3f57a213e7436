"""Supervised fine-tuning of a causal LM (docs/sft.md).

The loss is the mean negative log-likelihood of the target tokens (completion tokens by default,
every token with ``--loss-on full``), averaged over all target tokens of an optimizer step's
micro-batches. With ``--packing`` examples are concatenated into rows of ``--max-length`` tokens,
position ids restart per example and a 4D block-diagonal causal mask keeps attention inside each
example, so a packed batch has exactly the loss of the same examples padded
(tests/test_train_sft.py).
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
from dpolab.train.options import BatchOptions, LoraOptions, ModelOptions, OptimizerOptions, RunOptions

DESCRIPTION = """Supervised fine-tuning of a causal LM on prompt/completion, conversational or plain-text data.

Data: JSONL/JSON/Parquet/CSV files, a `datasets.save_to_disk` folder or a hub name whose rows hold
{"prompt", "completion"}, {"messages": [{"role", "content"}, ...]} (rendered with the tokenizer's
chat template; the loss covers assistant turns) or {"text"} (docs/sft.md). Writes the run directory
of docs/run-directory.md; summary.json holds "eval/loss" (mean NLL per target token).

example:
  dpolab sft --model path/to/base --data sft.jsonl --packing --output-dir runs/sft
"""


@dataclass
class SFTConfig(RunOptions, ModelOptions, LoraOptions, BatchOptions, OptimizerOptions):
    model: str = opt("", "model to fine-tune: a Hugging Face name or local folder (required)")
    data: str = opt("", "training data: file, save_to_disk folder or hub name (required)")
    eval_data: str | None = opt(None, "held-out data (default: --eval-fraction of --data)")
    eval_fraction: float = opt(0.05, "fraction of --data held out for evaluation when --eval-data is not given")
    output_dir: str = opt("runs/sft", "run directory")
    loss_on: str = opt("completion", "which tokens the loss covers: completion/assistant tokens, or all",
                       choices=("completion", "full"))
    packing: bool = opt(False, "pack several examples per row (block-diagonal attention, exact loss)")
    max_length: int = opt(1024, "maximum tokens per example (and per packed row)")
    max_prompt_length: int | None = opt(None, "prompt tokens kept when truncating (default: --max-length // 2)")
    learning_rate: float = opt(2e-5, "peak learning rate")
    gradient_checkpointing: bool = opt(False, "trade compute for memory")

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("--model is required (a Hugging Face name or a local folder)")
        if not self.data:
            raise ConfigError("--data is required (an SFT data file, folder or hub name)")
        for name in ("batch_size", "grad_accum", "save_total_limit", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_length < 2:
            raise ConfigError("--max-length must be >= 2")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise ConfigError("--max-prompt-length must be >= 1 and smaller than --max-length")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError("--eval-fraction must be in [0, 1)")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError("--eval-batch-size must be >= 1")


def batch_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the target tokens of an :class:`~dpolab.data.sft.SFTBatch` and their count.

    Returns ``(nll_sum, n_targets)``: a scalar float32 tensor (with grad) and a scalar long. Token
    ``t`` is scored by the logits at ``t - 1`` (``dpolab.lm.model_sequence_logps``); packed rows get
    the block-diagonal mask of :meth:`SFTBatch.model_attention_mask`."""
    from dpolab.lm import model_sequence_logps

    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    dtype = next(inner.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float64):
        dtype = torch.float32
    mask = batch.model_attention_mask(dtype, getattr(config, "_attn_implementation", None))
    logps, counts = model_sequence_logps(model, batch.input_ids, mask, batch.loss_mask, batch.position_ids)
    return -logps.sum(), counts.sum()


def train(cfg: SFTConfig) -> dict:
    """Run SFT as configured; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    from dpolab.data.bucketing import batch_order
    from dpolab.data.collate import pad_token_id_for
    from dpolab.data.sft import collate_sft, load_sft_data, pack_examples
    from dpolab.train import common, distributed
    from dpolab.train.supervised_loop import Task, run_loop

    accelerator, tokenizer = distributed.start_run(cfg)
    data = load_sft_data(cfg.data, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                         loss_on=cfg.loss_on, eval_source=cfg.eval_data, eval_fraction=cfg.eval_fraction,
                         seed=cfg.seed)
    report = data.report.as_dict()
    rows = pack_examples(data.train, cfg.max_length) if cfg.packing else data.train
    report["train_batch_rows"] = len(rows)
    if cfg.dry_run:
        return common.dry_run_report(cfg, report)

    model = common.load_trainable_lm(cfg)
    run = RunDir(cfg.output_dir, keep_last=cfg.save_total_limit)
    ckpt = common.resume_run(run, cfg.resume)
    pad_id = pad_token_id_for(tokenizer)

    order = batch_order([len(r) for r in rows], cfg, accelerator)
    steps = common.total_steps(cfg.max_steps, cfg.epochs, order.per_epoch, cfg.grad_accum)
    optimizer = common.make_optimizer(model.parameters(), cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    scheduler = common.make_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_steps, steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    def loss(batch):
        nll, n = batch_nll(model, batch)
        return nll, {"loss": nll.item() / max(int(n), 1)}

    def evaluate() -> dict[str, float]:
        if not data.eval:
            return {}
        total, count = 0.0, 0
        for idx in distributed.eval_shards(len(data.eval), cfg.eval_batch_size or cfg.batch_size, accelerator):
            nll, n = batch_nll(model, collate_sft([data.eval[i] for i in idx or [0]], pad_id).to(accelerator.device))
            if idx:  # an empty block runs a stand-in batch (aligned collective passes), not counted
                total, count = total + float(nll), count + int(n)
        total, count = distributed.global_sum(accelerator, [total, count])  # per-token mean over all processes
        count = int(count)
        mean = total / max(count, 1)
        return {"loss": mean, "perplexity": float(torch.tensor(mean).exp()), "tokens": count}

    def save_final(path: Path, state_dict) -> None:
        final = accelerator.unwrap_model(model)
        if cfg.lora:
            final = final.merge_and_unload()
        common.save_pretrained_atomic(final, tokenizer, path, state_dict=state_dict)

    task = Task(name="sft", make_batch=lambda idx: collate_sft([rows[i] for i in idx], pad_id).to(accelerator.device),
                units=lambda b: b.num_targets, tokens=lambda b: int(b.attention_mask.sum()), loss=loss,
                evaluate=evaluate, save_final=save_final)
    if accelerator.is_main_process:
        run.create()
        run.write_config(cfg)
        (run.path / "data_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return run_loop(cfg, task, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                    order=order, steps=steps, run=run, ckpt=ckpt, report=report,
                    weight_filter=(lambda k: "lora_" in k) if cfg.lora else None)


def cli_main(argv: list[str], prog: str) -> int:
    cfg = parse_config(SFTConfig, argv, prog=prog, description=DESCRIPTION)
    summary = train(cfg)
    if not summary.get("dry_run") and not summary.get("stopped") and is_main_process():
        print(f"done: {cfg.output_dir} (final model in {Path(cfg.output_dir) / 'final'})")
    return 0
