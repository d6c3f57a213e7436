"""Direct Preference Optimization and its loss family, on the shared engine (docs/dpo.md).

What is DPO's own: its options, how a batch of pairs becomes per-pair losses (the policy's summed
response log-probs against the reference's, through a loss of :mod:`dpolab.losses.dpo`), and its
evaluation. By default a step runs lean (docs/performance.md): pairs are prefix-shared when a check
shows the model exact that way (:mod:`dpolab.train.pair_layout`), optimizer steps are bucketed by
length, micro-batches run as passes within a token budget (same gradient) and the reference
log-probs are precomputed once (:mod:`dpolab.train.reference`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dpolab.config import opt
from dpolab.errors import ConfigError
from dpolab.losses.dpo import PREFERENCE_LOSSES, loss_defaults
from dpolab.train.engine import Algorithm, Engine, cli, dry_run_report
from dpolab.train.options import TrainerOptions, validate_common

DESCRIPTION = """Train a causal LM with DPO (or IPO, SimPO, hinge, robust/conservative DPO) on preference pairs.

Data: JSONL/JSON/Parquet/CSV files, a `datasets.save_to_disk` folder or a hub name, with
prompt/chosen/rejected strings, chosen/rejected sharing a prompt prefix, or chat messages
(docs/data-formats.md). Writes the run directory of docs/run-directory.md.

example:
  dpolab dpo --model path/to/sft --data prefs.jsonl --beta 0.1 --output-dir runs/dpo
