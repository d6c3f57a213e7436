"""PPO, actor-critic style (Schulman et al. 2017, arXiv 1707.06347, Algorithm 1) on Gymnasium.

    for iteration = 1, 2, ...:
        run π_θold in N environments for T steps                       (Collector.collect)
        compute advantage estimates Â_1..Â_T with GAE(γ, λ)            (dpolab.rl.advantages.gae)
        optimise L = L^CLIP − c₁ L^VF + c₂ H for K epochs, minibatches of M ≤ NT   (the loop below)
          (or L^KLPEN = r_t Â_t − β KL[π_θold(·|s_t) ‖ π_θ(·|s_t)], eq. 8, with --objective kl-penalty;
          β adapted after each update with --kl-target, section 4)
        θold ← θ

Defaults are the RL-Zoo CartPole-v1 settings (8 envs × 32 steps, 20 epochs, minibatch 256,
γ = 0.98, λ = 0.8, lr 1e-3 and clip 0.2 both annealed linearly to 0, no entropy bonus). The math,
metrics and a benchmark against Stable-Baselines3 are in docs/ppo.md.

Usage: ``dpolab rl ppo --env CartPole-v1 --total-steps 100000 --seed 1 --output-dir runs/cp``
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


@dataclass
class PPOConfig(GymOptions):
    output_dir: str = opt("runs/ppo", "run directory (config.yaml, metrics.jsonl, checkpoints/, final/)")
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
    norm_adv: bool = opt(True, "whiten advantages per minibatch")
    skip_nonfinite: bool = opt(False, "skip a minibatch step whose loss or gradient is NaN/inf (counted in "
                               "skipped_steps) instead of stopping the run")
    target_kl: float | None = opt(None, "stop the epochs of an update once a minibatch's approx KL exceeds this")
    objective: str = opt("clip", "the surrogate: clip (L^CLIP) or kl-penalty (L^KLPEN: r·Â − β·KL[π_old ‖ π], "
                         "the exact KL per state)", choices=("clip", "kl-penalty"))
    kl_coef: float = opt(1.0, "β of --objective kl-penalty (the first β with --kl-target)")
    kl_target: float | None = opt(None, "d_targ of --objective kl-penalty: after each update β is halved if the "
                                  "KL over the rollout < d_targ/1.5, doubled if > 1.5·d_targ (leave out: fixed β)")

    def validate(self) -> None:
        super().validate()
        for name in ("batch_size", "n_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_size > self.n_envs * self.n_steps:
            raise ConfigError(f"--batch-size {self.batch_size} exceeds N×T = {self.n_envs * self.n_steps}")
        if not 0 < self.clip_eps < 1:  # ε >= 1 leaves no lower clip: 1 - ε <= 0
            raise ConfigError(f"--clip-eps must be in (0, 1), got {self.clip_eps}")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ConfigError(f"--target-kl must be > 0 (leave it out for no early stop), got {self.target_kl}")
        if self.objective != "kl-penalty":
            for name, default in (("kl_coef", 1.0), ("kl_target", None)):
                if getattr(self, name) != default:
                    raise ConfigError(f"--{name.replace('_', '-')} is read only by --objective kl-penalty")
        if not self.kl_coef >= 0:
            raise ConfigError(f"--kl-coef must be >= 0, got {self.kl_coef}")
        if self.kl_coef == 0 and self.kl_target is not None:
            raise ConfigError("--kl-target adapts β by halving and doubling it: give a --kl-coef > 0")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ConfigError(f"--kl-target must be > 0 (leave it out for a fixed β), got {self.kl_target}")


_LOSS_KEYS = ("losses/policy", "losses/value", "losses/entropy", "losses/clipfrac", "losses/approx_kl")


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm``; returns the norm
    before clipping. The same operations as ``torch.nn.utils.clip_grad_norm_(foreach=True)`` on one
    device and dtype (identical results, tested) without its per-call grouping overhead."""
    import torch
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def flat_optimizer_state(saved: dict) -> dict:
    """An Adam ``state_dict`` over the separate parameter tensors (checkpoints of dpolab before the
    flat parameter buffer) as the state over the one flat tensor: the per-element moments
    concatenated in parameter order (the order the flat buffer uses). Anything else is returned as is."""
    import torch
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
               cfg: PPOConfig, clip_eps: float, *, where: str = "", step: int = 0,
               penalty: tuple[torch.Tensor, torch.Tensor | None, float] | None = None,
               ) -> tuple[dict[str, float], int, int]:
    """K epochs of minibatch steps on L^CLIP + c₁ L^VF − c₂ H over one rollout's samples; with
    ``penalty = (old actor outputs (B, A), old log_std or None, β)``, on L^KLPEN instead of L^CLIP
    (``losses/clipfrac`` is then only measured, and ``losses/kl`` is the exact KL's mean).

    ``batch`` = (obs (B, obs_dim), actions (B[, A]), old log-probs (B,), old values (B,), advantages (B,),
    returns (B,)). A minibatch whose loss or gradient norm is NaN/inf raises a :class:`NonFiniteError`
    naming ``where``, the epoch and the minibatch; with ``cfg.skip_nonfinite`` its step is skipped
    instead (weights and optimizer state untouched) and counted. Returns (mean losses over the
    minibatches stepped, epochs run, minibatches skipped).

    With ``ent_coef == 0`` the entropy is left out of the loss (its gradient would be exactly 0) and
    only computed, without gradient, for the logged ``losses/entropy``."""
    import torch

    from dpolab.losses.pg import value_loss
    from dpolab.losses.ppo import clipped_value_loss, ppo_clip_loss, ppo_kl_penalty_loss
    from dpolab.rl.advantages import whiten
    from dpolab.runs.guards import nonfinite_error
    b_obs, b_act, b_logp, b_val, b_adv, b_ret = batch
    n = b_obs.shape[0]
    grads = None  # after flatten_parameters: one flat tensor, so clipping is one norm
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf  # the norm is needed either way
    keys = _LOSS_KEYS + (("losses/kl",) if penalty is not None else ())
    sums = [0.0] * len(keys)
    n_mb = skipped = epoch = 0
    for epoch in range(1, cfg.n_epochs + 1):
        perm = torch.randperm(n)
        for mb, lo in enumerate(range(0, n, cfg.batch_size), start=1):
            idx = perm[lo:lo + cfg.batch_size]
            out, values = policy.training_forward(b_obs[idx])
            adv = whiten(b_adv[idx]) if cfg.norm_adv and idx.numel() > 1 else b_adv[idx]
            logp = policy.log_prob(out, b_act[idx])
            pg_loss, st = ppo_clip_loss(logp, b_logp[idx], adv, clip_eps)
            if penalty is not None:
                old_out, old_log_std, beta = penalty
                kl = policy.kl(old_out[idx], out, old_log_std)
                pg_loss, _ = ppo_kl_penalty_loss(logp, b_logp[idx], adv, beta, kl=kl)
            if cfg.clip_vloss:
                v_loss, _ = clipped_value_loss(values, b_val[idx], b_ret[idx], clip_eps)
            else:
                v_loss = value_loss(values, b_ret[idx])
            pg_mean, v_mean = pg_loss.mean(), v_loss.mean()
            loss = pg_mean + cfg.vf_coef * v_mean
            if cfg.ent_coef != 0:
                entropy_mean = policy.entropy(out).mean()
                loss = loss - cfg.ent_coef * entropy_mean
            else:  # its gradient would be exactly 0: only logged
                with torch.no_grad():
                    entropy_mean = policy.entropy(out.detach()).mean()
            policy.backward(loss)
            grads = grads or policy.gradients()  # the same tensors from the first backward on
            grad_norm = clip_grad_norm(grads, max_norm)
            loss_value, norm_value = torch.stack([loss.detach(), grad_norm]).tolist()
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                if not cfg.skip_nonfinite:
                    raise nonfinite_error(what, step, f"{where}, epoch {epoch}, minibatch {mb}")
                skipped += 1
                continue
            optimizer.step()
            values_now = torch.stack([pg_mean, v_mean, entropy_mean, st["clipfrac"].mean(), st["approx_kl"].mean(),
                                      *((kl.mean(),) if penalty is not None else ())]).detach().tolist()
            sums = [a + b for a, b in zip(sums, values_now)]
            n_mb += 1
            if cfg.target_kl is not None and values_now[4] > cfg.target_kl:
                return {k: v / n_mb for k, v in zip(keys, sums)}, epoch, skipped
    return {k: v / n_mb for k, v in zip(keys, sums)} if n_mb else {}, epoch, skipped


