"""`dpolab ppo` at scale: several responses per prompt, gradient accumulation with the exact loss
scale, 2 CPU processes equal 1 process (uneven last batch included), and a real process stopped by
SIGTERM resumes bitwise."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import launch  # noqa: E402
from test_reliability_signals import assert_clean_stop, assert_same_weights, interrupt, metric_rows  # noqa: E402
from test_train_grpo import PROMPTS, REWARDS  # noqa: E402, F401


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture()
def reward_file(tmp_path) -> Path:
    path = tmp_path / "ppo_scale_rewards.py"
    path.write_text(REWARDS)
    return path


def _args(model_dir, data, out, reward, *extra):
    return ["ppo", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--no-progress",
            "--max-new-tokens", "6", "--log-samples", "0", "--eval-prompts", "0", "--reward", f"{reward}:frac_alpha",
            *map(str, extra)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(run / "final" / "model.safetensors")),
            **load_file(str(run / "final" / "value_head.safetensors"))}


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


SGD = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-grad-norm", "0", "--max-steps", "3",
       "--lr-scheduler", "constant", "--num-samples", "2", "--ppo-epochs", "2")


def test_two_processes_equal_one_process(tiny_model_dir, prompts_file, reward_file, tmp_path):
    """5 prompts × 2 responses, 4 prompts per step globally: step 2 holds ONE prompt (process 1
    runs stand-in rows); whitening and metrics over the global batch; mini-batches of a shared
    permutation, each split into 2 micro-batches."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(tiny_model_dir, prompts_file, one, reward_file, *SGD, "--rollout-batch-size", 4,
                      "--mini-batch-size", 4, "--grad-accum", 2)) == 0
    res = launch("ddp_cpu.yaml", _args(tiny_model_dir, prompts_file, two, reward_file, *SGD, "--rollout-batch-size",
                                       2, "--mini-batch-size", 2, "--grad-accum", 2))
    assert res.returncode == 0, res.stderr[-4000:]
    wa, wb = _weights(one), _weights(two)
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert max(float((wa[k] - init[k]).abs().max()) for k in init) > 1e-2
    for ra, rb in zip(_rows(one), _rows(two)):
        for key in ("objective/scores", "objective/kl", "objective/entropy", "losses/policy", "losses/value",
                    "losses/explained_variance", "val/response_length"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), (key, ra["step"])


def test_grad_accum_and_samples_per_prompt_keep_the_step(tiny_model_dir, prompts_file, reward_file, tmp_path):
    """A mini-batch of 4 responses in one pass or in 4 micro-batches: the same weights."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = (*SGD, "--rollout-batch-size", 2, "--mini-batch-size", 4)
    assert main(_args(tiny_model_dir, prompts_file, a, reward_file, *common)) == 0
    assert main(_args(tiny_model_dir, prompts_file, b, reward_file, *common, "--grad-accum", 4)) == 0
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0)
    assert _rows(a)[0]["val/response_length"] > 0


def test_sigterm_then_resume_latest_is_bitwise_exact(tiny_model_dir, prompts_file, reward_file, tmp_path):
    common = ("--rollout-batch-size", 2, "--mini-batch-size", 2, "--num-samples", 2, "--max-steps", 6,
              "--save-steps", 1, "--learning-rate", "1e-2", "--ppo-epochs", 1, "--adaptive-kl", "--target-kl", "0.01")
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_args(tiny_model_dir, prompts_file, ref, reward_file, *common)) == 0
    rc, err = interrupt(_args(tiny_model_dir, prompts_file, run, reward_file, *common), run, after_rows=2)
    assert_clean_stop(rc, err, signal.SIGTERM)
    assert main([*_args(tiny_model_dir, prompts_file, run, reward_file, *common), "--resume", "latest"]) == 0
    assert_same_weights(_weights(ref), _weights(run))
    strip = {"seconds_per_step"}
    assert [{k: v for k, v in r.items() if k not in strip} for r in metric_rows(ref)] == \
        [{k: v for k, v in r.items() if k not in strip} for r in metric_rows(run)]
