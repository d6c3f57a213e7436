"""Markov chain / MRP / MDP types: validation, exact values against published oracles, file and
Gymnasium construction."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from dpolab.errors import DpolabError
from dpolab.rl.envs import (
    from_gymnasium,
    gridworld_4x4,
    jump_random_walk,
    load_mdp_file,
    make_model,
    parse_env_kwargs,
    random_walk,
    student_mdp,
    student_mrp,
)
from dpolab.rl.mdp import MDP, MRP, MarkovChain, MDPError


def test_student_mrp_matches_silver_lecture2():
    """Silver, RL lecture 2, slide 'Example: State-Value Function for Student MRP (2)', gamma = 0.9."""
    mrp = student_mrp(0.9)
    v = dict(zip(mrp.states, mrp.values()))
    oracle = {"Class1": -5.013, "Class2": 0.943, "Class3": 4.087, "Pass": 10.0, "Pub": 1.908,
              "Facebook": -7.638, "Sleep": 0.0}
    for s, want in oracle.items():
        assert v[s] == pytest.approx(want, abs=1e-3), s


def test_student_mrp_gamma_limits():
    """gamma = 0: v = R. gamma = 1: absorption is certain, so the undiscounted values exist
    (Silver's slide: v(Class1) = -13, v(Class2) = 1.5, v(Class3) = 4.3, v(Pub) = 0.8, v(FB) = -23)."""
    m0 = student_mrp(0.0)
    np.testing.assert_allclose(m0.values(), m0.R)
    v1 = dict(zip(student_mrp(1.0).states, student_mrp(1.0).values()))
    for s, want in {"Class1": -12.54, "Class2": 1.46, "Class3": 4.32, "Pub": 0.8, "Facebook": -22.54}.items():
        assert v1[s] == pytest.approx(want, abs=0.1)  # the slide rounds to -13, 1.5, 4.3, 0.8, -23


def test_hand_computed_two_state_mrp():
    """s0 -> s1 w.p. 1 with reward 1; s1 absorbing with reward 2 each step; gamma = 0.5:
    v(s1) = 2 / (1 - 0.5) = 4; v(s0) = 1 + 0.5 * 4 = 3."""
    mrp = MRP([[0, 1], [0, 1]], [1, 2], 0.5)
    np.testing.assert_allclose(mrp.values(), [3.0, 4.0])
    assert not mrp.terminal.any()  # absorbing but rewarding: not terminal


def test_next_state_rewards_are_averaged():
    """R[s, s'] form: from s0, 0.25 -> s0 (reward 4), 0.75 -> s1 (reward 0): R(s0) = 1."""
    mrp = MRP([[0.25, 0.75], [0, 1]], [[4, 0], [0, 0]], 0.9)
    np.testing.assert_allclose(mrp.R, [1.0, 0.0])


@pytest.mark.parametrize("P, msg", [
    ([[0.5, 0.4], [0, 1]], "sums to 0.9"),
    ([[1.5, -0.5], [0, 1]], "negative probability"),
    ([[1, 0, 0], [0, 1, 0]], "square"),
    ([1, 0], "2 dimensions"),
    ([[np.nan, 1], [0, 1]], "non-finite"),
])
def test_markov_chain_validation(P, msg):
    with pytest.raises(DpolabError, match=msg):
        MarkovChain(P)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, "x"])
def test_gamma_out_of_range(gamma):
    with pytest.raises(DpolabError, match="gamma"):
        MRP([[1.0]], [0.0], gamma)


def test_mismatched_shapes():
    with pytest.raises(MDPError, match="R must have shape"):
        MRP(np.eye(2), [1, 2, 3], 0.9)
    with pytest.raises(MDPError, match="R must have shape"):
        MDP(np.ones((2, 3, 2)) / 2, np.zeros((2, 2)), 0.9)
    with pytest.raises(MDPError, match=r"\(S, A, S\)"):
        MDP(np.ones((2, 3, 4)) / 4, np.zeros((2, 3)), 0.9)
    with pytest.raises(MDPError, match="names"):
        MarkovChain(np.eye(2), states=["a"])