"""


@dataclass
class DPOConfig(TrainerOptions):
    model: str = opt("", "policy model to train: a Hugging Face name or local folder (required)")
    ref_model: str | None = opt(None, "reference model (default: a frozen copy of --model; with --lora, the base with adapters off)")
    data: str = opt("", "training preference data: file, save_to_disk folder or hub name (required)")
    eval_data: str | None = opt(None, "held-out preference data (default: --eval-fraction of --data)")
    eval_fraction: float = opt(0.05, "fraction of --data held out for evaluation when --eval-data is not given")
    output_dir: str = opt("runs/dpo", "run directory")
    loss: str = opt("sigmoid", "preference loss (sigmoid = DPO; cDPO via --label-smoothing)", choices=PREFERENCE_LOSSES)
    beta: float | None = opt(None, "β: strength of the KL constraint / implicit-reward scale (unset: the loss's "
                             "own default, 0.1; SimPO 2.0)")
    label_smoothing: float = opt(0.0, "ε: assumed label-noise rate (cDPO for sigmoid, robust DPO for robust)")
    simpo_gamma: float | None = opt(None, "SimPO target reward margin γ (unset: SimPO's default, 1.0)")
    rpo_alpha: float | None = opt(None, "weight of an NLL term on chosen responses (RPO); off when unset")
    learning_rate: float = opt(1e-6, "peak learning rate")
    max_length: int = opt(512, "maximum prompt+response tokens")
    max_prompt_length: int = opt(256, "maximum prompt tokens (prompts are truncated first, keeping their end)")
    precompute_ref: bool = opt(True, "compute reference log-probs once before training, for the pairs the run visits "
                               "and the eval split, cached on disk; --no-precompute-ref runs a live reference model")
    ref_cache_dir: str | None = opt(None, "where precomputed reference log-probs are cached (default: OUTPUT_DIR/cache)")
    prefix_sharing: bool | None = opt(None, "run each pair as one row [prompt|chosen|rejected] with a 4D mask, so the "
                                      "prompt is computed once; unset: on when a check on the first pairs shows "
                                      "the model gives the same log-probs that way")
    micro_batch_tokens: int | None = opt(None, "split each micro-batch into forward/backward passes of at most this "
                                         "many padded tokens (same gradient, less activation memory); unset: "
                                         "activations about the weights' size, at least 32 MiB; 0: never split")
    gradient_checkpointing: bool = opt(False, "trade compute for memory")

    def validate(self) -> None:
        validate_common(self, data_what="a preference data file, folder or hub name")
        defaults = loss_defaults(self.loss)  # the loss's own β (and γ for SimPO) unless given
        self.beta = defaults.get("beta", 0.1) if self.beta is None else self.beta
        if self.simpo_gamma is None:
            self.simpo_gamma = defaults.get("simpo_gamma")
        if self.beta <= 0:
            raise ConfigError("--beta must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("--label-smoothing must be in [0, 0.5)")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 0:
            raise ConfigError("--micro-batch-tokens must be >= 0 (0: never split a micro-batch)")


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

    def passes(self, engine, group):
        from dpolab.data.batching import split_by_tokens
        from dpolab.train.pair_layout import batch_tokens

        return engine.micro_batch_passes(
            group, lambda rows: self.collate([self.data.train[i] for i in rows]), lambda b: b.batch_size,
            batch_tokens, split=lambda rows: split_by_tokens(rows, self.widths, self.budget))

    def loss(self, batch):
        losses, stats = self.pair_losses(batch, "train")
        return losses.sum(), stats

    def pair_losses(self, batch, split: str):
        """(B,) losses of a batch of pairs of ``split`` and their detached mean statistics."""
        from dpolab.losses.dpo import PairLogps, preference_loss
        from dpolab.train.pair_layout import batch_logps

        cfg, B = self.cfg, batch.batch_size
        logps, lengths = batch_logps(self.engine.model, batch)
        ref_c, ref_r = self.reference.pair_logps(batch, split) if self.reference is not None else (None, None)
        lp = PairLogps(policy_chosen=logps[:B], policy_rejected=logps[B:], chosen_lengths=lengths[:B],
                       rejected_lengths=lengths[B:], ref_chosen=ref_c, ref_rejected=ref_r)
        losses, chosen_r, rejected_r = preference_loss(cfg.loss, lp, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                                                       simpo_gamma=cfg.simpo_gamma, rpo_alpha=cfg.rpo_alpha)
        return losses, {
            "loss": losses.detach().mean().item(),
            "rewards/chosen": chosen_r.mean().item(),
            "rewards/rejected": rejected_r.mean().item(),
            "rewards/margins": (chosen_r - rejected_r).mean().item(),
            "rewards/accuracies": (chosen_r > rejected_r).float().mean().item(),
            "logps/chosen": lp.policy_chosen.detach().mean().item(),
            "logps/rejected": lp.policy_rejected.detach().mean().item(),
        }

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
    from dpolab.data.batching import batch_order
    from dpolab.lm.loading import load_trainable_lm
    from dpolab.losses.dpo import needs_reference
    from dpolab.train import distributed
    from dpolab.train.pair_layout import (
        collate_pairs,
        load_pairs,
        pair_widths,
        resolve_micro_batch_tokens,
        resolve_prefix_sharing,
    )
    from dpolab.train.reference import make_reference

    accelerator, tokenizer = distributed.start_run(cfg)
    data = load_pairs(cfg, tokenizer)
    report = data.report.as_dict()
    if cfg.dry_run:
        return dry_run_report(cfg, report)

    engine = Engine(cfg, accelerator, load_trainable_lm(cfg), report=report, tokenizer=tokenizer)
    pad_id = tokenizer.pad_token_id
    prefix = resolve_prefix_sharing(cfg, engine.model, data.train, pad_id, accelerator)
    widths = pair_widths(data.train, prefix)
    steps = engine.plan(batch_order(widths, cfg, accelerator), micro_batches=cfg.grad_accum)

    def collate(pairs):
        return collate_pairs(prefix, pairs, pad_id).to(accelerator.device)

    reference = make_reference(cfg, engine, data, collate, steps * cfg.grad_accum) if needs_reference(cfg.loss) else None
    budget = resolve_micro_batch_tokens(cfg, engine.unwrapped)
    return engine.run(DPO(cfg, engine, data, prefix=prefix, widths=widths, budget=budget, reference=reference,
                          collate=collate))


def cli_main(argv: list[str], prog: str) -> int:
    return cli(DPOConfig, train, argv, prog, DESCRIPTION)
