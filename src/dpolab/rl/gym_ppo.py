"""PPO, actor-critic style (Schulman et al. 2017, arXiv 1707.06347, Algorithm 1) on Gymnasium.

    for iteration = 1, 2, ...:
        run π_θold in N environments for T steps                       (Collector.collect)
        compute advantage estimates Â_1..Â_T with GAE(γ, λ)            (dpolab.rl.advantages.gae)
        optimise L = L^CLIP − c₁ L^VF + c₂ H for K epochs, minibatches of M ≤ NT   (the loop below)
        θold ← θ

Defaults are the RL-Zoo CartPole-v1 settings (8 envs × 32 steps, 20 epochs, minibatch 256,
γ = 0.98, λ = 0.8, lr 1e-3 and clip 0.2 both annealed linearly to 0, no entropy bonus). The math,
metrics and a benchmark against Stable-Baselines3 are in docs/ppo.md.

Usage: ``dpolab rl ppo --env CartPole-v1 --total-steps 100000 --seed 1 --output-dir runs/cp``
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
from dpolab.losses.pg import value_loss
from dpolab.losses.ppo import clipped_value_loss, ppo_clip_loss
from dpolab.rl.advantages import gae, whiten
from dpolab.rl.nets import ActorCritic
from dpolab.rl.rollout import Collector, evaluate, make_vec_env, space_dims
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
class PPOConfig:
    env: str = opt("CartPole-v1", "Gymnasium environment id (flat Box observations; Discrete or Box actions)")
    total_steps: int = opt(100_000, "environment steps to train for (rounded up to whole rollouts of N×T)")
    seed: int = opt(1, "seed for torch, NumPy, Python and the environments")
    output_dir: str = opt("runs/ppo", "run directory (config.yaml, metrics.jsonl, checkpoints/, final/)")
    resume: str | None = opt(None, "continue from a checkpoint: a path or 'latest' (in --output-dir)")
    n_envs: int = opt(8, "N: parallel environments (SyncVectorEnv)")
    n_steps: int = opt(32, "T: steps per environment per rollout")
    batch_size: int = opt(256, "M: minibatch size (M <= N×T)")
    n_epochs: int = opt(20, "K: optimisation epochs per rollout")
    gamma: float = opt(0.98, "discount γ")
    gae_lambda: float = opt(0.8, "GAE λ")
    lr: float = opt(1e-3, "Adam learning rate")
    anneal_lr: bool = opt(True, "anneal the learning rate linearly to 0")
    clip_eps: float = opt(0.2, "PPO clip ε")
    anneal_clip: bool = opt(True, "anneal ε linearly to 0 (as the RL Zoo's 'lin_0.2')")
    clip_vloss: bool = opt(False, "clip the value loss around the old values with ε")
    vf_coef: float = opt(0.5, "c₁: value loss coefficient")
    ent_coef: float = opt(0.0, "c₂: entropy bonus coefficient")
    max_grad_norm: float = opt(0.5, "gradient norm clip (0 disables)")
    norm_adv: bool = opt(True, "whiten advantages per minibatch")
    skip_nonfinite: bool = opt(False, "skip a minibatch step whose loss or gradient is NaN/inf (counted in "
                               "skipped_steps) instead of stopping the run")
    target_kl: float | None = opt(None, "stop the epochs of an update once a minibatch's approx KL exceeds this")
    hidden: list[int] = opt(default_factory=lambda: [64, 64], help="hidden layer sizes (comma separated)")
    activation: str = opt("tanh", "hidden activation", choices=("tanh", "relu"))
    log_std_init: float = opt(0.0, "initial log σ of Gaussian policies (continuous actions)")
    eval_every: int = opt(10_000, "evaluate every this many environment steps (0: only at the end)")
    eval_episodes: int = opt(10, "evaluation episodes (deterministic policy, run in parallel)")
    stop_return: float | None = opt(None, "stop once the evaluation mean return reaches this")
    save_steps: int = opt(50_000, "checkpoint every this many environment steps (0: only at the end of the run)")
    save_total_limit: int = opt(2, "keep the newest N checkpoints")
    dry_run: bool = opt(False, "validate the config and environment, print a summary, do not train")
    threads: int = opt(1, "torch CPU threads (tiny networks: 1 is fastest)")
    progress: bool = opt(True, "show a tqdm progress bar")
    tensorboard: bool = opt(False, "also log to TensorBoard (needs the tensorboard package)")

    def validate(self) -> None:
        for name in ("total_steps", "n_envs", "n_steps", "batch_size", "n_epochs", "eval_episodes", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_size > self.n_envs * self.n_steps:
            raise ConfigError(f"--batch-size {self.batch_size} exceeds N×T = {self.n_envs * self.n_steps}")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ConfigError("--gamma and --gae-lambda must lie in [0, 1]")
        if self.lr <= 0 or self.clip_eps <= 0:
            raise ConfigError("--lr and --clip-eps must be > 0")
        if not self.hidden:
            raise ConfigError("--hidden needs at least one layer size")


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 − Var[target − pred] / Var[target] (1: perfect, 0: no better than a constant; nan if Var = 0)."""
    var = target.var()
    return float("nan") if var == 0 else float(1 - (target - pred).var() / var)


