"""Benchmark: dpolab's Gymnasium PPO against Stable-Baselines3's PPO on CartPole-v1, in one run.

Both sides use the RL-Zoo CartPole-v1 settings (8 envs × 32 steps, minibatch 256, 20 epochs, γ 0.98,
λ 0.8, ent 0, lr 1e-3 and clip 0.2 annealed linearly over the budget, 64-64 tanh MLPs, orthogonal
init, Adam eps 1e-5, grad-norm 0.5), the same budget and one torch thread. Two parts, ours and SB3
alternating seed by seed:

1. *Sample efficiency* (``--seeds``): train with the full budget's schedules, evaluate after every
   update that crosses a multiple of ``--eval-every`` steps (``--eval-episodes`` deterministic
   episodes, fixed seeds, the same evaluation code for both), stop once the mean return reaches
   ``--threshold``. Reports the steps trained on when the threshold was first reached. Both sides
   evaluate at rollout boundaries, after the update (SB3: at the start of the next rollout).
2. *Wall time* (``--timed-seeds``): the full budget without evaluation, timed; then one final
   evaluation (untimed). Ours is ``dpolab.rl.gym_ppo.train`` as shipped (it also writes the run directory,
   a checkpoint, ``final/`` and the learning-curve plot), SB3 is ``PPO(...).learn``.

    make bench-ppo        # = .venv-bench/bin/python bench/ppo_vs_sb3.py; ~7.5 min on a 2-core CPU
    .venv-bench/bin/python bench/ppo_vs_sb3.py --seeds 1-4 --timed-seeds 1-2    # a quick look

Prints per-seed rows, then medians with interquartile ranges and the ratios (with a bootstrap 90%
interval over seeds for the ratio of medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ENV = "CartPole-v1"
EVAL_SEED_OFFSET = 1_000_003  # dpolab's trainer evaluates with seed + this; SB3 gets the same seeds


def _seeds(text: str) -> list[int]:
    """'1-10' or '1,2,5' (or a mix) -> list of ints."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-")
            out += range(int(lo), int(hi) + 1)
        elif part:
            out.append(int(part))
    return out


# -- ours -----------------------------------------------------------------------------------------------
def ours(seed: int, total_steps: int, eval_every: int, eval_episodes: int, stop: float | None) -> dict:
    from dpolab.config import make_config
    from dpolab.rl.gym_ppo import PPOConfig, train

    with tempfile.TemporaryDirectory() as d:
        cfg = make_config(PPOConfig, dict(env=ENV, total_steps=total_steps, seed=seed, eval_every=eval_every,
                                          eval_episodes=eval_episodes, stop_return=stop, save_steps=0,
                                          progress=False, output_dir=d + "/run"))
        t0 = time.perf_counter()
        summary = train(cfg)
        wall = time.perf_counter() - t0 - summary["eval_seconds"]
        rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/mean_return"]) for r in rows if "eval/mean_return" in r]
    return {"evals": evals, "wall": wall, "final": summary["eval/mean_return"], "steps": summary["steps"]}


# -- Stable-Baselines3 -----------------------------------------------------------------------------------
def sb3(seed: int, total_steps: int, eval_every: int, eval_episodes: int, stop: float | None) -> dict:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    from dpolab.rl.rollout import make_vec_env as make_eval_env

    def evaluate(model) -> float:  # the protocol of dpolab.rl.rollout.evaluate: parallel episodes, fixed seeds
        envs = make_eval_env(ENV, eval_episodes)
        obs, _ = envs.reset(seed=seed + EVAL_SEED_OFFSET)
        returns, running = np.zeros(eval_episodes), np.ones(eval_episodes, dtype=bool)
        while running.any():
            actions, _ = model.predict(obs, deterministic=True)
            obs, r, te, tr, _ = envs.step(actions)
            returns += r * running
            running &= ~(te | tr)
        envs.close()
        return float(returns.mean())

    class EvalAtRolloutStart(BaseCallback):
        """At the start of a rollout every collected step has been trained on (as after our update)."""

        def __init__(self):
            super().__init__()
            self.evals: list[tuple[int, float]] = []
            self.eval_seconds, self.last, self.done = 0.0, 0, False

        def _on_rollout_start(self) -> None:
            n = self.num_timesteps
            if eval_every and n // eval_every > self.last // eval_every:
                t0 = time.perf_counter()
                self.evals.append((n, evaluate(self.model)))
                self.eval_seconds += time.perf_counter() - t0
                self.done = stop is not None and self.evals[-1][1] >= stop
            self.last = n

        def _on_step(self) -> bool:
            return not self.done

    def linear(v: float):
        return lambda progress_remaining: progress_remaining * v

    env = make_vec_env(ENV, n_envs=8, seed=seed)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
                ent_coef=0.0, learning_rate=linear(1e-3), clip_range=linear(0.2), seed=seed, device="cpu",
                verbose=0)
    cb = EvalAtRolloutStart()
    t0 = time.perf_counter()
    model.learn(total_timesteps=total_steps, callback=cb)
    wall = time.perf_counter() - t0 - cb.eval_seconds
    steps = model.num_timesteps
    if not cb.done:  # the final policy (the one after the last update)
        t0 = time.perf_counter()
        cb.evals.append((steps, evaluate(model)))
    return {"evals": cb.evals, "wall": wall, "final": cb.evals[-1][1], "steps": steps}


# -- statistics ------------------------------------------------------------------------------------------
def _first_at(evals: list[tuple[int, float]], threshold: float) -> float:
    return next((float(s) for s, r in evals if r >= threshold), float("inf"))


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = np.percentile(np.asarray(xs, dtype=float), [25, 50, 75], method="linear")
    return float(q1), float(q2), float(q3)


