"""Rollouts on Gymnasium vector environments, and evaluation episodes.

Same-step autoreset (``AutoresetMode.SAME_STEP``, Gymnasium >= 1.1; the behaviour of
Stable-Baselines3's ``DummyVecEnv``): the ``step`` that ends an episode already returns the *reset*
observation of the next one, and the finished episode's final observation in
``infos["final_obs"]``. Every ``step`` call of N environments is therefore N real transitions (no
wasted step per episode, no masked rows), and we

- take ``next_values[t] = values[t+1]`` inside an episode;
- at a time-limit truncation bootstrap with V(final observation): those observations are collected
  during the rollout and valued in one batch at its end, with the same (unchanged) policy;
- set ``next_values[t] = 0`` at a termination (V of a terminal state; GAE ignores it anyway).

(Gymnasium's default, ``NEXT_STEP``, instead spends one ignored ``step`` per episode returning the
reset observation with reward 0; dpolab used it before and masked those rows out of the update.)
"""

from __future__ import annotations

import collections
import enum
import functools
import importlib
import types
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
    """N copies of ``env_id`` in a SyncVectorEnv (faster than Async for classic control) that resets
    a finished episode in the same step (see the module docstring).

    Checkpoints store its state as plain data (:func:`env_state`), never a pickle.
    """
    if n_envs < 1:
        raise DpolabError(f"need at least one environment, got n_envs={n_envs}")
    module, _, name = env_id.rpartition(":")
    if module:  # "module:EnvId", as gym.make takes it: importing the module registers the env
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise DpolabError(f"--env {env_id}: cannot import module {module!r} ({err})") from None
    try:
        gym.spec(name)
    except gym.error.Error as err:
        raise DpolabError(f"unknown Gymnasium environment {env_id!r}: {err}") from None
    mode = getattr(gym.vector, "AutoresetMode", None)
    if mode is None:
        raise DpolabError(f"dpolab's Gymnasium trainers need gymnasium >= 1.1 (same-step autoreset); "
                          f"found {gym.__version__}: pip install -U gymnasium")
    try:
        envs = gym.vector.SyncVectorEnv([functools.partial(gym.make, env_id) for _ in range(n_envs)],
                                        autoreset_mode=mode.SAME_STEP)
    except gym.error.Error as err:  # e.g. DependencyNotInstalled (LunarLander without box2d)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DpolabError(f"cannot make {env_id!r}: {first}") from None
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
    """Policy actions -> what ``env.step`` takes: categorical indices offset by ``Discrete.start``,
    Gaussian actions clipped to the Box bounds."""
    a = actions.numpy()
    if isinstance(space, gym.spaces.Box):
        return np.clip(a, space.low, space.high)
    return a + space.start if space.start else a  # the policy's index 0..n-1; Discrete(n, start) acts from start


@dataclass
class Rollout:
    """One rollout of T steps from N environments (time first); every entry is a real transition.

    obs (T, N, obs_dim); actions (T, N) int64 or (T, N, A) float; logp, values, next_values,
    rewards (T, N) float32; terminated, truncated (T, N) bool. ``next_values[t]`` is V(s_{t+1}) of the
    true next state: ``values[t+1]``, V(final observation) at a truncation, 0 at a termination.
    """

    obs: torch.Tensor
    actions: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    next_values: torch.Tensor
    rewards: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor


AUTORESET = "same-step"  # recorded in the collector state: a checkpoint of another mode is not resumed as is


