"""The optimisation loop shared by the supervised trainers (``dpolab sft``, ``dpolab rm``).

Same contract as the DPO loop (``dpolab.train.dpo``): one optimizer step = ``grad_accum``
micro-batches of a seeded :class:`~dpolab.train.common.BatchOrder`; the loss of a step is the sum
of per-unit losses over *all* its micro-batches divided by their total number of units (tokens for
SFT, pairs for the reward model), so accumulation 1x8 and 8x1 give the same gradient; NaN/inf
losses or gradients stop the run (or are skipped with ``--skip-nonfinite``); SIGINT/SIGTERM finish
the step and checkpoint; ``--resume`` restores weights, optimizer, scheduler, RNG and data position;
``summary.json`` is written last. Each trainer supplies the model, the batches and the loss.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpolab.rundir import RunDir
from dpolab.train import common, distributed


@dataclass
class Task:
    """What a trainer plugs into :func:`run_loop`.

    make_batch(indices) -> batch: collate training rows ``indices`` (on the device).
    units(batch) -> int: how many loss units (tokens, pairs) the batch holds.
    tokens(batch) -> int: real tokens the model reads (for throughput).
    loss(batch) -> (loss_sum, stats): the SUM of per-unit losses (scalar tensor with grad) and
        detached per-batch mean statistics (floats; ``"loss"`` among them).
    evaluate() -> dict: held-out metrics, un-prefixed (``{}`` if there is no eval set).
    save_final(path, state_dict): write the final Hugging Face folder (main process only);
        ``state_dict`` is the gathered full weights under FSDP/DeepSpeed, else None.
    """

    name: str
    make_batch: Callable[[list[int]], Any]
    units: Callable[[Any], int]
    tokens: Callable[[Any], int]
    loss: Callable[[Any], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[], dict[str, float]]
    save_final: Callable[[Path], None]
    bar_keys: tuple[str, ...] = ("loss",)


def _dedupe_shared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied embeddings): clone the duplicates."""
    seen: set[int] = set()
    out = {}
    for k, v in weights.items():
        out[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    return out


def run_loop(cfg: Any, task: Task, *, accelerator, model, optimizer, scheduler, order: common.BatchOrder,
             steps: int, run: RunDir, ckpt: Path | None, report: dict, weight_filter=None) -> dict:
    """Train for ``steps`` optimizer steps; returns the summary (written to ``summary.json``).

    ``cfg`` needs: grad_accum, max_grad_norm, skip_nonfinite, logging_steps, eval_steps,
    save_steps, progress, output_dir. ``model`` and ``optimizer`` are already ``accelerator``-prepared.
    ``weight_filter(name) -> bool`` picks the weights a checkpoint stores (all by default).

    With W processes (``accelerate launch``) each backpropagates ``W * (its loss sum) / N`` with N
    the step's loss units over ALL processes (one all-reduce per step), so DDP's gradient average
    equals the single-process gradient (:mod:`dpolab.train.distributed`); a process left without
    rows runs a stand-in row with weight 0. Metrics are reduced across processes."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    step, micro, skipped, tokens_seen = 0, 0, 0, 0
    window: list[dict[str, float]] = []  # step metrics not yet logged: a checkpoint carries them
    tokens_window = 0
    if ckpt is not None:
        common.load_checkpoint_weights(accelerator.unwrap_model(model), ckpt, partial=weight_filter is not None)
        state = common.read_training_state(ckpt, optimizer=optimizer, scheduler=scheduler)
        step, micro, skipped, tokens_seen = state["step"], state["micro_batch"], state["skipped_steps"], state["tokens"]
        window, tokens_window = list(state.get("window", [])), int(state.get("tokens_window", 0))
        common.warn_config_changes(state.get("config", {}), vars(cfg))
        if accelerator.is_main_process:
            run.truncate_metrics(step)
        print(f"resumed from {ckpt} at step {step}", file=sys.stderr)

    def save_checkpoint() -> None:
        """Written once, by the main process; its RNG state is every process's (all are seeded alike)."""
        unwrapped = accelerator.unwrap_model(model)
        if not common.weights_finite(unwrapped):
            raise common.nonfinite_error("weights", step, "refusing to write a checkpoint")
        full = distributed.model_state_dict(accelerator, model)  # collective under FSDP/DeepSpeed
        if not accelerator.is_main_process:
            return

        def write(d: Path) -> None:
            weights = {k: v.detach().contiguous().cpu() for k, v in full.items()
                       if weight_filter is None or weight_filter(k)}
            save_file(_dedupe_shared(weights), str(d / "model.safetensors"))
            common.write_training_state(d, optimizer=optimizer, scheduler=scheduler, state={
                "step": step, "micro_batch": micro, "skipped_steps": skipped, "tokens": tokens_seen,
                "window": window, "tokens_window": tokens_window, "config": vars(cfg)})

        run.save_checkpoint(step, write)

    model.train()
    batches = order.iterate(start=micro)
    bar = tqdm(total=steps, initial=step, desc=task.name, dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_main_process))
    t0 = time.time()
    last_eval: dict[str, float] = {}
    last_logged: dict[str, float] = {}

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            out = {f"eval/{k}": v for k, v in task.evaluate().items()}
        model.train()
        return out

    with common.StopSignal() as stop:
        while step < steps:
            group = [next(batches) for _ in range(cfg.grad_accum)]
            made = [(k, idx, task.make_batch(idx or [0])) for k, idx in group]  # [0]: stand-in, weight 0
            units = [task.units(b) if idx else 0 for _, idx, b in made]
            total_units = distributed.global_sum(accelerator, [sum(units)])[0]
            scale = accelerator.num_processes / total_units if total_units > 0 else 0.0
            step_stats, weights, nonfinite, tokens = [], [], False, 0
            for j, (k, idx, batch) in enumerate(made):
                if total_units == 0:  # no loss unit on any process: every process skips alike
                    break
                with distributed.accumulation_context(accelerator, model, sync=j == len(made) - 1):
                    loss_sum, stats = task.loss(batch)
                    if idx and not torch.isfinite(loss_sum).all():
                        nonfinite = True  # every process still runs its backward passes (no hang)
                        where = f"micro-batch {k}, rows {idx[:8]}{'...' if len(idx) > 8 else ''}"
                        if not cfg.skip_nonfinite:
                            raise common.nonfinite_error("loss", step + 1, where)
                    accelerator.backward(loss_sum * (scale if idx else 0.0))
                step_stats.append(stats)
                weights.append(units[j])
                tokens += task.tokens(batch) if idx else 0
            grad_norm = torch.tensor(0.0)
            merged: dict[str, float] = {}
            if total_units > 0:  # the norm is checked also with clipping off (--max-grad-norm 0)
                grad_norm = common.grad_norm_(model.parameters(), cfg.max_grad_norm, accelerator)
                merged, _, extra = distributed.reduce_weighted(accelerator, step_stats, weights,
                                                               {"tokens": tokens, "nonfinite": float(nonfinite)})
                tokens_window += int(extra["tokens"])
                nonfinite = extra["nonfinite"] > 0
                if not nonfinite and not torch.isfinite(grad_norm).all():
                    nonfinite = True
                    if not cfg.skip_nonfinite:
                        raise common.nonfinite_error("gradient norm", step + 1, f"micro-batches {group[0][0]}..")
            if nonfinite:
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
                bar.set_postfix({k: f"{logged[k]:.4f}" for k in task.bar_keys if k in logged})
            if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and step < steps:
                last_eval = evaluate()
                if accelerator.is_main_process and last_eval:
                    run.log(step, last_eval)
            if cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < steps:
                save_checkpoint()
            signame = stop.agreed(accelerator)
            if signame and step < steps:
                save_checkpoint()
                bar.close()
                if accelerator.is_main_process:
                    print(common.resume_hint(task.name, run, signame, step, steps), file=sys.stderr)
                return {"stopped": True, "steps": step}
    bar.close()

    last_eval = evaluate()
    save_checkpoint()
    summary_metrics = {**last_logged, **last_eval, "skipped_steps": skipped,
                       "data/skipped_rows": report["skipped"], "data/truncated_rows": report["truncated"]}
    full = distributed.model_state_dict(accelerator, model) if distributed.is_sharded(accelerator) else None
    if accelerator.is_main_process:
        if last_eval:
            run.log(step, last_eval)
        task.save_final(run.final, full)
        summary = run.write_summary(summary_metrics, steps=step)
        print_summary(summary, ["steps", "eval/loss", "eval/accuracy", "loss", "wall_seconds"])
        return summary
    return summary_metrics


def print_summary(summary: dict, keys: list[str]) -> None:
    shown = {k: summary[k] for k in keys if k in summary}
    width = max((len(k) for k in shown), default=0)
    for k, v in shown.items():
        print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}", file=sys.stderr)
