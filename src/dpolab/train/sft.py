"""Supervised fine-tuning of a causal LM, the first stage of RLHF (Ouyang et al. 2022, arXiv 2203.02155;
docs/sft.md).

The loss is the mean negative log-likelihood of the target tokens (completion tokens by default,
every token with ``--loss-on full``), averaged over all target tokens of an optimizer step's
micro-batches. With ``--packing`` examples are concatenated into rows of ``--max-length`` tokens,
position ids restart per example and a 4D block-diagonal causal mask keeps attention inside each
example, so a packed batch has exactly the loss of the same examples padded
(tests/test_train_sft.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dpolab.config import opt
from dpolab.errors import ConfigError
from dpolab.train.algorithm import Algorithm
from dpolab.train.command import cli, dry_run_report
from dpolab.train.options import TrainerOptions, check_positions, eval_split_of, validate_common

if TYPE_CHECKING:
    import torch

    from dpolab.train.engine import Engine

DESCRIPTION = """Supervised fine-tuning of a causal LM on prompt/completion, conversational or plain-text data.

Data: JSONL/JSON/Parquet/CSV files, a `datasets.save_to_disk` folder or a hub name whose rows hold
{"prompt", "completion"}, {"messages": [{"role", "content"}, ...]} (rendered with the tokenizer's
chat template; the loss covers assistant turns) or {"text"} (docs/sft.md). Writes the run directory
of docs/run-directory.md; summary.json holds "eval/loss" (mean NLL per target token).

example:
  dpolab sft --model path/to/base --data sft.jsonl --packing --output-dir runs/sft
"""


def perplexity(mean_nll: float) -> float:
    """exp(mean token NLL); inf where exp would overflow (past ~709), NaN for a NaN loss (it fails
    both comparisons: it was reported as inf)."""
    return math.exp(mean_nll) if mean_nll < 700 else float("inf") if mean_nll >= 700 else float("nan")


@dataclass
class SFTConfig(TrainerOptions):
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
        validate_common(self, data_what="an SFT data file, folder or hub name")
        if self.max_length < 2:
            raise ConfigError("--max-length must be >= 2")


def batch_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the target tokens of an :class:`~dpolab.data.sft.SFTBatch` and their count.

    Returns ``(nll_sum, n_targets)``: a scalar float32 tensor (with grad) and a scalar long. Token
    ``t`` is scored by the logits at ``t - 1`` (``dpolab.lm.model_sequence_logps``); packed rows get
    the block-diagonal mask of :meth:`SFTBatch.model_attention_mask`."""
    import torch

    from dpolab.lm.logps import model_sequence_logps

    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    dtype = next(inner.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float64):
        dtype = torch.float32
    mask = batch.model_attention_mask(dtype, getattr(config, "_attn_implementation", None))
    logps, counts = model_sequence_logps(model, batch.input_ids, mask, batch.loss_mask, batch.position_ids)
    return -logps.sum(), counts.sum()


class SFT(Algorithm):
    """Summed NLL of the target tokens; the unit of the loss is a target token."""

    name = "sft"

    def __init__(self, cfg: SFTConfig, engine: Engine, data, rows, pad_id: int, budget: int):
        self.cfg, self.engine, self.data, self.rows, self.pad_id = cfg, engine, data, rows, pad_id
        self.lora, self.micro_batches, self.budget = cfg.lora, cfg.grad_accum, budget
        self.widths = [len(r) for r in rows]

    def passes(self, engine, group):
        from dpolab.data.batching import split_by_tokens
        from dpolab.data.sft import collate_sft

        return engine.micro_batch_passes(
            group, lambda idx: collate_sft([self.rows[i] for i in idx], self.pad_id).to(engine.device),
            lambda b: b.num_targets, lambda b: int(b.attention_mask.sum()),
            split=lambda rows: split_by_tokens(rows, self.widths, self.budget))

    def loss(self, batch):
        nll, n = batch_nll(self.engine.model, batch)
        return nll, {"loss": nll.item() / max(int(n), 1)}

    def summary(self, engine):
        return {"micro_batch_tokens": self.budget, **super().summary(engine)}

    def evaluate(self):
        """Per-token mean NLL over all processes' blocks of the eval split."""
        from dpolab.data.sft import collate_sft
        from dpolab.train import distributed

        if not self.data.eval:
            return {}
        acc, total, count = self.engine.accelerator, 0.0, 0
        for idx in distributed.eval_shards(len(self.data.eval), self.cfg.eval_batch_size or self.cfg.batch_size, acc):
            batch = collate_sft([self.data.eval[i] for i in idx or [0]], self.pad_id).to(acc.device)
            nll, n = batch_nll(self.engine.model, batch)
            if idx:  # an empty block runs a stand-in batch (aligned collective passes), not counted
                total, count = total + float(nll), count + int(n)
        total, count = distributed.global_sum(acc, [total, count])
        count = int(count)
        mean = total / max(count, 1)
        return {"loss": mean, "perplexity": perplexity(mean), "tokens": count}




def train(cfg: SFTConfig) -> dict:
    """Run SFT as configured; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    from dpolab.config import check_config
    from dpolab.data.batching import batch_order
    from dpolab.data.collate import pad_token_id_for
    from dpolab.data.sft import load_sft_data, pack_examples
    from dpolab.lm.loading import load_trainable_lm
    from dpolab.train import distributed
    from dpolab.train.engine import Engine
    from dpolab.train.memory import resolve_micro_batch_tokens

    cfg = check_config(cfg)  # a config built in Python: converted and checked as the command line's
    accelerator, tokenizer = distributed.start_run(cfg, SFT.name)
    data = load_sft_data(cfg.data, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                         loss_on=cfg.loss_on, eval_source=cfg.eval_data, eval_fraction=cfg.eval_fraction,
                         seed=cfg.seed, split=cfg.data_split, eval_split=eval_split_of(cfg))
    report = data.report.as_dict()
    rows = pack_examples(data.train, cfg.max_length) if cfg.packing else data.train
    report["train_batch_rows"] = len(rows)
    check_positions(cfg, max(len(r) for r in [*rows, *data.eval]))
    if cfg.dry_run:
        return dry_run_report(cfg, report)

    engine = Engine(cfg, accelerator, load_trainable_lm(cfg), tokenizer=tokenizer, report=report)
    engine.plan(batch_order([len(r) for r in rows], cfg, accelerator), micro_batches=cfg.grad_accum)
    budget = resolve_micro_batch_tokens(cfg, engine.unwrapped)
    return engine.run(SFT(cfg, engine, data, rows, pad_token_id_for(tokenizer), budget))


def cli_main(argv: list[str], prog: str) -> int:
    return cli(SFTConfig, train, argv, prog, DESCRIPTION)