def test_gamma_one_requires_termination():
    # MRP: a two-state loop never ends.
    with pytest.raises(MDPError, match="never reaches a terminal"):
        MRP([[0, 1, 0], [1, 0, 0], [0, 0, 1]], [-1, -1, 0], 1.0)
    MRP([[0, 1, 0], [1, 0, 0], [0, 0, 1]], [-1, -1, 0], 0.9)  # fine with discounting
    # MDP: a zero-reward loop is refused, a costly loop (Student MDP's Facebook) is accepted.
    P = np.zeros((2, 2, 2))
    P[0, 0, 0] = P[0, 1, 1] = 1.0  # stay or go to the terminal state 1
    P[1, :, 1] = 1.0
    with pytest.raises(MDPError, match="loop forever"):
        MDP(P, [[0.0, 1.0], [0.0, 0.0]], 1.0)
    assert MDP(P, [[-1.0, 1.0], [0.0, 0.0]], 1.0).terminal.tolist() == [False, True]
    with pytest.raises(MDPError, match="no policy leads"):
        MDP(np.stack([np.eye(2), np.eye(2)], axis=1), -np.ones((2, 2)), 1.0)


def test_gridworld_4x4_random_policy_sutton_barto_4_1():
    """Sutton & Barto Example 4.1 (Figure 4.1, k = infinity)."""
    g = gridworld_4x4()
    v = g.induced_mrp(g.uniform_policy()).values()
    expected = [0, -14, -20, -22, -14, -18, -20, -20, -20, -20, -18, -14, -22, -20, -14, 0]
    np.testing.assert_allclose(v, expected, atol=1e-9)


def test_random_walk_true_values():
    """Sutton & Barto Example 6.2: v(A..E) = 1/6 .. 5/6."""
    np.testing.assert_allclose(random_walk().values()[:5], np.arange(1, 6) / 6, atol=1e-12)
    # Example 9.1 shape: antisymmetric values, -1 .. +1.
    v = jump_random_walk(20, 3).values()[:20]
    np.testing.assert_allclose(v, -v[::-1], atol=1e-12)
    assert -1 < v[0] < 0 < v[-1] < 1


def test_induced_mrp_and_q_from_v_by_hand():
    """Two states, two actions, gamma = 0.5. a0: stay, reward 1; a1: move to the other state, reward 0.
    pi = 50/50 in both states: P^pi = [[.5, .5], [.5, .5]], R^pi = [.5, .5], v = .5 / (1 - .5) = 1.
    q(s, a0) = 1 + .5 * 1 = 1.5, q(s, a1) = 0 + .5 * 1 = 0.5."""
    P = np.zeros((2, 2, 2))
    P[0, 0, 0] = P[1, 0, 1] = P[0, 1, 1] = P[1, 1, 0] = 1.0
    mdp = MDP(P, [[1, 0], [1, 0]], 0.5)
    mrp = mdp.induced_mrp(np.full((2, 2), 0.5))
    np.testing.assert_allclose(mrp.P, 0.5)
    np.testing.assert_allclose(mrp.R, 0.5)
    np.testing.assert_allclose(mrp.values(), [1.0, 1.0])
    np.testing.assert_allclose(mdp.q_from_v(mrp.values()), [[1.5, 0.5], [1.5, 0.5]])


def test_policy_validation():
    mdp = student_mdp()
    with pytest.raises(MDPError, match="unavailable action 'pub' in state 'Facebook'"):
        mdp.policy_matrix([4, 2, 2, 2, 0])
    with pytest.raises(MDPError, match="shape"):
        mdp.policy_matrix([0, 1])
    with pytest.raises(MDPError, match="sums to"):
        mdp.policy_matrix(np.full((5, 5), 0.3))
    np.testing.assert_allclose(mdp.uniform_policy().sum(axis=1), 1.0)


def test_student_mdp_yaml_equals_builtin(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    a, b = load_mdp_file(root / "examples" / "student_mdp.yaml"), student_mdp()
    assert a.states == b.states and a.gamma == b.gamma == 1.0
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.P[a.mask], b.P[b.mask])
    np.testing.assert_allclose(a.R[a.mask], b.R[b.mask])
    # JSON works too, and gamma can be overridden.
    raw = {"gamma": 0.5, "states": ["x", "end"], "transitions": {"x": {"go": {"reward": 2, "next": "end"}}}}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(raw))
    m = load_mdp_file(path, gamma=0.9)
    assert m.gamma == 0.9 and m.terminal.tolist() == [False, True]