class PPO(GymAlgorithm):
    name, title = "ppo", "PPO"

    def __init__(self, cfg):
        from dpolab.losses.ppo import AdaptiveKLController, FixedKLController

        super().__init__(cfg)
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target) if cfg.kl_target is not None
                       else FixedKLController(cfg.kl_coef))

    def make_optimizer(self, policy):
        # fused: one kernel for all parameters instead of ~10 small ops per tensor (the bulk of a step
        # here), and with all parameters in one flat tensor, one update of one tensor
        import torch
        return torch.optim.Adam([policy.flatten_parameters()], lr=self.cfg.lr, eps=1e-5, fused=True)

    def load_optimizer(self, optimizer, saved):
        optimizer.load_state_dict(flat_optimizer_state(saved))

    def update(self, policy, optimizer, ro, episodes, *, frac, update, n_updates, step):
        import numpy as np

        from dpolab.rl.advantages import gae

        cfg = self.cfg
        lr_now = cfg.lr * frac if cfg.anneal_lr else cfg.lr
        clip_now = cfg.clip_eps * frac if cfg.anneal_clip else cfg.clip_eps
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        # Advantages: GAE(γ, λ) over the (T, N) rollout, then flattened to N×T samples.
        adv, ret = gae(ro.rewards, ro.values, ro.next_values, ro.terminated, ro.truncated,
                       gamma=cfg.gamma, lam=cfg.gae_lambda)
        b_obs = ro.obs.reshape(-1, ro.obs.shape[-1])
        b_act = ro.actions.reshape(b_obs.shape[0], *ro.actions.shape[2:])
        b_val, b_ret = ro.values.reshape(-1), ret.reshape(-1)
        penalty = None
        if cfg.objective == "kl-penalty":  # π_θold's outputs: the policy that collected the rollout
            old_out = policy.forward_with_cache(b_obs)[0]
            old_log_std = None if policy.discrete else policy.log_std.detach().clone()
            penalty = (old_out, old_log_std, self.kl_ctl.beta)
        # K epochs of minibatch SGD on the surrogate.
        metrics, epochs, skipped = ppo_update(policy, optimizer, (b_obs, b_act, ro.logp.reshape(-1), b_val,
                                                                  adv.reshape(-1), b_ret), cfg, clip_now,
                                              where=f"update {update}/{n_updates}", step=step, penalty=penalty)
        metrics.update({"losses/explained_variance": explained_variance(b_val, b_ret),
                        "charts/learning_rate": lr_now, "charts/clip_eps": clip_now, "charts/epochs": epochs})
        if penalty is not None:
            metrics["charts/kl_coef"] = penalty[2]  # the β of this update
            if cfg.kl_target is not None:  # d = the KL over the whole rollout after the update
                import torch
                with torch.no_grad():
                    d = float(policy.kl(old_out, policy.forward_with_cache(b_obs)[0], old_log_std).mean())
                metrics["losses/rollout_kl"] = d
                self.kl_ctl.update(d)
        if episodes:
            metrics["charts/episodic_return"] = float(np.mean([e[0] for e in episodes]))
            metrics["charts/episodic_length"] = float(np.mean([e[1] for e in episodes]))
        return metrics, skipped

    def state_dict(self):
        return {"kl_coef": self.kl_ctl.beta} if self.cfg.kl_target is not None else {}

    def load_state_dict(self, state):
        if self.cfg.kl_target is not None and "kl_coef" in state:  # an adapted β; a fixed one is the config's
            self.kl_ctl.beta = float(state["kl_coef"])


def train(cfg: PPOConfig) -> dict:
    """Train PPO as configured; returns the summary (also written to summary.json)."""
    from dpolab.config import check_config

    cfg = check_config(cfg)  # a config built in Python: converted and checked as the command line's
    return run(cfg, PPO(cfg))


def cli_main(argv: list[str], prog: str) -> int:
    return cli(PPOConfig, PPO, argv, prog, __doc__.split("\n\n")[0])
