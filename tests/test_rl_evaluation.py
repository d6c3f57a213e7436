"""Returns, episodes, iterative evaluation, Monte Carlo and TD(0) (hand-computed steps and convergence)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpolab.rl.envs import gridworld_4x4, random_walk, student_mrp
from dpolab.rl.mdp import MDP, MDPError
from dpolab.rl.policy_evaluation import (
    Episode,
    discounted_returns,
    exact_values,
    iterative_evaluation,
    mc_evaluation,
    mc_update,
    sample_episode,
    td0_evaluation,
    td0_update,
)


def test_discounted_returns_by_hand():
    """r = [1, 0, 2], gamma = 0.5: G_2 = 2, G_1 = 0 + 0.5 * 2 = 1, G_0 = 1 + 0.5 * 1 = 1.5."""
    np.testing.assert_allclose(discounted_returns([1, 0, 2], 0.5), [1.5, 1.0, 2.0])
    # gamma = 1: suffix sums; gamma = 0: the rewards themselves.
    np.testing.assert_allclose(discounted_returns([1, 0, 2], 1.0), [3, 2, 2])
    np.testing.assert_allclose(discounted_returns([1, 0, 2], 0.0), [1, 0, 2])


def test_deck_examples():
    """The deck's worked examples, gamma = 1, alpha = 0.1, V = 0 initially.
    MC: G_t = 1+0+0+0+0+0+1+1+0+0 = 3, New V(S0) = 0 + 0.1 * (3 - 0) = 0.3.
    TD: New V(S0) = 0 + 0.1 * (1 + 1 * 0 - 0) = 0.1."""
    rewards = [1, 0, 0, 0, 0, 0, 1, 1, 0, 0]
    ep = Episode(np.array([0] + list(range(1, 11))), np.zeros(10, dtype=int), np.array(rewards, float))
    V = np.zeros(11)
    mc_update(V, ep, gamma=1.0, alpha=0.1)
    assert V[0] == pytest.approx(0.3)
    V = np.zeros(11)
    delta = td0_update(V, 0, 1.0, 1, False, alpha=0.1, gamma=1.0)
    assert V[0] == pytest.approx(0.1) and delta == pytest.approx(1.0)


def test_first_vs_every_visit_by_hand():
    """Episode s0 -r=1-> s0 -r=2-> end(1), gamma = 1: returns G_0 = 3, G_1 = 2.
    First-visit sample mean: V(s0) = 3. Every-visit sample mean: (3 + 2) / 2 = 2.5.
    Constant alpha = 0.5, every visit: V = 0 + .5 * (3 - 0) = 1.5, then 1.5 + .5 * (2 - 1.5) = 1.75."""
    ep = Episode(np.array([0, 0, 1]), np.array([0, 0]), np.array([1.0, 2.0]))
    V, N = np.zeros(2), np.zeros(2)
    mc_update(V, ep, 1.0, None, N, first_visit=True)
    assert V[0] == 3.0 and N[0] == 1
    V, N = np.zeros(2), np.zeros(2)
    mc_update(V, ep, 1.0, None, N, first_visit=False)
    assert V[0] == 2.5 and N[0] == 2
    V = np.zeros(2)
    mc_update(V, ep, 1.0, 0.5, first_visit=False)
    assert V[0] == 1.75


def test_td0_terminal_bootstraps_zero():
    V = np.array([0.0, 5.0])
    td0_update(V, 0, 1.0, 1, True, alpha=1.0, gamma=1.0)
    assert V[0] == 1.0  # V(terminal) treated as 0 even though the array holds 5


def test_sample_episode_structure():
    rng = np.random.default_rng(0)
    ep = sample_episode(random_walk(), rng)
    assert ep.states[0] == 2  # starts at C
    assert ep.states[-1] in (5, 6) and len(ep.rewards) == len(ep.states) - 1 == len(ep.actions)
    assert ep.rewards.sum() == (1.0 if ep.states[-1] == 6 else 0.0)
    g = gridworld_4x4()
    ep = sample_episode(g, rng, policy=g.uniform_policy(), max_steps=3)
    assert len(ep.rewards) <= 3 and np.all(ep.rewards == -1)
    with pytest.raises(MDPError, match="needs a policy"):
        sample_episode(g, rng)


def test_iterative_equals_linear_solve_on_textbook_examples():
    g = gridworld_4x4()
    v, sweeps = iterative_evaluation(g, g.uniform_policy(), tol=1e-6)
    np.testing.assert_allclose(v, exact_values(g, g.uniform_policy()), atol=1e-6)
    assert sweeps > 10
    m = student_mrp(0.9)
    np.testing.assert_allclose(iterative_evaluation(m, tol=1e-9)[0], m.values(), atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), S=st.integers(1, 5), A=st.integers(1, 3),
       gamma=st.floats(0.0, 0.95), tol=st.sampled_from([1e-3, 1e-6]))
def test_iterative_evaluation_property(seed, S, A, gamma, tol):
    """On random MDPs and random stochastic policies, iterative evaluation is within tol of the solve."""
    rng = np.random.default_rng(seed)
    mdp = MDP(rng.dirichlet(np.ones(S), size=(S, A)), rng.normal(size=(S, A)), gamma)
    pi = rng.dirichlet(np.ones(A), size=S)
    v, _ = iterative_evaluation(mdp, pi, tol=tol)
    assert np.max(np.abs(v - exact_values(mdp, pi))) < tol


def test_mc_and_td_converge_on_random_walk():
    """Sutton & Barto Example 6.2, seeded. Bounds: with 1000 episodes the sample-mean MC error is about
    sd(G) / sqrt(visits) ~ 0.5 / sqrt(1000) ~ 0.016 per state; constant-alpha TD(0) with alpha = 0.02
    fluctuates with a stationary RMS of order sqrt(alpha / 2) * 0.5 ~ 0.05. We require RMS < 0.06 for
    all and < 0.1 for the deck's constant-alpha MC (alpha = 0.02)."""
    w = random_walk()
    v = w.values()
    first = mc_evaluation(w, 1000, np.random.default_rng(1), v_true=v)
    every = mc_evaluation(w, 1000, np.random.default_rng(2), v_true=v, first_visit=False)
    const = mc_evaluation(w, 1000, np.random.default_rng(3), v_true=v, alpha=0.02)
    td = td0_evaluation(w, 1000, np.random.default_rng(4), alpha=0.02, v_true=v)
    for res in (first, every, td):
        assert res.rms[-1] < 0.06
        assert res.rms[-1] < res.rms[0] / 3  # it learned: far below the error after one episode
    assert const.rms[-1] < 0.1
    np.testing.assert_array_equal(td.V[5:], 0.0)  # terminal states stay at 0


