"""Rollouts on Gymnasium ≥ 1.0 vector environments, and evaluation episodes.

Next-step autoreset (Gymnasium's default ``AutoresetMode.NEXT_STEP``): the step that ends an episode
returns that episode's *final* observation; the following ``step`` call ignores its action and
returns the reset observation with reward 0. We therefore

- take ``next_values[t] = values[t+1]``: after a finished step that is V(final observation), the
  correct bootstrap at a time-limit truncation (and zeroed by ``terminated`` otherwise);
- mark the reset step with ``mask = 0``: it is not a transition; GAE gives it advantage 0 and the
  update drops it.

An environment step counts toward the budget either way (honest accounting: one ``step`` call of
N environments = N steps).
"""

from __future__ import annotations

import functools
import pickle
import warnings
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from dpolab.errors import DpolabError
from dpolab.rl.advantages import shift_values
from dpolab.rl.nets import ActorCritic


def make_vec_env(env_id: str, n_envs: int) -> gym.vector.SyncVectorEnv:
    """N copies of ``env_id`` in a SyncVectorEnv (faster than Async for classic control).

    Built from ``functools.partial`` rather than lambdas so the whole vector env (physics state,
    time-limit counters, RNGs) can be pickled into a checkpoint.
    """
    if n_envs < 1:
        raise DpolabError(f"need at least one environment, got n_envs={n_envs}")
    try:
        gym.spec(env_id)
    except gym.error.Error as err:
        raise DpolabError(f"unknown Gymnasium environment {env_id!r}: {err}") from None
    envs = gym.vector.SyncVectorEnv([functools.partial(gym.make, env_id) for _ in range(n_envs)])
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        envs.close()
        raise DpolabError(f"{env_id}: only flat Box observations are supported, got {obs_space}")
    if not isinstance(act_space, (gym.spaces.Discrete, gym.spaces.Box)) or (
            isinstance(act_space, gym.spaces.Box) and len(act_space.shape) != 1):
        envs.close()
        raise DpolabError(f"{env_id}: only Discrete or flat Box actions are supported, got {act_space}")
    return envs


def space_dims(envs: gym.vector.VectorEnv) -> tuple[int, int, bool]:
    """``(obs_dim, action_dim, discrete)`` of a vector env."""
    act = envs.single_action_space
    discrete = isinstance(act, gym.spaces.Discrete)
    action_dim = int(act.n) if discrete else int(act.shape[0])
    return int(envs.single_observation_space.shape[0]), action_dim, discrete


def to_env_actions(actions: torch.Tensor, space: gym.Space) -> np.ndarray:
    """Policy actions -> what ``env.step`` takes; Gaussian actions are clipped to the Box bounds."""
    a = actions.numpy()
    if isinstance(space, gym.spaces.Box):
        return np.clip(a, space.low, space.high)
    return a


@dataclass
class Rollout:
    """One rollout of T steps from N environments (time first).

    obs (T, N, obs_dim); actions (T, N) int64 or (T, N, A) float; logp, values, next_values,
    rewards (T, N) float32; terminated, truncated, mask (T, N) bool (``mask`` False on reset steps).
    """

    obs: torch.Tensor
    actions: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    next_values: torch.Tensor
    rewards: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    mask: torch.Tensor


