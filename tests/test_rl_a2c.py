"""Gymnasium A2C: CLI smoke test, determinism, exact resume, and that one update follows the A2C gradient."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from dpolab.cli import main
from dpolab.config import make_config
from dpolab.rl.gym_a2c import A2CConfig, a2c_update, train
from dpolab.rl.nets import ActorCritic, load_policy
from dpolab.rl.rollout import Collector, make_vec_env


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "charts/sps"}
            for x in (path / "metrics.jsonl").read_text().splitlines()]


def _cfg(tmp_path: Path, name: str, **kw) -> A2CConfig:
    base = dict(total_steps=400, n_envs=4, n_steps=5, eval_every=200, eval_episodes=2, save_steps=200,
                log_every=3, progress=False, output_dir=str(tmp_path / name))
    return make_config(A2CConfig, {**base, **kw})


def test_cli_smoke(tmp_path, capsys):
    out = tmp_path / "a2c"
    assert main(["rl", "a2c", "--env", "CartPole-v1", "--total-steps", "200", "--seed", "1", "--output-dir",
                 str(out), "--eval-episodes", "2", "--no-progress"]) == 0
    assert "eval/mean_return" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 200 and summary["eval/mean_return"] > 0
    assert any("losses/value" in r for r in _rows(out))
    assert load_policy(out / "final")[1]["algo"] == "a2c"
    assert main(["rl", "a2c", "--lr", "-1", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--lr" in capsys.readouterr().err


def test_determinism_and_exact_resume(tmp_path):
    train(_cfg(tmp_path, "a", seed=2))
    train(_cfg(tmp_path, "b", seed=2))
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    # step-200 checkpoint (update 10 of 20 steps, mid logging window: log_every=3) -> fresh dir
    (tmp_path / "r").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-200", tmp_path / "r" / "ckpt")
    train(_cfg(tmp_path, "r", seed=2, resume=str(tmp_path / "r" / "ckpt")))
    after = [r for r in _rows(tmp_path / "a") if r["step"] > 200]
    assert after and _rows(tmp_path / "r") == after


def test_resume_from_the_final_checkpoint_logs_the_final_evaluation_once(tmp_path):
    """The final checkpoint follows the end-of-run evaluation: resuming from it (a crash before
    summary.json) does not evaluate again, so metrics.jsonl keeps one row of it, as the run had."""
    out = tmp_path / "a"
    train(_cfg(tmp_path, "a", seed=2))
    rows = _rows(out)
    (out / "summary.json").unlink()
    summary = train(_cfg(tmp_path, "a", seed=2, resume="latest"))
    assert _rows(out) == rows and sum("eval/mean_return" in r and r["step"] == 400 for r in rows) == 1
    assert summary["eval/mean_return"] == rows[-1]["eval/mean_return"]


def test_a2c_update_is_one_sgd_step_on_the_masked_a2c_loss():
    """The loop's update, with plain SGD, must move θ by −lr·∇ of the mean A2C loss over all N×T steps,
    recomputed here from scratch (a plain per-column loop for the n-step returns)."""
    torch.manual_seed(0)
    envs = make_vec_env("CartPole-v1", 3)
    col = Collector(envs, seed=0)
    policy = ActorCritic(4, 2, True)
    ro, episodes = col.collect(policy, 30)
    envs.close()
    assert episodes and (ro.terminated | ro.truncated).any()  # the rollout crosses episode ends
    before = copy.deepcopy(policy)
    cfg = make_config(A2CConfig, dict(gamma=0.9, gae_lambda=1.0, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.0))
    a2c_update(policy, torch.optim.SGD(policy.parameters(), lr=0.1), ro, cfg)

    # expected: n-step returns by hand (λ = 1), every step
    T, N = ro.rewards.shape
    obs, acts, rets = [], [], []
    for n in range(N):
        for t in range(T):
            g, disc, s = 0.0, 1.0, t
            while True:
                g += disc * float(ro.rewards[s, n])
                if ro.terminated[s, n]:
                    break
                if ro.truncated[s, n] or s == T - 1:
                    g += disc * 0.9 * float(ro.next_values[s, n])
                    break
                disc *= 0.9
                s += 1
            obs.append(ro.obs[t, n]), acts.append(ro.actions[t, n]), rets.append(g)
    obs, acts, rets = torch.stack(obs), torch.stack(acts), torch.tensor(rets)
    logp, ent, v = before.evaluate(obs, acts)
    adv = rets - v.detach()
    loss = (-logp * adv + 0.5 * (v - rets) ** 2 - 0.01 * ent).mean()
    loss.backward()
    for (k, p_new), p_old in zip(policy.named_parameters(), before.parameters()):
        torch.testing.assert_close(p_new.detach(), p_old.detach() - 0.1 * p_old.grad, msg=k)


@pytest.mark.slow
def test_a2c_solves_cartpole():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        summary = train(make_config(A2CConfig, dict(total_steps=200_000, seed=1, eval_every=10_000,
                                                    stop_return=475.0, progress=False, output_dir=d + "/r")))
    assert summary["eval/best_mean_return"] >= 475.0


def test_stop_return_logs_the_partly_filled_window(tmp_path):
    """--stop-return at update 3 of a --log-every 5 window: the 3 updates are logged (were dropped)."""
    kw = dict(seed=3, eval_every=60, stop_return=0.0, save_steps=0)
    train(_cfg(tmp_path, "w5", log_every=5, **kw))
    train(_cfg(tmp_path, "w1", log_every=1, **kw))
    rows, each = _rows(tmp_path / "w5"), _rows(tmp_path / "w1")
    train_rows = [r for r in rows if "losses/policy" in r]
    assert [r["step"] for r in train_rows] == [60] and [r["step"] for r in rows if "eval/mean_return" in r] == [60]
    per_update = [r for r in each if "losses/policy" in r]
    assert [r["step"] for r in per_update] == [20, 40, 60]
    for key in ("losses/policy", "losses/value", "losses/entropy", "losses/explained_variance"):
        assert train_rows[0][key] == pytest.approx(sum(r[key] for r in per_update) / 3, rel=1e-6), key
    assert train_rows[0]["charts/learning_rate"] == 7e-4 and train_rows[0]["skipped_steps"] == 0


def test_a_resume_of_a_run_that_stopped_at_stop_return_is_finished(tmp_path):
    """The checkpoint written at a --stop-return stop sits before the step budget: resumed unchanged, the
    run trained on, past where the uninterrupted one stopped, and replaced final/ and summary.json."""
    kw = dict(seed=3, eval_every=60, stop_return=0.0, save_steps=0)
    first = train(_cfg(tmp_path, "r", **kw))
    assert first["steps"] == 60
    rows = _rows(tmp_path / "r")
    again = train(_cfg(tmp_path, "r", resume="latest", **kw))
    assert again["steps"] == 60 and _rows(tmp_path / "r") == rows