_LOSS_KEYS = ("losses/policy", "losses/value", "losses/entropy", "losses/clipfrac", "losses/approx_kl")


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm``; returns the norm
    before clipping. The same operations as ``torch.nn.utils.clip_grad_norm_(foreach=True)`` on one
    device and dtype (identical results, tested) without its per-call grouping overhead."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def flat_optimizer_state(saved: dict) -> dict:
    """An Adam ``state_dict`` over the separate parameter tensors (checkpoints of dpolab before the
    flat parameter buffer) as the state over the one flat tensor: the per-element moments
    concatenated in parameter order (the order the flat buffer uses). Anything else is returned as is."""
    (group,) = saved["param_groups"]
    ids = group["params"]
    if len(ids) == 1:
        return saved
    state = {}
    if ids[0] in saved["state"]:
        per = [saved["state"][i] for i in ids]
        step = per[0]["step"]
        state = {0: {"step": step.clone() if torch.is_tensor(step) else step,
                     **{k: torch.cat([s[k].reshape(-1) for s in per]) for k in ("exp_avg", "exp_avg_sq")}}}
    return {"state": state, "param_groups": [{**group, "params": [0]}]}


def ppo_update(policy: ActorCritic, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...],
               cfg: PPOConfig, clip_eps: float, *, where: str = "", step: int = 0) -> tuple[dict[str, float], int, int]:
    """K epochs of minibatch steps on L^CLIP + c₁ L^VF − c₂ H over one rollout's samples.

    ``batch`` = (obs (B, obs_dim), actions (B[, A]), old log-probs (B,), old values (B,), advantages (B,),
    returns (B,)). A minibatch whose loss or gradient norm is NaN/inf raises a :class:`NonFiniteError`
    naming ``where``, the epoch and the minibatch; with ``cfg.skip_nonfinite`` its step is skipped
    instead (weights and optimizer state untouched) and counted. Returns (mean losses over the
    minibatches stepped, epochs run, minibatches skipped).

    With ``ent_coef == 0`` the entropy is left out of the loss (its gradient would be exactly 0) and
    only computed, without gradient, for the logged ``losses/entropy``."""
    b_obs, b_act, b_logp, b_val, b_adv, b_ret = batch
    n = b_obs.shape[0]
    params = list(policy.parameters())
    flat_grad = policy.flat_grad()  # one tensor for the norm and clipping (see flatten_parameters)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf  # the norm is needed either way
    entropy_bonus = cfg.ent_coef != 0
    sums = [0.0] * len(_LOSS_KEYS)
    n_mb = skipped = epoch = 0
    for epoch in range(1, cfg.n_epochs + 1):
        perm = torch.randperm(n)
        kl_stop = False
        for mb, lo in enumerate(range(0, n, cfg.batch_size), start=1):
            idx = perm[lo:lo + cfg.batch_size]
            # Network outputs without autograd; autograd differentiates only the loss with respect to them,
            # then ActorCritic.backward_from_outputs carries the gradient through the layers by hand.
            out, values, cache = policy.forward_with_cache(b_obs[idx])
            out.requires_grad_()
            values.requires_grad_()
            logp = policy.log_prob(out, b_act[idx])
            mb_adv = b_adv[idx]
            if cfg.norm_adv and idx.numel() > 1:
                mb_adv = whiten(mb_adv)
            pg_loss, st = ppo_clip_loss(logp, b_logp[idx], mb_adv, clip_eps)
            if cfg.clip_vloss:
                v_loss, _ = clipped_value_loss(values, b_val[idx], b_ret[idx], clip_eps)
            else:
                v_loss = value_loss(values, b_ret[idx])
            pg_mean, v_mean = pg_loss.mean(), v_loss.mean()
            loss = pg_mean + cfg.vf_coef * v_mean
            if entropy_bonus:
                entropy_mean = policy.entropy(out).mean()
                loss = loss - cfg.ent_coef * entropy_mean
            else:
                with torch.no_grad():
                    entropy_mean = policy.entropy(out.detach()).mean()
            wrt = (out, values) if policy.discrete else (out, values, policy.log_std)
            policy.backward_from_outputs(cache, *torch.autograd.grad(loss, wrt, allow_unused=True))
            grad_norm = clip_grad_norm([flat_grad] if flat_grad is not None else [p.grad for p in params], max_norm)
            loss_value, norm_value = torch.stack([loss.detach(), grad_norm]).tolist()
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                if not cfg.skip_nonfinite:
                    raise nonfinite_error(what, step, f"{where}, epoch {epoch}, minibatch {mb}")
                skipped += 1
                continue
            optimizer.step()
            values_now = torch.stack([pg_mean, v_mean, entropy_mean, st["clipfrac"].mean(),
                                      st["approx_kl"].mean()]).detach().tolist()  # one conversion, not five
            sums = [a + b for a, b in zip(sums, values_now)]
            n_mb += 1
            if cfg.target_kl is not None and values_now[-1] > cfg.target_kl:
                kl_stop = True
                break
        if kl_stop:
            break
    return {k: v / n_mb for k, v in zip(_LOSS_KEYS, sums)} if n_mb else {}, epoch, skipped


