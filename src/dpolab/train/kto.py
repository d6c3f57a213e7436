"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306) on the shared engine (docs/kto.md).

What is KTO's own: unpaired examples (:mod:`dpolab.data.unpaired`), the reference point z0 and the
loss of :mod:`dpolab.losses.kto`. Row ``i`` travels as the pair ``(x_i, y_i, y_j(i))`` with a fixed
mismatched partner ``j(i)``, so the pair batches and the reference of :mod:`dpolab.train.reference`
(precomputed and cached by default, a live frozen model, or the PEFT base) serve it unchanged; the
passes that score both halves without gradients (reference precompute, evaluation) take the
prefix-shared layout when exact. A step:

1. z0 = max(0, mean of log π_θ(y_j(i)|x_i) − log π_ref(y_j(i)|x_i)) over the step's rows on ALL
   processes: a no-grad pass over the mismatched halves, then one all-reduce of (sum, count);
2. the engine's exact step over the matched halves with that z0, detached as in the paper.

A row's mismatched pair is fixed, so z0 depends only on the step's rows and the weights: the step is
the same under any split into passes, micro-batches or processes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dpolab.config import opt
from dpolab.errors import ConfigError
from dpolab.losses.constants import KTO_BETA, KTO_DESIRABLE_WEIGHT, KTO_UNDESIRABLE_WEIGHT
from dpolab.train.algorithm import Algorithm
from dpolab.train.command import cli, dry_run_report
from dpolab.train.options import (
    TrainerOptions,
    check_pair_positions,
    check_ref_cache_dir,
    eval_split_of,
    validate_common,
)

if TYPE_CHECKING:
    import torch

    from dpolab.train.engine import Engine

DESCRIPTION = """Train a causal LM with KTO on completions labelled desirable or undesirable.

Data: JSONL/JSON/Parquet/CSV files, a `datasets.save_to_disk` folder or a hub name, with unpaired
rows {"prompt", "completion", "label": true/false} (strings or chat messages), or preference pairs
(prompt/chosen/rejected, implicit prompt, chat), each split into a desirable and an undesirable
example (docs/kto.md). Writes the run directory of docs/run-directory.md.

example:
  dpolab kto --model path/to/sft --data feedback.jsonl --beta 0.1 --output-dir runs/kto
"""


@dataclass
class KTOConfig(TrainerOptions):
    model: str = opt("", "policy model to train: a Hugging Face name or local folder (required)")
    ref_model: str | None = opt(None, "reference model (default: a frozen copy of --model; with --lora, the base with adapters off)")
    data: str = opt("", "training data: unpaired rows (prompt, completion, label) or preference pairs split into a "
                    "desirable and an undesirable example; file, save_to_disk folder or hub name (required)")
    eval_data: str | None = opt(None, "held-out data, same formats (default: --eval-fraction of --data)")
    eval_fraction: float = opt(0.05, "fraction of --data rows held out for evaluation when --eval-data is not given "
                               "(a pair's two examples stay together)")
    output_dir: str = opt("runs/kto", "run directory")
    beta: float = opt(KTO_BETA, "β: implicit-reward scale / strength of the KL constraint")
    desirable_weight: float = opt(KTO_DESIRABLE_WEIGHT, "λ_D: weight of the desirable examples' losses")
    undesirable_weight: float = opt(KTO_UNDESIRABLE_WEIGHT, "λ_U: weight of the undesirable examples' losses (a "
                                    "warning says when λ_D·n_D/(λ_U·n_U) leaves the paper's [1, 4/3])")
    learning_rate: float = opt(1e-6, "peak learning rate")
    max_length: int = opt(512, "maximum prompt+completion tokens")
    max_prompt_length: int | None = opt(None, "maximum prompt tokens (prompts are truncated first, keeping their "
                                        "end) (default: --max-length // 2)")
    precompute_ref: bool = opt(True, "compute reference log-probs (of each row's completion and its mismatched one) "
                               "once before training, cached on disk; --no-precompute-ref runs a live reference")
    ref_cache_dir: str | None = opt(None, "where precomputed reference log-probs are cached (default: OUTPUT_DIR/cache)")
    prefix_sharing: bool | None = opt(None, "in the no-grad passes that score both a row's completion and its mismatched "
                                      "one (reference precompute, evaluation), run them as one row "
                                      "[prompt|completion|mismatched] with a 4D mask, the prompt computed once; unset: "
                                      "on when a check on the first rows shows the model gives the same log-probs "
                                      "that way")
    gradient_checkpointing: bool = opt(False, "trade compute for memory")

    def validate(self) -> None:
        validate_common(self, data_what="an unpaired or preference data file, folder or hub name")
        check_ref_cache_dir(self)
        if not self.beta > 0:
            raise ConfigError("--beta must be > 0")
        if not (self.desirable_weight > 0 and self.undesirable_weight > 0):
            raise ConfigError("--desirable-weight and --undesirable-weight must be > 0")


