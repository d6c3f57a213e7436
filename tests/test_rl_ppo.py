"""Gymnasium PPO: CLI smoke test, run directory, determinism, exact resume, continuous actions, CartPole."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dpolab.cli import main
from dpolab.config import make_config
from dpolab.errors import DpolabError
from dpolab.rl.nets import ActorCritic, load_policy
from dpolab.rl.ppo import PPOConfig, train
from dpolab.rl.rollout import Collector, evaluate, make_vec_env

TINY = ["--n-envs", "2", "--n-steps", "16", "--batch-size", "16", "--n-epochs", "2", "--eval-episodes", "2",
        "--no-progress"]
TIME_KEYS = {"charts/sps"}


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIME_KEYS}
            for x in (path / "metrics.jsonl").read_text().splitlines()]


def _cfg(tmp_path: Path, name: str, **kw) -> PPOConfig:
    base = dict(total_steps=256, n_envs=2, n_steps=32, batch_size=32, n_epochs=2, eval_every=128,
                eval_episodes=2, save_steps=128, progress=False, output_dir=str(tmp_path / name))
    return make_config(PPOConfig, {**base, **kw})


def test_cli_smoke_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "cp"
    assert main(["rl", "ppo", "--env", "CartPole-v1", "--total-steps", "128", "--seed", "1",
                 "--output-dir", str(out), *TINY]) == 0
    assert "eval/mean_return" in capsys.readouterr().out
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "learning_curve.png",
                 "final/model.safetensors", "final/config.json", "checkpoints/latest"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 128 and summary["eval/mean_return"] > 0
    rows = _rows(out)
    for key in ("losses/policy", "losses/value", "losses/entropy", "losses/clipfrac", "losses/approx_kl",
                "losses/explained_variance"):
        assert any(key in r for r in rows), key
    assert all(torch.isfinite(torch.tensor(r["losses/value"])) for r in rows if "losses/value" in r)
    # the saved policy loads and acts as well as reported
    policy, conf = load_policy(out / "final")
    assert conf["env"] == "CartPole-v1" and conf["algo"] == "ppo"
    assert sum(evaluate(policy, "CartPole-v1", 2, seed=1 + 1_000_003)) / 2 == summary["eval/mean_return"]


def test_cli_user_errors(tmp_path, capsys):
    assert main(["rl", "ppo", "--env", "NoSuchEnv-v9", "--output-dir", str(tmp_path / "a"), *TINY]) == 2
    assert "unknown Gymnasium environment" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # bad input leaves nothing behind
    assert main(["rl", "ppo", "--batch-size", "999", "--output-dir", str(tmp_path / "b"), *TINY[:4]]) == 2
    assert "exceeds" in capsys.readouterr().err
    assert main(["rl", "ppo", "--resume", "latest", "--output-dir", str(tmp_path / "c"), *TINY]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["rl", "ppo", "--env", "FrozenLake-v1", "--output-dir", str(tmp_path / "d"), *TINY]) == 2
    assert "Box observations" in capsys.readouterr().err


def test_same_seed_same_curve_different_seed_different(tmp_path):
    train(_cfg(tmp_path, "a", seed=3))
    train(_cfg(tmp_path, "b", seed=3))
    train(_cfg(tmp_path, "c", seed=4))
    a, b, c = (_rows(tmp_path / n) for n in "abc")
    assert a == b
    assert a != c
    with pytest.raises(DpolabError, match="already holds a run"):
        train(_cfg(tmp_path, "a", seed=3))


def test_resume_equals_uninterrupted_run(tmp_path):
    full = _cfg(tmp_path, "full", seed=5, total_steps=384)
    train(full)
    # Continue a copy of the full run's step-256 checkpoint in a fresh directory: the rows logged
    # after step 256 and the final weights must equal the uninterrupted run's.
    ckpt = tmp_path / "full" / "checkpoints" / "step-256"
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(ckpt, resumed_dir / "ckpt")
    train(_cfg(tmp_path, "resumed", seed=5, total_steps=384, resume=str(resumed_dir / "ckpt")))
    after = [r for r in _rows(tmp_path / "full") if r["step"] > 256]
    assert after and _rows(resumed_dir) == after
    a, _ = load_policy(tmp_path / "full" / "final")
    b, _ = load_policy(resumed_dir / "final")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    with pytest.raises(DpolabError, match="different"):
        train(_cfg(tmp_path, "resumed2", seed=6, total_steps=384, resume=str(resumed_dir / "ckpt")))


def test_rollout_masks_autoreset_steps_and_bootstraps_final_observation():
    envs = make_vec_env("CartPole-v1", 2)
    torch.manual_seed(0)
    col = Collector(envs, seed=0)
    policy = ActorCritic(4, 2, True)
    ro, episodes = col.collect(policy, 60)  # random-ish policy: CartPole episodes end within ~60 steps
    done = ro.terminated | ro.truncated
    assert episodes and done.any()
    # the step right after an episode end is the autoreset step: reward 0, masked
    after = torch.zeros_like(done)
    after[1:] = done[:-1]
    assert torch.equal(~ro.mask, after)
    assert torch.all(ro.rewards[after] == 0)
    # next_values at an end is V(final observation) = the value computed at the masked step
    t, n = torch.nonzero(done[:-1])[0]
    assert ro.next_values[t, n] == ro.values[t + 1, n]
    with torch.no_grad():
        assert torch.allclose(ro.next_values[t, n], policy.value(ro.obs[t + 1, n][None])[0])
    # episode lengths count real steps only
    assert all(length == ret for ret, length in episodes)  # CartPole: reward 1 per step
    envs.close()


def test_gaussian_policy_matches_torch_distributions_and_continuous_smoke(tmp_path):
    torch.manual_seed(0)
    pol = ActorCritic(3, 2, discrete=False, log_std_init=-0.5)
    obs, act = torch.randn(5, 3), torch.randn(5, 2)
    logp, ent, _ = pol.evaluate(obs, act)
    dist = torch.distributions.Normal(pol.actor(obs), torch.exp(pol.log_std))
    torch.testing.assert_close(logp, dist.log_prob(act).sum(-1))
    torch.testing.assert_close(ent, dist.entropy().sum(-1))
    summary = train(_cfg(tmp_path, "pend", env="Pendulum-v1", total_steps=128, eval_every=0))
    assert summary["steps"] == 128 and -2000 < summary["eval/mean_return"] < 0


@pytest.mark.slow
def test_ppo_solves_cartpole_within_150k_steps_for_2_of_3_seeds(tmp_path):
    solved = []
    for seed in (1, 2, 3):
        summary = train(make_config(PPOConfig, dict(env="CartPole-v1", total_steps=150_000, seed=seed,
                                                    eval_every=5_000, stop_return=475.0, progress=False,
                                                    output_dir=str(tmp_path / f"s{seed}"))))
        solved.append(summary["eval/best_mean_return"] >= 475.0)
    assert sum(solved) >= 2, solved


def test_collector_state_roundtrip_and_unpicklable_fallback():
    torch.manual_seed(0)
    policy = ActorCritic(4, 2, True)
    a = Collector(make_vec_env("CartPole-v1", 2), seed=0)
    a.collect(policy, 7)
    state = a.state_dict()
    b = Collector(make_vec_env("CartPole-v1", 2), seed=99)
    b.load_state_dict(state)
    torch.manual_seed(1)
    ra, _ = a.collect(policy, 20)
    torch.manual_seed(1)
    rb, _ = b.collect(policy, 20)
    assert torch.equal(ra.obs, rb.obs) and torch.equal(ra.rewards, rb.rewards)
    with pytest.warns(UserWarning, match="no environment state"):
        b.load_state_dict({**state, "envs": None}, reseed=5)
    assert not b.prev_done.any() and b.ep_length.sum() == 0
    a.envs.close(), b.envs.close()