@pytest.mark.parametrize("text, msg", [
    ("gamma: 0.9\nstates: [a]\ntransitions: {a: {go: {next: {a: 0.5}}}}\n", "sum to 0.5"),
    ("gamma: 0.9\nstates: [a]\ntransitions: {a: {go: {next: b}}}\n", "unknown next state 'b'"),
    ("gamma: 0.9\nstates: [a]\n", "missing key 'transitions'"),
    ("gamma: 2\nstates: [a]\ntransitions: {a: {go: {next: a, reward: -1}}}\n", "gamma must be in"),
    ("gamma: 0.9\nstates: [a\ntransitions: {}\n", "malformed MDP file"),
    ("- just a list\n", "expected a mapping"),
    ("gamma: 0.9\nstates: [a]\ntransitions: {a: {go: {next: {a: -1, a2: 2}}}}\n", "unknown next state"),
    ("gamma: 0.9\nstates: [a]\ntransitoins: {}\n", "unknown key"),
])
def test_bad_mdp_files(tmp_path, text, msg):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DpolabError, match=msg):
        load_mdp_file(path)


def test_frozenlake_conversion():
    """FrozenLake 4x4 (slippery): holes 5, 7, 11, 12 and the goal 15 become absorbing, zero reward; the
    only reward is +1 on entering the goal. From cell 14 action 'right' (2) the table gives 1/3 each to
    14 (slip down, blocked), 15 (reward 1) and 10 (slip up): expected reward 1/3."""
    mdp = from_gymnasium("FrozenLake-v1", 0.9)
    assert mdp.n_states == 16 and mdp.actions == ("left", "down", "right", "up")
    assert np.flatnonzero(mdp.terminal).tolist() == [5, 7, 11, 12, 15]
    assert mdp.R[14, 2] == pytest.approx(1 / 3)
    assert mdp.initial[0] == 1.0
    det = from_gymnasium("FrozenLake-v1", 0.9, is_slippery=False)
    assert det.P[14, 2, 15] == 1.0


def test_taxi_gets_an_extra_terminal_state():
    mdp = from_gymnasium("Taxi-v4", 0.9)
    assert mdp.n_states == 501 and mdp.states[-1] == "terminal"
    assert np.flatnonzero(mdp.terminal).tolist() == [500]


@pytest.mark.parametrize("env, msg", [("NoSuchEnv-v0", "unknown environment"),
                                      ("CartPole-v1", "not a toy-text"), ("nope", "built-ins are")])
def test_unknown_environments(env, msg):
    with pytest.raises(DpolabError, match=msg):
        make_model(env)


def test_parse_env_kwargs():
    assert parse_env_kwargs("is_slippery=false, map_name=8x8") == {"is_slippery": False, "map_name": "8x8"}
    with pytest.raises(DpolabError, match="key=value"):
        parse_env_kwargs("is_slippery")


def test_sample_path_stops_in_absorbing_state():
    chain = MarkovChain([[0, 1, 0], [0, 0, 1], [0, 0, 1]])
    assert chain.sample(0, 10, np.random.default_rng(0)) == [0, 1, 2]


