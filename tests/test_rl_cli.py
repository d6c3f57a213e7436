"""`dpolab rl solve` / `dpolab rl evaluate` through the real dispatcher (and once through a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpolab.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_solve_student_mdp_file_table(capsys):
    code, out, _ = run(capsys, "rl", "solve", "--mdp", str(ROOT / "examples" / "student_mdp.yaml"))
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[3:]}
    assert rows["Class3"] == ["10.0000", "study"] and rows["Facebook"] == ["6.0000", "quit"]
    assert rows["Sleep"] == ["0.0000", "-"]


@pytest.mark.parametrize("method", ["policy-iteration", "value-iteration"])
def test_solve_frozenlake_json(capsys, method):
    """Deterministic FrozenLake, gamma = 0.9: the goal is 6 moves from the start and the reward is 1 on
    entering it, so v*(0) = 0.9^5 = 0.59049 and v*(14) = 1."""
    code, out, _ = run(capsys, "rl", "solve", "--env", "FrozenLake-v1", "--gamma", "0.9", "--method", method,
                       "--env-kwargs", "is_slippery=false", "--json")
    assert code == 0
    obj = json.loads(out)
    assert len(obj["values"]) == len(obj["policy"]) == 16
    assert obj["values"][0] == pytest.approx(0.9 ** 5, abs=1e-6)
    assert obj["values"][14] == pytest.approx(1.0, abs=1e-6)
    assert obj["policy"][5] is None and obj["actions"][obj["policy"][14]] == "right"


def test_solve_slippery_frozenlake_methods_agree(capsys):
    outs = []
    for method in ("policy-iteration", "value-iteration"):
        code, out, _ = run(capsys, "rl", "solve", "--env", "FrozenLake-v1", "--gamma", "0.9",
                           "--method", method, "--json")
        outs.append(json.loads(out)["values"])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
    assert outs[0][14] > outs[0][0] > 0


def test_solve_with_config_file(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("env: gridworld-4x4\nmethod: value-iteration\njson: true\n")
    code, out, _ = run(capsys, "rl", "solve", "--config", str(cfg))
    assert code == 0 and json.loads(out)["values"][1] == pytest.approx(-1.0)


@pytest.mark.parametrize("argv, msg", [
    (["--env", "NoSuchEnv-v0"], "unknown environment"),
    (["--env", "FrozenLake-v1", "--gamma", "1.5"], "gamma must be in [0, 1]"),
    (["--env", "FrozenLake-v1", "--gamma", "1"], "use gamma < 1"),
    (["--env", "FrozenLake-v1", "--method", "magic"], "unknown value 'magic'"),
    ([], "exactly one of --env or --mdp"),
    (["--env", "student-mrp"], "Markov reward process"),
    (["--env", "FrozenLake-v1", "--env-kwargs", "colour=blue"], "bad keyword arguments"),
    (["--mdp", "missing.yaml"], "file not found"),
    (["--mdp", "missing.yaml", "--gamma", "2"], "--gamma must be in [0, 1], got 2"),  # the flag, not the file
    (["--mdp", "missing.yaml", "--env-kwargs", "a=1"], "--env-kwargs applies to Gymnasium environments"),
    (["--env", "FrozenLake-v1", "--env-kwargs", "map_name=9x9"], "FrozenLake-v1 refused them: KeyError"),
    (["--env", "FrozenLake-v1", "--env-kwargs", "map_name=["], "cannot read the value of 'map_name'"),
])
def test_solve_errors_are_one_line(capsys, argv, msg):
    code, out, err = run(capsys, "rl", "solve", *argv)
    assert code == 2 and msg in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_malformed_yaml_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gamma: 0.9\nstates: [a, b\n")
    code, _, err = run(capsys, "rl", "solve", "--mdp", str(bad))
    assert code == 2 and "malformed MDP file" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name, text, where, problem", [
    ("flow.yaml", "gamma: 0.9\nstates: [a, b]\ntransitions:\n  a:\n    go: {reward: 1, next: b\n  b: {}\n",
     ":6: ", "expected ',' or '}'"),
    ("tab.yaml", "gamma: 0.9\nstates: [a, b]\ntransitions:\n\ta: 1\n", ":4: ", "found character '\\t'"),
    ("bad.json", '{"gamma": 0.9,\n "states": [}\n', ":2: ", "Expecting value (column 13)"),
])
def test_a_syntax_error_in_an_mdp_file_names_its_line_and_problem(capsys, tmp_path, name, text, where, problem):
    """YAML's error kept only its first line ("while parsing a flow mapping"), without the line where the
    problem is or what it is."""
    path = tmp_path / name
    path.write_text(text)
    code, _, err = run(capsys, "rl", "solve", "--mdp", str(path))
    assert code == 2 and f"{path}{where}malformed MDP file" in err and problem in err, err
    assert len(err.strip().splitlines()) == 1


def test_an_mdp_path_that_is_a_folder_is_named_as_one(capsys, tmp_path):
    code, _, err = run(capsys, "rl", "solve", "--mdp", str(tmp_path))
    assert code == 2 and f"{tmp_path}: is a folder, not an MDP file" in err, err


def test_solve_json_gives_terminal_states_exactly_zero(capsys):
    """Policy evaluation solved the linear system over every state with gamma < 1, so FrozenLake 8x8's
    holes came out as +-1e-17 in --json; they are fixed at 0 as with gamma = 1."""
    code, out, _ = run(capsys, "rl", "solve", "--env", "FrozenLake-v1", "--env-kwargs", "map_name=8x8", "--json")
    obj = json.loads(out)
    holes = [s for s, a in enumerate(obj["policy"]) if a is None]
    assert code == 0 and len(holes) == 11 and all(obj["values"][s] == 0.0 for s in holes), holes


def test_evaluate_refuses_a_negative_seed_in_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "rl", "evaluate", "--seed", "-1", "--output", str(tmp_path / "o.png"))
    assert code == 2 and "--seed must be >= 0, got -1" in err and "Traceback" not in err, err


def test_solve_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["rl", "solve", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for flag in ("--env", "--mdp", "--env-kwargs", "--gamma", "--method", "--tol", "--json", "--config"):
        assert flag in out


def test_evaluate_writes_png_and_json(capsys, tmp_path):
    png = tmp_path / "new" / "curves.png"  # its folder is made, as a run's output folder is
    code, out, _ = run(capsys, "rl", "evaluate", "--env", "random-walk", "--episodes", "50", "--runs", "2",
                       "--output", str(png), "--json")
    assert code == 0
    obj = json.loads(out)
    np.testing.assert_allclose(obj["exact"][:5], np.arange(1, 6) / 6)
    assert set(obj["final_rms"]) == {"MC first-visit", "MC every-visit", "TD(0)"}
    assert all(0 < r < 0.3 for r in obj["final_rms"].values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_mdp_table(capsys, tmp_path):
    code, out, _ = run(capsys, "rl", "evaluate", "--env", "student-mdp", "--policy", "optimal",
                       "--episodes", "20", "--runs", "1", "--output", str(tmp_path / "s.png"))
    assert code == 0 and "Class3" in out and "learning curves written" in out


def test_mdp_file_with_a_misspelt_transition_key_is_refused(capsys, tmp_path):
    bad = tmp_path / "typo.yaml"  # 'rewrd' would otherwise be solved as reward 0
    bad.write_text("gamma: 0.9\nstates: [a, b]\nactions: [go]\ntransitions:\n  a: {go: {rewrd: 5, next: b}}\n")
    code, _, err = run(capsys, "rl", "solve", "--mdp", str(bad))
    assert code == 2 and "state 'a' action 'go': unknown key(s) ['rewrd']; expected reward and next" in err


def test_mdp_file_gamma_true_is_not_a_discount_of_one(capsys, tmp_path):
    bad = tmp_path / "bool.yaml"
    bad.write_text("gamma: true\nstates: [a, b]\ntransitions:\n  a: {go: {reward: 1, next: b}}\n")
    code, _, err = run(capsys, "rl", "solve", "--mdp", str(bad))
    assert code == 2 and f"{bad}: gamma must be a number, got True" in err


def test_mdp_file_states_named_by_numbers(capsys, tmp_path):
    mdp = tmp_path / "numbers.yaml"
    mdp.write_text("gamma: 0.5\nstates: [1, 2]\ntransitions:\n  1: {go: {reward: 2, next: 2}}\n")
    code, out, _ = run(capsys, "rl", "solve", "--mdp", str(mdp), "--json")
    assert code == 0 and json.loads(out)["values"] == [2.0, 0.0]


def test_mdp_file_states_named_on_off_or_by_decimals_keep_their_names(capsys, tmp_path):
    """YAML 1.1 reads on/off/yes/no as booleans: an MDP file keeps them as the names written (only
    true/false are booleans there), and a decimal name in 'states' names a 'next' state too."""
    mdp = tmp_path / "onoff.yaml"
    mdp.write_text("gamma: 0.9\nstates: [on, off, done]\ntransitions:\n  on:\n    toggle: {reward: 1, next: off}\n"
                   "    stop: {reward: 0, next: done}\n  off:\n    toggle: {reward: -1, next: on}\n")
    code, out, err = run(capsys, "rl", "solve", "--mdp", str(mdp), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["states"] == ["on", "off", "done"], result
    # v(on) = 1 + 0.9 v(off), v(off) = -1 + 0.9 v(on) -> v(on) = 0.1/0.19
    assert result["values"][0] == pytest.approx(0.1 / 0.19) and result["values"][1] == pytest.approx(-0.1 / 0.19)
    mdp.write_text("gamma: 0.5\nstates: [1.5, 2]\ntransitions:\n  2: {go: {reward: 1, next: 1.5}}\n")
    code, out, err = run(capsys, "rl", "solve", "--mdp", str(mdp), "--json")
    assert code == 0 and json.loads(out)["values"] == [0.0, 1.0], err


def test_evaluate_refuses_an_output_that_is_not_a_png_before_running(capsys, tmp_path):
    for name in ("x.txt", "noext", ".png"):
        code, _, err = run(capsys, "rl", "evaluate", "--episodes", "2000", "--output", str(tmp_path / name))
        assert code == 2 and "give a file name ending in .png" in err, name
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run(capsys, "rl", "evaluate", "--output", str(afile / "c.png"))
    assert code == 2 and "is a file, not a folder" in err


def test_evaluate_takes_an_mdp_file_instead_of_the_default_env_but_not_with_an_explicit_one(capsys, tmp_path):
    mdp = tmp_path / "m.yaml"
    mdp.write_text("gamma: 0.5\nstates: [a, b]\ntransitions:\n  a: {go: {reward: 2, next: b}}\n")
    common = ("--episodes", "5", "--runs", "1", "--output", str(tmp_path / "m.png"), "--json")
    code, out, _ = run(capsys, "rl", "evaluate", "--mdp", str(mdp), *common)
    assert code == 0 and json.loads(out)
    code, _, err = run(capsys, "rl", "evaluate", "--env", "random-walk", "--mdp", str(mdp), *common)
    assert code == 2 and "give exactly one of --env or --mdp" in err


def test_evaluate_bad_alpha(capsys, tmp_path):
    code, _, err = run(capsys, "rl", "evaluate", "--td-alpha", "2", "--output", str(tmp_path / "x.png"))
    assert code == 2 and "--td-alpha" in err


def test_subprocess_json():
    proc = subprocess.run([sys.executable, "-m", "dpolab", "rl", "solve", "--env", "student-mdp", "--json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert obj["values"] == pytest.approx([6, 6, 8, 10, 0], abs=1e-9)
    assert obj["policy"][:4] == [1, 2, 2, 2] and obj["policy"][4] is None


def test_solve_prints_gamma_unrounded(capsys):
    code, out, _ = run(capsys, "rl", "solve", "--env", "FrozenLake-v1", "--gamma", "0.9999999",
                       "--method", "value-iteration")
    assert code == 0 and out.startswith("value-iteration (gamma = 0.9999999,")  # :g showed 1, refused here
    code, out, _ = run(capsys, "rl", "solve", "--env", "student-mdp")
    assert out.startswith("policy-iteration (gamma = 1,")


def test_evaluate_says_how_many_episodes_were_cut(capsys, tmp_path):
    """student-mrp cut at 2 steps: most episodes are cut; Monte Carlo leaves them out, and says so."""
    code, out, err = run(capsys, "rl", "evaluate", "--env", "student-mrp", "--max-steps", "2", "--episodes", "50",
                         "--runs", "2", "--output", str(tmp_path / "c.png"), "--json")
    assert code == 0
    cut = json.loads(out)["cut_episodes"]
    assert set(cut) == {"MC first-visit", "MC every-visit", "TD(0)"} and all(0 < n <= 100 for n in cut.values())
    assert "episodes cut at --max-steps 2, of 100: MC first-visit " in err and "raise --max-steps" in err
    code, out, err = run(capsys, "rl", "evaluate", "--env", "random-walk", "--episodes", "5", "--runs", "1",
                         "--output", str(tmp_path / "d.png"), "--json")
    assert code == 0 and err == "" and set(json.loads(out)["cut_episodes"].values()) == {0}


def test_rl_refuses_a_thread_count_torch_cannot_take(capsys, tmp_path):
    code, _, err = run(capsys, "rl", "ppo", "--threads", "1000000000000", "--output-dir", str(tmp_path / "r"))
    assert code == 2 and "--threads must be at most 4096" in err and not (tmp_path / "r").exists(), err


def test_plots_leave_the_users_matplotlib_backend_alone(tmp_path):
    """A notebook's or script's pyplot backend is not switched to Agg by a plot dpolab writes (it was:
    `matplotlib.use("Agg")` in every plotting path), and pyplot is not imported for it."""
    code = f"""