def half_logps(model, batch, mismatched: bool = False) -> torch.Tensor:
    """(B,) summed completion log-probs of one half of a plain (2B, T) batch of rows: ``(x_i, y_i)``, or
    with ``mismatched`` ``(x_i, y_j(i))``; cut to that half's own width (right padding)."""
    from dpolab.lm.logps import model_sequence_logps

    B = batch.batch_size
    rows = slice(B, 2 * B) if mismatched else slice(0, B)
    width = int(batch.attention_mask[rows].sum(1).max())
    parts = (batch.input_ids, batch.attention_mask, batch.loss_mask, batch.position_ids)
    return model_sequence_logps(model, *(t[rows, :width] for t in parts))[0]


class KTO(Algorithm):
    """The KTO loss over rows ``(x_i, y_i)`` with a per-step z0 from the rows' mismatched pairs."""

    name = "kto"
    bar_keys = ("loss", "kl", "rewards/margins")
    summary_keys = ("steps", "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/kl", "loss",
                    "wall_seconds")

    def __init__(self, cfg: KTOConfig, engine: Engine, data, *, widths: list[int], budget: int, reference, collate,
                 prefix: bool, collate_scored):
        import torch

        from dpolab.data.unpaired import implied_pairs

        self.cfg, self.engine, self.data, self.lora = cfg, engine, data, cfg.lora
        self.widths, self.budget, self.reference, self.collate = widths, budget, reference, collate
        self.prefix, self.collate_scored = prefix, collate_scored  # both halves at once: eval, reference
        self.micro_batches = cfg.grad_accum
        self.desirable = {s: torch.tensor([r.desirable for r in getattr(data, s)], dtype=torch.bool)
                          for s in ("train", "eval")}
        self.eval_pairs = implied_pairs(data.eval)
        self.weights = {"beta": cfg.beta, "desirable_weight": cfg.desirable_weight,
                        "undesirable_weight": cfg.undesirable_weight}

    def passes(self, engine, group):
        from dpolab.data.batching import split_by_tokens
        from dpolab.train.pair_layout import batch_tokens

        return engine.micro_batch_passes(
            group, lambda rows: self.collate([self.data.train[i] for i in rows]), lambda b: b.batch_size,
            batch_tokens, split=lambda rows: split_by_tokens(rows, self.widths, self.budget))

    def step(self, engine, group):
        import torch

        from dpolab.losses.kto import kto_metric_means, kto_reference_point_from_sums
        from dpolab.train import distributed

        passes = self.passes(engine, group)
        local = [0.0, 0.0]  # Σ log-ratio of the mismatched pairs, their count (real rows of this process)
        for p in passes:
            ref, ref_kl = self.reference.pair_logps(p.batch, "train")
            with torch.no_grad():  # in the training mode: z0 measured as the loss measures ρ
                kl = half_logps(engine.model, p.batch, mismatched=True)
            if p.real:
                local[0] += float((kl - ref_kl).sum())
                local[1] += p.units
            p.batch = (p.batch, ref)
        total, n = distributed.global_sum(engine.accelerator, local)
        z0 = float(kto_reference_point_from_sums(total, n)) if n else 0.0
        out = engine.optimizer_step(passes, lambda b: self.loss(*b, z0),
                                    where=f"micro-batches {group[0][0]}..{group[-1][0]}")
        # the engine's means are Σ/N of the per-row sums: back to sums, then per-class means
        return None if out is None else {**kto_metric_means({k: v * n for k, v in out.items()}, n), "kl": z0,
                                         "grad_norm": out["grad_norm"]}

    def loss(self, batch, ref, z0: float):
        from dpolab.losses.kto import kto_loss, kto_metric_sums

        logps = half_logps(self.engine.model, batch)
        desirable = self.desirable["train"][batch.index.cpu()].to(logps.device)
        losses, _, stats = kto_loss(logps, ref, desirable, z0, **self.weights)
        return losses.sum(), {k: v / batch.batch_size for k, v in kto_metric_sums(losses, logps, desirable, stats).items()}

    def evaluate(self):
        """One no-grad pass over the eval split (each process its block); from the gathered per-row
        log-probs: z0 over the whole split, the loss, and the accuracy on its implied pairs."""
        import torch

        from dpolab.losses.kto import kto_loss, kto_metric_means, kto_metric_sums, kto_reference_point
        from dpolab.train import distributed
        from dpolab.train.pair_layout import batch_logps

        rows, acc = self.data.eval, self.engine.accelerator
        if not rows:
            return {}
        table = torch.zeros(len(rows), 4, dtype=torch.float64)  # policy, ref of (x_i, y_i); of (x_i, y_j(i))
        for idx in distributed.eval_shards(len(rows), self.cfg.eval_batch_size or self.cfg.batch_size, acc):
            batch = self.collate_scored([rows[i] for i in idx or [0]])  # a stand-in batch keeps collectives aligned
            logps = batch_logps(self.engine.model, batch)[0]
            ref, ref_kl = self.reference.pair_logps(batch, "eval")
            B = batch.batch_size
            if idx:
                table[idx] = torch.stack([logps[:B], ref, logps[B:], ref_kl], 1).double().cpu()
        table = torch.tensor(distributed.global_sum(acc, table.flatten().tolist()), dtype=torch.float64).view(-1, 4)
        z0 = kto_reference_point(table[:, 2], table[:, 3])
        desirable = self.desirable["eval"]
        losses, rewards, stats = kto_loss(table[:, 0], table[:, 1], desirable, z0, **self.weights)
        out = {**kto_metric_means(kto_metric_sums(losses, table[:, 0], desirable, stats), len(rows)), "kl": float(z0)}
        if self.eval_pairs:
            d, u = zip(*self.eval_pairs)
            out["rewards/accuracies"] = (rewards[list(d)] > rewards[list(u)]).double().mean().item()
        return out

    def summary(self, engine):
        return {"ref_precompute_seconds": self.reference.seconds, "prefix_sharing": self.prefix,
                "micro_batch_tokens": self.budget,
                **super().summary(engine)}