class Collector:
    """Steps a vector env with a policy, keeping the current observations and episode statistics."""

    def __init__(self, envs: gym.vector.SyncVectorEnv, seed: int):
        if getattr(envs, "autoreset_mode", None) != getattr(gym.vector, "AutoresetMode", object()).SAME_STEP:
            raise DpolabError("Collector needs a vector env with same-step autoreset (make_vec_env)")
        self.envs = envs
        obs, _ = envs.reset(seed=seed)
        self.obs = torch.as_tensor(obs, dtype=torch.float32)
        n = envs.num_envs
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
        term, trunc = np.zeros((n_steps, n), dtype=bool), np.zeros((n_steps, n), dtype=bool)
        episodes: list[tuple[float, int]] = []
        cut: list[tuple[int, int, np.ndarray]] = []  # (t, env, final observation) of truncated episodes
        for t in range(n_steps):
            actions, logp, values = policy.act(self.obs)
            obs_buf[t], act_buf[t], logp_buf[t], val_buf[t] = self.obs, actions, logp, values
            next_obs, r, te, tr, info = self.envs.step(to_env_actions(actions, space))
            rew[t], term[t], trunc[t] = r, te, tr
            self.ep_return += r
            self.ep_length += 1
            done = te | tr
            if done.any():
                for i in np.flatnonzero(done):
                    episodes.append((float(self.ep_return[i]), int(self.ep_length[i])))
                    if tr[i] and not te[i]:
                        cut.append((t, int(i), info["final_obs"][i]))
                self.ep_return[done], self.ep_length[done] = 0.0, 0
            self.obs = torch.as_tensor(next_obs, dtype=torch.float32)
        with torch.no_grad():
            next_values = shift_values(val_buf, policy.value(self.obs))
            if cut:  # V(final observation) for the truncation bootstrap, one batch for the rollout
                v_final = policy.value(torch.as_tensor(np.stack([o for _, _, o in cut]), dtype=torch.float32))
                for k, (t, i, _) in enumerate(cut):
                    next_values[t, i] = v_final[k]
        terminated = torch.from_numpy(term)
        next_values[terminated] = 0.0
        rollout = Rollout(obs=obs_buf, actions=act_buf, logp=logp_buf, values=val_buf, next_values=next_values,
                          rewards=torch.from_numpy(rew), terminated=terminated, truncated=torch.from_numpy(trunc))
        return rollout, episodes

    # -- checkpointing: the environment state as plain data, so a resumed run continues exactly ------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue stepping exactly, as tensors and plain data (no pickled
        objects: loadable with ``torch.load(weights_only=True)``). See :func:`env_state`."""
        return {"envs": env_state(self.envs), "obs": self.obs.clone(), "autoreset": AUTORESET,
                "ep_return": torch.from_numpy(self.ep_return.copy()),
                "ep_length": torch.from_numpy(self.ep_length.copy())}

    def load_state_dict(self, state: dict[str, Any], reseed: int = 0) -> None:
        """Restore :meth:`state_dict`. If the environment state cannot be restored (an environment
        holding state other than plain data, a checkpoint of another Gymnasium version, or one written
        with next-step autoreset by an older dpolab), warn and start fresh episodes seeded with
        ``reseed``: the run goes on, but will not equal an uninterrupted one."""
        if state.get("autoreset") != AUTORESET:
            problem = "the checkpoint was written with next-step autoreset (an older dpolab)"
        else:
            problem = restore_env_state(self.envs, state.get("envs"))
        if problem is not None:
            warnings.warn(f"cannot restore the environment state ({problem}): resuming with fresh "
                          f"episodes (seed {reseed}); the run will not match an uninterrupted one",
                          stacklevel=2)
            obs, _ = self.envs.reset(seed=reseed)
            self.obs = torch.as_tensor(obs, dtype=torch.float32)
            n = self.envs.num_envs
            self.ep_return, self.ep_length = np.zeros(n), np.zeros(n, np.int64)
            return
        self.obs = state["obs"].clone()
        self.ep_return, self.ep_length = (_as_numpy(state[k]) for k in ("ep_return", "ep_length"))


def _as_numpy(x: Any) -> np.ndarray:
    return x.numpy().copy() if torch.is_tensor(x) else np.array(x)


# -- environment state as plain data ------------------------------------------------------------------
# A Gymnasium env is a chain of wrappers around a base env; its state is the attributes of each layer
# (physics state, time-limit counters, order/checker flags, the vector env's autoreset flags and
# buffers) plus the numpy Generators (env.np_random, space RNGs). We store attributes that are plain
# data (None, bool/int/float/str, numpy scalars and arrays of numeric dtype, tuples/lists/dicts/deques
# of those) with type tags so they come back with their exact types and bits, and bit-generator states
# (dicts of ints). Attributes of the types below are construction-time structure, not state, and are
# skipped; any other attribute (a physics engine handle, a renderer, ...) makes the env unrestorable.
_STRUCTURE_ATTRS = frozenset({"env", "envs", "env_fns", "_saved_kwargs", "metadata", "_metadata", "spec",
                              "_cached_spec"})
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")
_PLAIN = (type(None), bool, int, float, str)


class _NotPlain(Exception):
    pass


def _encode(v: Any) -> Any:
    """Plain value -> a tree of None/bool/int/float/str/list/dict, exact and type-tagged."""
    if type(v) in _PLAIN:
        return v
    if isinstance(v, np.generic) and v.dtype.kind in "biuf":
        return {"__np__": v.dtype.str, "v": v.item()}
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
        return {"__nd__": v.dtype.str, "shape": list(v.shape), "v": v.tolist()}
    if type(v) is list:
        return [_encode(x) for x in v]
    if type(v) is tuple:
        return {"__tuple__": [_encode(x) for x in v]}
    if type(v) is dict:
        return {"__dict__": [[_encode(k), _encode(x)] for k, x in v.items()]}
    if type(v) is collections.deque:
        return {"__deque__": [_encode(x) for x in v], "maxlen": v.maxlen}
    if isinstance(v, np.random.Generator) and type(v.bit_generator).__name__ in _BIT_GENERATORS:
        return {"__rng__": _encode(v.bit_generator.state)}
    if type(v) is np.random.RandomState:
        return {"__randomstate__": _encode(v.get_state())}
    raise _NotPlain(type(v).__name__)


def _decode(v: Any) -> Any:
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if not isinstance(v, dict):
        return v
    if "__np__" in v:
        return np.dtype(v["__np__"]).type(v["v"])
    if "__nd__" in v:
        return np.array(v["v"], dtype=np.dtype(v["__nd__"])).reshape(v["shape"])
    if "__tuple__" in v:
        return tuple(_decode(x) for x in v["__tuple__"])
    if "__dict__" in v:
        return {_decode(k): _decode(x) for k, x in v["__dict__"]}
    if "__deque__" in v:
        return collections.deque((_decode(x) for x in v["__deque__"]), maxlen=v["maxlen"])
    if "__rng__" in v:
        state = _decode(v["__rng__"])
        name = state["bit_generator"]
        if name not in _BIT_GENERATORS:
            raise ValueError(f"unknown bit generator {name!r}")
        gen = np.random.Generator(getattr(np.random, name)())
        gen.bit_generator.state = state
        return gen
    if "__randomstate__" in v:
        rs = np.random.RandomState()
        rs.set_state(_decode(v["__randomstate__"]))
        return rs
    raise ValueError(f"unknown tag in environment state: {sorted(v)[:3]}")


def _is_structure(v: Any) -> bool:
    """Values that are part of how the env was built, not of its running state."""
    return isinstance(v, (gym.Space, gym.Env, gym.vector.VectorEnv, enum.Enum, gym.envs.registration.EnvSpec,
                          functools.partial, types.FunctionType, types.MethodType, type))


def _chain(env: Any) -> list[Any]:
    """The wrapper chain, outermost first, down to the base env."""
    layers = [env]
    while isinstance(getattr(env, "env", None), (gym.Env, gym.vector.VectorEnv)):
        env = env.env
        layers.append(env)
    return layers


def _layer_state(layer: Any, problems: list[str]) -> dict[str, Any]:
    attrs, spaces = {}, {}
    for name, value in vars(layer).items():
        if name in _STRUCTURE_ATTRS:
            continue
        if isinstance(value, gym.Space):
            if value._np_random is not None:  # a space RNG in use (e.g. action_space.sample())
                spaces[name] = _encode(value._np_random)
            continue
        try:
            attrs[name] = _encode(value)
        except _NotPlain as err:
            if not _is_structure(value):
                problems.append(f"{type(layer).__name__}.{name} ({err})")
    return {"type": f"{type(layer).__module__}.{type(layer).__qualname__}", "attrs": attrs, "spaces": spaces}


def env_state(envs: gym.vector.VectorEnv) -> dict[str, Any]:
    """The state of a SyncVectorEnv and of every sub-env's wrapper chain, as plain data.

    ``{"vector": [layer, ...], "envs": [[layer, ...] per sub-env], "unrestorable": []}``, a layer being
    ``{"type": class name, "attrs": {name: encoded value}, "spaces": {name: encoded RNG}}``. If some
    attribute is neither plain data nor known structure, only ``{"unrestorable": [names]}`` is kept.
    Exact for the classic-control envs (CartPole, Acrobot, MountainCar[Continuous], Pendulum) under
    the standard wrappers; not for Box2D or MuJoCo envs (engine objects)."""
    problems: list[str] = []
    vector = [_layer_state(layer, problems) for layer in _chain(envs)]
    subs = [[_layer_state(layer, problems) for layer in _chain(e)] for e in getattr(envs, "envs", [])]
    if problems:
        return {"unrestorable": problems}
    return {"vector": vector, "envs": subs, "unrestorable": []}


def _assign(layer: Any, name: str, value: Any) -> None:
    current = getattr(layer, name, None)
    if isinstance(value, np.ndarray) and isinstance(current, np.ndarray) and \
            current.shape == value.shape and current.dtype == value.dtype and current.flags.writeable:
        current[...] = value  # in place: keeps any other reference to the buffer valid
    elif isinstance(value, np.random.Generator) and isinstance(current, np.random.Generator) and \
            type(current.bit_generator) is type(value.bit_generator):
        current.bit_generator.state = value.bit_generator.state
    else:
        setattr(layer, name, value)


def restore_env_state(envs: gym.vector.VectorEnv, state: Any) -> str | None:
    """Put :func:`env_state` back into ``envs``; returns None, or why it could not (nothing restored)."""
    if not isinstance(state, dict) or "unrestorable" not in state:
        return "the checkpoint holds no environment state in this format (written by an older dpolab?)"
    if state["unrestorable"]:
        return "the environment holds state that is not plain data: " + ", ".join(state["unrestorable"][:4])
    layers = [(layer, saved) for layer, saved in zip(_chain(envs), state["vector"])]
    subs = getattr(envs, "envs", [])
    if len(subs) != len(state["envs"]) or len(_chain(envs)) != len(state["vector"]):
        return "the checkpoint's vector environment has another shape"
    for env, saved_chain in zip(subs, state["envs"]):
        chain = _chain(env)
        if len(chain) != len(saved_chain):
            return "the checkpoint's environment has another wrapper chain"
        layers += list(zip(chain, saved_chain))
    for layer, saved in layers:
        now = f"{type(layer).__module__}.{type(layer).__qualname__}"
        if now != saved["type"]:
            return f"the checkpoint's environment layer {saved['type']} is {now} now"
    try:  # decode everything first: a damaged state changes nothing
        values = [(layer, name, _decode(enc)) for layer, saved in layers for name, enc in saved["attrs"].items()]
        rngs = [(getattr(layer, name), _decode(enc)) for layer, saved in layers
                for name, enc in saved["spaces"].items()]
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
        return f"bad environment state in the checkpoint: {err}"
    for layer, name, value in values:
        _assign(layer, name, value)
    for space, rng in rngs:
        space._np_random = rng
    return None


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
