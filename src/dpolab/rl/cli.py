"""``dpolab rl solve`` and ``dpolab rl evaluate``: tabular planning and policy evaluation from the CLI.

Examples::

    dpolab rl solve --env FrozenLake-v1 --gamma 0.9 --method value-iteration
    dpolab rl solve --mdp examples/student_mdp.yaml --json
    dpolab rl evaluate --env random-walk --episodes 100 --output curves.png
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpolab.config import ConfigError, opt, parse_config
from dpolab.rl.envs import BUILTIN_MDPS, BUILTIN_MRPS, make_model
from dpolab.rl.mdp import MDP, MDPError, check_gamma

GYM_HELP = "or a Gymnasium toy-text id such as FrozenLake-v1, CliffWalking-v1, Taxi-v4"


def _check_model_options(cfg) -> None:
    """What the model options say on their own, before a file is read (so a bad --gamma is not
    blamed on the MDP file)."""
    if cfg.gamma is not None:
        try:
            check_gamma(cfg.gamma)
        except MDPError as err:
            raise ConfigError(f"--{err}") from None
    if cfg.mdp is not None and cfg.env_kwargs:
        raise ConfigError("--env-kwargs applies to Gymnasium environments, not to an --mdp file")


@dataclass
class SolveConfig:
    env: str | None = opt(None, f"the MDP: a built-in ({', '.join(BUILTIN_MDPS)}) {GYM_HELP}")
    mdp: str | None = opt(None, "a YAML/JSON MDP file instead of --env (see examples/student_mdp.yaml)")
    env_kwargs: str = opt("", "keyword arguments for gymnasium.make, e.g. is_slippery=false,map_name=8x8")
    gamma: float | None = opt(None, "discount in [0, 1]; default: the file's or built-in's, 0.9 for Gymnasium")
    method: str = opt("policy-iteration", "planning algorithm",
                      choices=("policy-iteration", "value-iteration"))
    tol: float = opt(1e-8, "value iteration: sup-norm accuracy guaranteed on V (and the greedy policy)")
    json: bool = opt(False, "print one JSON object {values, policy, states, actions} instead of a table")

    def validate(self) -> None:
        if (self.env is None) == (self.mdp is None):
            raise ConfigError("give exactly one of --env or --mdp")
        _check_model_options(self)
        if not self.tol > 0:
            raise ConfigError(f"--tol must be positive, got {self.tol:g}")


@dataclass
class EvaluateConfig:
    env: str | None = opt(None, f"the model: a built-in MRP ({', '.join(BUILTIN_MRPS)}) or MDP "
                          f"({', '.join(BUILTIN_MDPS)}) {GYM_HELP}; default: random-walk, unless --mdp is given")
    mdp: str | None = opt(None, "a YAML/JSON MDP file instead of --env")
    env_kwargs: str = opt("", "keyword arguments for gymnasium.make, e.g. is_slippery=false")
    gamma: float | None = opt(None, "discount in [0, 1]; default: the model's own, 0.9 for Gymnasium")
    policy: str = opt("random", "policy to evaluate on an MDP (ignored for an MRP)",
                      choices=("random", "optimal"))
    episodes: int = opt(100, "episodes per run")
    runs: int = opt(10, "independent runs; the curves are RMS errors averaged over runs")
    mc_alpha: float | None = opt(None, "Monte Carlo step size; none = sample mean (1/N(s))")
    td_alpha: float = opt(0.1, "TD(0) step size")
    v0: float = opt(0.0, "initial estimate for non-terminal states (Sutton & Barto's Figure 6.2 uses 0.5)")
    max_steps: int = opt(1000, "longest episode: longer ones are cut, left out of Monte Carlo (no complete "
                         "return) and learnt from by TD(0)")
    seed: int = opt(0, "random seed")
    output: str = opt("rl-evaluate.png", "PNG file for the learning curves")
    json: bool = opt(False, "print one JSON object with the exact and estimated values and final errors")

    def validate(self) -> None:
        if self.mdp is None and self.env is None:
            self.env = "random-walk"
        if (self.env is None) == (self.mdp is None):
            raise ConfigError("give exactly one of --env or --mdp")
        _check_model_options(self)
        if self.episodes < 1 or self.runs < 1 or self.max_steps < 1:
            raise ConfigError("--episodes, --runs and --max-steps must be positive")
        if self.seed < 0:  # NumPy's seeds are unsigned
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if not self.output.lower().endswith(".png") or Path(self.output).name.lower() == ".png":  # else after the runs
            raise ConfigError(f"--output {self.output!r}: give a file name ending in .png")
        from dpolab.runs.rundir import check_writable

        check_writable("--output", self.output)
        for name, a in (("--mc-alpha", self.mc_alpha), ("--td-alpha", self.td_alpha)):
            if a is not None and not 0 < a <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {a:g}")


def _fmt(v: float) -> str:
    """Four decimals, without the "-0.0000" that round-off below 5e-5 would print."""
    text = f"{v:.4f}"
    return "0.0000" if text == "-0.0000" else text

def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _solve(cfg: SolveConfig) -> int:
    from dpolab.rl.planning import solve

    model = make_model(cfg.env, cfg.mdp, cfg.gamma, cfg.env_kwargs, need_start=False)  # solving samples nothing
    if not isinstance(model, MDP):
        raise ConfigError(f"'{cfg.env}' is a Markov reward process (no actions); try `dpolab rl evaluate`")
    res = solve(model, cfg.method, cfg.tol)
    policy = [None if model.terminal[s] else int(a) for s, a in enumerate(res.policy)]
    if cfg.json:
        print(json.dumps({"values": [float(v) for v in res.values], "policy": policy,
                          "states": list(model.states), "actions": list(model.actions)}))
        return 0
    rows = [[name, _fmt(v), "-" if a is None else model.actions[a]]
            for name, v, a in zip(model.states, res.values, policy)]
    gamma = f"{model.gamma:g}" if float(f"{model.gamma:g}") == model.gamma else repr(model.gamma)  # never rounded
    print(f"{cfg.method} (gamma = {gamma}, {res.iterations} iterations); terminal states show '-'")
    print(_table(["state", "value", "action"], rows))
    return 0


def _evaluate(cfg: EvaluateConfig) -> int:
    from dpolab.rl.planning import policy_iteration
    from dpolab.rl.policy_evaluation import exact_values, mc_evaluation, td0_evaluation
    from dpolab.runs.memory_check import check_fits_memory

    check_fits_memory(6 * 8 * cfg.episodes, f"the learning curves of --episodes {cfg.episodes}")  # 3 methods' sums + a run's
    model = make_model(cfg.env, cfg.mdp, cfg.gamma, cfg.env_kwargs)
    policy = None
    if isinstance(model, MDP):
        policy = policy_iteration(model).policy if cfg.policy == "optimal" else model.uniform_policy()
    v_true = exact_values(model, policy)
    rng = np.random.default_rng(cfg.seed)
    methods = {"MC first-visit": dict(first_visit=True), "MC every-visit": dict(first_visit=False), "TD(0)": {}}
    curves, estimates, cut = {}, {}, {}
    for name, kw in methods.items():
        total = np.zeros(cfg.episodes)
        cut[name] = 0
        for _ in range(cfg.runs):
            if name == "TD(0)":
                res = td0_evaluation(model, cfg.episodes, rng, policy, alpha=cfg.td_alpha, v_true=v_true,
                                     v0=cfg.v0, max_steps=cfg.max_steps)
            else:
                res = mc_evaluation(model, cfg.episodes, rng, policy, alpha=cfg.mc_alpha, v_true=v_true,
                                    v0=cfg.v0, max_steps=cfg.max_steps, **kw)
            total += res.rms
            cut[name] += res.cut
        curves[name], estimates[name] = total / cfg.runs, res.V
    _plot(curves, cfg)
    if any(cut.values()):  # else MC's estimates could be taken for ones from complete episodes
        print(f"episodes cut at --max-steps {cfg.max_steps}, of {cfg.episodes * cfg.runs}: "
              + ", ".join(f"{k} {n}" for k, n in cut.items())
              + "; Monte Carlo leaves them out (no complete return), so its estimates favour short episodes: "
              "raise --max-steps (TD(0) learns from their steps)", file=sys.stderr)
    if cfg.json:
        print(json.dumps({"states": list(model.states), "exact": v_true.tolist(),
                          "estimates": {k: v.tolist() for k, v in estimates.items()},
                          "final_rms": {k: float(c[-1]) for k, c in curves.items()}, "cut_episodes": cut,
                          "plot": cfg.output}))
        return 0
    rows = [[s, _fmt(v), *(_fmt(estimates[k][i]) for k in methods)] for i, (s, v) in
            enumerate(zip(model.states, v_true))]
    print(_table(["state", "exact", *methods], rows))
    print("RMS error after the last episode, mean over runs: "
          + ", ".join(f"{k} {c[-1]:.4f}" for k, c in curves.items()))
    print(f"learning curves written to {cfg.output}")
    return 0


def _plot(curves: dict[str, np.ndarray], cfg: EvaluateConfig) -> None:
    # a Figure of its own: pyplot's global backend (a notebook's) is left as the user set it
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    x = np.arange(1, cfg.episodes + 1)
    for name, c in curves.items():
        ax.plot(x, c, label=name)
    ax.set_xlabel("episodes")
    ax.set_ylabel(f"RMS error vs exact values (mean of {cfg.runs} runs)")
    ax.set_title(f"policy evaluation on {cfg.env or cfg.mdp}")
    ax.legend()
    fig.tight_layout()
    try:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)  # as run folders are made (checked before the runs)
        fig.savefig(cfg.output)
    except OSError as err:
        raise ConfigError(f"cannot write {cfg.output}: {err.strerror or err}") from None


def cli_main(argv: list[str], prog: str = "dpolab rl", command: str = "solve") -> int:
    """Entry point for ``dpolab rl solve`` / ``dpolab rl evaluate``."""
    if command == "solve":
        cfg = parse_config(SolveConfig, argv, prog, "Solve a finite MDP exactly; print values and the greedy "
                           "policy per state.")
        return _solve(cfg)
    if command == "evaluate":
        cfg = parse_config(EvaluateConfig, argv, prog, "Monte Carlo (first/every visit) and TD(0) policy "
                           "evaluation against the exact values, with learning curves saved as a PNG.")
        return _evaluate(cfg)
    raise ConfigError(f"unknown rl command {command!r}")
