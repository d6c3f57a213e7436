"""Policy evaluation: returns, sampled episodes, exact/iterative values, Monte Carlo and TD(0).

Formulas (the seed deck, "policy evaluation"; Sutton & Barto 2018, sections 5.1, 6.1):

* return ``G_t = r_t + gamma r_{t+1} + gamma^2 r_{t+2} + ...``
* Monte Carlo, incremental form: ``V(s_t) <- V(s_t) + alpha (G_t - V(s_t))``; with ``alpha = 1/N(s_t)``
  this is the running sample mean of the returns (first-visit or every-visit).
* TD(0): ``V(s_t) <- V(s_t) + alpha (r_t + gamma V(s_{t+1}) - V(s_t))`` with ``V(terminal) = 0``.

A *model* is an :class:`~dpolab.rl.mdp.MRP`, or an :class:`~dpolab.rl.mdp.MDP` together with a policy;
episodes start from ``model.initial`` and end in a terminal state (or are cut at ``max_steps``).
A cut episode has no complete return: Monte Carlo leaves it out, TD(0) learns from its steps (each
bootstraps from V(s_{t+1}), complete or not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpolab.rl.mdp import MDP, MRP, MDPError


def discounted_returns(rewards, gamma: float) -> np.ndarray:
    """``G_t = sum_k gamma^k r_{t+k}`` for every t (T,), by the backward recursion G_t = r_t + gamma G_{t+1}."""
    r = np.asarray(rewards, dtype=np.float64)
    G = np.zeros_like(r)
    acc = 0.0
    for t in range(len(r) - 1, -1, -1):
        acc = r[t] + gamma * acc
        G[t] = acc
    return G


@dataclass
class Episode:
    """One episode: ``states`` (T+1,) including the final state, ``actions`` (T,) (-1 for an MRP),
    ``rewards`` (T,) with ``rewards[t]`` received on leaving ``states[t]``; ``truncated`` if cut."""

    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    truncated: bool = False

    def returns(self, gamma: float) -> np.ndarray:
        return discounted_returns(self.rewards, gamma)


class Sampler:
    """Fast sampling of transitions from an MRP, or from an MDP under a fixed policy (inverse CDF)."""

    def __init__(self, model: MRP | MDP, policy=None):
        self.model, self.gamma, self.terminal = model, model.gamma, model.terminal
        self.n_states = model.n_states
        self._init_cdf = np.cumsum(model.initial)
        if isinstance(model, MDP):
            if policy is None:
                raise MDPError("evaluating an MDP needs a policy")
            self.pi = model.policy_matrix(policy)
            self._pi_cdf = np.cumsum(self.pi, axis=1)
            self._cdf = np.cumsum(model.P, axis=2)  # (S, A, S)
        else:
            self.pi = None
            self._cdf = np.cumsum(model.P, axis=1)[:, None, :]  # (S, 1, S)
        self._R = model.R_next if isinstance(model, MDP) else model.R_next[:, None, :]

    @staticmethod
    def _draw(cdf: np.ndarray, u: float) -> int:
        return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(cdf) - 1)

    def start(self, rng: np.random.Generator) -> int:
        return self._draw(self._init_cdf, rng.random())

    def step(self, s: int, rng: np.random.Generator) -> tuple[int, float, int]:
        """(action, reward, next state); action is -1 for an MRP."""
        a = self._draw(self._pi_cdf[s], rng.random()) if self.pi is not None else 0
        s2 = self._draw(self._cdf[s, a], rng.random())
        return (a if self.pi is not None else -1), float(self._R[s, a, s2]), s2

    def episode(self, rng: np.random.Generator, start: int | None = None, max_steps: int = 10_000) -> Episode:
        s = self.start(rng) if start is None else int(start)
        states, actions, rewards = [s], [], []
        truncated = False
        while not self.terminal[s]:
            if len(rewards) >= max_steps:
                truncated = True
                break
            a, r, s = self.step(s, rng)
            states.append(s)
            actions.append(a)
            rewards.append(r)
        return Episode(np.array(states), np.array(actions, dtype=np.int64), np.array(rewards), truncated)


def sample_episode(model: MRP | MDP, rng: np.random.Generator, policy=None, start: int | None = None,
                   max_steps: int = 10_000) -> Episode:
    """One episode from ``model.initial`` (or ``start``) until a terminal state or ``max_steps``."""
    return Sampler(model, policy).episode(rng, start, max_steps)


def exact_values(model: MRP | MDP, policy=None) -> np.ndarray:
    """v_pi (S,) by the Bellman linear solve ``(I - gamma P^pi)^-1 R^pi``."""
    mrp = model.induced_mrp(policy) if isinstance(model, MDP) else model
    return mrp.values()


def iterative_evaluation(model: MRP | MDP, policy=None, tol: float = 1e-8,
                         max_iter: int = 1_000_000) -> tuple[np.ndarray, int]:
    """v_pi by iterating ``v <- R + gamma P v`` from 0; returns (v (S,), sweeps).

    Stopping rule with a guarantee on v itself: the error after a sweep with change ``d = v_{k+1} - v_k``
    is ``v - v_{k+1} = (I - gamma P)^-1 gamma P d`` (subtract the fixed-point equation), so
    ``||v - v_{k+1}||_inf <= B ||d||_inf`` with ``B = gamma / (1 - gamma)`` for gamma < 1, and for gamma = 1
    ``B = max_s E[steps to termination]`` (row sums of ``(I - P_NN)^-1``, nonnegative). We stop once
    ``B ||d||_inf < tol``.
    """
    mrp = model.induced_mrp(policy) if isinstance(model, MDP) else model
    g = mrp.gamma
    live = ~mrp.terminal if g == 1.0 else np.ones(mrp.n_states, dtype=bool)
    P, R = mrp.P[np.ix_(live, live)], mrp.R[live]
    if g < 1.0:
        bound = g / (1.0 - g)
    else:
        bound = float(np.linalg.solve(np.eye(len(R)) - P, np.ones(len(R))).max())
    v = np.zeros(len(R))
    for k in range(1, max_iter + 1):
        new = R + g * (P @ v)
        diff = float(np.max(np.abs(new - v))) if len(v) else 0.0
        v = new
        if bound * diff < tol:
            out = np.zeros(mrp.n_states)
            out[live] = v
            return out, k
    raise MDPError(f"iterative evaluation did not reach tol={tol:g} in {max_iter} sweeps")


def mc_update(V: np.ndarray, episode: Episode, gamma: float, alpha: float | None = None,
              counts: np.ndarray | None = None, first_visit: bool = True) -> None:
    """Monte Carlo update of ``V`` (S,) in place from one episode.

    ``alpha`` None: sample-mean step ``1/N(s)`` using ``counts`` (S,) (updated in place); else the deck's
    constant step ``V(s_t) += alpha (G_t - V(s_t))``. First-visit uses only the first occurrence of each
    state in the episode; every-visit uses all of them, in time order. A cut episode
    (``truncated``) is refused: its partial sums are not returns.
    """
    if episode.truncated:
        raise MDPError("Monte Carlo needs complete episodes: this one was cut before a terminal state")
    G = episode.returns(gamma)
    states = episode.states[:-1]
    seen: set[int] = set()
    for t, s in enumerate(states):
        s = int(s)
        if first_visit:
            if s in seen:
                continue
            seen.add(s)
        if alpha is None:
            if counts is None:
                raise MDPError("sample-mean Monte Carlo needs a counts array")
            counts[s] += 1
            step = 1.0 / counts[s]
        else:
            step = alpha
        V[s] += step * (G[t] - V[s])


def td0_update(V: np.ndarray, s: int, r: float, s2: int, terminal2: bool, alpha: float, gamma: float) -> float:
    """One TD(0) step in place; returns the TD error ``delta = r + gamma V(s') - V(s)`` (V(terminal) = 0)."""
    target = r + (0.0 if terminal2 else gamma * V[s2])
    delta = target - V[s]
    V[s] += alpha * delta
    return float(delta)


def rms_error(V: np.ndarray, v_true: np.ndarray, terminal: np.ndarray) -> float:
    """Root-mean-square error over non-terminal states (Sutton & Barto's Figure 6.2 measure)."""
    live = ~terminal
    return float(np.sqrt(np.mean((V[live] - v_true[live]) ** 2)))


@dataclass
class EvalResult:
    """Estimated values ``V`` (S,), when exact values were given ``rms`` (episodes,) per episode, and
    ``cut``: the episodes cut at ``max_steps`` (left out of Monte Carlo)."""

    V: np.ndarray
    rms: np.ndarray | None
    cut: int = 0


def mc_evaluation(model: MRP | MDP, n_episodes: int, rng: np.random.Generator, policy=None,
                  alpha: float | None = None, first_visit: bool = True, v_true=None, v0: float = 0.0,
                  max_steps: int = 10_000) -> EvalResult:
    """Monte Carlo policy evaluation over ``n_episodes`` sampled episodes (see :func:`mc_update`);
    episodes cut at ``max_steps`` are left out (counted in ``cut``; the curve stays flat there)."""
    sampler = Sampler(model, policy)
    V = np.full(model.n_states, float(v0))
    V[model.terminal] = 0.0
    counts = np.zeros(model.n_states)
    curve = np.zeros(n_episodes) if v_true is not None else None
    cut = 0
    for i in range(n_episodes):
        ep = sampler.episode(rng, max_steps=max_steps)
        if ep.truncated:
            cut += 1
        else:
            mc_update(V, ep, model.gamma, alpha, counts, first_visit)
        if curve is not None:
            curve[i] = rms_error(V, np.asarray(v_true), model.terminal)
    return EvalResult(V, curve, cut)


def td0_evaluation(model: MRP | MDP, n_episodes: int, rng: np.random.Generator, policy=None,
                   alpha: float = 0.1, v_true=None, v0: float = 0.0, max_steps: int = 10_000) -> EvalResult:
    """TD(0) policy evaluation, updating after every step of ``n_episodes`` sampled episodes (also
    of those cut at ``max_steps``, counted in ``cut``)."""
    sampler = Sampler(model, policy)
    V = np.full(model.n_states, float(v0))
    V[model.terminal] = 0.0
    curve = np.zeros(n_episodes) if v_true is not None else None
    cut = 0
    for i in range(n_episodes):
        s = sampler.start(rng)
        for _ in range(max_steps):
            if model.terminal[s]:
                break
            _, r, s2 = sampler.step(s, rng)
            td0_update(V, s, r, s2, bool(model.terminal[s2]), alpha, model.gamma)
            s = s2
        cut += int(not model.terminal[s])
        if curve is not None:
            curve[i] = rms_error(V, np.asarray(v_true), model.terminal)
    return EvalResult(V, curve, cut)
