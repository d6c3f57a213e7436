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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dpolab.config import opt
from dpolab.errors import ConfigError
from dpolab.rl.loop import GymAlgorithm, GymOptions, cli, explained_variance, run

if TYPE_CHECKING:
    import torch

    from dpolab.rl.nets import ActorCritic
    from dpolab.rl.rollout import Rollout


@dataclass
class A2CConfig(GymOptions):
    total_steps: int = opt(200_000, "environment steps to train for (rounded up to whole rollouts of N×T)")
    output_dir: str = opt("runs/a2c", "run directory (config.yaml, metrics.jsonl, checkpoints/, final/)")
    n_steps: int = opt(5, "T: steps per environment per update")
    gamma: float = opt(0.99, "discount γ")
    gae_lambda: float = opt(1.0, "GAE λ (1: n-step returns, as A3C)")
    lr: float = opt(7e-4, "learning rate")
    optimizer: str = opt("rmsprop", "optimizer", choices=("rmsprop", "adam"))
    anneal_lr: bool = opt(False, "anneal the learning rate linearly to 0")
    norm_adv: bool = opt(False, "whiten advantages per update")
    skip_nonfinite: bool = opt(False, "skip an update whose loss or gradient is NaN/inf (counted in "
                               "skipped_steps) instead of stopping the run")
    log_every: int = opt(10, "log training metrics every this many updates")

    def validate(self) -> None:
        super().validate()
        if self.log_every < 1:
            raise ConfigError(f"--log-every must be >= 1, got {self.log_every}")


def a2c_update(policy: ActorCritic, optimizer: torch.optim.Optimizer, ro: Rollout, cfg: A2CConfig, *,
               where: str = "", step: int = 0) -> tuple[dict[str, float] | None, torch.Tensor, torch.Tensor]:
    """One A2C update from rollout ``ro``: GAE, then one gradient step on the mean A2C loss over the
    N×T steps. Returns (mean policy/value/entropy losses, old values, value targets).

    A NaN/inf loss or gradient norm raises a :class:`NonFiniteError` naming ``where``; with
    ``cfg.skip_nonfinite`` the step is skipped instead (weights and optimizer state untouched) and
    the losses come back as ``None``."""
    import torch

    from dpolab.losses.pg import a2c_loss
    from dpolab.rl.advantages import gae, whiten
    from dpolab.runs.guards import nonfinite_error
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


class A2C(GymAlgorithm):
    """One gradient step per rollout; metrics averaged over ``--log-every`` updates (the partly filled
    window is checkpointed, so a resumed run logs what an uninterrupted one does)."""

    name, title = "a2c", "A2C"

    def __init__(self, cfg: A2CConfig):
        super().__init__(cfg)
        self.sums: dict[str, float] = {}
        self.episodes: list[tuple[float, int]] = []
        self.n_logged = self.n_stepped = 0  # updates in the logging window, of them not skipped
        self.lr_now = cfg.lr

    def make_optimizer(self, policy):
        import torch
        if self.cfg.optimizer == "rmsprop":
            return torch.optim.RMSprop(policy.parameters(), lr=self.cfg.lr, alpha=0.99, eps=1e-5)
        return torch.optim.Adam(policy.parameters(), lr=self.cfg.lr, eps=1e-5)

    def update(self, policy, optimizer, ro, episodes, *, frac, update, n_updates, step):
        cfg = self.cfg
        self.lr_now = cfg.lr * frac if cfg.anneal_lr else cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = self.lr_now
        self.episodes += episodes
        st, b_val, b_ret = a2c_update(policy, optimizer, ro, cfg, where=f"update {update}/{n_updates}", step=step)
        if st is not None:
            self.n_stepped += 1
            for k in ("policy", "value", "entropy"):
                self.sums[f"losses/{k}"] = self.sums.get(f"losses/{k}", 0.0) + st[k]
        self.sums["losses/explained_variance"] = self.sums.get("losses/explained_variance", 0.0) + \
            explained_variance(b_val, b_ret)
        self.n_logged += 1
        if update % cfg.log_every and update != n_updates:
            return None, int(st is None)
        return self.flush(), int(st is None)

    def flush(self):
        """The logging window's means (None if empty), and a new window."""
        import numpy as np

        if not self.n_logged:
            return None
        metrics = {k: v / (self.n_logged if k == "losses/explained_variance" else self.n_stepped)
                   for k, v in self.sums.items()}
        metrics["charts/learning_rate"] = self.lr_now
        if self.episodes:
            metrics["charts/episodic_return"] = float(np.mean([e[0] for e in self.episodes]))
            metrics["charts/episodic_length"] = float(np.mean([e[1] for e in self.episodes]))
        self.sums, self.episodes, self.n_logged, self.n_stepped = {}, [], 0, 0
        return metrics

    def state_dict(self):
        return {"log_window": (dict(self.sums), list(self.episodes), self.n_logged, self.n_stepped)}

    def load_state_dict(self, state):
        self.sums, self.episodes, self.n_logged, self.n_stepped = state["log_window"]
        self.sums, self.episodes = dict(self.sums), [tuple(e) for e in self.episodes]


def train(cfg: A2CConfig) -> dict:
    """Train A2C as configured; returns the summary (also written to summary.json)."""
    from dpolab.config import check_config

    cfg = check_config(cfg)  # a config built in Python: converted and checked as the command line's
    return run(cfg, A2C(cfg))


def cli_main(argv: list[str], prog: str) -> int:
    return cli(A2CConfig, A2C, argv, prog, __doc__.split("\n\n")[0])
