"""Benchmark: dpolab's Gymnasium PPO against Stable-Baselines3's PPO on CartPole-v1, in one run.

Both use the RL-Zoo CartPole settings (8 envs × 32 steps, minibatch 256, 20 epochs, γ 0.98, λ 0.8,
ent 0, lr 1e-3 and clip 0.2 annealed linearly, 64-64 tanh MLPs, orthogonal init, Adam eps 1e-5,
grad-norm 0.5) and the same budget, the same evaluation protocol (every ``--eval-every`` steps,
``--eval-episodes`` deterministic episodes with fixed seeds, the same evaluation code) and one torch
thread. Wall time excludes evaluation for both.

    .venv/bin/pip install stable-baselines3     # benchmark only; not a dpolab dependency
    .venv/bin/python bench/ppo_vs_sb3.py --seeds 1,2,3 --total-steps 100000

Prints, per seed and as medians: steps to reach a mean evaluation return ≥ ``--threshold``, training
wall time and final evaluation return, and the ratios ours/SB3.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


def _first_at(evals: list[tuple[int, float]], threshold: float) -> float:
    return next((float(s) for s, r in evals if r >= threshold), float("inf"))


def run_ours(seed: int, args: argparse.Namespace) -> dict:
    import json
    from pathlib import Path

    from dpolab.config import make_config
    from dpolab.rl.ppo import PPOConfig, train

    with tempfile.TemporaryDirectory() as d:
        cfg = make_config(PPOConfig, dict(env="CartPole-v1", total_steps=args.total_steps, seed=seed,
                                          eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                                          save_steps=0, progress=False, output_dir=d + "/run"))
        t0 = time.perf_counter()
        summary = train(cfg)
        wall = time.perf_counter() - t0 - summary["eval_seconds"]
        rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/mean_return"]) for r in rows if "eval/mean_return" in r]
    return {"steps_to": _first_at(evals, args.threshold), "wall": wall, "final": evals[-1][1]}


def run_sb3(seed: int, args: argparse.Namespace) -> dict:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    from dpolab.rl.rollout import make_vec_env as make_eval_env

    def sb3_eval(model) -> float:  # same protocol as dpolab.rl.rollout.evaluate: parallel, fixed seeds
        envs = make_eval_env("CartPole-v1", args.eval_episodes)
        obs, _ = envs.reset(seed=seed + 1_000_003)
        returns, running = np.zeros(args.eval_episodes), np.ones(args.eval_episodes, dtype=bool)
        while running.any():
            actions, _ = model.predict(obs, deterministic=True)
            obs, r, te, tr, _ = envs.step(actions)
            returns += r * running
            running &= ~(te | tr)
        envs.close()
        return float(returns.mean())

    class EvalEvery(BaseCallback):
        def __init__(self):
            super().__init__()
            self.evals: list[tuple[int, float]] = []
            self.eval_seconds = 0.0
            self.last = 0

        def _on_step(self) -> bool:
            if self.num_timesteps // args.eval_every > self.last // args.eval_every:
                t0 = time.perf_counter()
                self.evals.append((self.num_timesteps, sb3_eval(self.model)))
                self.eval_seconds += time.perf_counter() - t0
            self.last = self.num_timesteps
            return True

    def linear(v: float):
        return lambda progress_remaining: progress_remaining * v

    env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
                ent_coef=0.0, learning_rate=linear(1e-3), clip_range=linear(0.2), seed=seed, device="cpu",
                verbose=0)
    cb = EvalEvery()
    t0 = time.perf_counter()
    model.learn(total_timesteps=args.total_steps, callback=cb)
    wall = time.perf_counter() - t0 - cb.eval_seconds
    cb.evals.append((model.num_timesteps, sb3_eval(model)))
    return {"steps_to": _first_at(cb.evals, args.threshold), "wall": wall, "final": cb.evals[-1][1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    ap.add_argument("--total-steps", type=int, default=100_000)
    ap.add_argument("--eval-every", type=int, default=5_000)
    ap.add_argument("--eval-episodes", type=int, default=10)
    ap.add_argument("--threshold", type=float, default=475.0)
    args = ap.parse_args(argv)
    try:
        import stable_baselines3
    except ImportError:
        print("stable-baselines3 is not installed; this benchmark compares against it.\n"
              "Install it (benchmark only): .venv/bin/pip install stable-baselines3", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    print(f"PPO on CartPole-v1, {args.total_steps} steps, eval every {args.eval_every} steps "
          f"({args.eval_episodes} deterministic episodes), torch {torch.__version__}, "
          f"stable-baselines3 {stable_baselines3.__version__}, 1 torch thread")
    print(f"{'seed':>4} {'impl':>6} {'steps to ' + str(int(args.threshold)):>14} {'train wall s':>13} {'final':>7}")
    # Untimed warm-up of both (one-off imports such as torch._dynamo on the first optimizer).
    warm = argparse.Namespace(**{**vars(args), "total_steps": 512, "eval_every": 512, "eval_episodes": 1})
    run_ours(0, warm), run_sb3(0, warm)
    ours, sb3 = [], []
    for seed in seeds:
        for name, fn, out in (("dpolab", run_ours, ours), ("sb3", run_sb3, sb3)):
            res = fn(seed, args)
            out.append(res)
            print(f"{seed:>4} {name:>6} {res['steps_to']:>14.0f} {res['wall']:>13.1f} {res['final']:>7.1f}",
                  flush=True)

    def med(rs: list[dict], k: str) -> float:
        return statistics.median(r[k] for r in rs)

    print(f"median  dpolab: steps-to-{int(args.threshold)} {med(ours, 'steps_to'):.0f}, wall "
          f"{med(ours, 'wall'):.1f} s, final {med(ours, 'final'):.1f}")
    print(f"median     sb3: steps-to-{int(args.threshold)} {med(sb3, 'steps_to'):.0f}, wall "
          f"{med(sb3, 'wall'):.1f} s, final {med(sb3, 'final'):.1f}")
    solved = sum(r["steps_to"] < float("inf") for r in ours), sum(r["steps_to"] < float("inf") for r in sb3)
    print(f"solved seeds: dpolab {solved[0]}/{len(seeds)}, sb3 {solved[1]}/{len(seeds)}")
    steps_ratio = med(ours, "steps_to") / med(sb3, "steps_to") if med(sb3, "steps_to") < float("inf") else float("nan")
    print(f"ratios: steps-to-{int(args.threshold)} ours/sb3 = {steps_ratio:.2f} "
          f"(< 1: more sample-efficient); wall sb3/ours = {med(sb3, 'wall') / med(ours, 'wall'):.2f}x faster; "
          f"final return ours/sb3 = {med(ours, 'final') / max(med(sb3, 'final'), 1e-9):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