def train(cfg: KTOConfig) -> dict:
    """Run KTO as configured; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    from dpolab.config import check_config
    from dpolab.data import pad_token_id_for
    from dpolab.data.batching import batch_order
    from dpolab.data.unpaired import load_unpaired_data
    from dpolab.lm.loading import load_trainable_lm
    from dpolab.losses.kto import kto_weight_ratio_warning
    from dpolab.train import distributed
    from dpolab.train.engine import Engine
    from dpolab.train.memory import resolve_micro_batch_tokens
    from dpolab.train.pair_layout import collate_pairs, pair_widths, resolve_prefix_sharing
    from dpolab.train.reference import make_reference

    cfg = check_config(cfg)  # a config built in Python: converted and checked as the command line's
    accelerator, tokenizer = distributed.start_run(cfg, KTO.name)
    data = load_unpaired_data(cfg.data, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                              eval_source=cfg.eval_data, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
                              split=cfg.data_split, eval_split=eval_split_of(cfg))
    report = data.report.as_dict()
    warning = kto_weight_ratio_warning(report["desirable"], report["undesirable"], cfg.desirable_weight,
                                       cfg.undesirable_weight)
    if warning and accelerator.is_main_process:
        print(warning, file=sys.stderr)
    check_pair_positions(cfg, data)
    if cfg.dry_run:
        return dry_run_report(cfg, report)

    engine = Engine(cfg, accelerator, load_trainable_lm(cfg), report=report, tokenizer=tokenizer)
    pad_id, widths = pad_token_id_for(tokenizer), pair_widths(data.train, False)  # the plain (2B, T) layout
    steps = engine.plan(batch_order(widths, cfg, accelerator), micro_batches=cfg.grad_accum)

    # the training passes use the two halves apart (z0 first, then the matched rows with gradients);
    # passes scoring both halves without gradients can run each prompt once
    prefix = resolve_prefix_sharing(cfg, engine.model, data.train, pad_id, accelerator)

    def collate(rows):
        return collate_pairs(False, rows, pad_id).to(accelerator.device)

    def collate_scored(rows):
        return collate_pairs(prefix, rows, pad_id).to(accelerator.device)

    reference = make_reference(cfg, engine, data, collate_scored, steps * cfg.grad_accum)
    budget = resolve_micro_batch_tokens(cfg, engine.unwrapped)
    return engine.run(KTO(cfg, engine, data, widths=widths, budget=budget, reference=reference, collate=collate,
                          prefix=prefix, collate_scored=collate_scored))


def cli_main(argv: list[str], prog: str) -> int:
    return cli(KTOConfig, train, argv, prog, DESCRIPTION)