def test_mc_on_mdp_with_policy():
    """Equiprobable policy on the 4x4 gridworld (gamma = 1): sample-mean MC from random starts
    approaches the S&B 4.1 values; returns have sd ~ 15, so the RMS bound is generous (3)."""
    g = gridworld_4x4()
    v = exact_values(g, g.uniform_policy())
    res = mc_evaluation(g, 300, np.random.default_rng(0), g.uniform_policy(), v_true=v)
    assert res.rms[-1] < 3.0 < res.rms[0]


def test_seeded_runs_are_reproducible():
    w = random_walk()
    a = td0_evaluation(w, 20, np.random.default_rng(7))
    b = td0_evaluation(w, 20, np.random.default_rng(7))
    np.testing.assert_array_equal(a.V, b.V)


def _chain3():
    """s0 -1-> s1 -1-> s2 -1-> end, deterministic, gamma = 1: v = 3, 2, 1, 0; episodes start in s0."""
    from dpolab.rl.mdp import MRP

    P = np.zeros((4, 4))
    P[0, 1] = P[1, 2] = P[2, 3] = P[3, 3] = 1.0
    return MRP(P, np.array([1.0, 1.0, 1.0, 0.0]), 1.0, initial=[1, 0, 0, 0])


def test_monte_carlo_leaves_out_episodes_cut_at_max_steps():
    """max_steps 2 cuts every episode after s0, s1: the partial sums 2, 1 are not returns (MC took
    them: V = 2, 1, where v = 3, 2). MC leaves them out; TD(0) (alpha 1) learns from their steps:
    episode 1 gives V(s0) = 1 + V(s1) = 1, V(s1) = 1 + V(s2) = 1; episode 2 V(s0) = 1 + 1 = 2;
    s2 is never left, so V(s2) stays 0."""
    m = _chain3()
    mc = mc_evaluation(m, 3, np.random.default_rng(0), max_steps=2)
    np.testing.assert_array_equal(mc.V, [0, 0, 0, 0])
    assert mc.cut == 3
    td = td0_evaluation(m, 3, np.random.default_rng(0), alpha=1.0, max_steps=2)
    np.testing.assert_array_equal(td.V, [2, 1, 0, 0])
    assert td.cut == 3
    full = mc_evaluation(m, 3, np.random.default_rng(0), max_steps=3)
    np.testing.assert_array_equal(full.V, [3, 2, 1, 0])
    assert full.cut == 0
    with pytest.raises(MDPError, match="complete episodes"):
        mc_update(np.zeros(4), sample_episode(m, np.random.default_rng(0), max_steps=2), 1.0, 0.5)
