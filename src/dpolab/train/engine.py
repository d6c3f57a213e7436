"""The run skeleton of every language-model trainer: one engine, one short file per algorithm.

An :class:`Algorithm` says what is its own: how the rows of a step become forward/backward passes
and a loss (offline trainers: SFT, RM, DPO, KTO), or how experience is collected and optimized over
(on-policy trainers: PPO's epochs over a rollout, GRPO's iterations over a generation batch), its
evaluation, what its checkpoint and final folder hold. The :class:`Engine` owns the rest:

* the optimizer, the schedule and ``accelerate.prepare``; the seeded, resumable data order;
* **exact steps** (:meth:`Engine.optimizer_step`): the loss of an optimizer step is the SUM of
  per-unit losses (tokens, pairs, sequences) over all its passes divided by the step's units over
  ALL processes, so gradient accumulation 1×8 = 8×1, any split into token-budget passes, and W
  processes equal one process with the same global batch (:mod:`dpolab.train.distributed`); a
  process with fewer passes runs weight-0 stand-ins, so collective operations stay aligned;
* the gradient norm (clipping) and the non-finite guard (stop naming where, or skip and count);
  the metric window and logging (``metrics.jsonl``, the progress bar), the evaluation cadence;
* checkpoints (atomic, rotated, written once by the main process) and exact resume: weights,
  optimizer, scheduler, RNG states, the data position, counters and the unlogged window;
* SIGINT/SIGTERM agreed across processes: finish the step, checkpoint, print how to resume;
* the final evaluation, checkpoint, ``final/`` folder and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from dpolab.errors import ConfigError
from dpolab.lm import inplace_grads
from dpolab.runs.checkpoint import (
    check_steps_left,
    read_trainer_state,
    read_training_state,
    untied,
    warn_config_changes,
    write_training_state,
)
from dpolab.runs.guards import nonfinite_error, weights_finite
from dpolab.runs.model_card import method_text, write_model_card
from dpolab.runs.rundir import RunDir
from dpolab.runs.signals import StopSignal, resume_hint
from dpolab.runs.trackers import open_trackers
from dpolab.train import distributed
from dpolab.train.algorithm import Algorithm, Pass
from dpolab.train.optim import apply_new_rates, grad_norm_, make_optimizer, make_scheduler


def data_note(report: dict) -> str | None:
    """One line on stderr for rows a run skipped or cut (said in data_report.json only, before)."""
    rows = report.get("rows", report.get("prompts"))
    parts = []
    if report.get("skipped"):
        first = report.get("skipped_examples") or []
        parts.append(f"{report['skipped']} of {rows} rows skipped" + (f" (the first: {first[0]})" if first else ""))
    if report.get("truncated"):
        parts.append(f"{report['truncated']} {'prompts' if 'prompts' in report else 'rows'} cut to fit the length limits")
    if report.get("eval_truncated"):
        parts.append(f"{report['eval_truncated']} evaluation prompts cut to fit --max-prompt-length")
    if report.get("identical"):
        parts.append(f"{report['identical']} pairs with the same chosen and rejected response (no signal in them)")
    if report.get("duplicates"):
        first = (report.get("duplicate_examples") or [""])[0]
        parts.append(f"{report['duplicates']} rows repeating an earlier row" + (f" (the first: {first})" if first else ""))
    if report.get("repeats_prompt"):
        first = (report.get("repeats_prompt_examples") or [""])[0]
        parts.append(f"{report['repeats_prompt']} pairs whose chosen and rejected both begin with their prompt"
                     + (f" (the first: {first})" if first else "") + ": give the responses alone, or leave the "
                     "prompt field out for whole texts")
    return f"note: {'; '.join(parts)}; data_report.json in the run folder has the counts" if parts else None


class Engine:
    """Builds the optimizer and prepares the model for ``accelerator``; :meth:`plan` the steps,
    then :meth:`run` an :class:`Algorithm`.

    ``cfg`` has the option groups of :mod:`dpolab.train.options` (run, optimizer; ``grad_accum``
    where the algorithm has it)."""

    def __init__(self, cfg: Any, accelerator, model: torch.nn.Module, *, tokenizer=None, report: dict | None = None):
        self.cfg, self.accelerator, self.tokenizer, self.report = cfg, accelerator, tokenizer, report or {}
        self.run_dir = RunDir(cfg.output_dir, keep_last=cfg.save_total_limit)
        self.ckpt = self.run_dir.resolve_checkpoint(cfg.resume) if cfg.resume else None
        optimizer = make_optimizer(model.parameters(), cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
        self._raw_optimizer = optimizer
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        # later passes of a step add the head's and the embedding's gradients into .grad themselves
        self._inplace_grads = inplace_grads.allowed(accelerator) and self.unwrapped is self.model
        self.scheduler = None
        self.order = None
        self.steps = 0
        self.resumed_step: int | None = None
        # state a checkpoint restores
        self.step = self.micro = self.skipped = self.tokens_seen = self.tokens_window = 0
        self.stat_counts: dict[str, float] = {}  # the last optimizer step's counts of its (sum, count) stats
        self.window: list[dict[str, float]] = []
        self.last_logged: dict[str, float] = {}  # the last training row: the summary's training metrics
        self.window_lr: float | None = None  # the rate of the logging window's last optimizer step

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def device(self):
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def plan(self, order, *, micro_batches: int = 1, optimizer_steps_per_step: int = 1) -> int:
        """Fix the data order and the number of steps (``--max-steps``, else ``--epochs`` over the
        order), and build the schedule over the optimizer steps they make. Returns the steps."""
        cfg = self.cfg
        self.order = order
        if cfg.max_steps > 0:
            self.steps = cfg.max_steps
        else:
            self.steps = max(1, math.ceil(cfg.epochs * order.per_epoch / micro_batches))
        self.scheduler = make_scheduler(self._raw_optimizer, cfg.lr_scheduler, cfg.warmup_steps,
                                        self.steps * optimizer_steps_per_step)
        if self.ckpt is not None:  # an --epochs run behind its checkpoint: before any reference precompute
            check_steps_left(self.ckpt, read_trainer_state(self.ckpt), self.steps)
        return self.steps

    # -- one exact optimizer step -----------------------------------------------------------------
    def micro_batch_passes(self, group: list[tuple[int, list[int]]], make_batch, units, tokens, *,
                           split=None) -> list[Pass]:
        """The passes of offline micro-batches ``group`` [(k, rows)]: each micro-batch as one pass, or
        cut by ``split(rows) -> [rows]`` (a token budget). ``make_batch(rows)`` collates (row 0 stands
        in for an empty micro-batch); ``units(batch)``, ``tokens(batch)`` count. With several
        processes and ``split``, every process runs the largest count of passes of any process."""
        parts = [(k, part) for k, rows in group for part in (split(rows) if split else [rows])]
        if split is not None and self.accelerator.num_processes > 1:
            n = distributed.global_max(self.accelerator, len(parts))
            parts += [(group[-1][0], [])] * (n - len(parts))
        out = []
        for k, rows in parts:
            batch = make_batch(rows or [0])
            where = f"micro-batch {k}, rows {rows[:8]}{'...' if len(rows) > 8 else ''}"
            out.append(Pass(batch, units(batch) if rows else 0, tokens(batch) if rows else 0, where, bool(rows)))
        return out

    def optimizer_step(self, passes: list[Pass], loss_fn, *, where: str = "") -> dict[str, float] | None:
        """Backpropagate ``W · loss_sum / U`` per pass (``U``: the step's units over all processes, one
        all-reduce), clip, check, step the optimizer (unless a non-finite value is skipped) and the
        schedule. ``loss_fn(batch) -> (loss_sum, stats)``; a stat given as ``(sum, count)`` is averaged
        as Σ sum / Σ count over the passes (e.g. a per-token mean), the others weighted by units.
        Returns the means over all processes plus ``grad_norm``; None when the step was skipped or
        had no unit."""
        from dpolab.lm.checkpointing import checkpointed_layers

        cfg, acc, model = self.cfg, self.accelerator, self.model
        self.stat_counts = {}
        total = distributed.global_sum(acc, [sum(p.units for p in passes if p.real)])[0]
        scale = acc.num_processes / total if total > 0 else 0.0
        rows, weights, nonfinite, tokens = [], [], False, 0
        # a model kept in eval mode (the on-policy trainers) is not checkpointed by transformers
        eval_checkpointing = getattr(cfg, "gradient_checkpointing", False) and not model.training
        inplace = self._inplace_grads
        with checkpointed_layers(model, enabled=eval_checkpointing), inplace_grads.embedding_in_place(self.unwrapped, inplace):
            for j, p in enumerate(passes):
                if total == 0:  # no loss unit on any process: every process skips alike
                    break
                with distributed.accumulation_context(acc, model, sync=j == len(passes) - 1):
                    loss_sum, stats = loss_fn(p.batch)
                    if p.real and not torch.isfinite(loss_sum).all():
                        nonfinite = True  # every process still runs its backward passes (no hang)
                        if not cfg.skip_nonfinite:
                            raise nonfinite_error("loss", self.step + 1, p.where)
                    with inplace_grads.accumulating(inplace):
                        acc.backward(loss_sum * (scale if p.real else 0.0))
                rows.append(stats)
                weights.append(p.units)
                tokens += p.tokens
        merged: dict[str, float] = {}
        grad_norm = torch.tensor(0.0)
        if total > 0:  # the norm is checked also with clipping off (--max-grad-norm 0)
            grad_norm = grad_norm_(model.parameters(), cfg.max_grad_norm, acc)
            rows, ratios = _split_ratio_stats(rows, weights)
            merged, _, extra = distributed.reduce_weighted(acc, rows, weights,
                                                           {"tokens": tokens, "nonfinite": float(nonfinite), **ratios})
            for key in [k for k in extra if k.startswith("/")]:  # (Σ value, Σ count) pairs: their ratio
                if key.endswith("/sum"):
                    count = self.stat_counts[key[1:-4]] = extra[key[:-4] + "/count"]
                    if count > 0:  # no counted element (every token masked): no value, not a 0 to average in
                        merged[key[1:-4]] = extra[key] / count
            self.tokens_window += int(extra["tokens"])
            nonfinite = extra["nonfinite"] > 0
            if not nonfinite and not torch.isfinite(grad_norm).all():
                nonfinite = True
                if not cfg.skip_nonfinite:
                    raise nonfinite_error("gradient norm", self.step + 1, where)
        if nonfinite:
            self.skipped += 1
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.window_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used (logged)
        with warnings.catch_warnings():  # a skipped first step: torch says the schedule skips a value; it does not
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        if not merged or nonfinite:
            return None
        merged["grad_norm"] = float(grad_norm)
        return merged

    # -- the run -----------------------------------------------------------------------------------
    def evaluate(self, algo: Algorithm) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            out = {f"eval/{k}": v for k, v in algo.evaluate().items()}
        self.model.train(algo.train_mode)
        return out

    def save_checkpoint(self, algo: Algorithm) -> None:
        """Written once, by the main process; the RNG state stored is the main process's (every
        process was seeded alike). Refused for non-finite weights (``latest`` stays valid)."""
        from safetensors.torch import save_file

        if not weights_finite(self.unwrapped):
            raise nonfinite_error("weights", self.step, "refusing to write a checkpoint")
        full = distributed.model_state_dict(self.accelerator, self.model)  # collective when sharded
        if not self.is_main:
            return
        files = algo.checkpoint_files(full)
        state = {"trainer": algo.name, "step": self.step, "micro_batch": self.micro, "skipped_steps": self.skipped,
                 "tokens": self.tokens_seen, "window": self.window, "tokens_window": self.tokens_window,
                 "last_logged": self.last_logged, "algorithm": algo.state_dict(), "config": vars(self.cfg),
                 "metrics_rows": self.run_dir.metrics_rows(), "processes": self.accelerator.num_processes,
                 "cwd": os.getcwd()}

        def write(d: Path) -> None:
            for name, weights in files.items():
                save_file(untied(weights), str(d / name))
            write_training_state(d, optimizer=self.optimizer, scheduler=self.scheduler, state=state)

        self.run_dir.save_checkpoint(self.step, write)

    def _resume(self, algo: Algorithm) -> None:
        # (what makes the checkpoint one this run cannot continue was refused by start_run and plan)
        trainer_state = read_trainer_state(self.ckpt, command=algo.name)
        config = trainer_state.get("config") if isinstance(trainer_state.get("config"), dict) else {}
        algo.load_checkpoint(self, self.ckpt)
        state = read_training_state(self.ckpt, optimizer=self.optimizer, scheduler=self.scheduler, command=algo.name)
        apply_new_rates(self.optimizer, self.scheduler, config, self.cfg.learning_rate, self.cfg.weight_decay)
        self.step, self.micro = state["step"], state["micro_batch"]
        self.resumed_step = self.step
        self.skipped, self.tokens_seen = state["skipped_steps"], state["tokens"]
        self.window, self.tokens_window = list(state.get("window", [])), int(state.get("tokens_window", 0))
        self.last_logged = dict(state.get("last_logged", {}))
        algo.load_state_dict(state.get("algorithm", {}))
        if self.is_main:  # said once, however many processes
            warn_config_changes(state.get("config", {}), vars(self.cfg))
            self.run_dir.truncate_metrics(self.step, state.get("metrics_rows"))
            self.run_dir.unfinish()
            algo.on_resume(self, self.step)
            print(f"resumed from {self.ckpt} at step {self.step}", file=sys.stderr)

    def _resumed_here_at(self, step: int) -> bool:
        """Whether this run resumed, at ``step``, from this folder's own checkpoint of that step."""
        if self.ckpt is None or self.resumed_step != step:
            return False
        return Path(self.ckpt).resolve() == (self.run_dir.checkpoints / f"step-{step}").resolve()

    def run(self, algo: Algorithm) -> dict:
        """Train ``algo`` for the planned steps; returns the summary (also ``summary.json``), or
        ``{"stopped": True, "steps": N}`` after a signal."""
        cfg, run = self.cfg, self.run_dir
        if self.is_main:  # claimed before a resume cuts the folder's metrics back
            run.create().lock()
            if self.ckpt is None:  # checked again now that it is ours: a run that held it may have ended since
                run.check_new_run(None)
        try:
            if self.ckpt is not None:
                self._resume(algo)
            if self.is_main:
                run.write_config(cfg)
                (run.path / "data_report.json").write_text(json.dumps(self.report, indent=2), encoding="utf-8")
                note = data_note(self.report)
                if note:
                    print(note, file=sys.stderr)
            try:
                self.trackers = open_trackers(getattr(cfg, "report_to", None) if self.is_main else None, run.path,
                                              vars(cfg), resumed_at=self.step if self.ckpt is not None else None)
            except ConfigError:
                if self.is_main and self.ckpt is None:  # nothing of the new run is left half-made
                    run.abandon()
                raise
            status = "failed"
            try:
                summary = self._loop(algo)
                status = "stopped" if summary.get("stopped") else "finished"
                return summary
            finally:
                self.trackers.close(status)
        finally:
            if self.is_main:
                run.unlock()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """A row of ``metrics.jsonl`` and of the trackers (main process)."""
        if self.is_main and metrics:
            self.run_dir.log(step, metrics)
            self.trackers.log(metrics, step)

    def _loop(self, algo: Algorithm) -> dict:
        from tqdm.auto import tqdm

        cfg, acc, run = self.cfg, self.accelerator, self.run_dir
        self.model.train(algo.train_mode)
        batches = self.order.iterate(start=self.micro)
        bar = tqdm(total=self.steps, initial=self.step, desc=algo.name, dynamic_ncols=True,
                   disable=not (cfg.progress and self.is_main))
        t0 = time.time()
        last_eval: dict[str, float] = {}
        with StopSignal() as stop:
            while self.step < self.steps:
                group = [next(batches) for _ in range(algo.micro_batches)]
                metrics = algo.step(self, group)
                self.step += 1
                self.micro = group[-1][0] + 1
                bar.update(1)
                if metrics:
                    self.window.append(metrics)
                step = self.step
                if step % cfg.logging_steps == 0 or step == self.steps:
                    elapsed = max(time.time() - t0, 1e-9)
                    logged = _mean(self.window)
                    lr = self.window_lr if self.window_lr is not None else self.scheduler.get_last_lr()[0]
                    logged.update({"learning_rate": lr,
                                   "epoch": self.micro / self.order.per_epoch,
                                   "tokens_per_second": self.tokens_window / elapsed, "skipped_steps": self.skipped})
                    self.tokens_seen += self.tokens_window
                    self.window, t0, self.tokens_window, self.last_logged = [], time.time(), 0, logged
                    self.window_lr = None
                    self.log(step, logged)
                    algo.on_log(self, step, logged)
                    bar.set_postfix({k.split("/")[-1]: f"{logged[k]:.4g}" for k in algo.bar_keys if k in logged})
                if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and step < self.steps:
                    last_eval = self.evaluate(algo)
                    self.log(step, last_eval)
                if cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < self.steps:
                    self.save_checkpoint(algo)
                signame = stop.agreed(acc)
                if signame and step < self.steps:
                    self.save_checkpoint(algo)
                    bar.close()
                    if self.is_main:
                        print(resume_hint(algo.name, run, signame, step, self.steps, acc.num_processes), file=sys.stderr)
                    return {"stopped": True, "steps": step}
        bar.close()
        pending = stop.received  # a signal during the last step stops after its checkpoint
        with StopSignal() as stop:  # a signal during the end-of-run work: a clean stop, resumable
            stop.received = pending
            # first: an evaluation that fails leaves the trained run resumable (a resume of this folder's
            # final checkpoint that trained nothing has it already: rewriting it needed its room twice)
            if not self._resumed_here_at(self.step):
                self.save_checkpoint(algo)
            signame = stop.agreed(acc)
            if not signame:
                last_eval = self.evaluate(algo)
                signame = stop.agreed(acc)
            if signame:  # the resume evaluates and saves final/ (the evaluation's row is not logged yet)
                if self.is_main:
                    print(resume_hint(algo.name, run, signame, self.step, self.steps, acc.num_processes),
                          file=sys.stderr)
                return {"stopped": True, "steps": self.step}
            summary_metrics = {**self.last_logged, **last_eval, "skipped_steps": self.skipped, **algo.summary(self)}
            full = distributed.model_state_dict(acc, self.model) if distributed.is_sharded(acc) else None
            if not self.is_main:
                return summary_metrics
            self.log(self.step, last_eval)
            algo.save_final(self, run.final, full)  # a signal from here on: the run finishes first
            summary = run.write_summary(summary_metrics, steps=self.step, before=lambda s: write_model_card(
                run.final, command=algo.name, method=method_text(algo), config=vars(cfg), metrics=s,
                report=self.report))
            print_summary(summary, algo.summary_keys)  # still under the handler: the run is complete
            if self.skipped:
                print(f"warning: {self.skipped} optimizer steps were skipped as non-finite (--skip-nonfinite): "
                      "their updates were not made (skipped_steps in summary.json)", file=sys.stderr)
        return summary