# A key given twice in an MDP file: YAML alone would keep the last without a word.
@pytest.mark.parametrize("text, msg", [
    ("gamma: 0.9\nstates: [a, b]\ntransitions:\n  a: {go: {reward: 1, next: b}}\n  a: {go: {reward: 5, next: b}}\n",
     "bad.yaml:5: transitions: state 'a' is given twice (first on line 4)"),
    ("gamma: 0.9\nstates: [a, b]\ntransitions:\n  a:\n    go:\n      reward: 1\n      next: b\n      next: a\n",
     "bad.yaml:8: state 'a' action 'go': 'next' is given twice (first on line 7)"),
    ("gamma: 0.9\nstates: [a, b]\ntransitions:\n  a:\n    go: {reward: 1, next: b}\n    go: {reward: 2, next: a}\n",
     "bad.yaml:6: state 'a': action 'go' is given twice (first on line 5)"),
    ("gamma: 0.9\nstates: [a, b]\ntransitions:\n  a: {go: {reward: 1, next: {b: 0.5, b: 0.5}}}\n",
     "bad.yaml:4: state 'a' action 'go': next state 'b' is given twice (first on line 4)"),
    ("gamma: 0.9\nstates: [a, b]\ngamma: 0.5\ntransitions: {a: {go: {reward: 1, next: b}}}\n",
     "bad.yaml:3: 'gamma' is given twice (first on line 1)"),
])
def test_mdp_file_key_given_twice(tmp_path, text, msg):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DpolabError, match="^" + re.escape(str(path.parent) + "/") + re.escape(msg) + "$"):
        load_mdp_file(path)


