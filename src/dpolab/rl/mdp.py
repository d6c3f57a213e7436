"""Finite Markov chains, Markov reward processes and Markov decision processes (numpy float64).

Conventions (the seed deck; Silver, RL course, lecture 2; Sutton & Barto 2018, ch. 3):

* ``S`` states, ``A`` actions. A Markov chain is ``P[s, s'] = p(s' | s)`` (S, S), rows summing to 1.
* An MRP adds a reward ``R[s] = E[r_t | s_t = s]`` (S,) (or a next-state reward ``R[s, s']`` (S, S),
  reduced to ``R[s] = sum_s' P[s, s'] R[s, s']``) and a discount ``gamma`` in [0, 1].
* An MDP has ``P[s, a, s']`` (S, A, S), ``R[s, a]`` (S, A) (or ``R[s, a, s']`` (S, A, S)) and an
  availability mask ``mask[s, a]`` (S, A) (Silver's Student MDP offers two of five actions per state).
* A *terminal* state is absorbing with zero reward (under every available action): episodes end there.
* A policy is either deterministic, ``(S,)`` action indices, or stochastic, ``pi[s, a]`` (S, A).

gamma = 1 is accepted only where the values are finite and unique:

* MRP: every state must reach a terminal state with probability 1 (checked exactly on the graph).
* MDP: the stochastic-shortest-path conditions (Bertsekas & Tsitsiklis 1991): from every state some
  policy reaches a terminal state, and every policy that can run forever collects reward -> -inf
  (certified by a finite-horizon bound, see :meth:`MDP._check_undiscounted`). Silver's Student MDP
  passes (looping on Facebook costs -1 a step); a zero-reward loop is rejected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dpolab.errors import DpolabError

ATOL = 1e-8  # tolerance on probabilities (row sums, policy sums)


class MDPError(DpolabError):
    """An invalid Markov chain, MRP, MDP or policy."""


def _numeric(x, name: str) -> np.ndarray:
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):  # text, or ragged nesting
        raise MDPError(f"{name} must be numeric, got {type(x).__name__}") from None


def _array(x, name: str, ndim: int) -> np.ndarray:
    arr = _numeric(x, name)
    if arr.ndim != ndim:
        raise MDPError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise MDPError(f"{name} has non-finite entries")
    return arr


def check_stochastic(P: np.ndarray, name: str = "P") -> None:
    """Every row (last axis) non-negative and summing to 1 within ``ATOL``."""
    if P.size == 0:
        raise MDPError(f"{name} is empty")
    if np.any(P < 0):
        idx = tuple(int(i) for i in np.argwhere(P < 0)[0])
        raise MDPError(f"{name} has a negative probability {P[idx]:g} at {idx}")
    sums = P.sum(axis=-1)
    bad = np.argwhere(np.abs(sums - 1.0) > ATOL)
    if len(bad):
        idx = tuple(int(i) for i in bad[0])
        raise MDPError(f"{name} row {idx} sums to {sums[idx]:.6g}, not 1")


def check_gamma(gamma: float) -> float:
    try:
        if isinstance(gamma, bool):  # YAML's `gamma: true` is not a discount of 1
            raise TypeError
        g = float(gamma)
    except (TypeError, ValueError):
        raise MDPError(f"gamma must be a number, got {gamma!r}") from None
    if not 0.0 <= g <= 1.0:
        raise MDPError(f"gamma must be in [0, 1], got {g:g}")
    return g


def _names(names: Sequence[str] | None, n: int, prefix: str, what: str) -> tuple[str, ...]:
    if names is None:
        return tuple(f"{prefix}{i}" for i in range(n))
    out = tuple(str(x) for x in names)
    if len(out) != n:
        raise MDPError(f"{len(out)} {what} names for {n} {what}s")
    if len(set(out)) != n:
        raise MDPError(f"duplicate {what} names")
    return out


def _reaches(adj: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Boolean (S,): states with a path (edges ``adj[s, s'] > 0``) to a state in ``targets``."""
    reach = targets.copy()
    while True:
        new = reach | np.any(adj[:, reach] > 0, axis=1)
        if np.array_equal(new, reach):
            return reach
        reach = new