import sys, matplotlib
matplotlib.use("svg")
from dpolab.cli import main
from dpolab.commands.evaluate import write_plot
assert main(["rl", "evaluate", "--env", "random-walk", "--episodes", "5", "--runs", "1",
             "--output", {str(tmp_path / 'c.png')!r}]) == 0
m = dict(label="a", kl=0.5, reward=1.0, kl_ci90=[0.4, 0.6], kl_sem=None, reward_ci90=None, reward_sem=0.1)
write_plot({str(tmp_path / 'f.png')!r}, dict(models=[m, dict(m, label="b", kl=1.0)], reference="ref",
                                             prompts=2, num_samples=1))
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["svg", "False"]
    for name in ("c.png", "f.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_buffers_beyond_the_machines_memory_are_refused_before_any_work(capsys, tmp_path):
    """--episodes 1e12 or --n-steps 1e12 ended in numpy's or torch's allocation traceback (rl ppo after
    its run folder and config.yaml were written)."""
    code, _, err = run(capsys, "rl", "evaluate", "--env", "random-walk", "--episodes", "1000000000000",
                       "--output", str(tmp_path / "c.png"))
    assert code == 2 and "the learning curves of --episodes 1000000000000 would take 44,703.5 GiB" in err
    for algo in ("ppo", "a2c"):
        out = tmp_path / algo
        code, _, err = run(capsys, "rl", algo, "--env", "CartPole-v1", "--n-envs", "2", "--n-steps", "1000000000000",
                           "--output-dir", str(out))
        assert code == 2 and "a rollout of --n-steps 1000000000000 x --n-envs 2 steps would take" in err, err
        assert "Traceback" not in err and not out.exists()