def train(cfg: PPOConfig) -> dict:
    """Train PPO as configured; returns the summary (also written to summary.json)."""
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
    # fused: one kernel for all parameters instead of ~10 small ops per tensor (the bulk of a step here)
    # and with all parameters in one flat tensor, one update of one tensor
    optimizer = torch.optim.Adam([policy.flatten_parameters()], lr=cfg.lr, eps=1e-5, fused=True)

    per_update = cfg.n_envs * cfg.n_steps
    n_updates = math.ceil(cfg.total_steps / per_update)
    start, eval_seconds, best, skipped = 0, 0.0, -math.inf, 0
    if cfg.resume is not None:
        state = load_checkpoint(run, cfg.resume, cfg)
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(flat_optimizer_state(state["optimizer"]))
        collector.load_state_dict(state["collector"], reseed=cfg.seed + state["update"])
        start, eval_seconds, best = state["update"], state["eval_seconds"], state["best"]
        skipped = int(state.get("skipped_steps", 0))

    def checkpoint(update: int) -> None:
        save_checkpoint(run, update * per_update, cfg, {
            "policy": policy.state_dict(), "optimizer": optimizer.state_dict(), "update": update,
            "collector": collector.state_dict(), "eval_seconds": eval_seconds, "best": best,
            "skipped_steps": skipped})

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

    tracker = Tracker(run, n_updates * per_update, start * per_update, cfg.progress, cfg.tensorboard, "ppo")
    t_start, last_eval, evaluated_at = time.perf_counter(), float("nan"), -1
    update = start
    signals = StopSignal().__enter__()  # SIGINT/SIGTERM: finish the update, checkpoint, exit 0
    try:
        while update < n_updates:
            update += 1
            step = update * per_update
            # Linear annealing to 0: the fraction of the budget left before this rollout (CleanRL's
            # convention; SB3 takes it after the rollout, one rollout less: 256/100k = 0.26% of lr and ε).
            frac = 1.0 - (update - 1) / n_updates
            lr_now = cfg.lr * frac if cfg.anneal_lr else cfg.lr
            clip_now = cfg.clip_eps * frac if cfg.anneal_clip else cfg.clip_eps
            for group in optimizer.param_groups:
                group["lr"] = lr_now

            # 1. Run π_θold in N environments for T steps.
            ro, episodes = collector.collect(policy, cfg.n_steps)

            # 2. Advantages: GAE(γ, λ) over the (T, N) rollout, then flattened to N×T samples.
            adv, ret = gae(ro.rewards, ro.values, ro.next_values, ro.terminated, ro.truncated,
                           gamma=cfg.gamma, lam=cfg.gae_lambda)
            b_obs = ro.obs.reshape(-1, obs_dim)
            b_act = ro.actions.reshape(per_update, *ro.actions.shape[2:])
            b_logp, b_val = ro.logp.reshape(-1), ro.values.reshape(-1)
            b_adv, b_ret = adv.reshape(-1), ret.reshape(-1)

            # 3. K epochs of minibatch SGD on the clipped surrogate.
            metrics, epochs, skipped_now = ppo_update(
                policy, optimizer, (b_obs, b_act, b_logp, b_val, b_adv, b_ret), cfg, clip_now,
                where=f"update {update}/{n_updates}", step=step)
            skipped += skipped_now
            if not weights_finite(policy):  # e.g. an overflowing optimizer step: stop before acting on NaN
                raise nonfinite_error("weights", step, f"after update {update}/{n_updates}")
            metrics["losses/explained_variance"] = explained_variance(b_val, b_ret)
            metrics["charts/learning_rate"] = lr_now
            metrics["charts/clip_eps"] = clip_now
            metrics["charts/epochs"] = epochs
            metrics["skipped_steps"] = skipped
            if episodes:
                metrics["charts/episodic_return"] = float(np.mean([e[0] for e in episodes]))
                metrics["charts/episodic_length"] = float(np.mean([e[1] for e in episodes]))
            metrics["charts/sps"] = step / max(time.perf_counter() - t_start, 1e-9)  # of this process
            tracker.log(step, metrics, advance=per_update)

            if cfg.eval_every and step // cfg.eval_every > (step - per_update) // cfg.eval_every:
                last_eval = run_eval(step)
                if cfg.stop_return is not None and last_eval >= cfg.stop_return:
                    break
            if update < n_updates and cfg.save_steps and \
                    step // cfg.save_steps > (step - per_update) // cfg.save_steps:
                checkpoint(update)
            if signals.received and update < n_updates:
                checkpoint(update)
                print(resume_hint("rl ppo", run, signals.received, step, n_updates * per_update), file=sys.stderr)
                return {"stopped": True, "steps": step}
        step = update * per_update
        if evaluated_at != step:
            last_eval = run_eval(step)
        checkpoint(update)
    finally:
        signals.__exit__(None, None, None)
        tracker.close()
        collector.envs.close()

    save_final(run, policy, {"env": cfg.env, "algo": "ppo"}, step)
    plot_learning_curve(run, f"PPO on {cfg.env} (seed {cfg.seed})")
    return run.write_summary({"eval/mean_return": last_eval, "eval/best_mean_return": best,
                              "eval_seconds": round(eval_seconds, 3), "skipped_steps": skipped}, steps=step)


def cli_main(argv: list[str], prog: str) -> int:
    cfg = parse_config(PPOConfig, argv, prog, description=__doc__.split("\n\n")[0])
    summary = train(cfg)
    if summary.get("stopped") or summary.get("dry_run"):
        return 0
    print(f"{prog}: {summary['steps']} steps, eval/mean_return {summary['eval/mean_return']:.1f} "
          f"-> {cfg.output_dir}")
    return 0