class MarkovChain:
    """A finite Markov chain: transition matrix ``P`` (S, S) with named states."""

    def __init__(self, P, states: Sequence[str] | None = None):
        self.P = _array(P, "P", 2)
        if self.P.shape[0] != self.P.shape[1]:
            raise MDPError(f"P must be square (S, S), got shape {self.P.shape}")
        check_stochastic(self.P, "P")
        self.states = _names(states, self.n_states, "s", "state")

    @property
    def n_states(self) -> int:
        return self.P.shape[0]

    def absorbing(self) -> np.ndarray:
        """Boolean (S,): states with ``P[s, s] = 1``."""
        return np.isclose(np.diag(self.P), 1.0, atol=ATOL, rtol=0)

    def sample(self, start: int, steps: int, rng: np.random.Generator) -> list[int]:
        """A path of ``steps`` transitions from ``start`` (stops early in an absorbing state)."""
        path, s, absorbing = [int(start)], int(start), self.absorbing()
        for _ in range(steps):
            if absorbing[s]:
                break
            s = int(rng.choice(self.n_states, p=self.P[s]))
            path.append(s)
        return path


class MRP(MarkovChain):
    """A Markov reward process (S, P, R, gamma).

    ``R`` is (S,), the expected reward on leaving ``s``, or (S, S), a reward on each transition.
    ``initial`` (S,) is the start distribution for sampling (default: uniform on non-terminal states).
    """

    def __init__(self, P, R, gamma: float, states: Sequence[str] | None = None, initial=None):
        super().__init__(P, states)
        R = _numeric(R, "R")
        S = self.n_states
        if R.shape == (S,):
            self.R_next = np.repeat(R[:, None], S, axis=1)
        elif R.shape == (S, S):
            self.R_next = R.copy()
        else:
            raise MDPError(f"R must have shape ({S},) or ({S}, {S}), got {R.shape}")
        if not np.all(np.isfinite(self.R_next)):
            raise MDPError("R has non-finite entries")
        self.R = (self.P * self.R_next).sum(axis=1)  # (S,)
        self.gamma = check_gamma(gamma)
        self.terminal = self.absorbing() & np.isclose(self.R, 0.0, atol=ATOL)
        self.initial = _initial(initial, self.terminal)
        if self.gamma == 1.0:
            ends = _reaches(self.P * ~np.eye(S, dtype=bool), self.terminal)
            if not ends.all():
                bad = self.states[int(np.argmin(ends))]
                raise MDPError(f"gamma = 1 needs every episode to end, but state '{bad}' never reaches a "
                               "terminal (absorbing, zero-reward) state; use gamma < 1")

    def values(self) -> np.ndarray:
        """Exact ``v = (I - gamma P)^-1 R`` (S,) (Bellman expectation equation as a linear system).

        The terminal states are fixed at exactly 0 (solved with the others they came out as round-off,
        +-1e-17, whose sign a test could read) and the system is solved on the others, where
        ``I - gamma P_NN`` is invertible: for gamma < 1 always, for gamma = 1 because absorption is
        certain (checked in ``__init__``).
        """
        S, g = self.n_states, self.gamma
        keep = ~self.terminal
        v = np.zeros(S)
        A = np.eye(int(keep.sum())) - g * self.P[np.ix_(keep, keep)]
        v[keep] = np.linalg.solve(A, self.R[keep])
        return v

    def step(self, s: int, rng: np.random.Generator) -> tuple[float, int]:
        """Sample one transition: (reward, next state)."""
        s2 = int(rng.choice(self.n_states, p=self.P[s]))
        return float(self.R_next[s, s2]), s2


