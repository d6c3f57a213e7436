"""Reliability of the Gymnasium trainers (``dpolab rl ppo`` / ``rl a2c``): checkpoints hold no pickled
objects (environment state as plain data), SIGINT/SIGTERM stop cleanly and resume exactly, the
non-finite guard, and crash-safe ``final/``. In-process and small: the whole file takes ~20 s."""

from __future__ import annotations

import collections
import json
import math
import os
import signal
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main
from dpolab.config import make_config
from dpolab.errors import DpolabError, NonFiniteError
from dpolab.losses import pg as pg_losses
from dpolab.losses import ppo as ppo_losses
from dpolab.rl import gym_a2c as a2c_mod
from dpolab.rl import gym_ppo as ppo_mod
from dpolab.rl.nets import ActorCritic, load_policy, save_policy
from dpolab.rl.rollout import Collector, env_state, make_vec_env, restore_env_state
from dpolab.rl.tracking import save_checkpoint, save_final
from dpolab.runs.rundir import RunDir

PPO_ARGS = ["rl", "ppo", "--env", "CartPole-v1", "--total-steps", "640", "--n-envs", "2", "--n-steps", "32",
            "--batch-size", "32", "--n-epochs", "2", "--eval-every", "256", "--eval-episodes", "2",
            "--save-steps", "0", "--seed", "3", "--no-progress"]
A2C_ARGS = ["rl", "a2c", "--env", "CartPole-v1", "--total-steps", "400", "--n-envs", "4", "--n-steps", "5",
            "--eval-every", "200", "--eval-episodes", "2", "--save-steps", "0", "--log-every", "3",
            "--seed", "2", "--no-progress"]


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "charts/sps"}
            for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def latest_step(run: Path) -> int:
    return int((run / "checkpoints" / "latest").read_text().strip().split("-")[1])


def only_plain(x) -> bool:
    """True if ``x`` is built from tensors, None/bool/int/float/str, lists, tuples and dicts (no other objects)."""
    if torch.is_tensor(x) or x is None or type(x) in (bool, int, float, str):
        return True
    if type(x) in (list, tuple):
        return all(only_plain(v) for v in x)
    if type(x) in (dict, collections.OrderedDict):
        return all(type(k) in (str, int) and only_plain(v) for k, v in x.items())
    return False


# -- environment state as plain data ---------------------------------------------------------------
class EngineHandle:
    """Stands for state that is not plain data (a physics engine, a renderer)."""

    def __init__(self):
        self.counter = 0


class WithEngine(gym.Wrapper):
    def __init__(self, env):
        super().__init__(env)
        self.engine = EngineHandle()


