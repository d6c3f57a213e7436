"""`dpolab demo --quick` end to end: every artifact exists and is well-formed (the DPO, PPO, GRPO and
RLOO series and the best-of-N baseline), the verdict covers every method, and DPO, GRPO and RLOO
raise the ground-truth reward well above the base model's."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys

import pytest

from dpolab.cli import main

METHODS = {"DPO", "PPO", "GRPO", "RLOO", "best-of-N"}


HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    trackers = ["--report-to", "tensorboard"] if HAS_TENSORBOARD else []
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress", *trackers]) == 0
    return out


@pytest.fixture(scope="module")
def results(demo_dir):
    return json.loads((demo_dir / "results.json").read_text())


def test_demo_writes_every_artifact(demo_dir, results):
    for name in ("frontier.png", "curves.png", "samples.md", "results.csv", "results.json", "report.md"):
        path = demo_dir / name
        assert path.is_file() and path.stat().st_size > 0, name
    for png in ("frontier.png", "curves.png"):
        assert (demo_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["method"] for r in results["rows"]} == METHODS
    for r in results["rows"]:
        assert -1.0 <= r["reward"] <= 1.0 and r["kl"] == r["kl"]  # VADER range; KL not NaN
    with open(demo_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(results["rows"]) + 1 and rows[0]["method"] == "base"
    assert {r["method"] for r in rows[1:]} == METHODS
    report = (demo_dir / "report.md").read_text()
    assert results["verdict"]["text"] in report and "dpolab demo --quick" in report
    assert f"{results['base']['reward']:+.3f}" in report
    samples = (demo_dir / "samples.md").read_text()
    for name in ("**base**", "**DPO", "**PPO", "**GRPO", "**RLOO", f"**best-of-{max(results['config']['best_of_n'])}**"):
        assert name in samples, name
    bandit = results["bandit"]
    assert bandit["kl_star_dpo"] < 0.25 * bandit["kl_star_ref"]
    assert bandit["kl_star_ppo"] < 0.25 * bandit["kl_star_ref"]


def test_demo_grpo_and_rloo_series_are_complete(demo_dir, results):
    """One run per β, each with a checkpoint every eval_every/4 steps up to its last, all evaluated."""
    cfg = results["config"]
    every = max(1, cfg["eval_every"] // 4)
    for method, betas, steps in (("GRPO", "grpo_betas", "grpo_steps"), ("RLOO", "rloo_betas", "rloo_steps")):
        rows = [r for r in results["rows"] if r["method"] == method]
        assert sorted({r["value"] for r in rows}) == sorted(cfg[betas])
        for beta in cfg[betas]:
            run_steps = sorted(r["step"] for r in rows if r["value"] == beta)
            assert run_steps == list(range(every, cfg[steps], every)) + [cfg[steps]], (method, beta)
            assert (demo_dir / "work" / f"{method.lower()}-beta{beta:g}" / "final").is_dir()
        assert all(r["param"] == "beta" and r["kl_kind"] == "sampled" for r in rows)


def test_demo_best_of_n_rows(demo_dir, results):
    """One row per N at the bound log N − (N−1)/N; best-of-1 is the base model's evaluation sample
    itself, and the best of more draws (nested: the first N of max(N)) is never worse."""
    rows = [r for r in results["rows"] if r["method"] == "best-of-N"]
    assert [r["value"] for r in rows] == results["config"]["best_of_n"]
    for r in rows:
        assert r["kl"] == pytest.approx(math.log(r["value"]) - (r["value"] - 1) / r["value"], abs=1e-12)
        assert r["kl_kind"] == "bound" and r["step"] == 0 and r["param"] == "N"
    one = next(r for r in rows if r["value"] == 1)
    assert one["reward"] == pytest.approx(results["base"]["reward"], abs=1e-9)
    rewards = [r["reward"] for r in sorted(rows, key=lambda r: r["value"])]
    assert rewards == sorted(rewards) and rewards[-1] > rewards[0] + 0.2, rewards
    report = (demo_dir / "report.md").read_text()
    assert "(bound)" in report and "log N − (N−1)/N" in report


def test_demo_verdict_covers_every_method(demo_dir, results):
    verdict = results["verdict"]
    assert set(verdict["methods"]) == METHODS
    for m in METHODS:
        assert m in verdict["text"], m
        assert set(verdict["dominated_share"][m]) == METHODS - {m}
    assert verdict["text"].startswith(("DPO's frontier dominates", "PPO's frontier dominates", "Neither frontier"))
    assert sum(verdict["joint_frontier_points"].values()) >= 1
    report = (demo_dir / "report.md").read_text()
    assert "Best mean reward at bounded KL" in report and "Dominance between frontiers" in report
    for m in METHODS:  # a row per method in both tables, and in the table of final points
        assert report.count(f"| {m} |") >= 2 and f"| {m}" in report.split("### Best mean reward")[0], m


def test_demo_dpo_beats_base_at_bounded_kl(results):
    base = results["base"]["reward"]
    last = max(r["step"] for r in results["rows"] if r["method"] == "DPO")
    finals = [r for r in results["rows"] if r["method"] == "DPO" and r["step"] == last]
    best = max(finals, key=lambda r: r["reward"])
    assert best["reward"] > base + 0.2, (base, finals)
    assert best["kl"] < 25.0, best


@pytest.mark.parametrize("method", ["GRPO", "RLOO"])
def test_demo_critic_free_methods_beat_base(results, method):
    """Their best checkpoint, on the held-out prefixes (measured over seeds 0-2: +0.4 to +0.6 above the base)."""
    base = results["base"]["reward"]
    rows = [r for r in results["rows"] if r["method"] == method]
    best = max(rows, key=lambda r: r["reward"])
    assert best["reward"] > base + 0.25, (base, best)


def test_demo_refuses_to_overwrite_finished_run(demo_dir, capsys):
    assert main(["demo", "--quick", "--output-dir", str(demo_dir)]) == 2
    assert "already holds a finished demo" in capsys.readouterr().err


def test_demo_with_user_model_prompts_and_reward(tiny_model_dir, tmp_path):
    """--model, --prompts and --reward take the place of the built-in model, prefixes and VADER."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Review {i}: the movie"}) + "\n" for i in range(24)))
    reward = tmp_path / "length_reward.py"
    reward.write_text("def score(prompts, completions):\n    return [len(c) / 40.0 for c in completions]\n")
    out = tmp_path / "mine"
    args = ["demo", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--reward", f"{reward}:score",
            "--output-dir", str(out), "--no-progress", "--train-prompts", "32", "--eval-prompts", "10",
            "--samples-per-prompt", "4", "--max-new-tokens", "8", "--dpo-betas", "0.5", "--ppo-kl-coefs", "0.1",
            "--dpo-steps", "4", "--ppo-steps", "2", "--rm-steps", "4", "--eval-every", "4", "--quick",
            "--grpo-betas", "0", "--rloo-betas", "0.1", "--grpo-steps", "2", "--rloo-steps", "2",
            "--num-generations", "2", "--prompts-per-step", "4", "--best-of-n", "1,4"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["model"] == str(tiny_model_dir)
    assert {r["method"] for r in results["rows"]} == METHODS
    assert not (out / "work" / "pretrain").exists()  # the user's model was used, nothing pretrained
    report = (out / "report.md").read_text()
    assert f"--model {tiny_model_dir}" in report and f"--reward {reward}:score" in report and "--dpo-steps 4" in report
    assert "--grpo-betas 0 " in report and "--best-of-n 1,4" in report
    # 24 prompts: a fifth (4, not the 10 asked) held out, the other 20 (not 32) trained on; the
    # report, results.json and the reproduce command give the counts used
    assert len((out / "work" / "prompts.jsonl").read_text().splitlines()) == 20
    assert len((out / "work" / "eval_prompts.jsonl").read_text().splitlines()) == 4
    assert (results["config"]["train_prompts"], results["config"]["eval_prompts"]) == (20, 4)
    assert "samples per prefix, 20 prefixes;" in report and "Evaluation: 4 held-out prefixes" in report
    assert "--train-prompts 20 --eval-prompts 4" in report


def test_a_stage_stopped_by_a_signal_stops_the_demo(tmp_path, monkeypatch, capsys):
    """A stage's trainer stopped by SIGTERM returns {"stopped": True}: the demo went on to the next
    stage, which failed on the model the stopped one never wrote."""
    import dpolab.train.sft

    monkeypatch.setattr(dpolab.train.sft, "train", lambda cfg: {"stopped": True, "steps": 3})
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress", "--corpus-size", "50"]) == 2
    err = capsys.readouterr().err
    assert "stopped by a signal during the pretraining stage (at its step 3)" in err, err
    assert f"remove {out}" in err and "Traceback" not in err


def test_demo_rejects_bad_series_options(capsys):
    for flag, value, msg in (("--grpo-betas", "-0.1", "values >= 0"), ("--best-of-n", "0,4", "values >= 1"),
                             ("--num-generations", "1", ">= 2"), ("--layers", "0", "--layers must be >= 1, got 0"),
                             ("--pretrain-steps", "-1", "--pretrain-steps must be >= 1"),
                             ("--seed", "-2", "--seed must be >= 0"),
                             ("--hidden-size", "6", "--hidden-size must be a multiple of 4"),
                             ("--output-dir", "", "--output-dir is empty"),
                             ("--prompts", "missing.jsonl", "--prompts missing.jsonl: file not found")):
        assert main(["demo", "--quick", flag, value]) == 2
        assert msg in capsys.readouterr().err, flag


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'dpolab[tracking]')")
def test_report_to_logs_the_demo_and_every_stage(demo_dir, results):
    """--report-to tensorboard: the demo's own run holds the base reward, each method's best reward and
    the frontier and samples tables; every training stage's run directory has its own event files."""
    from test_trackers import _tensorboard_scalars

    tb = _tensorboard_scalars(demo_dir)
    assert tb["base/reward"] == [(0, pytest.approx(results["base"]["reward"], abs=1e-6))]
    for m in METHODS:
        best = max(r["reward"] for r in results["rows"] if r["method"] == m)
        assert tb[f"best_reward/{m}"] == [(0, pytest.approx(best, abs=1e-6))], m
    assert {"text:frontier", "text:samples"} <= {k.split("/")[0] for k in tb}, sorted(tb)
    for stage in ("pretrain", "rm", "dpo-beta0.1", "ppo-kl0.05", "grpo-beta0", "rloo-beta0.01"):
        assert any((demo_dir / "work" / stage / "tensorboard").rglob("events.out.tfevents.*")), stage


