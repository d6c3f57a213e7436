"""Linear value-function approximation (the seed deck's "value function approximation" slides).

``v_hat(s, w) = phi(s)^T w`` with features ``phi`` (S, d). The deck minimises
``J(w) = E_pi[(v_hat(s, w) - v_pi(s))^2]`` by gradient descent and replaces the unknown ``v_pi(s)`` by a
target:

* gradient Monte Carlo: ``w <- w - alpha [phi(s_t)^T w - G_t] phi(s_t)`` (target: the return G_t);
* semi-gradient TD(0): ``w <- w - alpha [phi(s_t)^T w - (r_t + gamma phi(s_{t+1})^T w)] phi(s_t)``
  (target: the bootstrapped one-step return, not differentiated), ``phi(terminal) = 0``.

Their limits (Sutton & Barto 2018, sections 9.2-9.4) are computed in closed form for tests: gradient MC
converges to the mu-weighted least-squares fit of v_pi (mu = on-policy state distribution, eq. 9.2-9.3),
semi-gradient TD(0) to the TD fixed point ``w_TD = A^-1 b``, ``A = Phi^T D (Phi - gamma P Phi)``,
``b = Phi^T D R`` (eq. 9.12).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dpolab.rl.mdp import MDP, MRP, MDPError
from dpolab.rl.policy_evaluation import Sampler


def aggregation_features(n_states: int, n_groups: int, terminal: np.ndarray | None = None,
                         order: np.ndarray | None = None) -> np.ndarray:
    """State aggregation: one-hot group features Phi (S, n_groups).

    The non-terminal states (in index order, or ``order``) are cut into ``n_groups`` contiguous groups
    of near-equal size; terminal states get the zero vector, so ``v_hat(terminal) = 0``.
    """
    terminal = np.zeros(n_states, dtype=bool) if terminal is None else np.asarray(terminal, dtype=bool)
    live = np.flatnonzero(~terminal) if order is None else np.asarray(order)
    if not 1 <= n_groups <= len(live):
        raise MDPError(f"n_groups must be in [1, {len(live)}], got {n_groups}")
    phi = np.zeros((n_states, n_groups))
    for g, chunk in enumerate(np.array_split(live, n_groups)):
        phi[chunk, g] = 1.0
    return phi


StepSize = float | Callable[[int], float]


def _step(alpha: StepSize, episode: int) -> float:
    return float(alpha(episode)) if callable(alpha) else float(alpha)


def _check_phi(model: MRP | MDP, phi: np.ndarray) -> np.ndarray:
    phi = np.asarray(phi, dtype=np.float64)
    if phi.ndim != 2 or phi.shape[0] != model.n_states:
        raise MDPError(f"features must have shape ({model.n_states}, d), got {phi.shape}")
    return phi


def gradient_mc(model: MRP | MDP, phi: np.ndarray, n_episodes: int, alpha: StepSize,
                rng: np.random.Generator, policy=None, w0=None, max_steps: int = 100_000) -> np.ndarray:
    """Gradient Monte Carlo (every visit, in time order after each episode); returns w (d,).

    ``alpha`` is a constant or a function of the episode index (a decaying schedule converges)."""
    phi = _check_phi(model, phi)
    w = np.zeros(phi.shape[1]) if w0 is None else np.asarray(w0, dtype=np.float64).copy()
    sampler = Sampler(model, policy)
    for k in range(n_episodes):
        a = _step(alpha, k)
        ep = sampler.episode(rng, max_steps=max_steps)
        G = ep.returns(model.gamma)
        for t, s in enumerate(ep.states[:-1]):
            x = phi[s]
            w -= a * (x @ w - G[t]) * x
    return w


def semi_gradient_td0(model: MRP | MDP, phi: np.ndarray, n_episodes: int, alpha: StepSize,
                      rng: np.random.Generator, policy=None, w0=None, max_steps: int = 100_000) -> np.ndarray:
    """Semi-gradient TD(0), updating after every step; returns w (d,). ``alpha`` as in gradient_mc."""
    phi = _check_phi(model, phi)
    w = np.zeros(phi.shape[1]) if w0 is None else np.asarray(w0, dtype=np.float64).copy()
    sampler = Sampler(model, policy)
    g = model.gamma
    for k in range(n_episodes):
        a = _step(alpha, k)
        s = sampler.start(rng)
        for _ in range(max_steps):
            if model.terminal[s]:
                break
            _, r, s2 = sampler.step(s, rng)
            x = phi[s]
            target = r + (0.0 if model.terminal[s2] else g * (phi[s2] @ w))
            w -= a * (x @ w - target) * x
            s = s2
    return w


def on_policy_distribution(mrp: MRP) -> np.ndarray:
    """mu (S,): the fraction of time spent in each state in episodes (Sutton & Barto eq. 9.2-9.3).

    Expected visits ``eta = mu0 + eta P_NN`` on the non-terminal states, i.e. ``eta = mu0 (I - P_NN)^-1``,
    normalised to sum to 1; terminal states get 0. Needs every episode to end.
    """
    live = ~mrp.terminal
    P = mrp.P[np.ix_(live, live)]
    try:
        eta = np.linalg.solve((np.eye(int(live.sum())) - P).T, mrp.initial[live])
    except np.linalg.LinAlgError:
        raise MDPError("the on-policy distribution needs every episode to end") from None
    mu = np.zeros(mrp.n_states)
    mu[live] = eta
    return mu / mu.sum()


def mc_fixed_point(mrp: MRP, phi: np.ndarray) -> np.ndarray:
    """w (d,) minimising ``sum_s mu(s) (phi(s)^T w - v(s))^2``: where gradient MC converges."""
    phi = _check_phi(mrp, phi)
    D = np.diag(on_policy_distribution(mrp))
    return np.linalg.lstsq(phi.T @ D @ phi, phi.T @ D @ mrp.values(), rcond=None)[0]


def td_fixed_point(mrp: MRP, phi: np.ndarray) -> np.ndarray:
    """w_TD (d,) solving ``Phi^T D (Phi w - R - gamma P Phi' w) = 0`` (S&B eq. 9.12), where ``Phi'``
    is ``Phi`` with the terminal states' rows zero: a terminal state's value is 0 whatever its
    features, as in :func:`semi_gradient_td0`'s target (a bias feature made the equations
    singular with γ = 1, and least squares returned a meaningless w)."""
    phi = _check_phi(mrp, phi)
    D = np.diag(on_policy_distribution(mrp))
    bootstrap = np.where(mrp.terminal[:, None], 0.0, phi)
    A = phi.T @ D @ (phi - mrp.gamma * mrp.P @ bootstrap)
    return np.linalg.lstsq(A, phi.T @ D @ mrp.R, rcond=None)[0]