def _vec(n: int, *wrappers) -> gym.vector.SyncVectorEnv:
    def make():
        env = gym.make("CartPole-v1")
        for w in wrappers:
            env = w(env)
        return env
    return gym.vector.SyncVectorEnv([make for _ in range(n)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def _continue_equal(a: Collector, b: Collector, policy: ActorCritic, steps: int = 300) -> bool:
    torch.manual_seed(1)
    ra, ea = a.collect(policy, steps)
    torch.manual_seed(1)
    rb, eb = b.collect(policy, steps)
    return ea == eb and all(torch.equal(getattr(ra, f), getattr(rb, f)) for f in
                            ("obs", "actions", "rewards", "terminated", "truncated", "next_values"))


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1"])
def test_env_state_is_plain_data_and_restores_exactly(env_id, tmp_path):
    torch.manual_seed(0)
    a = Collector(make_vec_env(env_id, 2), seed=0)
    obs_dim = a.envs.single_observation_space.shape[0]
    discrete = isinstance(a.envs.single_action_space, gym.spaces.Discrete)
    policy = ActorCritic(obs_dim, int(a.envs.single_action_space.n) if discrete else 1, discrete)
    a.envs.action_space.sample()  # a space RNG in use is part of the state too
    a.collect(policy, 250)  # CartPole: episodes end within 250 steps, so autoreset flags are set somewhere
    torch.save(a.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)  # no pickled object anywhere
    assert only_plain(state) and state["envs"]["unrestorable"] == []
    b = Collector(make_vec_env(env_id, 2), seed=99)  # other episodes, other RNG states
    b.load_state_dict(state)
    assert _continue_equal(a, b, policy)
    assert np.array_equal(a.envs.action_space.sample(), b.envs.action_space.sample())
    a.envs.close(), b.envs.close()


def test_record_episode_statistics_wrapper_state_restores(tmp_path):
    """Deques, floats and counters of a stateful wrapper are state too."""
    torch.manual_seed(0)
    policy = ActorCritic(4, 2, True)
    a = Collector(_vec(2, lambda e: gym.wrappers.RecordEpisodeStatistics(e, buffer_length=5)), seed=0)
    a.collect(policy, 120)
    b = Collector(_vec(2, lambda e: gym.wrappers.RecordEpisodeStatistics(e, buffer_length=5)), seed=7)
    b.load_state_dict(a.state_dict())
    assert _continue_equal(a, b, policy)
    wa, wb = a.envs.envs[0], b.envs.envs[0]
    assert list(wa.length_queue) == list(wb.length_queue) and wb.length_queue.maxlen == 5
    assert wa.episode_lengths == wb.episode_lengths


def test_env_with_non_plain_state_warns_and_starts_fresh_episodes():
    torch.manual_seed(0)
    policy = ActorCritic(4, 2, True)
    a = Collector(_vec(2, WithEngine), seed=0)
    a.collect(policy, 40)
    state = a.state_dict()
    assert state["envs"] == {"unrestorable": ["WithEngine.engine (EngineHandle)"] * 2}
    b = Collector(_vec(2, WithEngine), seed=1)
    b.collect(policy, 13)
    with pytest.warns(UserWarning, match=r"not plain data: WithEngine\.engine.*fresh episodes \(seed 5\)"):
        b.load_state_dict(state, reseed=5)
    fresh = _vec(2, WithEngine)
    obs, _ = fresh.reset(seed=5)
    assert torch.equal(b.obs, torch.as_tensor(obs)) and b.ep_length.sum() == 0 and b.ep_return.sum() == 0


def test_damaged_or_foreign_env_state_changes_nothing():
    envs = make_vec_env("CartPole-v1", 2)
    envs.reset(seed=0)
    good = env_state(envs)
    before = envs.envs[0].unwrapped.state.copy()
    bad = json.loads(json.dumps(good))  # a copy
    bad["envs"][1][-1]["attrs"]["state"] = {"__nd__": "<f8", "shape": [4], "v": [0.0, 1.0]}  # cannot reshape
    bad["envs"][0][-1]["attrs"]["state"]["v"] = [9.0, 9.0, 9.0, 9.0]  # would change env 0 if applied
    assert "bad environment state" in restore_env_state(envs, bad)
    assert np.array_equal(envs.envs[0].unwrapped.state, before)  # decoded first: nothing applied
    assert "older dpolab" in restore_env_state(envs, b"pickled bytes")
    wrapped = _vec(2, gym.wrappers.RecordEpisodeStatistics)
    wrapped.reset(seed=0)
    assert "another wrapper chain" in restore_env_state(envs, env_state(wrapped))
    envs.close(), wrapped.close()


def test_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*PPO_ARGS, "--total-steps", "128", "--output-dir", str(out)]) == 0
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = out / "checkpoints" / f"step-{latest_step(out)}"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert only_plain(state)
    torch.save({**state, "collector": {**state["collector"], "envs": Payload()}}, ckpt / "state.pt")
    with pytest.raises(DpolabError, match="cannot read checkpoint"):
        ppo_mod.train(make_config(ppo_mod.PPOConfig, dict(
            total_steps=128, n_envs=2, n_steps=32, batch_size=32, n_epochs=2, eval_episodes=2, seed=3,
            save_steps=0, progress=False, output_dir=str(out), resume="latest")))
    assert not marker.exists()
    capsys.readouterr()
    (ckpt / "state.pt").write_bytes(b"not a checkpoint")
    assert main([*PPO_ARGS, "--total-steps", "128", "--output-dir", str(out), "--resume", "latest"]) == 2
    err = capsys.readouterr().err  # not torch's advice to load it with weights_only=False
    assert "is damaged or not a checkpoint of this trainer" in err and "weights_only" not in err, err


