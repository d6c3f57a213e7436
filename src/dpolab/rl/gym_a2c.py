"""Advantage actor-critic, synchronous (A2C; Mnih et al. 2016, arXiv 1602.01783) on Gymnasium.

    for iteration = 1, 2, ...:
        run π_θ in N environments for T steps                      (Collector.collect)
        Â_t = GAE(γ, λ); λ = 1 gives A3C's n-step returns up to the rollout end minus V(s_t)
        one gradient step on  L = −log π_θ(a_t|s_t) Â_t + c₁ (V(s_t) − G_t)² − c₂ H[π_θ(·|s_t)]

The same rollout, advantage and network code as ``dpolab.rl.gym_ppo``; the difference is one on-policy
gradient step per rollout, no ratio and no clipping. Defaults follow Stable-Baselines3's A2C
(RMSprop, lr 7e-4, T = 5) with the RL Zoo's N = 8 environments.

Usage: ``dpolab rl a2c --env CartPole-v1 --total-steps 200000 --seed 1 --output-dir runs/a2c``
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from dpolab.config import opt, parse_config
from dpolab.errors import ConfigError
from dpolab.losses.pg import a2c_loss
from dpolab.rl.advantages import gae, whiten
from dpolab.rl.gym_ppo import explained_variance
from dpolab.rl.nets import ActorCritic
from dpolab.rl.rollout import Collector, Rollout, evaluate, make_vec_env, space_dims
from dpolab.rl.tracking import (
    Tracker,
    dry_run_summary,
    load_checkpoint,
    plot_learning_curve,
    save_checkpoint,
    save_final,
    start_run,
)
from dpolab.runs.guards import nonfinite_error, weights_finite
from dpolab.runs.seeding import seed_everything
from dpolab.runs.signals import StopSignal, resume_hint


@dataclass
class A2CConfig:
    env: str = opt("CartPole-v1", "Gymnasium environment id (flat Box observations; Discrete or Box actions)")
    total_steps: int = opt(200_000, "environment steps to train for (rounded up to whole rollouts of N×T)")
    seed: int = opt(1, "seed for torch, NumPy, Python and the environments")
    output_dir: str = opt("runs/a2c", "run directory (config.yaml, metrics.jsonl, checkpoints/, final/)")
    resume: str | None = opt(None, "continue from a checkpoint: a path or 'latest' (in --output-dir)")
    n_envs: int = opt(8, "N: parallel environments (SyncVectorEnv)")
    n_steps: int = opt(5, "T: steps per environment per update")
    gamma: float = opt(0.99, "discount γ")
    gae_lambda: float = opt(1.0, "GAE λ (1: n-step returns, as A3C)")
    lr: float = opt(7e-4, "learning rate")
    optimizer: str = opt("rmsprop", "optimizer", choices=("rmsprop", "adam"))
    anneal_lr: bool = opt(False, "anneal the learning rate linearly to 0")
    vf_coef: float = opt(0.5, "c₁: value loss coefficient")
    ent_coef: float = opt(0.0, "c₂: entropy bonus coefficient")
    max_grad_norm: float = opt(0.5, "gradient norm clip (0 disables)")
    norm_adv: bool = opt(False, "whiten advantages per update")
    skip_nonfinite: bool = opt(False, "skip an update whose loss or gradient is NaN/inf (counted in "
                               "skipped_steps) instead of stopping the run")
    hidden: list[int] = opt(default_factory=lambda: [64, 64], help="hidden layer sizes (comma separated)")
    activation: str = opt("tanh", "hidden activation", choices=("tanh", "relu"))
    log_std_init: float = opt(0.0, "initial log σ of Gaussian policies (continuous actions)")
    eval_every: int = opt(10_000, "evaluate every this many environment steps (0: only at the end)")
    eval_episodes: int = opt(10, "evaluation episodes (deterministic policy, run in parallel)")
    stop_return: float | None = opt(None, "stop once the evaluation mean return reaches this")
    save_steps: int = opt(50_000, "checkpoint every this many environment steps (0: only at the end of the run)")
    save_total_limit: int = opt(2, "keep the newest N checkpoints")
    dry_run: bool = opt(False, "validate the config and environment, print a summary, do not train")
    log_every: int = opt(10, "log training metrics every this many updates")
    threads: int = opt(1, "torch CPU threads (tiny networks: 1 is fastest)")
    progress: bool = opt(True, "show a tqdm progress bar")
    tensorboard: bool = opt(False, "also log to TensorBoard (needs the tensorboard package)")

    def validate(self) -> None:
        for name in ("total_steps", "n_envs", "n_steps", "eval_episodes", "threads", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ConfigError("--gamma and --gae-lambda must lie in [0, 1]")
        if self.lr <= 0:
            raise ConfigError("--lr must be > 0")
        if not self.hidden:
            raise ConfigError("--hidden needs at least one layer size")


def a2c_update(policy: ActorCritic, optimizer: torch.optim.Optimizer, ro: Rollout, cfg: A2CConfig, *,
               where: str = "", step: int = 0) -> tuple[dict[str, float] | None, torch.Tensor, torch.Tensor]:
    """One A2C update from rollout ``ro``: GAE, then one gradient step on the mean A2C loss over the
    N×T steps. Returns (mean policy/value/entropy losses, old values, value targets).

    A NaN/inf loss or gradient norm raises a :class:`NonFiniteError` naming ``where``; with
    ``cfg.skip_nonfinite`` the step is skipped instead (weights and optimizer state untouched) and
    the losses come back as ``None``."""
    adv, ret = gae(ro.rewards, ro.values, ro.next_values, ro.terminated, ro.truncated,
                   gamma=cfg.gamma, lam=cfg.gae_lambda)
    b_obs = ro.obs.reshape(-1, ro.obs.shape[-1])
    b_act = ro.actions.reshape(ro.obs.shape[0] * ro.obs.shape[1], *ro.actions.shape[2:])
    b_adv, b_ret, b_val = adv.reshape(-1), ret.reshape(-1), ro.values.reshape(-1)
    if cfg.norm_adv and b_adv.numel() > 1:
        b_adv = whiten(b_adv)
    logp, entropy, values = policy.evaluate(b_obs, b_act)  # re-evaluated, with gradients
    loss, st = a2c_loss(logp, b_adv, values, b_ret, entropy, vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef)
    optimizer.zero_grad(set_to_none=True)
    loss = loss.mean()
    loss.backward()
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf  # the norm is needed either way
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
    loss_value = loss.item()
    if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
        what = "loss" if not math.isfinite(loss_value) else "gradient norm"
        if not cfg.skip_nonfinite:
            raise nonfinite_error(what, step, where or "A2C update")
        optimizer.zero_grad(set_to_none=True)
        return None, b_val, b_ret
    optimizer.step()
    return {k: float(v.mean()) for k, v in st.items()}, b_val, b_ret


def train(cfg: A2CConfig) -> dict:
    """Train A2C as configured; returns the summary (also written to summary.json)."""
    envs = make_vec_env(cfg.env, cfg.n_envs)  # a bad env id fails before the run directory exists
    if cfg.dry_run:
        return dry_run_summary(cfg, envs)
    try:
        run = start_run(cfg)
    except BaseException:
        envs.close()
        raise
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    obs_dim, action_dim, discrete = space_dims(envs)
    collector = Collector(envs, seed=cfg.seed)
    policy = ActorCritic(obs_dim, action_dim, discrete, cfg.hidden, cfg.activation, cfg.log_std_init)
    if cfg.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(policy.parameters(), lr=cfg.lr, alpha=0.99, eps=1e-5)
    else:
        optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)

    per_update = cfg.n_envs * cfg.n_steps
    n_updates = math.ceil(cfg.total_steps / per_update)
    start, eval_seconds, best = 0, 0.0, -math.inf
    if cfg.resume is not None:
        state = load_checkpoint(run, cfg.resume, cfg)
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["optimizer"])
        collector.load_state_dict(state["collector"], reseed=cfg.seed + state["update"])
        start, eval_seconds, best = state["update"], state["eval_seconds"], state["best"]

    def checkpoint(update: int) -> None:
        save_checkpoint(run, update * per_update, cfg, {
            "policy": policy.state_dict(), "optimizer": optimizer.state_dict(), "update": update,
            "collector": collector.state_dict(), "eval_seconds": eval_seconds, "best": best,
            "log_window": (dict(sums), list(episodes_window), n_logged, n_stepped), "skipped_steps": skipped})

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

    tracker = Tracker(run, n_updates * per_update, start * per_update, cfg.progress, cfg.tensorboard, "a2c")
    t_start, last_eval, evaluated_at = time.perf_counter(), float("nan"), -1
    sums: dict[str, float] = {}
    episodes_window: list[tuple[float, int]] = []
    n_logged = n_stepped = skipped = 0  # updates in the logging window, of them not skipped; skipped in all
    if cfg.resume is not None:  # the partly filled logging window, so resumed logs equal uninterrupted ones
        sums, episodes_window, n_logged, n_stepped = state["log_window"]
        skipped = int(state.get("skipped_steps", 0))
    update = start
    signals = StopSignal().__enter__()  # SIGINT/SIGTERM: finish the update, checkpoint, exit 0
    try:
        while update < n_updates:
            update += 1
            step = update * per_update
            lr_now = cfg.lr * (1.0 - (update - 1) / n_updates) if cfg.anneal_lr else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr_now

            ro, episodes = collector.collect(policy, cfg.n_steps)
            episodes_window += episodes
            st, b_val, b_ret = a2c_update(policy, optimizer, ro, cfg, where=f"update {update}/{n_updates}", step=step)
            if st is None:
                skipped += 1
            else:
                n_stepped += 1
                for k in ("policy", "value", "entropy"):
                    sums[f"losses/{k}"] = sums.get(f"losses/{k}", 0.0) + st[k]
            if not weights_finite(policy):  # e.g. an overflowing optimizer step: stop before acting on NaN
                raise nonfinite_error("weights", step, f"after update {update}/{n_updates}")
            sums["losses/explained_variance"] = sums.get("losses/explained_variance", 0.0) + \
                explained_variance(b_val, b_ret)
            n_logged += 1
            if update % cfg.log_every == 0 or update == n_updates:
                metrics = {k: v / (n_logged if k == "losses/explained_variance" else n_stepped)
                           for k, v in sums.items()}
                metrics["skipped_steps"] = skipped
                metrics["charts/learning_rate"] = lr_now
                if episodes_window:
                    metrics["charts/episodic_return"] = float(np.mean([e[0] for e in episodes_window]))
                    metrics["charts/episodic_length"] = float(np.mean([e[1] for e in episodes_window]))
                metrics["charts/sps"] = step / max(time.perf_counter() - t_start, 1e-9)
                tracker.log(step, metrics, advance=per_update * n_logged)
                sums, episodes_window, n_logged, n_stepped = {}, [], 0, 0

            if cfg.eval_every and step // cfg.eval_every > (step - per_update) // cfg.eval_every:
                last_eval = run_eval(step)
                if cfg.stop_return is not None and last_eval >= cfg.stop_return:
                    break
            if update < n_updates and cfg.save_steps and \
                    step // cfg.save_steps > (step - per_update) // cfg.save_steps:
                checkpoint(update)
            if signals.received and update < n_updates:
                checkpoint(update)
                print(resume_hint("rl a2c", run, signals.received, step, n_updates * per_update), file=sys.stderr)
                return {"stopped": True, "steps": step}
        step = update * per_update
        if evaluated_at != step:
            last_eval = run_eval(step)
        checkpoint(update)
    finally:
        signals.__exit__(None, None, None)
        tracker.close()
        collector.envs.close()

    save_final(run, policy, {"env": cfg.env, "algo": "a2c"}, step)
    plot_learning_curve(run, f"A2C on {cfg.env} (seed {cfg.seed})")
    return run.write_summary({"eval/mean_return": last_eval, "eval/best_mean_return": best,
                              "eval_seconds": round(eval_seconds, 3), "skipped_steps": skipped}, steps=step)


def cli_main(argv: list[str], prog: str) -> int:
    cfg = parse_config(A2CConfig, argv, prog, description=__doc__.split("\n\n")[0])
    summary = train(cfg)
    if summary.get("stopped") or summary.get("dry_run"):
        return 0
    print(f"{prog}: {summary['steps']} steps, eval/mean_return {summary['eval/mean_return']:.1f} "
          f"-> {cfg.output_dir}")
    return 0