def _ratio_interval(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 90% interval of median(a) / median(b), resampling seeds of each side independently."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ra = np.median(rng.choice(a, (n, a.size)), axis=1)
    rb = np.median(rng.choice(b, (n, b.size)), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = ra / rb
    r = r[np.isfinite(r)]
    return (float(np.percentile(r, 5)), float(np.percentile(r, 95))) if r.size else (float("nan"),) * 2


def _summary_line(name: str, what: str, xs: list[float], fmt: str) -> str:
    q1, med, q3 = _quartiles(xs)
    return f"  {name:>6} {what}: median {med:{fmt}}  IQR [{q1:{fmt}}, {q3:{fmt}}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1-40", help="sample-efficiency seeds, e.g. '1-40' or '1,2,3' ('' skips)")
    ap.add_argument("--timed-seeds", default="1-10", help="wall-time seeds ('' skips)")
    ap.add_argument("--total-steps", type=int, default=100_000, help="budget (sets the lr/clip schedules)")
    ap.add_argument("--eval-every", type=int, default=1024, help="evaluation grid in environment steps")
    ap.add_argument("--eval-episodes", type=int, default=10)
    ap.add_argument("--threshold", type=float, default=475.0)
    args = ap.parse_args(argv)
    try:
        import stable_baselines3
    except ImportError:
        print("stable-baselines3 is not installed; this benchmark compares against it.\n"
              "Install it (benchmark only): .venv-bench/bin/pip install stable-baselines3", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    se_seeds, timed_seeds = _seeds(args.seeds), _seeds(args.timed_seeds)
    thr = int(args.threshold)
    print(f"PPO on {ENV}, RL-Zoo settings, budget {args.total_steps} steps; torch {torch.__version__}, "
          f"stable-baselines3 {stable_baselines3.__version__}, 1 torch thread")
    t_bench = time.perf_counter()
    # Untimed warm-up of both (one-off imports and first-call costs).
    ours(0, 512, 512, 1, None), sb3(0, 512, 512, 1, None)
    impls = (("dpolab", ours), ("sb3", sb3))

    se: dict[str, list[float]] = {"dpolab": [], "sb3": []}
    if se_seeds:
        print(f"\n1. steps to a mean evaluation return >= {thr} (eval every {args.eval_every} steps, "
              f"{args.eval_episodes} deterministic episodes; stop at the threshold)")
        print(f"{'seed':>4} {'dpolab':>8} {'sb3':>8}")
        for seed in se_seeds:
            row = []
            for name, fn in impls:
                res = fn(seed, args.total_steps, args.eval_every, args.eval_episodes, args.threshold)
                se[name].append(_first_at(res["evals"], args.threshold))
                row.append(se[name][-1])
            print(f"{seed:>4} {row[0]:>8.0f} {row[1]:>8.0f}", flush=True)

    timed: dict[str, list[dict]] = {"dpolab": [], "sb3": []}
    if timed_seeds:
        print("\n2. full budget without evaluation: training wall time (s) and final evaluation return")
        print(f"{'seed':>4} {'dpolab s':>9} {'sb3 s':>7} {'dpolab ret':>11} {'sb3 ret':>8}")
        for seed in timed_seeds:
            for name, fn in impls:
                timed[name].append(fn(seed, args.total_steps, 0, args.eval_episodes, None))
            o, s = timed["dpolab"][-1], timed["sb3"][-1]
            print(f"{seed:>4} {o['wall']:>9.2f} {s['wall']:>7.2f} {o['final']:>11.1f} {s['final']:>8.1f}", flush=True)

    print("\nsummary")
    if se_seeds:
        for name in ("dpolab", "sb3"):
            print(_summary_line(name, f"steps-to-{thr}", se[name], ".0f") +
                  f"  (reached in {sum(x < float('inf') for x in se[name])}/{len(se_seeds)} seeds)")
    if timed_seeds:
        for name in ("dpolab", "sb3"):
            print(_summary_line(name, "wall s       ", [r["wall"] for r in timed[name]], ".2f"))
        for name in ("dpolab", "sb3"):
            print(_summary_line(name, "final return ", [r["final"] for r in timed[name]], ".1f"))
    print("ratios (bootstrap 90% interval over seeds)")
    if se_seeds:
        lo, hi = _ratio_interval(se["dpolab"], se["sb3"])
        ratio = statistics.median(se["dpolab"]) / statistics.median(se["sb3"])
        print(f"  steps-to-{thr} ours/sb3 = {ratio:.2f} [{lo:.2f}, {hi:.2f}]  (< 1: ours needs fewer steps)")
    if timed_seeds:
        w_o, w_s = [r["wall"] for r in timed["dpolab"]], [r["wall"] for r in timed["sb3"]]
        lo, hi = _ratio_interval(w_s, w_o)
        print(f"  wall sb3/ours       = {statistics.median(w_s) / statistics.median(w_o):.2f}x "
              f"[{lo:.2f}, {hi:.2f}]  (> 1: ours is faster); per-seed pairs: "
              f"median {statistics.median(s / o for s, o in zip(w_s, w_o)):.2f}x")
        f_o, f_s = [r["final"] for r in timed["dpolab"]], [r["final"] for r in timed["sb3"]]
        print(f"  final return ours/sb3 = {statistics.median(f_o) / max(statistics.median(f_s), 1e-9):.2f}")
    print(f"(benchmark took {time.perf_counter() - t_bench:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