def combine_steps(outs: list[tuple[dict[str, float], dict[str, float]]]) -> dict[str, float]:
    """One generation step's metrics from its optimizer steps' ``(metrics, counts)``: a per-token
    mean (a stat with a count) over all their tokens, as if one step, so an optimizer step with few
    (or, all masked, no) loss tokens weighs that much; the others (``grad_norm``) a plain mean."""
    out = {}
    for key in dict.fromkeys(k for metrics, _ in outs for k in metrics):
        have = [(metrics[key], counts.get(key)) for metrics, counts in outs if key in metrics]
        if all(c is not None for _, c in have):
            out[key] = sum(v * c for v, c in have) / sum(c for _, c in have)
        else:
            out[key] = sum(v for v, _ in have) / len(have)
    return out


def _split_ratio_stats(rows: list[dict], weights: list[int]) -> tuple[list[dict], dict[str, float]]:
    """Stats given as ``(sum, count)`` pairs (per-token means whose count is not the pass's units)
    become two plain sums over the passes of real data (``"/name/sum"``, ``"/name/count"``); the
    rest stay unit-weighted means."""
    plain = [{k: v for k, v in r.items() if not isinstance(v, tuple)} for r in rows]
    sums: dict[str, float] = {}
    for r, w in zip(rows, weights):
        for k, v in r.items():
            if isinstance(v, tuple):
                sums[f"/{k}/sum"] = sums.get(f"/{k}/sum", 0.0) + (v[0] if w else 0.0)
                sums[f"/{k}/count"] = sums.get(f"/{k}/count", 0.0) + (v[1] if w else 0.0)
    return plain, sums


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the window's steps that report it, each step weighing the same (a step
    may lack one: an online DPO step whose pairs all tie has no loss)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in rows:
        for k, v in r.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def print_summary(summary: dict, keys: tuple[str, ...] | list[str]) -> None:
    shown = {k: summary[k] for k in keys if k in summary}
    width = max((len(k) for k in shown), default=0)
    for k, v in shown.items():
        print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}", file=sys.stderr)
