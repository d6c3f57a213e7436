"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) and its loss family, on the
shared engine (docs/dpo.md).

What is DPO's own: its options, how a batch of pairs becomes per-pair losses (the policy's summed
response log-probs against the reference's, through a loss of :mod:`dpolab.losses.dpo`), and its
evaluation. By default a step runs lean (docs/performance.md): pairs are prefix-shared when a check
shows the model exact that way (:mod:`dpolab.train.pair_layout`), optimizer steps are bucketed by
length, micro-batches run as passes within a token budget (same gradient) and the reference
log-probs are precomputed once (:mod:`dpolab.train.reference`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dpolab.config import opt
from dpolab.errors import ConfigError
from dpolab.train.algorithm import Algorithm
from dpolab.train.command import cli, dry_run_report
from dpolab.train.options import (
    PreferenceLossOptions,
    TrainerOptions,
    check_loss_options,
    check_pair_positions,
    check_ref_cache_dir,
    check_unused_reference,
    validate_common,
)

if TYPE_CHECKING:
    from dpolab.train.engine import Engine

DESCRIPTION = """Train a causal LM with DPO (or IPO, SimPO, hinge, robust/conservative DPO) on preference pairs.

Data: JSONL/JSON/Parquet/CSV files, a `datasets.save_to_disk` folder or a hub name, with
prompt/chosen/rejected strings, chosen/rejected sharing a prompt prefix, or chat messages
(docs/data-formats.md). Writes the run directory of docs/run-directory.md.

example:
  dpolab dpo --model path/to/sft --data prefs.jsonl --beta 0.1 --output-dir runs/dpo
"""


@dataclass
class DPOConfig(TrainerOptions, PreferenceLossOptions):
    model: str = opt("", "policy model to train: a Hugging Face name or local folder (required)")
    ref_model: str | None = opt(None, "reference model (default: a frozen copy of --model; with --lora, the base with adapters off)")
    data: str = opt("", "training preference data: file, save_to_disk folder or hub name (required)")
    eval_data: str | None = opt(None, "held-out preference data (default: --eval-fraction of --data)")
    eval_fraction: float = opt(0.05, "fraction of --data held out for evaluation when --eval-data is not given")
    output_dir: str = opt("runs/dpo", "run directory")
    wpo: bool = opt(False, "weight each pair by WPO's on-policy probability of its responses (arXiv 2406.11827)")
    ref_update_steps: int = opt(0, "TR-DPO: update the reference from the policy every N steps (0: never; needs "
                                "--no-precompute-ref)")
    ref_update_alpha: float = opt(1.0, "TR-DPO: π_ref ← α·π_θ + (1−α)·π_ref at each update (1: hard copy)")
    learning_rate: float = opt(1e-6, "peak learning rate")
    max_length: int = opt(512, "maximum prompt+response tokens")
    max_prompt_length: int | None = opt(None, "maximum prompt tokens (prompts are truncated first, keeping their "
                                        "end) (default: --max-length // 2)")
    precompute_ref: bool = opt(True, "compute reference log-probs once before training, for the pairs the run visits "
                               "and the eval split, cached on disk; --no-precompute-ref runs a live reference model")
    ref_cache_dir: str | None = opt(None, "where precomputed reference log-probs are cached (default: OUTPUT_DIR/cache)")
    prefix_sharing: bool | None = opt(None, "run each pair as one row [prompt|chosen|rejected] with a 4D mask, so the "
                                      "prompt is computed once; unset: on when a check on the first pairs shows "
                                      "the model gives the same log-probs that way")
    gradient_checkpointing: bool = opt(False, "trade compute for memory")

    def validate(self) -> None:
        validate_common(self, data_what="a preference data file, folder or hub name")
        check_loss_options(self)
        check_unused_reference(self)
        check_ref_cache_dir(self)
        if self.ref_update_steps < 0 or not 0 < self.ref_update_alpha <= 1:
            raise ConfigError("--ref-update-steps must be >= 0 and --ref-update-alpha in (0, 1]")
        if self.ref_update_alpha != 1.0 and not self.ref_update_steps:
            raise ConfigError("--ref-update-alpha is read only with --ref-update-steps N (TR-DPO's updates)")
        if self.ref_update_steps and self.precompute_ref:
            raise ConfigError("--ref-update-steps (TR-DPO) changes the reference during training, which would make "
                              "precomputed reference log-probs stale: add --no-precompute-ref")
        if self.ref_update_steps and self.lora:
            raise ConfigError("--ref-update-steps (TR-DPO) needs a full reference copy; it is not supported with --lora")


class DPO(Algorithm):
    """Per-pair preference losses over prefix-shared or plain batches of pairs."""

    name = "dpo"
    bar_keys = ("loss", "rewards/accuracies")
    summary_keys = ("steps", "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "loss", "wall_seconds")

    def __init__(self, cfg: DPOConfig, engine: Engine, data, *, prefix: bool, widths: list[int], budget: int,
                 reference, collate):
        self.cfg, self.engine, self.data, self.lora = cfg, engine, data, cfg.lora
        self.prefix, self.widths, self.budget, self.reference, self.collate = prefix, widths, budget, reference, collate
        self.micro_batches = cfg.grad_accum
        self.bco_delta, self.bco_count = 0.0, 0  # BCO's reward shift: a running mean over the run

    def passes(self, engine, group):
        from dpolab.data.batching import split_by_tokens
        from dpolab.train.pair_layout import batch_tokens

        return engine.micro_batch_passes(
            group, lambda rows: self.collate([self.data.train[i] for i in rows]), lambda b: b.batch_size,
            batch_tokens, split=lambda rows: split_by_tokens(rows, self.widths, self.budget))

    def loss(self, batch):
        losses, stats = self.pair_losses(batch, "train")
        return losses.sum(), stats

    def step(self, engine, group):
        from dpolab.train.reference import update_reference

        out = super().step(engine, group)
        if out is not None and "bco_pair" in self.cfg.losses:
            # δ: the running mean of the implicit rewards of the steps so far (used from the next step on)
            n = 2 * sum(engine.order.global_size(k) for k, _ in group)
            mean = out["bco/rewards"] if "bco/rewards" in out else (out["rewards/chosen"] + out["rewards/rejected"]) / 2
            step_sum = mean * n
            self.bco_count += n
            self.bco_delta += (step_sum - n * self.bco_delta) / self.bco_count
        tau = self.cfg.ref_update_steps
        if tau and (engine.step + 1) % tau == 0:
            update_reference(self.reference.model, engine.unwrapped, self.cfg.ref_update_alpha)
        return out

    def state_dict(self):
        return {"bco_delta": self.bco_delta, "bco_count": self.bco_count}

    def load_state_dict(self, state):
        self.bco_delta, self.bco_count = float(state.get("bco_delta", 0.0)), int(state.get("bco_count", 0))

    def checkpoint_files(self, state_dict):
        files = super().checkpoint_files(state_dict)
        if self.cfg.ref_update_steps:  # the reference moved with the policy: it is state too
            files["reference.safetensors"] = self.reference.model.state_dict()
        return files

    def load_checkpoint(self, engine, directory):
        from dpolab.runs.checkpoint import load_checkpoint_weights

        super().load_checkpoint(engine, directory)
        if self.cfg.ref_update_steps:
            load_checkpoint_weights(self.reference.model, directory, file="reference.safetensors")

    def pair_losses(self, batch, split: str):
        """(B,) losses of a batch of pairs of ``split`` and their detached mean statistics."""
        from dpolab.train.pair_layout import pair_losses

        ref = self.reference.pair_logps(batch, split) if self.reference is not None else (None, None)
        return pair_losses(self.cfg, self.engine.model, batch, ref, bco_delta=self.bco_delta)

    def evaluate(self):
        """Each process scores its block of the eval split; the means are over all pairs."""
        from dpolab.train import distributed

        if not self.data.eval:
            return {}
        acc, rows, weights = self.engine.accelerator, [], []
        for idx in distributed.eval_shards(len(self.data.eval), self.cfg.eval_batch_size or self.cfg.batch_size, acc):
            _, stats = self.pair_losses(self.collate([self.data.eval[i] for i in idx or [0]]), "eval")
            rows.append(stats)
            weights.append(len(idx))  # 0: a stand-in batch that keeps collective passes aligned
        return distributed.reduce_weighted(acc, rows, weights)[0]


    def summary(self, engine):
        return {"ref_precompute_seconds": self.reference.seconds if self.reference is not None else 0.0,
                "prefix_sharing": self.prefix, "micro_batch_tokens": self.budget, **super().summary(engine)}


def train(cfg: DPOConfig) -> dict:
    """Run DPO as configured; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    from dpolab.config import check_config
    from dpolab.data.batching import batch_order
    from dpolab.lm.loading import load_trainable_lm
    from dpolab.losses.dpo import is_batch_level, needs_reference
    from dpolab.train import distributed
    from dpolab.train.engine import Engine
    from dpolab.train.memory import resolve_micro_batch_tokens
    from dpolab.train.pair_layout import collate_pairs, load_pairs, pair_widths, resolve_prefix_sharing
    from dpolab.train.reference import make_reference

    cfg = check_config(cfg)  # a config built in Python: converted and checked as the command line's
    accelerator, tokenizer = distributed.start_run(cfg, DPO.name)
    data = load_pairs(cfg, tokenizer)
    report = data.report.as_dict()
    check_pair_positions(cfg, data)
    if cfg.dry_run:
        return dry_run_report(cfg, report)

    engine = Engine(cfg, accelerator, load_trainable_lm(cfg), report=report, tokenizer=tokenizer)
    pad_id = tokenizer.pad_token_id
    prefix = resolve_prefix_sharing(cfg, engine.model, data.train, pad_id, accelerator)
    widths = pair_widths(data.train, prefix)  # what a pass costs in this layout: the token budget's unit
    # the order buckets by one layout's widths whichever runs, so that prefix sharing (on where the model
    # allows it) changes how a step is computed, not which pairs form it
    steps = engine.plan(batch_order(pair_widths(data.train, True), cfg, accelerator), micro_batches=cfg.grad_accum)

    def collate(pairs):
        return collate_pairs(prefix, pairs, pad_id).to(accelerator.device)

    use_ref = any(needs_reference(n) for n in cfg.losses)
    reference = make_reference(cfg, engine, data, collate, steps * cfg.grad_accum) if use_ref else None
    if cfg.ref_update_steps and cfg.ref_model and reference is not None and reference.model is not None:
        from dpolab.train.reference import check_reference_updatable

        check_reference_updatable(reference.model, engine.unwrapped, cfg.ref_model)
    budget = resolve_micro_batch_tokens(cfg, engine.unwrapped)
    if any(is_batch_level(n) for n in cfg.losses):  # AOT sorts across its batch: never split the micro-batch
        budget = 0
        if cfg.grad_accum > 1 or accelerator.num_processes > 1:
            accelerator.print("note: AOT sorts within each micro-batch of each process, so --grad-accum and "
                              "several processes change its loss (docs/dpo.md)")
    return engine.run(DPO(cfg, engine, data, prefix=prefix, widths=widths, budget=budget, reference=reference,
                          collate=collate))


def cli_main(argv: list[str], prog: str) -> int:
    return cli(DPOConfig, train, argv, prog, DESCRIPTION)