# -- SIGINT / SIGTERM -------------------------------------------------------------------------------
def _signal_on_collect(monkeypatch, module, n: int, sig: int) -> None:
    """Make the ``n``-th rollout of this process deliver ``sig`` to itself mid-update."""
    calls = {"n": 0}
    real = Collector.collect

    def collect(self, policy, n_steps):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), sig)
        return real(self, policy, n_steps)

    monkeypatch.setattr(Collector, "collect", collect)


@pytest.mark.parametrize("algo,args,at,per_update", [("ppo", PPO_ARGS, 4, 64), ("a2c", A2C_ARGS, 10, 20)])
def test_signal_stops_after_the_update_and_resume_is_exact(algo, args, at, per_update, tmp_path, monkeypatch,
                                                            capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main([*args, "--output-dir", str(ref)]) == 0
    module = ppo_mod if algo == "ppo" else a2c_mod
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        sig = signal.SIGTERM if algo == "ppo" else signal.SIGINT
        _signal_on_collect(m, module, at, sig)
        capsys.readouterr()
        assert main([*args, "--output-dir", str(run)]) == 0
    err = capsys.readouterr().err
    assert signal.Signals(sig).name in err and "Traceback" not in err
    assert latest_step(run) == at * per_update  # the update in flight finished, then the checkpoint
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # given back
    hint = f"dpolab rl {algo} --config {run / 'config.yaml'} --resume latest"
    assert hint in err
    assert main(hint.split()[1:]) == 0
    assert rows(run) == rows(ref)
    a, b = load_file(str(ref / "final" / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- non-finite guard -------------------------------------------------------------------------------
def _nan_on_call(monkeypatch, module, name: str, calls: set[int]) -> None:
    """Replace ``module.name`` by a wrapper whose result's first element becomes NaN on the given calls."""
    real, count = getattr(module, name), {"n": 0}

    def wrapped(*a, **k):
        count["n"] += 1
        out = real(*a, **k)
        if count["n"] in calls:
            first = out[0] if isinstance(out, tuple) else out
            first = first * float("nan")
            return (first, *out[1:]) if isinstance(out, tuple) else first
        return out

    monkeypatch.setattr(module, name, wrapped)


def test_ppo_nan_loss_stops_naming_update_epoch_minibatch_and_saves_nothing_new(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    # updates have 64 samples = 2 minibatches × 2 epochs = 4 loss calls; call 15 = update 4, epoch 2, minibatch 1
    _nan_on_call(monkeypatch, ppo_losses, "ppo_clip_loss", {15})
    assert main([*PPO_ARGS, "--save-steps", "128", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at step 256 (update 4/10, epoch 2, minibatch 1)" in err and "Traceback" not in err
    assert latest_step(out) == 128 and not (out / "final").exists()  # step-256 was never written


def test_ppo_nan_gradient_is_named(monkeypatch):
    """A finite loss with a NaN gradient (one weight's gradient poisoned after the backward pass) is
    caught through the gradient norm."""
    cfg = make_config(ppo_mod.PPOConfig, dict(n_epochs=1, batch_size=8, max_grad_norm=0.0))
    policy = ActorCritic(4, 2, True)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)), torch.full((16,), -0.7), torch.zeros(16),
             torch.randn(16), torch.randn(16))
    real = ActorCritic.backward_from_outputs

    def poisoned(self, *a, **k):
        real(self, *a, **k)
        self.critic[0].weight.grad[0, 0] = float("nan")

    monkeypatch.setattr(ActorCritic, "backward_from_outputs", poisoned)
    with pytest.raises(NonFiniteError, match=r"gradient norm at step 9 \(u, epoch 1, minibatch 1\)"):
        ppo_mod.ppo_update(policy, opt, batch, cfg, 0.2, where="u", step=9)


def test_ppo_skip_nonfinite_skips_exactly_the_bad_minibatches():
    """Two of 2×4 minibatch steps get a NaN loss: 6 Adam steps happen, the losses average the other 6,
    and the weights are those of the same update with the bad steps left out (same permutations)."""
    torch.manual_seed(0)
    cfg = make_config(ppo_mod.PPOConfig, dict(n_epochs=2, batch_size=4, skip_nonfinite=True, norm_adv=False))
    batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)), torch.full((16,), -0.7), torch.zeros(16),
             torch.randn(16), torch.randn(16))
    policy = ActorCritic(4, 2, True)
    twin = ActorCritic(4, 2, True)
    twin.load_state_dict(policy.state_dict())
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    bad = {2, 7}
    real, calls = ppo_losses.ppo_clip_loss, {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss, st = real(*a, **k)
        return (loss * float("nan"), st) if calls["n"] in bad else (loss, st)

    ppo_losses.ppo_clip_loss = poisoned
    try:
        torch.manual_seed(5)
        metrics, epochs, skipped = ppo_mod.ppo_update(policy, opt, batch, cfg, 0.2)
    finally:
        ppo_losses.ppo_clip_loss = real
    assert (epochs, skipped) == (2, 2)
    assert all(s["step"] == 6 for s in opt.state.values())
    assert all(math.isfinite(v) for v in metrics.values())
    # replay by hand: same permutations, the good minibatches only
    opt2 = torch.optim.Adam(twin.parameters(), lr=1e-2)
    torch.manual_seed(5)
    k = 0
    for _ in range(2):
        perm = torch.randperm(16)
        for lo in range(0, 16, 4):
            k += 1
            idx = perm[lo:lo + 4]
            logp, ent, values = twin.evaluate(batch[0][idx], batch[1][idx])
            pg, st = real(logp, batch[2][idx], batch[4][idx], 0.2)
            loss = pg.mean() + 0.5 * ((values - batch[5][idx]) ** 2).mean()
            opt2.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(twin.parameters()), 0.5)
            if k not in bad:
                opt2.step()
    for p, q in zip(policy.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_skip_nonfinite_runs_count_skipped_steps(tmp_path, monkeypatch):
    _nan_on_call(monkeypatch, ppo_losses, "ppo_clip_loss", {3, 4, 10})
    out = tmp_path / "ppo"
    assert main([*PPO_ARGS, "--total-steps", "256", "--skip-nonfinite", "--output-dir", str(out)]) == 0
    train_rows = [r for r in rows(out) if "skipped_steps" in r]
    assert [r["skipped_steps"] for r in train_rows] == [2, 2, 3, 3]  # cumulative; 4 loss calls per update
    assert all(math.isfinite(r["losses/policy"]) for r in train_rows)
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 3

    with monkeypatch.context() as m:
        _nan_on_call(m, pg_losses, "a2c_loss", {2})  # 3 updates of 20 steps, logged together
        out = tmp_path / "a2c"
        assert main([*A2C_ARGS, "--total-steps", "60", "--skip-nonfinite", "--output-dir", str(out)]) == 0
    (row,) = [r for r in rows(out) if "skipped_steps" in r]
    assert row["skipped_steps"] == 1 and math.isfinite(row["losses/value"])


def test_a2c_nan_loss_stops_naming_the_update(tmp_path, monkeypatch, capsys):
    _nan_on_call(monkeypatch, pg_losses, "a2c_loss", {2})
    out = tmp_path / "a2c"
    assert main([*A2C_ARGS, "--total-steps", "60", "--output-dir", str(out)]) == 2
    assert "non-finite loss at step 40 (update 2/3)" in capsys.readouterr().err
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


def test_a_nan_evaluation_return_ends_the_run_cleanly(tmp_path, monkeypatch, capsys):
    """An environment with NaN rewards: training, final/ and summary.json were written, then the last
    line crashed ('Unknown format code f' for the summary's "nan") with exit status 1; the best
    return read -inf although an evaluation ran."""
    import dpolab.rl.rollout as rollout

    monkeypatch.setattr(rollout, "evaluate", lambda *a, **k: [math.nan, 1.0])
    out = tmp_path / "a2c"
    assert main([*A2C_ARGS, "--total-steps", "60", "--output-dir", str(out)]) == 0
    assert "eval/mean_return nan ->" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/mean_return"] == summary["eval/best_mean_return"] == "nan"


def test_checkpoint_and_final_refuse_non_finite_weights(tmp_path):
    run = RunDir(tmp_path / "run").create()
    cfg = make_config(ppo_mod.PPOConfig, dict(output_dir=str(run.path)))
    policy = ActorCritic(4, 2, True)
    save_checkpoint(run, 64, cfg, {"policy": policy.state_dict()})
    with torch.no_grad():
        policy.critic[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="weights at step 128"):
        save_checkpoint(run, 128, cfg, {"policy": policy.state_dict()})
    assert latest_step(run.path) == 64 and not (run.checkpoints / "step-128").exists()
    with pytest.raises(NonFiniteError, match="refusing to write final"):
        save_final(run, policy, {}, 128)
    assert not run.final.exists()


def test_final_is_replaced_atomically(tmp_path, monkeypatch):
    target = tmp_path / "final"
    old = ActorCritic(4, 2, True)
    save_policy(old, target, {"tag": "old"})
    import safetensors.torch

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        save_policy(ActorCritic(4, 2, True), target, {"tag": "new"})
    policy, conf = load_policy(target)  # the old folder, complete
    assert conf["tag"] == "old" and all(torch.equal(a, b) for a, b in zip(policy.parameters(), old.parameters()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary folder left
    monkeypatch.undo()
    save_policy(ActorCritic(4, 2, True), target, {"tag": "new"})
    assert load_policy(target)[1]["tag"] == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_dry_run_validates_and_writes_nothing(algo, tmp_path, capsys):
    from dpolab.cli import main

    out = tmp_path / "run"
    assert main(["rl", algo, "--env", "CartPole-v1", "--dry-run", "--output-dir", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dry_run"] is True and summary["action_space"] == "Discrete(2)"
    assert not out.exists()
    assert main(["rl", algo, "--env", "NoSuchEnv-v0", "--dry-run", "--output-dir", str(out)]) == 2
    assert main(["rl", algo, "--env", "CartPole-v1", "--dry-run", "--output-dir", str(out), "--resume", "latest"]) == 2
    assert "--resume" in capsys.readouterr().err and not out.exists()


def test_a_refused_resume_changes_nothing(tmp_path, capsys):
    """A resume refused for its config or for the other algorithm leaves config.yaml as it was (the
    printed resume command keeps working) and makes no folder; a bad option is named before any work."""
    from dpolab.cli import main

    tiny = ["--env", "CartPole-v1", "--total-steps", "128", "--n-envs", "2", "--n-steps", "16", "--eval-every", "0",
            "--eval-episodes", "1", "--no-progress"]
    ppo, a2c, mb = tmp_path / "ppo", tmp_path / "a2c", ["--batch-size", "32", "--n-epochs", "1"]
    assert main(["rl", "ppo", *tiny, *mb, "--output-dir", str(ppo)]) == 0
    assert main(["rl", "a2c", *tiny, "--output-dir", str(a2c)]) == 0
    capsys.readouterr()
    config = (ppo / "config.yaml").read_text()
    for argv, says in (
            (["rl", "ppo", *tiny, *mb, "--seed", "7", "--output-dir", str(ppo)], "made with different seed=1 (now 7)"),
            (["rl", "a2c", *tiny, "--output-dir", str(ppo)], "made by `dpolab rl ppo`, not `dpolab rl a2c`"),
            (["rl", "a2c", *tiny, "--output-dir", str(tmp_path / "new"), "--resume",
              str(ppo / "checkpoints" / (ppo / "checkpoints" / "latest").read_text().strip())],
             "made by `dpolab rl ppo`")):
        assert main([*argv, "--resume", "latest"] if "--resume" not in argv else argv) == 2
        assert says in capsys.readouterr().err, argv
        assert (ppo / "config.yaml").read_text() == config
    assert main(["rl", "ppo", *tiny, *mb, "--output-dir", str(a2c), "--resume", "latest"]) == 2
    assert "made by `dpolab rl a2c`, not `dpolab rl ppo`" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["rl", "ppo", "--config", str(ppo / "config.yaml"), "--resume", "latest"]) == 0  # still resumable

    afile = tmp_path / "afile"
    afile.write_text("x")
    for extra, says in ((["--seed", "-1"], "--seed must be >= 0"), (["--hidden", "0"], "each >= 1, got [0]"),
                        (["--vf-coef", "-1"], "--vf-coef must be >= 0"),
                        (["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0"),
                        (["--clip-eps", "5"], "--clip-eps must be in (0, 1)"),
                        (["--target-kl", "-1"], "--target-kl must be > 0"),
                        (["--output-dir", str(afile / "run")], "is a file, not a folder")):
        args = ["rl", "ppo", *tiny, *mb, "--output-dir", str(tmp_path / "bad"), *extra]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "bad").exists()


def test_a_resume_keeps_the_training_settings(tmp_path, capsys):
    """Changed hyperparameters are refused, naming each with both values (they were taken silently
    and config.yaml rewritten as if the whole run had used them); run options may change, said on
    stderr; --stop-return and --skip-nonfinite only where the run so far fits the new value."""
    out = tmp_path / "ppo"
    tiny = ["--env", "CartPole-v1", "--total-steps", "128", "--n-envs", "2", "--n-steps", "16", "--eval-every", "64",
            "--eval-episodes", "1", "--batch-size", "32", "--n-epochs", "1", "--no-progress", "--output-dir", str(out)]
    assert main(["rl", "ppo", *tiny, "--save-steps", "64"]) == 0
    config = (out / "config.yaml").read_text()
    resume = ["rl", "ppo", "--config", str(out / "config.yaml"), "--resume", str(out / "checkpoints" / "step-64")]
    capsys.readouterr()
    for extra, says in ((["--lr", "0.01", "--objective", "kl-penalty"],
                         "made with different lr=0.001 (now 0.01), objective='clip' (now 'kl-penalty')"),
                        (["--gamma", "0.5"], "gamma=0.98 (now 0.5)"), (["--eval-episodes", "3"], "eval_episodes=1 (now 3)"),
                        (["--stop-return", "1"], "--stop-return 1.0 (was None): an evaluation before checkpoint")):
        assert main([*resume, *extra]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (extra, err)
        assert (out / "config.yaml").read_text() == config
    best = torch.load(out / "checkpoints" / "step-64" / "state.pt", weights_only=True)["best"]
    assert main([*resume, "--save-total-limit", "3", "--stop-return", str(best + 1), "--skip-nonfinite"]) == 0
    assert ("--resume: run options changed (they change no update): save_total_limit=2 (now 3), stop_return=None "
            f"(now {best + 1!r}), skip_nonfinite=False (now True)") in capsys.readouterr().err
    # a run that skipped steps with --skip-nonfinite cannot claim it never skipped
    state_file = out / "checkpoints" / "step-128" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["config"]["skip_nonfinite"] is True
    torch.save({**state, "skipped_steps": 3}, state_file)
    assert main(["rl", "ppo", *tiny, "--save-total-limit", "3", "--stop-return", str(best + 1), "--resume",
                 str(state_file.parent)]) == 2
    assert "--no-skip-nonfinite: the run skipped 3 non-finite step(s)" in capsys.readouterr().err


def test_save_total_limit_rotates_checkpoints(tmp_path):
    from dpolab.cli import main

    out = tmp_path / "run"
    assert main(["rl", "ppo", "--env", "CartPole-v1", "--total-steps", "1024", "--save-steps", "256",
                 "--save-total-limit", "1", "--eval-every", "0", "--eval-episodes", "1", "--no-progress",
                 "--output-dir", str(out)]) == 0
    steps = [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()]
    assert len(steps) == 1 and (out / "checkpoints" / "latest").read_text().strip() == steps[0]


def test_discard_checkpoints_after_a_step(tmp_path):
    """Steps 1..8 with latest at 8, resumed from step 3: 4..8 go and latest names step-3; a pointer
    at a step that stays is left as it is."""
    run = RunDir(tmp_path / "run", keep_last=0)
    for step in range(1, 9):
        run.save_checkpoint(step, lambda d: (d / "x").write_text("x"))
    run.discard_checkpoints_after(3)
    assert [p.name for p in run.list_checkpoints()] == ["step-1", "step-2", "step-3"]
    assert (run.checkpoints / "latest").read_text().strip() == "step-3"
    (run.checkpoints / "latest").write_text("step-2\n")
    run.discard_checkpoints_after(2)
    assert [p.name for p in run.list_checkpoints()] == ["step-1", "step-2"]
    assert (run.checkpoints / "latest").read_text().strip() == "step-2"
    run.discard_checkpoints_after(1)
    assert [p.name for p in run.list_checkpoints()] == ["step-1"]
    assert (run.checkpoints / "latest").read_text().strip() == "step-1"
    run.discard_checkpoints_after(5)  # nothing later: nothing changes
    assert [p.name for p in run.list_checkpoints()] == ["step-1"]

def test_resume_from_an_earlier_checkpoint_drops_the_later_ones(tmp_path, monkeypatch, capsys):
    """Resumed from step-128 of 64..512 with --save-total-limit 2 and stopped after one update: the
    later checkpoints were left (step-512 outranked the new step-192 and was latest's fallback),
    the good ones pruned. Now 192..512 go when the resume starts, as their metrics rows do."""
    out = tmp_path / "run"
    args = ["rl", "ppo", "--env", "CartPole-v1", "--total-steps", "512", "--n-envs", "2", "--n-steps", "32",
            "--batch-size", "32", "--n-epochs", "1", "--eval-every", "0", "--eval-episodes", "1", "--no-progress",
            "--output-dir", str(out)]
    assert main([*args, "--save-steps", "64", "--save-total-limit", "0"]) == 0
    assert len(list((out / "checkpoints").glob("step-*"))) == 8
    at_start = []
    real = Collector.collect

    def collect(self, policy, n_steps):
        if not at_start:
            at_start.extend(sorted(p.name for p in (out / "checkpoints").glob("step-*")))
            at_start.append(latest_step(out))
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, policy, n_steps)

    monkeypatch.setattr(Collector, "collect", collect)
    assert main(["rl", "ppo", "--config", str(out / "config.yaml"), "--save-total-limit", "2", "--resume",
                 str(out / "checkpoints" / "step-128")]) == 0
    assert at_start == ["step-128", "step-64", 128]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-128", "step-192"]
    assert latest_step(out) == 192 and max(r["step"] for r in rows(out)) == 192
    assert RunDir(out).list_checkpoints()[-1].name == "step-192"  # latest's fallback: this run's newest
