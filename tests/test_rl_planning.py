"""Bellman operators, policy iteration, value iteration, greedy policies and Q-learning."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpolab.rl.envs import QTABLE_GRID, gridworld_4x4, qtable_gridworld, student_mdp
from dpolab.rl.mdp import MDP, MDPError
from dpolab.rl.planning import (
    bellman_expectation,
    bellman_optimality,
    greedy_policy,
    policy_iteration,
    proper_policy,
    q_learning,
    solve,
    value_iteration,
)
from dpolab.rl.policy_evaluation import exact_values


def random_mdp(seed: int, S: int, A: int, gamma: float) -> MDP:
    rng = np.random.default_rng(seed)
    return MDP(rng.dirichlet(np.ones(S) * 0.5, size=(S, A)), rng.normal(size=(S, A)) * 3, gamma)


mdps = st.builds(random_mdp, st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(1, 3),
                 st.floats(0.0, 0.95))


@settings(max_examples=30, deadline=None)
@given(mdp=mdps, seed=st.integers(0, 1000))
def test_bellman_operators_are_gamma_contractions(mdp, seed):
    rng = np.random.default_rng(seed)
    u, w = rng.normal(size=mdp.n_states) * 10, rng.normal(size=mdp.n_states) * 10
    dist = np.max(np.abs(u - w))
    assert np.max(np.abs(bellman_optimality(mdp, u) - bellman_optimality(mdp, w))) <= mdp.gamma * dist + 1e-9
    pi = mdp.uniform_policy()
    assert np.max(np.abs(bellman_expectation(mdp, u, pi) - bellman_expectation(mdp, w, pi))) \
        <= mdp.gamma * dist + 1e-9


@settings(max_examples=30, deadline=None)
@given(mdp=mdps, tol=st.sampled_from([1e-2, 1e-5, 1e-8]))
def test_value_iteration_guarantees_and_agrees_with_policy_iteration(mdp, tol):
    vi, pi = value_iteration(mdp, tol=tol), policy_iteration(mdp)
    v_star = pi.values
    # policy iteration's fixed point satisfies the Bellman optimality equation
    np.testing.assert_allclose(bellman_optimality(mdp, v_star), v_star, atol=1e-9)
    # VI: Bellman residual under tol and within tol of v* (in fact tol/2)
    assert np.max(np.abs(bellman_optimality(mdp, vi.values) - vi.values)) < tol
    assert np.max(np.abs(vi.values - v_star)) < tol / 2 + 1e-12
    # VI's greedy policy is tol-optimal (Puterman Thm 6.3.1)
    assert np.max(np.abs(exact_values(mdp, vi.policy) - v_star)) < tol + 1e-12
    # PI's policy is optimal: its value is v*
    np.testing.assert_allclose(exact_values(mdp, pi.policy), v_star, atol=1e-9)


def test_bellman_expectation_by_hand():
    """One state s0 with a0 (reward 1, stay) and a1 (reward 3, to terminal s1); gamma = 0.5, v = [2, 0].
    q(s0) = [1 + .5 * 2, 3 + 0] = [2, 3]; pi = (.25, .75): T^pi v(s0) = .5 + 2.25 = 2.75; T v(s0) = 3."""
    P = np.zeros((2, 2, 2))
    P[0, 0, 0] = P[0, 1, 1] = 1.0
    P[1, :, 1] = 1.0
    mdp = MDP(P, [[1, 3], [0, 0]], 0.5)
    v = np.array([2.0, 0.0])
    np.testing.assert_allclose(bellman_expectation(mdp, v, [[0.25, 0.75], [1, 0]]), [2.75, 0])
    np.testing.assert_allclose(bellman_optimality(mdp, v), [3.0, 0.0])
    assert greedy_policy(mdp, v=v)[0] == 1


def test_student_mdp_optimal_values():
    """Silver, RL lecture 2: v*(Facebook) = 6, v*(Class1) = 6, v*(Class2) = 8, v*(Class3) = 10 (gamma = 1);
    optimal actions quit, study, study, study."""
    mdp = student_mdp()
    for method in ("policy-iteration", "value-iteration"):
        res = solve(mdp, method, tol=1e-10)
        np.testing.assert_allclose(res.values, [6, 6, 8, 10, 0], atol=1e-9)
        assert [mdp.actions[a] for a in res.policy[:4]] == ["quit", "study", "study", "study"]
    # q* from v*: q*(Class3, pub) = 1 + 0.2*6 + 0.4*8 + 0.4*10 = 9.4 (Silver's slide)
    assert mdp.q_from_v(res.values)[3, mdp.actions.index("pub")] == pytest.approx(9.4)


def test_gridworld_4x4_optimal():
    """Optimal values = -(Manhattan distance to the nearest terminal corner)."""
    res = value_iteration(gridworld_4x4(), tol=1e-10)
    rows, cols = np.divmod(np.arange(16), 4)
    dist = np.minimum(rows + cols, (3 - rows) + (3 - cols))
    np.testing.assert_allclose(res.values, -dist, atol=1e-9)


def test_gamma_zero_is_one_sweep():
    mdp = random_mdp(0, 4, 3, 0.0)
    res = value_iteration(mdp, tol=1e-12)
    assert res.iterations == 1
    np.testing.assert_allclose(res.values, mdp.R.max(axis=1))


def test_proper_policy_terminates():
    mdp = student_mdp()
    mdp.induced_mrp(proper_policy(mdp))  # raises if some state never ends under gamma = 1


def test_bad_arguments():
    with pytest.raises(MDPError, match="tol"):
        value_iteration(student_mdp(), tol=0)
    with pytest.raises(MDPError, match="unknown method"):
        solve(student_mdp(), "magic")
    with pytest.raises(MDPError, match="exactly one"):
        greedy_policy(student_mdp())


def test_qtable_gridworld_q_learning_agrees_with_value_iteration():
    """Our Q-table gridworld (docs/rl-foundations.md). Deterministic moves make tabular Q-learning with
    exploring starts converge to q*: seeded, 1000 episodes, alpha = 0.5, epsilon = 0.2 give
    max |max_a Q - v*| < 1e-3 on every non-terminal state, and the greedy policy from Q is optimal."""
    mdp = qtable_gridworld()
    vi = value_iteration(mdp, tol=1e-10)
    Q = q_learning(mdp, 1000, np.random.default_rng(0), alpha=0.5, epsilon=0.2, exploring_starts=True)
    live = ~mdp.terminal
    assert np.max(np.abs(Q.max(axis=1) - vi.values)[live]) < 1e-3
    np.testing.assert_allclose(exact_values(mdp, greedy_policy(mdp, q=Q)), vi.values, atol=1e-9)
    # The optimal route from S collects both power tiles: S right, down, right (P) ...
    s, path = mdp.states.index("0,0S"), []
    while not mdp.terminal[s]:
        s = int(np.argmax(mdp.P[s, vi.policy[s]]))
        path.append(mdp.states[s])
    assert path[-1].endswith("E") and sum(p.endswith("P") for p in path) == 2
    assert "".join(QTABLE_GRID).count("P") == 2


def test_q_learning_from_start_finds_optimal_start_value():
    """Without exploring starts Q-learning still learns the values along the route from S."""
    mdp = qtable_gridworld()
    v_star = value_iteration(mdp, tol=1e-10).values
    Q = q_learning(mdp, 600, np.random.default_rng(1), alpha=0.5, epsilon=0.2)
    start = int(np.argmax(mdp.initial))
    assert Q[start].max() == pytest.approx(v_star[start], abs=1e-3)


def test_q_learning_bootstraps_from_available_actions_only():
    """A masked action never enters the max. s0 -a0-> s1 (r = −1), s0 -a1-> T (r = −5); s1 has only a0,
    s1 -a0-> T (r = −1); a1 in s1 is unavailable (a zero-reward self-loop row). gamma = 0.5:
    q*(s1, a0) = −1, q*(s0, a0) = −1 + 0.5·(−1) = −1.5, q*(s0, a1) = −5. Deterministic moves and alpha = 1
    make each update exact; a max over all of Q(s1) would see the unavailable Q(s1, a1) = 0 and give
    q(s0, a0) = −1 + 0.5·0 = −1. The unavailable Q(s1, a1) is never explored, so it stays 0."""
    P = np.zeros((3, 2, 3))
    P[0, 0, 1] = P[0, 1, 2] = 1.0
    P[1, 0, 2] = P[1, 1, 1] = 1.0
    P[2, :, 2] = 1.0
    mdp = MDP(P, [[-1, -5], [-1, 0], [0, 0]], 0.5, mask=[[1, 1], [1, 0], [1, 1]], initial=0)
    assert not mdp.mask.all() and mdp.terminal.tolist() == [False, False, True]
    Q = q_learning(mdp, 50, np.random.default_rng(0), alpha=1.0, epsilon=0.3)
    np.testing.assert_allclose(Q[:2], [[-1.5, -5.0], [-1.0, 0.0]], rtol=0, atol=1e-12)
    assert greedy_policy(mdp, q=Q).tolist()[:2] == [0, 0]


def test_planning_arguments_are_checked():
    from dpolab.rl.envs import student_mdp
    from dpolab.rl.mdp import MDPError
    from dpolab.rl.planning import q_learning, value_iteration

    mdp = student_mdp()
    with pytest.raises(MDPError, match="tol must be positive"):
        value_iteration(mdp, tol=float("nan"))  # NaN compares false: one sweep would have "converged"
    for bad in ({"alpha": 0.0}, {"alpha": 1.5}, {"epsilon": -0.1}, {"max_steps": 0}):
        with pytest.raises(MDPError, match="q_learning needs"):
            q_learning(mdp, 1, np.random.default_rng(0), **bad)
    np.testing.assert_array_equal(q_learning(mdp, 20, 3), q_learning(mdp, 20, np.random.default_rng(3)))
