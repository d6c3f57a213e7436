"""The run skeleton of the Gymnasium trainers (``dpolab rl ppo``, ``dpolab rl a2c``).

An algorithm (:class:`GymAlgorithm`) supplies its optimizer and its update from one rollout; this
loop owns the rest: the vector environment and the actor-critic, seeding, the learning-rate
schedule's fraction, evaluation every ``--eval-every`` environment steps, checkpoints every
``--save-steps`` and at the end, exact resume (weights, optimizer, RNG, environment state and the
algorithm's own state), SIGINT/SIGTERM (finish the update, checkpoint, print how to resume), the
non-finite weight guard, ``final/``, the learning curve and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dpolab.config import opt
from dpolab.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from dpolab.rl.nets import ActorCritic
    from dpolab.rl.rollout import Rollout


@dataclass
class GymOptions:
    """Options every Gymnasium trainer has (each redeclares the ones whose defaults differ)."""

    env: str = opt("CartPole-v1", "Gymnasium environment id, or module:EnvId to import the module that registers "
                   "it first (flat Box observations; Discrete or Box actions)")
    total_steps: int = opt(100_000, "environment steps to train for (rounded up to whole rollouts of N×T)")
    seed: int = opt(1, "seed for torch, NumPy, Python and the environments")
    output_dir: str = opt("runs/rl", "run directory (config.yaml, metrics.jsonl, checkpoints/, final/)")
    resume: str | None = opt(None, "continue from a checkpoint: a path or 'latest' (in --output-dir)")
    n_envs: int = opt(8, "N: parallel environments (SyncVectorEnv)")
    n_steps: int = opt(32, "T: steps per environment per rollout")
    gamma: float = opt(0.99, "discount γ")
    gae_lambda: float = opt(0.95, "GAE λ")
    lr: float = opt(1e-3, "learning rate")
    vf_coef: float = opt(0.5, "c₁: value loss coefficient")
    ent_coef: float = opt(0.0, "c₂: entropy bonus coefficient")
    max_grad_norm: float = opt(0.5, "gradient norm clip (0 disables)")
    hidden: list[int] = opt(default_factory=lambda: [64, 64], help="hidden layer sizes (comma separated)")
    activation: str = opt("tanh", "hidden activation", choices=("tanh", "relu"))
    log_std_init: float = opt(0.0, "initial log σ of Gaussian policies (continuous actions)")
    eval_every: int = opt(10_000, "evaluate every this many environment steps (0: only at the end)")
    eval_episodes: int = opt(10, "evaluation episodes (deterministic policy, run in parallel)")
    stop_return: float | None = opt(None, "stop once the evaluation mean return reaches this")
    save_steps: int = opt(50_000, "checkpoint every this many environment steps (0: only at the end of the run)")
    save_total_limit: int = opt(2, "keep the newest N checkpoints (0: keep all)")
    dry_run: bool = opt(False, "validate the config and environment, print a summary, do not train")
    threads: int = opt(1, "torch CPU threads (tiny networks: 1 is fastest)")
    progress: bool = opt(True, "show a tqdm progress bar")
    tensorboard: bool = opt(False, "also log to TensorBoard (the same as --report-to tensorboard)")
    report_to: str = opt("none", "also log to experiment trackers: tensorboard, wandb, mlflow, a comma-separated "
                         "list, or none (pip install 'dpolab[tracking]')", items=True)

    def validate(self) -> None:
        for name in ("total_steps", "n_envs", "n_steps", "eval_episodes", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.threads > 4096:  # torch.set_num_threads overflowed (a traceback after config.yaml was written)
            raise ConfigError(f"--threads must be at most 4096, got {self.threads}")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ConfigError("--gamma and --gae-lambda must lie in [0, 1]")
        if self.lr <= 0:
            raise ConfigError("--lr must be > 0")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError(f"--hidden needs one or more layer sizes, each >= 1, got {self.hidden}")
        if self.seed < 0:  # NumPy's and Gymnasium's seeds are unsigned
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        for name in ("vf_coef", "ent_coef", "max_grad_norm", "eval_every", "save_steps", "save_total_limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")


class GymAlgorithm:
    """What a Gymnasium trainer supplies to :func:`run`."""

    name = ""    # "ppo" / "a2c": the command is ``dpolab rl NAME``
    title = ""   # for the learning-curve plot

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def make_optimizer(self, policy: ActorCritic) -> torch.optim.Optimizer:
        raise NotImplementedError

    def load_optimizer(self, optimizer: torch.optim.Optimizer, saved: dict) -> None:
        optimizer.load_state_dict(saved)

    def update(self, policy: ActorCritic, optimizer: torch.optim.Optimizer, ro: Rollout,
               episodes: list[tuple[float, int]], *, frac: float, update: int, n_updates: int,
               step: int) -> tuple[dict[str, float] | None, int]:
        """Learn from rollout ``ro`` (``frac``: the share of the budget left before it, for linear
        annealing). Returns (metrics to log at this update or None, optimizer steps skipped)."""
        raise NotImplementedError

    def flush(self) -> dict[str, float] | None:
        """Metrics still held back (e.g. A2C's partly filled logging window) when the run ends before
        its last update (``--stop-return``); None if there are none."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Plain-data algorithm state a checkpoint carries (e.g. a partly filled logging window)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def run(cfg: Any, algo: GymAlgorithm) -> dict:
    """Train ``algo`` as ``cfg`` (checked: :func:`dpolab.config.check_config`) says; returns the
    summary (also written to summary.json). torch's thread count (``--threads``) is restored
    afterwards, for the rest of a notebook or sweep."""
    import torch

    from dpolab.runs.rundir import RunDir

    threads = torch.get_num_threads()
    try:
        return _run(cfg, algo)
    finally:
        torch.set_num_threads(threads)
        RunDir(cfg.output_dir).unlock()  # the folder's claim, if this run made one


def _run(cfg: Any, algo: GymAlgorithm) -> dict:
    import numpy as np
    import torch

    from dpolab.rl.nets import ActorCritic
    from dpolab.rl.rollout import Collector, evaluate, make_vec_env, space_dims
    from dpolab.rl.tracking import (
        Tracker,
        dry_run_summary,
        plot_learning_curve,
        report_to,
        restore_checkpoint,
        save_checkpoint,
        save_final,
        start_run,
    )
    from dpolab.runs.guards import nonfinite_error, weights_finite
    from dpolab.runs.memory_check import check_fits_memory
    from dpolab.runs.model_card import method_text, write_model_card
    from dpolab.runs.seeding import seed_everything
    from dpolab.runs.signals import StopSignal, resume_hint
    trackers = report_to(cfg)  # a tracker that is not installed fails before any work
    envs = make_vec_env(cfg.env, cfg.n_envs)  # a bad env id fails before the run directory exists
    try:  # a rollout's buffers (observations, actions, log-probs, values, rewards, advantages, flags)
        obs_dim, action_dim, _ = space_dims(envs)
        check_fits_memory(cfg.n_steps * cfg.n_envs * (4 * obs_dim + 8 * action_dim + 34),
                          f"a rollout of --n-steps {cfg.n_steps} x --n-envs {cfg.n_envs} steps")
    except BaseException:
        envs.close()
        raise
    if cfg.dry_run:
        try:
            start_run(cfg, algo.name, create=False)  # the output folder and --resume, as a real run checks them
        except BaseException:
            envs.close()
            raise
        return dry_run_summary(cfg, envs)
    try:
        run_dir, state = start_run(cfg, algo.name)
    except BaseException:
        envs.close()
        raise
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    obs_dim, action_dim, discrete = space_dims(envs)
    collector = Collector(envs, seed=cfg.seed)
    policy = ActorCritic(obs_dim, action_dim, discrete, cfg.hidden, cfg.activation, cfg.log_std_init)
    optimizer = algo.make_optimizer(policy)

    per_update = cfg.n_envs * cfg.n_steps
    n_updates = math.ceil(cfg.total_steps / per_update)
    start, eval_seconds, best, skipped = 0, 0.0, -math.inf, 0
    if state is not None:
        restore_checkpoint(run_dir, state)
        policy.load_state_dict(state["policy"])
        algo.load_optimizer(optimizer, state["optimizer"])
        collector.load_state_dict(state["collector"], reseed=cfg.seed + state["update"])
        start, eval_seconds, best = state["update"], state["eval_seconds"], state["best"]
        skipped = int(state.get("skipped_steps", 0))
        algo.load_state_dict(state)

    def checkpoint(update: int) -> None:

        save_checkpoint(run_dir, update * per_update, cfg, {"algorithm": algo.name,
            "policy": policy.state_dict(), "optimizer": optimizer.state_dict(), "update": update,
            "collector": collector.state_dict(), "eval_seconds": eval_seconds, "best": best,
            "skipped_steps": skipped, "evaluated_at": evaluated_at, "last_eval": last_eval, **algo.state_dict()})

    def run_eval(step: int) -> float:

        nonlocal eval_seconds, best, evaluated_at
        evaluated_at = step
        t0 = time.perf_counter()
        returns = evaluate(policy, cfg.env, cfg.eval_episodes, seed=cfg.seed + 1_000_003)
        eval_seconds += time.perf_counter() - t0
        mean = float(np.mean(returns))
        best = max(best, mean)
        tracker.log(step, {"eval/mean_return": mean, "eval/std_return": float(np.std(returns))})
        return mean

    def log_training(metrics: dict[str, float] | None, step: int) -> None:
        if metrics is not None:
            metrics["skipped_steps"] = skipped
            metrics["charts/sps"] = (step - start * per_update) / max(time.perf_counter() - t_start, 1e-9)  # this process's steps
            tracker.log(step, metrics)

    try:
        tracker = Tracker(run_dir, n_updates * per_update, start * per_update, cfg.progress, trackers, algo.name,
                          dataclasses.asdict(cfg), resumed_at=start * per_update if state is not None else None)
    except BaseException:
        envs.close()
        if state is None:  # nothing of the new run is left half-made
            run_dir.abandon()
        raise
    t_start, last_eval, evaluated_at = time.perf_counter(), float("nan"), -1
    if state is not None:  # the final checkpoint follows the end-of-run evaluation: not evaluated again
        evaluated_at, last_eval = int(state.get("evaluated_at", -1)), float(state.get("last_eval", math.nan))
        if cfg.stop_return is not None and last_eval >= cfg.stop_return:
            n_updates = start  # it stopped here at --stop-return: finished, as the uninterrupted run is
    update = start
    signals = StopSignal().__enter__()  # SIGINT/SIGTERM: finish the update, checkpoint, exit 0
    status = "failed"  # what the trackers record when the loop does not end
    try:
        while update < n_updates:
            update += 1
            step = update * per_update
            ro, episodes = collector.collect(policy, cfg.n_steps)
            # Linear annealing to 0 uses the fraction of the budget left before this rollout (CleanRL's
            # convention; SB3 takes it after the rollout, one rollout less: 256/100k = 0.26% of lr and ε).
            metrics, skipped_now = algo.update(policy, optimizer, ro, episodes, frac=1.0 - (update - 1) / n_updates,
                                               update=update, n_updates=n_updates, step=step)
            skipped += skipped_now
            if not weights_finite(policy):  # e.g. an overflowing optimizer step: stop before acting on NaN
                raise nonfinite_error("weights", step, f"after update {update}/{n_updates}")
            log_training(metrics, step)
            tracker.advance(per_update)
            if cfg.eval_every and step // cfg.eval_every > (step - per_update) // cfg.eval_every:
                last_eval = run_eval(step)
                if cfg.stop_return is not None and last_eval >= cfg.stop_return:
                    log_training(algo.flush(), step)  # the updates since the last row are logged too
                    break
            if update < n_updates and cfg.save_steps and step // cfg.save_steps > (step - per_update) // cfg.save_steps:
                checkpoint(update)
            if signals.received and update < n_updates:
                checkpoint(update)
                print(resume_hint(f"rl {algo.name}", run_dir, signals.received, step, n_updates * per_update),
                      file=sys.stderr)
                status = "stopped"
                return {"stopped": True, "steps": step}
        step = update * per_update
        if evaluated_at != step:
            last_eval = run_eval(step)
        checkpoint(update)
        status = "finished"
    finally:
        signals.__exit__(None, None, None)
        tracker.close(status)
        collector.envs.close()

    save_final(run_dir, policy, {"env": cfg.env, "algo": algo.name}, step)
    plot_learning_curve(run_dir, f"{algo.title} on {cfg.env} (seed {cfg.seed})")
    return run_dir.write_summary(
        {"eval/mean_return": last_eval, "eval_seconds": round(eval_seconds, 3),
         # no finite evaluation (NaN rewards): NaN, not the -inf best starts from
         "eval/best_mean_return": best if best > -math.inf else last_eval,
         "skipped_steps": skipped}, steps=step,
        before=lambda s: write_model_card(run_dir.final, command=f"rl {algo.name}", method=method_text(algo),
                                          config=dataclasses.asdict(cfg), metrics=s, base_model=""))


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 − Var[target − pred] / Var[target] (1: perfect, 0: no better than a constant; nan if Var = 0)."""
    var = target.var()
    return float("nan") if var == 0 else float(1 - (target - pred).var() / var)


def cli(cfg_cls, algo_cls, argv: list[str], prog: str, description: str) -> int:
    """A Gymnasium trainer's command: parse, train, print the final evaluation."""
    from dpolab.config import parse_config

    cfg = parse_config(cfg_cls, argv, prog, description=description)
    summary = run(cfg, algo_cls(cfg))
    if summary.get("stopped") or summary.get("dry_run"):
        return 0
    value = summary["eval/mean_return"]  # "nan" in the summary's JSON-safe form when the rewards were NaN
    print(f"{prog}: {summary['steps']} steps, eval/mean_return "
          f"{f'{value:.1f}' if isinstance(value, (int, float)) else value} -> {cfg.output_dir}")
    return 0
