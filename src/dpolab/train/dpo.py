"""Direct Preference Optimization: the training loop (docs/dpo.md).

By default a step runs lean (docs/performance.md): each pair is one row ``[prompt | chosen |
rejected]`` whose prompt is computed once (prefix sharing, when a check on the first pairs shows the
model exact that way; otherwise chosen and rejected rows in one forward pass), optimizer steps are
bucketed by length, each micro-batch runs as forward/backward passes within a token budget (bounded
activation memory, same gradient), and the reference log-probs are computed once before training and
cached (``dpolab.train.reference``). A live frozen reference model, or the PEFT base with adapters
disabled, runs instead with ``--no-precompute-ref``. Losses come from ``dpolab.losses.dpo`` (pure
functions); this file only feeds them and keeps the books.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dpolab.config import opt, parse_config
from dpolab.errors import ConfigError
from dpolab.rundir import RunDir
from dpolab.train.distributed import is_main_process
from dpolab.train.options import BatchOptions, LoraOptions, ModelOptions, OptimizerOptions, RunOptions

DESCRIPTION = """Train a causal LM with DPO (or IPO, SimPO, hinge, robust/conservative DPO) on preference pairs.

Data: JSONL/JSON/Parquet/CSV files, a `datasets.save_to_disk` folder or a hub name, with
prompt/chosen/rejected strings, chosen/rejected sharing a prompt prefix, or chat messages
(docs/data-formats.md). Writes the run directory of docs/run-directory.md.

example:
  dpolab dpo --model path/to/sft --data prefs.jsonl --beta 0.1 --output-dir runs/dpo