def _initial(initial, terminal: np.ndarray) -> np.ndarray:
    S = terminal.shape[0]
    if initial is None:
        mu = (~terminal).astype(np.float64) if (~terminal).any() else np.ones(S)
        return mu / mu.sum()
    if isinstance(initial, (int, np.integer)):
        if not 0 <= int(initial) < S:
            raise MDPError(f"initial state {initial} out of range [0, {S})")
        mu = np.zeros(S)
        mu[int(initial)] = 1.0
        return mu
    mu = _array(initial, "initial", 1)
    if mu.shape != (S,):
        raise MDPError(f"initial must have shape ({S},), got {mu.shape}")
    check_stochastic(mu, "initial")
    return mu


class MDP:
    """A finite MDP (S, A, P, R, gamma) with an availability mask.

    Shapes: ``P`` (S, A, S); ``R`` (S, A) or (S, A, S); ``mask`` (S, A) bool (default all True);
    ``initial`` (S,) start distribution, a start state index, or None (uniform on non-terminal states).
    Unavailable actions must still have a valid row in ``P`` (use a self-loop); they never enter a max.
    """

    def __init__(self, P, R, gamma: float, states: Sequence[str] | None = None,
                 actions: Sequence[str] | None = None, mask=None, initial=None):
        self.P = _array(P, "P", 3)
        S, A, S2 = self.P.shape
        if S != S2:
            raise MDPError(f"P must have shape (S, A, S), got {self.P.shape}")
        check_stochastic(self.P, "P")
        R = _numeric(R, "R")
        if R.shape == (S, A):
            self.R_next = np.repeat(R[:, :, None], S, axis=2)
        elif R.shape == (S, A, S):
            self.R_next = R.copy()
        else:
            raise MDPError(f"R must have shape ({S}, {A}) or ({S}, {A}, {S}), got {R.shape}")
        if not np.all(np.isfinite(self.R_next)):
            raise MDPError("R has non-finite entries")
        self.R = (self.P * self.R_next).sum(axis=2)  # (S, A) expected reward
        self.gamma = check_gamma(gamma)
        self.states = _names(states, S, "s", "state")
        self.actions = _names(actions, A, "a", "action")
        self.mask = np.ones((S, A), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if self.mask.shape != (S, A):
            raise MDPError(f"mask must have shape ({S}, {A}), got {self.mask.shape}")
        if not self.mask.any(axis=1).all():
            raise MDPError(f"state '{self.states[int(np.argmin(self.mask.any(axis=1)))]}' has no available action")
        stay = np.isclose(self.P[np.arange(S), :, np.arange(S)], 1.0, atol=ATOL, rtol=0)  # (S, A)
        self.terminal = np.all((stay & np.isclose(self.R, 0.0, atol=ATOL)) | ~self.mask, axis=1)
        self.initial = _initial(initial, self.terminal)
        if self.gamma == 1.0:
            self._check_undiscounted()

    @property
    def n_states(self) -> int:
        return self.P.shape[0]

    @property
    def n_actions(self) -> int:
        return self.P.shape[1]

    def with_gamma(self, gamma: float) -> MDP:
        return MDP(self.P, self.R_next, gamma, self.states, self.actions, self.mask, self.initial)

    def _check_undiscounted(self, max_sweeps: int = 5000) -> None:
        """gamma = 1: certify the stochastic-shortest-path conditions or raise ``MDPError``.

        1. Some policy ends from every state: backward reachability of the terminal set through
           available actions.
        2. Every policy that never ends collects reward -> -inf. ``C`` = the largest set of
           non-terminal states in which some available action keeps all its mass inside ``C``
           (the only places a never-ending policy can stay forever). Let ``u_k(s)`` be the best
           ``k``-step reward among policies confined to ``C`` (``u_0 = 0``, one Bellman sweep per
           ``k``). If ``max_s u_k(s) = -d < 0`` for some ``k`` then every confined policy earns at most
           ``-m d`` in ``m k`` steps (``u_{a+b} <= u_a + max u_b``), so its value is -inf. If no such
           ``k <= max_sweeps`` exists we refuse (conservatively; e.g. a zero-reward loop).
        """
        S = self.n_states
        edges = np.any(self.P * self.mask[:, :, None] > 0, axis=1) & ~np.eye(S, dtype=bool)
        ends = _reaches(edges, self.terminal)
        if not ends.all():
            bad = self.states[int(np.argmin(ends))]
            raise MDPError(f"gamma = 1 needs episodes to end, but no policy leads from state '{bad}' to a "
                           "terminal (absorbing, zero-reward) state; use gamma < 1")
        C = ~self.terminal
        while True:
            keeps = self.mask & (self.P[:, :, ~C].sum(axis=2) <= ATOL)  # (S, A) stays inside C
            newC = C & keeps.any(axis=1)
            if np.array_equal(newC, C):
                break
            C = newC
        if not C.any():
            return  # every policy ends with probability 1
        idx = np.flatnonzero(C)
        Pc = self.P[np.ix_(idx, np.arange(self.n_actions), idx)]  # (C, A, C)
        Rc = np.where(keeps[idx], self.R[idx], -np.inf)  # (C, A)
        u = np.zeros(len(idx))
        for _ in range(max_sweeps):
            u = np.max(Rc + Pc @ u, axis=1)
            if u.max() < 0:
                return
        bad = self.states[int(idx[np.argmax(u)])]
        raise MDPError(f"gamma = 1 is undefined here: a policy can loop forever from state '{bad}' without "
                       "losing reward; use gamma < 1")

    def policy_matrix(self, policy) -> np.ndarray:
        """``pi[s, a]`` (S, A) from (S,) action indices or an (S, A) matrix, validated."""
        S, A = self.n_states, self.n_actions
        arr = np.asarray(policy)
        if arr.shape == (S,):
            if not np.issubdtype(arr.dtype, np.integer):
                if not np.all(np.equal(np.mod(arr, 1), 0)):
                    raise MDPError("a deterministic policy must hold integer action indices")
                arr = arr.astype(np.int64)
            if arr.min() < 0 or arr.max() >= A:
                raise MDPError(f"policy actions must be in [0, {A})")
            pi = np.zeros((S, A))
            pi[np.arange(S), arr] = 1.0
        elif arr.shape == (S, A):
            pi = _array(arr, "policy", 2)
            check_stochastic(pi, "policy")
        else:
            raise MDPError(f"policy must have shape ({S},) or ({S}, {A}), got {arr.shape}")
        bad = (pi > ATOL) & ~self.mask & ~self.terminal[:, None]
        if bad.any():
            s, a = (int(i) for i in np.argwhere(bad)[0])
            raise MDPError(f"policy uses unavailable action '{self.actions[a]}' in state '{self.states[s]}'")
        return pi

    def uniform_policy(self) -> np.ndarray:
        """The equiprobable random policy over available actions (S, A)."""
        pi = self.mask.astype(np.float64)
        return pi / pi.sum(axis=1, keepdims=True)

    def induced_mrp(self, policy) -> MRP:
        """The MRP a policy induces (the deck's policy evaluation slide):
        ``P^pi[s, s'] = sum_a pi(a|s) P(s'|s, a)``, ``R^pi[s] = sum_a pi(a|s) R(s, a)``."""
        pi = self.policy_matrix(policy)
        P_pi = np.einsum("sa,sat->st", pi, self.P)
        R_pi = np.einsum("sa,sa->s", pi, self.R)
        return MRP(P_pi, R_pi, self.gamma, self.states, initial=self.initial)

    def q_from_v(self, v) -> np.ndarray:
        """``q(s, a) = R(s, a) + gamma sum_s' P(s'|s, a) v(s')`` (S, A); unavailable actions are -inf."""
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (self.n_states,):
            raise MDPError(f"v must have shape ({self.n_states},), got {v.shape}")
        q = self.R + self.gamma * (self.P @ v)
        return np.where(self.mask, q, -np.inf)

    def step(self, s: int, a: int, rng: np.random.Generator) -> tuple[float, int, bool]:
        """Sample one transition: (reward, next state, next state is terminal)."""
        s2 = int(rng.choice(self.n_states, p=self.P[s, a]))
        return float(self.R_next[s, a, s2]), s2, bool(self.terminal[s2])