def test_mdp_json_file_key_given_twice(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"gamma": 0.9, "states": ["a", "b"],\n "transitions": {"a": {"go": {"reward": 1, "next": "b",\n'
                    ' "next": "a"}}}}')
    with pytest.raises(DpolabError, match=re.escape("bad.json:3: state 'a' action 'go': 'next' is given twice "
                                                    "(first on line 2)")):
        load_mdp_file(path)
    path.write_text('{\t"gamma": 0.9,\n\t"gamma": 0.5, "states": ["a"], "transitions": {}}')  # YAML can't: no line
    with pytest.raises(DpolabError, match="^" + re.escape(f"{path}: 'gamma' is given twice") + "$"):
        load_mdp_file(path)


@pytest.mark.parametrize("spec, msg", [
    ("{reward: true, next: b}", "state 'a' action 'go': reward must be a number, got True"),
    ("{reward: 1, next: {b: true}}", "state 'a' action 'go': probability of 'b' must be a number, got True"),
    ("{next: b}", "state 'a' action 'go': reward missing"),
    ("{reward: .nan, next: b}", "state 'a' action 'go': reward must be a finite number, got nan"),
    ("{reward: -.inf, next: b}", "state 'a' action 'go': reward must be a finite number, got -inf"),
    ("{reward: 1, next: {a: .nan, b: 0.5}}", "state 'a' action 'go': probability of 'a' must be a finite number"),
    ("{reward: 1, next: {b: .inf}}", "state 'a' action 'go': probability of 'b' must be a finite number"),
])
def test_mdp_file_rewards_and_probabilities_must_be_finite_numbers(tmp_path, spec, msg):
    path = tmp_path / "bad.yaml"
    path.write_text(f"gamma: 0.9\nstates: [a, b]\ntransitions:\n  a: {{go: {spec}}}\n")
    with pytest.raises(DpolabError, match=re.escape(msg)):
        load_mdp_file(path)


def test_mdp_json_file_nan_names_state_and_action(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"gamma": 0.9, "states": ["a", "b"], "transitions": {"a": {"go": {"reward": NaN, "next": "b"}}}}')
    with pytest.raises(DpolabError, match="state 'a' action 'go': reward must be a finite number"):
        load_mdp_file(path)


def test_non_numeric_rewards_are_an_mdp_error():
    with pytest.raises(MDPError, match="R must be numeric"):
        MRP(np.eye(2), ["x", "y"], 0.9)
    with pytest.raises(MDPError, match="R must be numeric"):
        MDP(np.ones((2, 1, 2)) / 2, [["x"], ["y"]], 0.9)
    with pytest.raises(MDPError, match="R must be numeric"):
        MDP(np.ones((2, 1, 2)) / 2, [[1.0], [1.0, 2.0]], 0.9)  # ragged


def test_env_kwargs_take_lists_and_check_is_slippery():
    assert parse_env_kwargs('desc=["SF","FG"], is_slippery=false') == {"desc": ["SF", "FG"], "is_slippery": False}
    assert parse_env_kwargs("desc=[SFF, FHF, FFG],map_name='a,b'") == {"desc": ["SFF", "FHF", "FFG"],
                                                                       "map_name": "a,b"}
    assert parse_env_kwargs("a='x'',y',b=\"p,\\\"q\",c=it's") == {"a": "x',y", "b": 'p,"q', "c": "it's"}
    mdp = make_model("FrozenLake-v1", env_kwargs='desc=["SF","FG"],is_slippery=false', gamma=0.9)
    assert mdp.n_states == 4 and mdp.P[2, 2, 3] == 1.0  # from 1,0 'right' reaches the goal
    with pytest.raises(DpolabError, match="^--env-kwargs: is_slippery must be true or false, got 'maybe'$"):
        parse_env_kwargs("is_slippery=maybe")
    with pytest.raises(DpolabError, match="'map_name' is given twice"):
        parse_env_kwargs("map_name=4x4,map_name=8x8")


def test_mdp_file_names_are_kept_as_written(tmp_path):
    """Names that YAML or JSON would read as numbers stay the text written (010, 0x1F, 2.50 and 12:30
    were the states 8, 31, 2.5 and 750); then 2.5 is not 2.50. A chain of rewards 1, gamma 0.5:
    v = 1 + 0.5 (1 + 0.5 (1 + 0.5 (1 + 0.5 * 1))) = 1.9375, 1.875, 1.75, 1.5, 1, 0."""
    path = tmp_path / "m.yaml"
    text = ("gamma: 0.5\nstates: [010, 0x1F, 12:30, 2.50, true, s]\ninitial: 0x1F\nactions: [1.0]\ntransitions:\n"
            "  010: {1.0: {reward: 1, next: 0x1F}}\n  0x1F: {1.0: {reward: 1, next: {12:30: 1}}}\n"
            "  12:30: {1.0: {reward: 1, next: 2.50}}\n  2.50: {1.0: {reward: 1, next: true}}\n"
            "  true: {1.0: {reward: 1, next: s}}\n")
    path.write_text(text)
    m = load_mdp_file(path)
    assert list(m.states) == ["010", "0x1F", "12:30", "2.50", "true", "s"] and list(m.actions) == ["1.0"]
    assert m.initial.tolist() == [0, 1, 0, 0, 0, 0]
    np.testing.assert_allclose(m.induced_mrp(m.uniform_policy()).values(), [1.9375, 1.875, 1.75, 1.5, 1, 0])
    path.write_text(text.replace("next: 2.50", "next: 2.5"))
    with pytest.raises(DpolabError, match="state '12:30' action '1.0': unknown next state '2.5'"):
        load_mdp_file(path)
    path.write_text(text.replace("  010: {1.0", "  8: {1.0"))  # 8 was 010's name
    with pytest.raises(DpolabError, match="transitions: unknown state '8'"):
        load_mdp_file(path)
    js = tmp_path / "m.json"
    js.write_text('{"gamma": 0.5, "states": [2.50, 1e2, "s"], "initial": 1e2, '
                  '"transitions": {"2.50": {"go": {"reward": 1, "next": 1e2}}, "1e2": {"go": {"reward": 1, "next": "s"}}}}')
    m = load_mdp_file(js)
    assert list(m.states) == ["2.50", "1e2", "s"] and m.initial.tolist() == [0, 1, 0] and m.gamma == 0.5
    np.testing.assert_allclose(m.induced_mrp(m.uniform_policy()).values(), [1.5, 1, 0])


def test_frozenlake_map_without_a_start_tile():
    """No 'S': gymnasium's start distribution is 0/0 (was 'initial has non-finite entries' after a
    NumPy RuntimeWarning). Sampling needs a start: refused, naming it; solving does not: map 'FG'
    not slippery, right from 0 enters the goal: v = 1, 0; policy right."""
    import warnings

    kw = dict(desc=["FG"], is_slippery=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(MDPError, match="no start distribution .*the map has no 'S' start tile"):
            from_gymnasium("FrozenLake-v1", 0.9, **kw)
        m = from_gymnasium("FrozenLake-v1", 0.9, need_start=False, **kw)
    from dpolab.rl.planning import policy_iteration

    res = policy_iteration(m)
    np.testing.assert_allclose(res.values, [1.0, 0.0])
    assert m.actions[int(res.policy[0])] == "right"
    with pytest.raises(MDPError, match="no 'S' start tile"):
        make_model("FrozenLake-v1", env_kwargs="desc=[FG],is_slippery=false")
