"""Linear value-function approximation: features, update rules by hand, convergence to the theory's limits."""

from __future__ import annotations

import numpy as np
import pytest

from dpolab.rl.approx import (
    aggregation_features,
    gradient_mc,
    mc_fixed_point,
    on_policy_distribution,
    semi_gradient_td0,
    td_fixed_point,
)
from dpolab.rl.envs import jump_random_walk, random_walk
from dpolab.rl.mdp import MRP, MDPError


def test_aggregation_features():
    phi = aggregation_features(7, 2, terminal=np.array([0, 0, 0, 0, 0, 1, 1], bool))
    np.testing.assert_array_equal(phi, [[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 0], [0, 0]])
    with pytest.raises(MDPError, match="n_groups"):
        aggregation_features(3, 4)


def test_one_episode_updates_by_hand():
    """Deterministic chain s0 -> s1 -> end, rewards 1 then 2, gamma = 1, phi(s0) = [1, 1],
    phi(s1) = [0, 1], w0 = 0, alpha = 0.5.
    Gradient MC: G_0 = 3, G_1 = 2. t=0: w -= .5 (0 - 3) [1, 1] -> [1.5, 1.5];
                 t=1: phi(s1).w = 1.5, w -= .5 (1.5 - 2) [0, 1] -> [1.5, 1.75].
    Semi-gradient TD(0): t=0: target 1 + phi(s1).w = 1 + 0 = 1, w -= .5 (0 - 1) [1, 1] -> [.5, .5];
                 t=1: target 2 (terminal), phi(s1).w = .5, w -= .5 (.5 - 2) [0, 1] -> [.5, 1.25]."""
    mrp = MRP([[0, 1, 0], [0, 0, 1], [0, 0, 1]], [1, 2, 0], 1.0, initial=0)
    phi = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(gradient_mc(mrp, phi, 1, 0.5, rng), [1.5, 1.75])
    np.testing.assert_allclose(semi_gradient_td0(mrp, phi, 1, 0.5, rng), [0.5, 1.25])


def test_tabular_features_recover_exact_values():
    """With one-hot features per state both limits equal v_pi (no approximation error)."""
    w = random_walk()
    phi = aggregation_features(w.n_states, 5, w.terminal)
    v = w.values()[:5]
    np.testing.assert_allclose(mc_fixed_point(w, phi), v, atol=1e-12)
    np.testing.assert_allclose(td_fixed_point(w, phi), v, atol=1e-12)


def test_td_fixed_point_takes_terminal_values_as_zero_whatever_their_features():
    """A bias feature is 1 on the terminal states too; TD(0) bootstraps a terminal state as 0, so its
    fixed point is the exact linear fit here (v = position / 6: w = [0, 1]) and the learner gets there."""
    m = random_walk()  # A..E, then the two terminal states
    position = np.array([1, 2, 3, 4, 5, 0, 6], float) / 6
    phi = np.stack([np.ones(7), position], axis=1)
    np.testing.assert_allclose(td_fixed_point(m, phi), [0.0, 1.0], atol=1e-12)
    w = semi_gradient_td0(m, phi, 3000, lambda k: 0.05 / (1 + k / 200), np.random.default_rng(0))
    np.testing.assert_allclose(w, [0.0, 1.0], atol=0.1)


def test_on_policy_distribution_random_walk():
    """Example 6.2 from C: expected visits to A..E are 1/3, 2/3, 1, 2/3, 1/3 (total 3 steps), so
    mu = [1, 2, 3, 2, 1] / 9."""
    np.testing.assert_allclose(on_policy_distribution(random_walk())[:5], np.array([1, 2, 3, 2, 1]) / 9)


def test_state_aggregation_converges_to_theoretical_limits():
    """20-state jump walk (S&B Example 9.1 scaled down: jumps of 1..3), 4 groups of 5 states.
    Gradient MC -> the mu-weighted least-squares fit; semi-gradient TD(0) -> the TD fixed point. The two
    limits differ by more than 0.15 in some group, and each seeded run (1000 episodes, decaying
    steps) lands within 0.1 of its own limit (MC noise ~ sd(G)/sqrt(effective samples) ~ 0.05)."""
    m = jump_random_walk(20, 3)
    phi = aggregation_features(m.n_states, 4, m.terminal)
    w_mc, w_td = mc_fixed_point(m, phi), td_fixed_point(m, phi)
    assert np.max(np.abs(w_mc - w_td)) > 0.15
    wg = gradient_mc(m, phi, 1000, lambda k: 0.3 / (k + 1), np.random.default_rng(1))
    wt = semi_gradient_td0(m, phi, 1000, lambda k: 0.3 / (1 + k / 10), np.random.default_rng(2))
    assert np.max(np.abs(wg - w_mc)) < 0.1
    assert np.max(np.abs(wt - w_td)) < 0.1
    # The MC fit minimises the mu-weighted error, so it is no worse than the TD solution (S&B 9.4).
    mu, v = on_policy_distribution(m), m.values()
    err = lambda w: np.sqrt(np.sum(mu * (phi @ w - v) ** 2))  # noqa: E731
    assert err(w_mc) <= err(w_td)


def test_bad_features():
    with pytest.raises(MDPError, match="features"):
        gradient_mc(random_walk(), np.ones((3, 2)), 1, 0.1, np.random.default_rng(0))