"""

LOSS_CHOICES = ("sigmoid", "robust", "ipo", "hinge", "simpo", "ref_free")


@dataclass
class DPOConfig(RunOptions, ModelOptions, LoraOptions, BatchOptions, OptimizerOptions):
    model: str = opt("", "policy model to train: a Hugging Face name or local folder (required)")
    ref_model: str | None = opt(None, "reference model (default: a frozen copy of --model; with --lora, the base with adapters off)")
    data: str = opt("", "training preference data: file, save_to_disk folder or hub name (required)")
    eval_data: str | None = opt(None, "held-out preference data (default: --eval-fraction of --data)")
    eval_fraction: float = opt(0.05, "fraction of --data held out for evaluation when --eval-data is not given")
    output_dir: str = opt("runs/dpo", "run directory")
    loss: str = opt("sigmoid", "preference loss (sigmoid = DPO; cDPO via --label-smoothing)", choices=LOSS_CHOICES)
    beta: float = opt(0.1, "β: strength of the KL constraint / implicit-reward scale")
    label_smoothing: float = opt(0.0, "ε: assumed label-noise rate (cDPO for sigmoid, robust DPO for robust)")
    simpo_gamma: float = opt(0.5, "SimPO target reward margin γ")
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
        if not self.model:
            raise ConfigError("--model is required (a Hugging Face name or a local folder)")
        if not self.data:
            raise ConfigError("--data is required (a preference data file, folder or hub name)")
        if self.beta <= 0:
            raise ConfigError("--beta must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("--label-smoothing must be in [0, 0.5)")
        for name in ("batch_size", "grad_accum", "max_length", "max_prompt_length", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 0:
            raise ConfigError("--micro-batch-tokens must be >= 0 (0: never split a micro-batch)")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError("--max-prompt-length must be smaller than --max-length")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError("--eval-fraction must be in [0, 1)")


# -- the loop -----------------------------------------------------------------------------------
def train(cfg: DPOConfig) -> dict:
    """Run DPO as configured; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    from tqdm.auto import tqdm

    from dpolab.data import load_preference_data
    from dpolab.data.bucketing import batch_order, split_by_tokens
    from dpolab.losses.dpo import PairLogps, needs_reference, preference_loss
    from dpolab.train import common, distributed
    from dpolab.train.reference import planned_rows, precompute_reference
    from dpolab.train.supervised_loop import _dedupe_shared

    accelerator, tokenizer = distributed.start_run(cfg)
    data = load_preference_data(cfg.data, tokenizer, max_length=cfg.max_length,
                                max_prompt_length=cfg.max_prompt_length, eval_source=cfg.eval_data,
                                eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    report = data.report.as_dict()
    if cfg.dry_run:
        return common.dry_run_report(cfg, report)

    use_ref = needs_reference(cfg.loss)
    model = common.load_trainable_lm(cfg)
    run = RunDir(cfg.output_dir, keep_last=cfg.save_total_limit)
    ckpt = common.resume_run(run, cfg.resume)
    optimizer = common.make_optimizer(model.parameters(), cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    raw_optimizer = optimizer
    model, optimizer = accelerator.prepare(model, optimizer)
    pad_id = tokenizer.pad_token_id
    prefix = resolve_prefix_sharing(cfg, model, data.train, pad_id, accelerator)

    # Batch layout: the padded width a pair forces on its forward pass ([prompt|chosen|rejected] as
    # one row when prefix-shared; prompt+chosen and prompt+rejected as two rows otherwise).
    widths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) if prefix else
              2 * (len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))) for p in data.train]
    order = batch_order(widths, cfg, accelerator)
    steps = common.total_steps(cfg.max_steps, cfg.epochs, order.per_epoch, cfg.grad_accum)
    scheduler = common.make_scheduler(raw_optimizer, cfg.lr_scheduler, cfg.warmup_steps, steps)
    budget = resolve_micro_batch_tokens(cfg, accelerator.unwrap_model(model))

    def collate(pairs):
        return collate_pairs(prefix, pairs, pad_id).to(accelerator.device)

    # Reference: precomputed tables (default), PEFT base (adapters disabled), or a frozen model.
    ref_model, ref_cache, ref_seconds = None, None, 0.0
    if use_ref and cfg.precompute_ref:
        def make_scorer():
            if ckpt is None and not cfg.ref_model:  # the policy as loaded IS the reference: no second copy
                model.eval()
                return lambda batch: reference_logps(model, None if cfg.lora else model, batch, accelerator)
            ref = common.load_causal_lm(cfg.ref_model or cfg.model, dtype=cfg.dtype,
                                        trust_remote_code=cfg.trust_remote_code)
            ref = distributed.prepare_reference(accelerator, ref)
            return lambda batch: batch_logps(ref, batch)[0]

        t_ref = time.time()
        ref_cache = precompute_reference(cfg, data, planned_rows(order, steps * cfg.grad_accum),
                                         accelerator=accelerator, run=run, collate=collate, make_scorer=make_scorer)
        ref_seconds = time.time() - t_ref
    elif use_ref and (not cfg.lora or cfg.ref_model):
        ref_model = common.load_causal_lm(cfg.ref_model or cfg.model, dtype=cfg.dtype,
                                          trust_remote_code=cfg.trust_remote_code)
        ref_model = distributed.prepare_reference(accelerator, ref_model)

    def pair_logps(batch, idx_split: str) -> PairLogps:
        """Policy (and reference) summed response log-probs for one batch of pairs."""

        B = batch.batch_size
        logps, lengths = batch_logps(model, batch)
        ref_c = ref_r = None
        if use_ref:
            with torch.no_grad():
                if ref_cache is not None:
                    ref = ref_cache[idx_split][batch.index.cpu()]  # (B, 2)
                    ref_c, ref_r = ref[:, 0].to(logps.device), ref[:, 1].to(logps.device)
                else:
                    ref_logps = reference_logps(model, ref_model, batch, accelerator)
                    ref_c, ref_r = ref_logps[:B], ref_logps[B:]
        return PairLogps(policy_chosen=logps[:B], policy_rejected=logps[B:], chosen_lengths=lengths[:B],
                         rejected_lengths=lengths[B:], ref_chosen=ref_c, ref_rejected=ref_r)

    def loss_and_stats(batch, split: str):
        lp = pair_logps(batch, split)
        losses, chosen_r, rejected_r = preference_loss(
            cfg.loss, lp, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
            simpo_gamma=cfg.simpo_gamma, rpo_alpha=cfg.rpo_alpha)
        stats = {
            "loss": losses.detach().mean().item(),
            "rewards/chosen": chosen_r.mean().item(),
            "rewards/rejected": rejected_r.mean().item(),
            "rewards/margins": (chosen_r - rejected_r).mean().item(),
            "rewards/accuracies": (chosen_r > rejected_r).float().mean().item(),
            "logps/chosen": lp.policy_chosen.detach().mean().item(),
            "logps/rejected": lp.policy_rejected.detach().mean().item(),
        }
        return losses, stats

    def evaluate() -> dict[str, float]:
        """Each process scores its block of the eval split; the means are over all pairs."""
        if not data.eval:
            return {}
        model.eval()
        rows, weights = [], []
        with torch.no_grad():
            for idx in distributed.eval_shards(len(data.eval), cfg.eval_batch_size or cfg.batch_size, accelerator):
                _, stats = loss_and_stats(collate([data.eval[i] for i in idx or [0]]), "eval")
                rows.append(stats)
                weights.append(len(idx))  # 0: a stand-in batch that keeps collective passes aligned
        model.train()
        means, _, _ = distributed.reduce_weighted(accelerator, rows, weights)
        return {f"eval/{k}": v for k, v in means.items()}

    # State that a checkpoint restores: weights, optimizer, scheduler, RNG, the data position, the
    # counters and the not-yet-logged window of step metrics (so a mid-window resume logs the
    # same averages as an uninterrupted run).
    step, micro, skipped, tokens_seen = 0, 0, 0, 0
    window: list[dict[str, float]] = []
    tokens_window = 0
    if ckpt is not None:
        common.load_checkpoint_weights(accelerator.unwrap_model(model), ckpt, partial=cfg.lora)
        state = common.read_training_state(ckpt, optimizer=optimizer, scheduler=scheduler)
        step, micro, skipped, tokens_seen = (state["step"], state["micro_batch"], state["skipped_steps"],
                                             state["tokens"])
        window, tokens_window = list(state.get("window", [])), int(state.get("tokens_window", 0))
        common.warn_config_changes(state.get("config", {}), vars(cfg))
        if accelerator.is_main_process:
            run.truncate_metrics(step)
        print(f"resumed from {ckpt} at step {step}", file=sys.stderr)

    def save_checkpoint() -> None:
        """Written once, by the main process. The RNG state stored is the main process's; every
        process was seeded alike (seed_everything(cfg.seed)), so it is every process's."""
        unwrapped = accelerator.unwrap_model(model)
        if not common.weights_finite(unwrapped):
            raise common.nonfinite_error("weights", step, "refusing to write a checkpoint")
        full = distributed.model_state_dict(accelerator, model)  # collective under FSDP/DeepSpeed
        if not accelerator.is_main_process:
            return

        def write(d: Path) -> None:
            from safetensors.torch import save_file

            weights = {k: v.detach().contiguous().cpu() for k, v in full.items()
                       if not cfg.lora or "lora_" in k}
            save_file(_dedupe_shared(weights), str(d / "model.safetensors"))
            common.write_training_state(d, optimizer=optimizer, scheduler=scheduler, state={
                "step": step, "micro_batch": micro, "skipped_steps": skipped, "tokens": tokens_seen,
                "window": window, "tokens_window": tokens_window, "config": vars(cfg)})

        run.save_checkpoint(step, write)

    if accelerator.is_main_process:
        run.create()
        run.write_config(cfg)
        (run.path / "data_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    model.train()
    batches = order.iterate(start=micro)
    bar = tqdm(total=steps, initial=step, desc="dpo", disable=not (cfg.progress and accelerator.is_main_process),
               dynamic_ncols=True)
    t0 = time.time()
    last_eval: dict[str, float] = {}
    last_logged: dict[str, float] = {}

    with common.StopSignal() as stop:
        while step < steps:
            # One optimizer step = grad_accum micro-batches, each run as forward/backward passes of at
            # most `budget` padded tokens; the loss is the mean over ALL the step's pairs, so
            # accumulation 1x8 and 8x1, and any split into passes, give the same gradient
            # (tests/test_train_dpo.py). With W processes each backpropagates W * (its pairs' loss
            # sum) / (the step's pairs over all processes); DDP's gradient average then equals the
            # single-process gradient (dpolab.train.distributed). A process with no pairs, or fewer
            # passes than another, runs stand-in passes with weight 0 (collectives stay aligned).
            group = [next(batches) for _ in range(cfg.grad_accum)]
            scale = accelerator.num_processes / sum(order.global_size(k) for k, _ in group)
            passes = [(k, part) for k, idx in group for part in split_by_tokens(idx, widths, budget)]
            if accelerator.num_processes > 1:
                n_passes = distributed.global_max(accelerator, len(passes))
                passes += [(group[-1][0], [])] * (n_passes - len(passes))
            step_stats, weights, nonfinite, tokens = [], [], False, 0
            for j, (k, idx) in enumerate(passes):
                batch = collate([data.train[i] for i in idx or [0]])
                with distributed.accumulation_context(accelerator, model, sync=j == len(passes) - 1):
                    losses, stats = loss_and_stats(batch, "train")
                    if idx and not torch.isfinite(losses).all():
                        nonfinite = True  # every process still runs its backward passes (no hang)
                        where = f"micro-batch {k}, rows {idx[:8]}{'...' if len(idx) > 8 else ''}"
                        if not cfg.skip_nonfinite:
                            raise common.nonfinite_error("loss", step + 1, where)
                    accelerator.backward(losses.sum() * (scale if idx else 0.0))
                step_stats.append(stats)
                weights.append(len(idx))
                tokens += batch_tokens(batch) if idx else 0
            # the norm is checked also when clipping is off (--max-grad-norm 0)
            grad_norm = common.grad_norm_(model.parameters(), cfg.max_grad_norm, accelerator)
            merged, _, extra = distributed.reduce_weighted(accelerator, step_stats, weights,
                                                           {"tokens": tokens, "nonfinite": float(nonfinite)})
            tokens_window += int(extra["tokens"])
            nonfinite = extra["nonfinite"] > 0
            if not nonfinite and not torch.isfinite(grad_norm).all():
                nonfinite = True
                if not cfg.skip_nonfinite:
                    raise common.nonfinite_error(
                        "gradient norm", step + 1, f"micro-batches {group[0][0]}..{group[-1][0]}")
            if nonfinite:
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            micro = group[-1][0] + 1
            bar.update(1)

            if merged and not nonfinite:
                merged["grad_norm"] = float(grad_norm)
                window.append(merged)
            if step % cfg.logging_steps == 0 or step == steps:
                elapsed = max(time.time() - t0, 1e-9)
                logged = common.mean_metrics(window, [1] * len(window)) if window else {}
                logged.update({"learning_rate": scheduler.get_last_lr()[0], "epoch": micro / order.per_epoch,
                               "tokens_per_second": tokens_window / elapsed, "skipped_steps": skipped})
                tokens_seen += tokens_window
                window, t0, tokens_window, last_logged = [], time.time(), 0, logged
                if accelerator.is_main_process:
                    run.log(step, logged)
                bar.set_postfix(loss=f"{logged.get('loss', float('nan')):.4f}",
                                acc=f"{logged.get('rewards/accuracies', float('nan')):.2f}")
            if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and step < steps:
                last_eval = evaluate()
                if accelerator.is_main_process:
                    run.log(step, last_eval)
            if cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < steps:
                save_checkpoint()
            signame = stop.agreed(accelerator)
            if signame and step < steps:
                save_checkpoint()
                bar.close()
                if accelerator.is_main_process:
                    print(common.resume_hint("dpo", run, signame, step, steps), file=sys.stderr)
                return {"stopped": True, "steps": step}
    bar.close()

    last_eval = evaluate()
    save_checkpoint()
    summary_metrics = {**last_logged, **last_eval, "skipped_steps": skipped, "ref_precompute_seconds": ref_seconds,
                       "prefix_sharing": prefix, "micro_batch_tokens": budget,
                       "data/skipped_rows": report["skipped"], "data/truncated_rows": report["truncated"]}
    full = distributed.model_state_dict(accelerator, model) if distributed.is_sharded(accelerator) else None
    if accelerator.is_main_process:
        if last_eval:
            run.log(step, last_eval)
        final = accelerator.unwrap_model(model)
        if cfg.lora:
            final = final.merge_and_unload()
        common.save_pretrained_atomic(final, tokenizer, run.final, state_dict=full)
        summary = run.write_summary(summary_metrics, steps=step)
        _print_summary(summary)
        return summary
    return summary_metrics


def reference_logps(policy, ref_model, batch, accelerator) -> torch.Tensor:
    """Summed response log-probs under the reference for a whole (2B, T) batch.

    ``ref_model`` None means a PEFT policy: the reference is its base with adapters disabled."""

    if ref_model is None:
        with accelerator.unwrap_model(policy).disable_adapter():
            logps, _ = batch_logps(policy, batch)
        return logps.detach()
    logps, _ = batch_logps(ref_model, batch)
    return logps.detach()


def collate_pairs(prefix_sharing: bool, pairs, pad_token_id: int):
    """A plain (2B, T) PreferenceBatch, or when prefix-shared a (B, L) PrefixSharedBatch."""
    if prefix_sharing:
        from dpolab.prefix import collate_prefix_shared

        return collate_prefix_shared(pairs, pad_token_id)
    from dpolab.data import collate_preference

    return collate_preference(pairs, pad_token_id)


def resolve_prefix_sharing(cfg: DPOConfig, model, pairs, pad_token_id: int, accelerator) -> bool:
    """--prefix-sharing on/off as given, or (unset) on when :func:`dpolab.prefix.check_prefix_sharing`
    finds the model exact in the shared layout. Given explicitly and failing the check: an error."""
    from dpolab.prefix import check_prefix_sharing

    if cfg.prefix_sharing is False:
        return False
    from dpolab.lm import _unwrap

    inner = _unwrap(accelerator.unwrap_model(model)) or accelerator.unwrap_model(model)
    attn = getattr(getattr(inner, "config", None), "_attn_implementation", "eager")
    if attn not in ("sdpa", "eager"):
        problem = f"its attention ('{attn}') ignores custom 4D masks"
    else:
        vocab = inner.get_input_embeddings().num_embeddings
        problem = check_prefix_sharing(model, pairs, pad_token_id, vocab, accelerator.device)
    if problem is None:
        return True
    if cfg.prefix_sharing:
        raise ConfigError(f"--prefix-sharing is not exact for this model: {problem}. Drop --prefix-sharing.")
    accelerator.print(f"prefix sharing off: {problem}")
    return False


def resolve_micro_batch_tokens(cfg: DPOConfig, model) -> int:
    """The forward-pass token budget: --micro-batch-tokens, or the size-based default
    (:func:`dpolab.train.memory.auto_forward_tokens`); 0 with gradient checkpointing, whose
    activations are already small."""
    from dpolab.lm import _unwrap
    from dpolab.train.memory import auto_forward_tokens

    if cfg.micro_batch_tokens is not None:
        return cfg.micro_batch_tokens
    if cfg.gradient_checkpointing:
        return 0
    return auto_forward_tokens(_unwrap(model) or model, cfg.mixed_precision)


def batch_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts, (2B,) each (chosen rows, then rejected),
    for either batch layout; the two are equal up to summation order (tests/test_perf_prefix.py)."""
    from dpolab.lm import model_sequence_logps
    from dpolab.prefix import PrefixSharedBatch, prefix_shared_logps

    if isinstance(batch, PrefixSharedBatch):
        return prefix_shared_logps(model, batch)
    return model_sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask, batch.position_ids)


def batch_tokens(batch) -> int:
    """Tokens the forward pass runs (not counting pads)."""
    return batch.num_tokens if hasattr(batch, "num_tokens") else int(batch.attention_mask.sum())


def _print_summary(summary: dict) -> None:
    keys = ["steps", "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "loss", "wall_seconds"]
    shown = {k: summary[k] for k in keys if k in summary}
    width = max(len(k) for k in shown) if shown else 0
    for k, v in shown.items():
        print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}", file=sys.stderr)


def cli_main(argv: list[str], prog: str) -> int:
    cfg = parse_config(DPOConfig, argv, prog=prog, description=DESCRIPTION)
    summary = train(cfg)
    if not summary.get("dry_run") and not summary.get("stopped") and is_main_process():
        print(f"done: {cfg.output_dir} (final model in {Path(cfg.output_dir) / 'final'})")
    return 0