def test_demo_rejects_repeated_sweep_values(tmp_path, capsys):
    """Two runs of one value (or of values whose run folders, named with {value:g}, are the same)
    would meet at the second run's folder: refused before anything is written."""
    out = tmp_path / "run"
    for flag, value, msg in (("--dpo-betas", "0.1,0.1", "--dpo-betas gives the value 0.1 twice"),
                             ("--dpo-betas", "0.1,0.5,0.1000001", "--dpo-betas: 0.1 and 0.1000001 would share the "
                              "run folder work/dpo-beta0.1"),
                             ("--ppo-kl-coefs", "0.05,0.0500000001", "work/ppo-kl0.05"),
                             ("--grpo-betas", "0,0", "--grpo-betas gives the value 0 twice"),
                             ("--rloo-betas", "0.01,0.0100000002", "work/rloo-beta0.01"),
                             ("--best-of-n", "1,4,4", "--best-of-n gives the value 4 twice")):
        assert main(["demo", "--quick", flag, value, "--output-dir", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, (flag, value, err)
        assert not out.exists()


def test_demo_prompts_are_split_before_any_stage(tmp_path):
    """read_prompts gives the split run_demo trains and evaluates on: a fifth held out (at most
    --eval-prompts), at most --train-prompts of the rest; `messages` rows rendered as the built-in
    tokenizer's chat template does, before that tokenizer is trained."""
    from dpolab.experiments.sentiment import DemoConfig
    from dpolab.experiments.stages import read_prompts
    from dpolab.lm.tiny import train_tokenizer

    path = tmp_path / "p.jsonl"
    rows = [{"prompt": f"Review {i}: the movie"} for i in range(39)] + [{"messages": [{"role": "user", "content": "hi"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held = read_prompts(DemoConfig(quick=True, prompts=str(path)).resolved())
    assert (len(train), len(held)) == (32, 8) and not set(train) & set(held)
    chat = train_tokenizer(["the movie was great"] * 4).apply_chat_template(
        rows[-1]["messages"], tokenize=False, add_generation_prompt=True)
    assert sorted(train + held) == sorted([r["prompt"] for r in rows[:-1]] + [chat])
    train, held = read_prompts(DemoConfig(quick=True, prompts=str(path), train_prompts=5, eval_prompts=3).resolved())
    assert (len(train), len(held)) == (5, 3)


def test_demo_checks_the_prompts_file_before_any_stage(tmp_path, capsys):
    """A bad --prompts file fails before pretraining and leaves no work/ folder, so the same command
    runs once the file is fixed (small sizes: should the check come late again, it fails fast)."""
    good = json.dumps({"prompt": "the movie"})
    cases = {"broken.jsonl": (good + "\n{oops\n", "broken.jsonl:2"),
             "few.jsonl": (good + "\n" + good + "\n", "need at least 4 prompts, found 2"),
             "nofield.jsonl": (good + "\n" + json.dumps({"text": "the movie"}) + "\n", "nofield.jsonl:2")}
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        out = tmp_path / f"out-{name}"
        args = ["demo", "--quick", "--prompts", str(tmp_path / name), "--output-dir", str(out), "--no-progress",
                "--corpus-size", "50", "--pretrain-steps", "1"]
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert msg in err and "pretraining" not in err, (name, err)
        assert not (out / "work").exists(), name


def test_a_signal_outside_a_trainer_ends_the_demo_with_one_line(tmp_path, monkeypatch, capsys):
    """SIGTERM while the demo samples, evaluates or writes (no trainer's handler installed) ended it
    silently with status 143; now one line naming the stage."""
    import os
    import signal

    import dpolab.train.sft

    def killed(cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        return {}

    monkeypatch.setattr(dpolab.train.sft, "train", killed)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress", "--corpus-size", "50"]) == 2
    err = capsys.readouterr().err
    assert "stopped by SIGTERM during stage 1/9" in err and f"remove {out}" in err and "Traceback" not in err, err
    assert signal.getsignal(signal.SIGTERM) == before  # the demo's handler is gone again


def test_a_missing_model_is_refused_before_the_work_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--model", str(tmp_path / "nope"), "--output-dir", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (out / "work").exists()  # the same command runs once the path is fixed


def test_results_json_the_finished_mark_is_written_last(tmp_path, monkeypatch):
    import dpolab.experiments.report as report

    def broken(results):
        raise OSError("disk full")

    monkeypatch.setattr(report, "render_report", broken)
    rows = [{"method": "DPO", "param": "beta", "value": 0.1, "step": 4, "reward": 0.5, "reward_std": 0.1,
             "kl": 0.2, "response_length": 8.0, "eos_fraction": 1.0, "kl_kind": "sampled"}]
    with pytest.raises(OSError):
        report.write_outputs(tmp_path, {"rows": rows, "base": {"reward": 0.1, "reward_std": 0.1, "kl": 0.0,
                                                               "response_length": 8.0, "eos_fraction": 1.0}}, [])
    assert not (tmp_path / "results.json").exists()


def test_a_broken_reward_is_refused_before_the_work_folder(tmp_path, capsys):
    """A reward returning the wrong count or NaN was found while the preference pairs were built,
    after pretraining, and left a work/ folder the rerun refused."""
    reward = tmp_path / "bad_reward.py"
    reward.write_text("def short(prompts, completions):\n    return [0.5]\n\n"
                      "def nan(prompts, completions):\n    return [float('nan')] * len(completions)\n")
    for fn in ("short", "nan"):
        out = tmp_path / f"demo-{fn}"
        assert main(["demo", "--quick", "--reward", f"{reward}:{fn}", "--output-dir", str(out), "--no-progress"]) == 2
        assert "Traceback" not in capsys.readouterr().err
        assert not (out / "work").exists()



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, where no folder can be made, is Linux's")
def test_an_output_dir_that_cannot_be_made_is_one_line(capsys):
    assert main(["demo", "--quick", "--output-dir", "/proc/dpolab-demo", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--output-dir /proc/dpolab-demo: cannot create" in err and "Traceback" not in err, err