class Collector:
    """Steps a vector env with a policy, keeping the current observations and episode statistics."""

    def __init__(self, envs: gym.vector.SyncVectorEnv, seed: int):
        self.envs = envs
        obs, _ = envs.reset(seed=seed)
        self.obs = torch.as_tensor(obs, dtype=torch.float32)
        n = envs.num_envs
        self.prev_done = np.zeros(n, dtype=bool)
        self.ep_return = np.zeros(n, dtype=np.float64)
        self.ep_length = np.zeros(n, dtype=np.int64)

    def collect(self, policy: ActorCritic, n_steps: int) -> tuple[Rollout, list[tuple[float, int]]]:
        """Run ``n_steps`` vector steps; returns the rollout and ``(return, length)`` of finished episodes."""
        n, space = self.envs.num_envs, self.envs.single_action_space
        obs_buf = torch.empty((n_steps, n, self.obs.shape[-1]), dtype=torch.float32)
        act_shape = (n_steps, n) if isinstance(space, gym.spaces.Discrete) else (n_steps, n, space.shape[0])
        act_buf = torch.empty(act_shape, dtype=torch.int64 if len(act_shape) == 2 else torch.float32)
        logp_buf, val_buf = torch.empty((n_steps, n)), torch.empty((n_steps, n))
        rew = np.zeros((n_steps, n), dtype=np.float32)
        term, trunc, mask = (np.zeros((n_steps, n), dtype=bool) for _ in range(3))
        episodes: list[tuple[float, int]] = []
        for t in range(n_steps):
            actions, logp, values = policy.act(self.obs)
            obs_buf[t], act_buf[t], logp_buf[t], val_buf[t] = self.obs, actions, logp, values
            mask[t] = ~self.prev_done
            next_obs, r, te, tr, _ = self.envs.step(to_env_actions(actions, space))
            rew[t], term[t], trunc[t] = r, te, tr
            self.ep_return += r
            self.ep_length += mask[t]
            done = te | tr
            for i in np.flatnonzero(done):
                episodes.append((float(self.ep_return[i]), int(self.ep_length[i])))
            self.ep_return[done], self.ep_length[done] = 0.0, 0
            self.prev_done = done
            self.obs = torch.as_tensor(next_obs, dtype=torch.float32)
        with torch.no_grad():
            last_value = policy.value(self.obs)
        rollout = Rollout(obs=obs_buf, actions=act_buf, logp=logp_buf, values=val_buf,
                          next_values=shift_values(val_buf, last_value), rewards=torch.from_numpy(rew),
                          terminated=torch.from_numpy(term), truncated=torch.from_numpy(trunc),
                          mask=torch.from_numpy(mask))
        return rollout, episodes

    # -- checkpointing: the whole environment state, so a resumed run continues exactly --------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue stepping exactly; an environment that cannot be pickled is
        stored as None (a resumed run then starts fresh episodes: not exact, and it warns)."""
        try:
            envs = pickle.dumps(self.envs)
        except Exception:  # noqa: BLE001 - any pickling failure means "not restorable"
            envs = None
        return {"envs": envs, "obs": self.obs.clone(), "prev_done": self.prev_done.copy(),
                "ep_return": self.ep_return.copy(), "ep_length": self.ep_length.copy()}

    def load_state_dict(self, state: dict[str, Any], reseed: int = 0) -> None:
        if state["envs"] is None:
            warnings.warn("the checkpoint holds no environment state (not picklable): resuming with "
                          f"fresh episodes (seed {reseed}); the run will not match an uninterrupted one",
                          stacklevel=2)
            obs, _ = self.envs.reset(seed=reseed)
            self.obs = torch.as_tensor(obs, dtype=torch.float32)
            n = self.envs.num_envs
            self.prev_done, self.ep_return, self.ep_length = np.zeros(n, bool), np.zeros(n), np.zeros(n, np.int64)
            return
        self.envs.close()
        self.envs = pickle.loads(state["envs"])
        self.obs = state["obs"].clone()
        self.prev_done, self.ep_return, self.ep_length = (np.array(state[k]) for k in (
            "prev_done", "ep_return", "ep_length"))


def evaluate(policy: ActorCritic, env_id: str, episodes: int, seed: int,
             deterministic: bool = True) -> list[float]:
    """Undiscounted returns of ``episodes`` episodes, run in parallel (one per env, seeds seed..seed+k−1)."""
    envs = make_vec_env(env_id, episodes)
    try:
        obs, _ = envs.reset(seed=seed)
        returns = np.zeros(episodes)
        running = np.ones(episodes, dtype=bool)
        space = envs.single_action_space
        while running.any():
            actions, _, _ = policy.act(torch.as_tensor(obs, dtype=torch.float32), deterministic=deterministic)
            obs, r, te, tr, _ = envs.step(to_env_actions(actions, space))
            returns += r * running
            running &= ~(te | tr)
    finally:
        envs.close()
    return returns.tolist()
