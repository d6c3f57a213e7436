"""`dpolab demo --quick` end to end: every artifact exists and is well-formed, and DPO raises the
ground-truth reward well above the base model's at bounded KL."""

from __future__ import annotations

import csv
import json

import pytest

from dpolab.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress"]) == 0
    return out


def test_demo_writes_every_artifact(demo_dir):
    for name in ("frontier.png", "curves.png", "samples.md", "results.csv", "results.json", "report.md"):
        path = demo_dir / name
        assert path.is_file() and path.stat().st_size > 0, name
    for png in ("frontier.png", "curves.png"):
        assert (demo_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((demo_dir / "results.json").read_text())
    methods = {r["method"] for r in results["rows"]}
    assert methods == {"DPO", "PPO"}
    for r in results["rows"]:
        assert -1.0 <= r["reward"] <= 1.0 and r["kl"] == r["kl"]  # VADER range; KL not NaN
    with open(demo_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(results["rows"]) + 1 and rows[0]["method"] == "base"
    report = (demo_dir / "report.md").read_text()
    assert results["verdict"]["text"] in report and "dpolab demo --quick" in report
    assert f"{results['base']['reward']:+.3f}" in report
    samples = (demo_dir / "samples.md").read_text()
    assert "**base**" in samples and "**DPO" in samples and "**PPO" in samples
    bandit = results["bandit"]
    assert bandit["kl_star_dpo"] < 0.25 * bandit["kl_star_ref"]
    assert bandit["kl_star_ppo"] < 0.25 * bandit["kl_star_ref"]


def test_demo_dpo_beats_base_at_bounded_kl(demo_dir):
    results = json.loads((demo_dir / "results.json").read_text())
    base = results["base"]["reward"]
    last = max(r["step"] for r in results["rows"] if r["method"] == "DPO")
    finals = [r for r in results["rows"] if r["method"] == "DPO" and r["step"] == last]
    best = max(finals, key=lambda r: r["reward"])
    assert best["reward"] > base + 0.2, (base, finals)
    assert best["kl"] < 25.0, best


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
            "--output-dir", str(out), "--no-progress", "--train-prompts", "16", "--eval-prompts", "4",
            "--samples-per-prompt", "4", "--max-new-tokens", "8", "--dpo-betas", "0.5", "--ppo-kl-coefs", "0.1",
            "--dpo-steps", "4", "--ppo-steps", "2", "--rm-steps", "4", "--eval-every", "4", "--quick"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["model"] == str(tiny_model_dir)
    assert {r["method"] for r in results["rows"]} == {"DPO", "PPO"}
    assert not (out / "work" / "pretrain").exists()  # the user's model was used, nothing pretrained
    report = (out / "report.md").read_text()
    assert f"--model {tiny_model_dir}" in report and f"--reward {reward}:score" in report and "--dpo-steps 4" in report
