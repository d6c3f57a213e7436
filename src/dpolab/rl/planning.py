"""Planning on a known MDP: Bellman operators, greedy policies, policy iteration, value iteration,
and tabular Q-learning (the sample-based counterpart, used on our Q-table gridworld).

References: the seed deck (policy iteration slide, the Q-table); Sutton & Barto 2018, sections 4.3-4.4
and 6.5; Puterman 1994, Theorem 6.3.1 (value-iteration stopping rule); Bertsekas & Tsitsiklis 1991
(gamma = 1, stochastic shortest paths). Terminal states always have value 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpolab.rl.mdp import MDP, MDPError


def bellman_expectation(mdp: MDP, v: np.ndarray, policy) -> np.ndarray:
    """``(T^pi v)(s) = sum_a pi(a|s) [R(s, a) + gamma sum_s' P(s'|s, a) v(s')]`` (S,); 0 on terminal states."""
    pi = mdp.policy_matrix(policy)
    q = mdp.R + mdp.gamma * (mdp.P @ np.asarray(v, dtype=np.float64))
    return np.where(mdp.terminal, 0.0, np.einsum("sa,sa->s", pi, q))


def bellman_optimality(mdp: MDP, v: np.ndarray) -> np.ndarray:
    """``(T v)(s) = max_{a available} [R(s, a) + gamma sum_s' P(s'|s, a) v(s')]`` (S,); 0 on terminal states.

    For gamma < 1 it is a gamma-contraction in the sup norm: ``|max_a x_a - max_a y_a| <= max_a |x_a - y_a|``
    and ``|gamma P (u - v)| <= gamma ||u - v||_inf`` row by row (P rows are probability vectors).
    """
    q = mdp.q_from_v(v)
    return np.where(mdp.terminal, 0.0, q.max(axis=1))


def greedy_policy(mdp: MDP, v: np.ndarray | None = None, q: np.ndarray | None = None,
                  rtol: float = 1e-10) -> np.ndarray:
    """Deterministic greedy policy (S,) from ``v`` (via q = R + gamma P v) or from ``q`` (S, A).

    Ties (within ``rtol * max(1, |q|max)``) go to the lowest action index, so the result is
    reproducible. Unavailable actions are never chosen.
    """
    if (v is None) == (q is None):
        raise MDPError("greedy_policy needs exactly one of v or q")
    q = mdp.q_from_v(v) if q is None else np.where(mdp.mask, np.asarray(q, dtype=np.float64), -np.inf)
    best = q.max(axis=1, keepdims=True)
    scale = max(1.0, float(np.max(np.abs(best))))
    return np.argmax(q >= best - rtol * scale, axis=1)


def proper_policy(mdp: MDP) -> np.ndarray:
    """A deterministic policy (S,) that ends with probability 1 from every state where possible.

    Backward layering from the terminal set: a state joins layer k+1 with an available action that puts
    positive mass on layers <= k, so under this policy every state has a positive-probability path to a
    terminal state of length <= S, hence absorption is certain. States that cannot end keep their first
    available action.
    """
    policy = np.argmax(mdp.mask, axis=1)
    done = mdp.terminal.copy()
    while True:
        mass = (mdp.P[:, :, done].sum(axis=2) > 0) & mdp.mask & ~done[:, None]  # (S, A)
        new = mass.any(axis=1)
        if not new.any():
            return policy
        idx = np.flatnonzero(new)
        policy[idx] = np.argmax(mass[idx], axis=1)
        done = done | new


@dataclass
class PlanResult:
    """``values`` (S,), greedy ``policy`` (S,) action indices, ``q`` (S, A), sweeps or improvement steps."""

    values: np.ndarray
    policy: np.ndarray
    q: np.ndarray
    iterations: int
    method: str


def policy_iteration(mdp: MDP, policy0=None, max_iter: int = 10_000) -> PlanResult:
    """Policy iteration (the deck's loop): exact evaluation by the linear solve, greedy improvement.

    Improvement keeps the current action when it is among the maximisers, so the loop stops exactly when
    the policy is greedy with respect to its own value, i.e. ``v_pi`` solves the Bellman optimality
    equation, hence ``v_pi = v*`` (to the linear solve's rounding) -- the accuracy holds for V itself, not
    only for a stable policy. With gamma = 1 it starts from :func:`proper_policy`; improvement keeps
    policies proper under the stochastic-shortest-path conditions (Bertsekas & Tsitsiklis 1991).
    """
    pi = proper_policy(mdp) if policy0 is None else np.asarray(policy0, dtype=np.int64)
    mdp.policy_matrix(pi)  # validates
    for k in range(1, max_iter + 1):
        v = mdp.induced_mrp(pi).values()
        q = mdp.q_from_v(v)
        best = q.max(axis=1)
        scale = max(1.0, float(np.max(np.abs(best))))
        keep = q[np.arange(mdp.n_states), pi] >= best - 1e-12 * scale
        new = np.where(keep | mdp.terminal, pi, greedy_policy(mdp, q=q))
        if np.array_equal(new, pi):
            return PlanResult(v, pi, q, k, "policy-iteration")
        pi = new
    raise MDPError(f"policy iteration did not converge in {max_iter} steps")


def value_iteration(mdp: MDP, tol: float = 1e-8, v0=None, max_iter: int = 1_000_000) -> PlanResult:
    """Value iteration ``v_{k+1} = T v_k`` with a stopping rule that bounds the error of V itself.

    gamma < 1: stop when ``||v_{k+1} - v_k||_inf < tol (1 - gamma) / (2 gamma)``. Then (Puterman 1994,
    Thm 6.3.1) ``||v_{k+1} - v*||_inf <= gamma/(1-gamma) ||v_{k+1} - v_k||_inf < tol / 2``, the greedy
    policy is tol-optimal, and the Bellman residual ``||T v_{k+1} - v_{k+1}||_inf <= gamma ||v_{k+1} - v_k||``
    is below ``tol (1 - gamma) / 2``. gamma = 0 stops after one sweep (exact).

    gamma = 1 (no sup-norm contraction): iterate until the change is below ``tol``, then certify: take the
    greedy policy pi, compute ``v_pi`` exactly; if pi is proper and greedy for ``v_pi`` (residual of
    ``v_pi`` ~ 0), ``v_pi`` solves the Bellman optimality equation, whose solution is unique under the
    stochastic-shortest-path conditions, so ``v_pi = v*`` is returned. Otherwise keep iterating at tol/10.
    """
    if not tol > 0:  # also NaN, which every comparison would take as converged at once
        raise MDPError(f"tol must be positive, got {tol:g}")
    g = mdp.gamma
    v = np.zeros(mdp.n_states) if v0 is None else np.asarray(v0, dtype=np.float64).copy()
    v[mdp.terminal] = 0.0
    threshold = tol * (1.0 - g) / (2.0 * g) if 0 < g < 1 else (np.inf if g == 0 else tol)
    for k in range(1, max_iter + 1):
        new = bellman_optimality(mdp, v)
        diff = float(np.max(np.abs(new - v)))
        v = new
        if diff >= threshold:
            continue
        if g < 1.0:
            return PlanResult(v, greedy_policy(mdp, v=v), mdp.q_from_v(v), k, "value-iteration")
        pi = greedy_policy(mdp, v=v)
        try:
            v_pi = mdp.induced_mrp(pi).values()
        except MDPError:  # greedy policy still improper: not converged yet
            threshold /= 10.0
            continue
        scale = max(1.0, float(np.max(np.abs(v_pi))))
        if np.max(np.abs(bellman_optimality(mdp, v_pi) - v_pi)) <= 1e-9 * scale:
            return PlanResult(v_pi, pi, mdp.q_from_v(v_pi), k, "value-iteration")
        threshold /= 10.0
    raise MDPError(f"value iteration did not reach tol={tol:g} in {max_iter} sweeps")


def solve(mdp: MDP, method: str = "policy-iteration", tol: float = 1e-8) -> PlanResult:
    """Dispatch by name: ``policy-iteration`` or ``value-iteration``."""
    if method == "policy-iteration":
        return policy_iteration(mdp)
    if method == "value-iteration":
        return value_iteration(mdp, tol=tol)
    raise MDPError(f"unknown method {method!r}; choose policy-iteration or value-iteration")


def q_learning(mdp: MDP, n_episodes: int, rng: np.random.Generator | int, alpha: float = 0.5,
               epsilon: float = 0.2, max_steps: int = 1000, exploring_starts: bool = False) -> np.ndarray:
    """Tabular Q-learning with epsilon-greedy exploration over available actions; returns Q (S, A).

    ``Q(s, a) <- Q(s, a) + alpha [r + gamma max_a' Q(s', a') - Q(s, a)]`` with ``Q(terminal, .) = 0``
    (Watkins 1989; Sutton & Barto eq. 6.8). Episodes start from ``mdp.initial``, or with
    ``exploring_starts`` uniformly among non-terminal states (so that states off the good paths, which
    epsilon-greedy rarely reaches, are learned too). Greedy ties are broken uniformly at random.
    """
    if not 0 < alpha <= 1 or not 0 <= epsilon <= 1 or n_episodes < 0 or max_steps < 1:
        raise MDPError(f"q_learning needs 0 < alpha <= 1, 0 <= epsilon <= 1, n_episodes >= 0 and max_steps >= 1; "
                       f"got alpha={alpha}, epsilon={epsilon}, n_episodes={n_episodes}, max_steps={max_steps}")
    if not isinstance(rng, np.random.Generator):  # an int seed, as the rest of the library takes
        rng = np.random.default_rng(rng)
    S, A = mdp.n_states, mdp.n_actions
    Q = np.zeros((S, A))
    avail = [np.flatnonzero(mdp.mask[s]) for s in range(S)]
    init_cdf = np.cumsum(~mdp.terminal if exploring_starts else mdp.initial)
    cdf = np.cumsum(mdp.P, axis=2)
    for _ in range(n_episodes):
        s = min(int(np.searchsorted(init_cdf, rng.random() * init_cdf[-1], side="right")), S - 1)
        for _ in range(max_steps):
            if mdp.terminal[s]:
                break
            acts = avail[s]
            if rng.random() < epsilon:
                a = int(rng.choice(acts))
            else:
                qs = Q[s, acts]
                a = int(rng.choice(acts[qs == qs.max()]))
            s2 = min(int(np.searchsorted(cdf[s, a], rng.random() * cdf[s, a, -1], side="right")), S - 1)
            r = mdp.R_next[s, a, s2]
            target = r + (0.0 if mdp.terminal[s2] else mdp.gamma * Q[s2, avail[s2]].max())
            Q[s, a] += alpha * (target - Q[s, a])
            s = s2
    return Q
