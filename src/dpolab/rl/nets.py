"""Actor-critic MLPs for Gymnasium control tasks: categorical or diagonal-Gaussian policies.

Separate actor and critic networks (no shared trunk), tanh hidden layers and orthogonal
initialisation: gain √2 for hidden layers, 0.01 for the policy head, 1 for the value head
(Andrychowicz et al. 2021, arXiv 2006.05990, and the PPO reference code). Log-probabilities and
entropies are computed in closed form rather than through ``torch.distributions`` (less per-step
overhead in the rollout).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpolab.errors import DpolabError
from dpolab.losses.pg import entropy_from_logits

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
_LOG_2PI = math.log(2 * math.pi)


def _mlp(sizes: list[int], activation: str, out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        last = i == len(sizes) - 2
        nn.init.orthogonal_(lin.weight, gain=out_gain if last else math.sqrt(2))
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if not last:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """π_θ(a|s) and V_φ(s). Observations (B, obs_dim) float32.

    Discrete: actions (B,) int64, the actor outputs logits (B, A). Continuous: actions (B, A) float,
    the actor outputs the Gaussian mean; the log standard deviation is a state-independent parameter.
    """

    def __init__(self, obs_dim: int, action_dim: int, discrete: bool, hidden: list[int] | tuple[int, ...] = (64, 64),
                 activation: str = "tanh", log_std_init: float = 0.0):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise DpolabError(f"unknown activation {activation!r}; choose from {list(_ACTIVATIONS)}")
        self.spec = {"obs_dim": int(obs_dim), "action_dim": int(action_dim), "discrete": bool(discrete),
                     "hidden": [int(h) for h in hidden], "activation": activation,
                     "log_std_init": float(log_std_init)}
        self.discrete = bool(discrete)
        self.actor = _mlp([obs_dim, *hidden, action_dim], activation, 0.01)
        self.critic = _mlp([obs_dim, *hidden, 1], activation, 1.0)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.full((action_dim,), float(log_std_init)))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s): (B, obs_dim) -> (B,)."""
        return self.critic(obs).squeeze(-1)

    def _logp_entropy(self, out: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.discrete:
            logp_all = F.log_softmax(out, dim=-1)  # (B, A)
            return logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1), entropy_from_logits(out)
        log_std = self.log_std.expand_as(out)
        z = (actions - out) * torch.exp(-log_std)
        logp = (-0.5 * z.pow(2) - log_std - 0.5 * _LOG_2PI).sum(-1)
        entropy = (0.5 + 0.5 * _LOG_2PI + log_std).sum(-1)
        return logp, entropy

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (or take the mode of) π(·|s): returns ``(actions, logp, values)``, (B[, A]), (B,), (B,)."""
        out = self.actor(obs)
        if self.discrete:
            if deterministic:
                actions = out.argmax(-1)
            else:
                actions = torch.multinomial(F.softmax(out, dim=-1), 1).squeeze(-1)
        else:
            actions = out if deterministic else out + torch.exp(self.log_std) * torch.randn_like(out)
        logp, _ = self._logp_entropy(out, actions)
        return actions, logp, self.value(obs)

    def evaluate(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log π(a|s), entropy H[π(·|s)] and V(s), each (B,), with gradients."""
        logp, entropy = self._logp_entropy(self.actor(obs), actions)
        return logp, entropy, self.value(obs)


def save_policy(policy: ActorCritic, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` (network spec plus ``extra``, e.g. env id) to
    the folder ``path``, atomically: both files go to a temporary sibling folder, which is fsynced and
    renamed into place (an existing ``path`` is moved aside first and deleted after), so ``path`` is
    always either the old complete folder or the new one."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    tmp.mkdir()
    try:
        state = {k: v.detach().contiguous() for k, v in policy.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps({**policy.spec, **(extra or {})}, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_policy(path: str | Path) -> tuple[ActorCritic, dict[str, Any]]:
    """Load a policy written by :func:`save_policy`; returns ``(policy, config)``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise DpolabError(f"{path}: not a saved policy (needs model.safetensors and config.json)")
    config = json.loads((path / "config.json").read_text())
    keys = ("obs_dim", "action_dim", "discrete", "hidden", "activation", "log_std_init")
    policy = ActorCritic(**{k: config[k] for k in keys})
    policy.load_state_dict(load_file(str(path / "model.safetensors")))
    return policy, config
