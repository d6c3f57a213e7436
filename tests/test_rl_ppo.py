"""Gymnasium PPO: CLI smoke test, run directory, determinism, exact resume, continuous actions, CartPole."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from dpolab.cli import main
from dpolab.config import make_config
from dpolab.errors import DpolabError
from dpolab.rl.gym_ppo import PPOConfig, clip_grad_norm, flat_optimizer_state, ppo_update, train
from dpolab.rl.nets import ActorCritic, fast_tanh, load_policy, save_policy
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


class _RecordFinal(gym.Wrapper):
    """Records each episode's last observation, as the environment itself returned it."""

    def __init__(self, env):
        super().__init__(env)
        self.finals: list[np.ndarray] = []

    def step(self, action):
        obs, r, te, tr, info = self.env.step(action)
        if te or tr:
            self.finals.append(obs.copy())
        return obs, r, te, tr, info


def test_rollout_same_step_autoreset_bootstraps_truncation_with_the_final_observation():
    """Every row is a real transition; after an episode end the next row starts the new episode;
    next_values is V(s_{t+1}) inside an episode, V(final observation) at a truncation, 0 at a
    termination (checked against the final observations the environments really returned)."""
    def make():  # short time limit: truncations within the rollout, as well as terminations
        return _RecordFinal(gym.make("CartPole-v1", max_episode_steps=12))
    envs = gym.vector.SyncVectorEnv([make, make], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    torch.manual_seed(0)
    col = Collector(envs, seed=0)
    policy = ActorCritic(4, 2, True)
    ro, episodes = col.collect(policy, 60)
    assert ro.truncated.any() and ro.terminated.any()
    assert torch.all(ro.rewards == 1)  # CartPole: reward 1 on every step, no reward-0 reset rows
    done = ro.terminated | ro.truncated
    inside = ~done[:-1]
    assert torch.equal(ro.next_values[:-1][inside], ro.values[1:][inside])
    assert torch.all(ro.next_values[ro.terminated] == 0)
    with torch.no_grad():
        for n in range(2):
            ends = torch.nonzero(done[:, n]).flatten().tolist()
            finals = envs.envs[n].finals
            assert len(finals) == len(ends)
            for t, final in zip(ends, finals):
                if ro.truncated[t, n] and not ro.terminated[t, n]:
                    expected = policy.value(torch.as_tensor(final)[None])[0]
                    torch.testing.assert_close(ro.next_values[t, n], expected)
                if t + 1 < 60:  # the next row is the reset observation of a new episode, not the final one
                    assert not np.allclose(ro.obs[t + 1, n].numpy(), final)
                    assert np.all(np.abs(ro.obs[t + 1, n].numpy()) <= 0.05)  # CartPole's reset range
    # episode lengths count every step; truncated ones are exactly the time limit
    assert all(length == ret for ret, length in episodes)
    assert sum(length == 12 for _, length in episodes) >= int(ro.truncated.sum())
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
    assert b.ep_length.sum() == 0
    # a collector state from before same-step autoreset (no "autoreset" entry) is not restored as is
    old = {k: v for k, v in state.items() if k != "autoreset"}
    with pytest.warns(UserWarning, match="next-step autoreset.*fresh episodes"):
        b.load_state_dict(old, reseed=5)
    a.envs.close(), b.envs.close()


# -- the fast paths equal the plain ones -------------------------------------------------------------
def test_fast_tanh_matches_torch_tanh_and_its_gradient():
    torch.manual_seed(0)
    for dtype, rtol in ((torch.float32, 2.5e-7), (torch.float64, 5e-16)):
        x = (torch.randn(300, 70, dtype=dtype) * 3).requires_grad_()
        x.data[0, :4] = torch.tensor([0.0, 1e-30, 25.0, -40.0], dtype=dtype)
        y = fast_tanh(x)
        ref = torch.tanh(x)
        torch.testing.assert_close(y, ref, rtol=rtol, atol=0)
        g = torch.randn_like(ref)
        (gx,) = torch.autograd.grad(y, x, g)
        (gref,) = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(gx, gref, rtol=4 * rtol, atol=4 * rtol)
        with torch.no_grad():
            torch.testing.assert_close(fast_tanh(x), ref.detach(), rtol=rtol, atol=0)
    xb = torch.randn(5, 3, dtype=torch.bfloat16)
    assert torch.equal(fast_tanh(xb), torch.tanh(xb))  # other dtypes: torch.tanh itself


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("discrete,activation,hidden", [(True, "tanh", [64, 64]), (False, "tanh", [32]),
                                                        (True, "relu", [16, 8, 4]), (False, "relu", [8, 8])])
def test_backward_from_outputs_equals_autograd(discrete, activation, hidden, dtype):
    """Exact in float64; in float32 within rounding of sums of 40 rows (the kernels' summation order
    differs by CPU, so the bound is relative to the gradient's scale, not to each element)."""
    torch.manual_seed(0)
    pol = ActorCritic(5, 3, discrete, hidden, activation, log_std_init=-0.3).to(dtype)
    for p in pol.parameters():
        p.data += 0.2 * torch.randn_like(p)
    obs = torch.randn(40, 5, dtype=dtype)
    d_out, d_values, d_log_std = (torch.randn(40, 3, dtype=dtype), torch.randn(40, dtype=dtype),
                                  torch.randn(3, dtype=dtype))
    out, values, cache = pol.forward_with_cache(obs)
    assert out.dtype == dtype and not out.requires_grad and not values.requires_grad  # no graph was built
    ref_out, ref_values = pol.actor(obs), pol.critic(obs).squeeze(-1)
    torch.testing.assert_close(out, ref_out.detach())
    torch.testing.assert_close(values, ref_values.detach())
    eps = 1e-12 if dtype == torch.float64 else 1e-6
    for with_values in (True, False):
        scalar = (ref_out * d_out).sum() + (ref_values * d_values).sum() * with_values
        if not discrete:
            scalar = scalar + (pol.log_std * d_log_std).sum()
        ref = torch.autograd.grad(scalar, list(pol.parameters()), retain_graph=True)
        pol.backward_from_outputs(cache, d_out, d_values if with_values else None, d_log_std)
        for (k, p), r in zip(pol.named_parameters(), ref):
            torch.testing.assert_close(p.grad, r, rtol=10 * eps, atol=eps * max(1.0, r.abs().max().item()), msg=k)


@pytest.mark.parametrize("discrete,activation", [(True, "tanh"), (False, "relu")])
def test_training_forward_then_backward_equals_loss_backward(discrete, activation):
    """The PPO update's interface: ``loss`` built from ``training_forward``'s outputs, then
    ``policy.backward(loss)``, leaves the gradients ``loss.backward()`` through ``forward`` would."""
    from dpolab.losses.ppo import ppo_clip_loss

    torch.manual_seed(1)
    pol = ActorCritic(4, 2, discrete, [16, 16], activation, log_std_init=-0.2)
    twin = ActorCritic(4, 2, discrete, [16, 16], activation, log_std_init=-0.2)
    twin.load_state_dict(pol.state_dict())
    obs, adv, ret = torch.randn(32, 4), torch.randn(32), torch.randn(32)
    actions = torch.randint(0, 2, (32,)) if discrete else torch.randn(32, 2)

    def loss_of(out, values, net):
        pg, _ = ppo_clip_loss(net.log_prob(out, actions), torch.full((32,), -0.7), adv, 0.2)
        return pg.mean() + 0.5 * (values - ret).pow(2).mean() - 0.01 * net.entropy(out).mean()

    out, values = pol.training_forward(obs)
    pol.backward(loss_of(out, values, pol))
    ref_out, ref_values = twin(obs)
    loss_of(ref_out, ref_values, twin).backward()
    for (k, p), q in zip(pol.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=k)


def test_clip_grad_norm_is_torch_clip_grad_norm():
    torch.manual_seed(0)
    for max_norm in (0.5, 1e9, math.inf):
        grads = [torch.randn(64, 4), torch.randn(64), torch.randn(2, 64) * 3, torch.randn(1)]
        before = [g.clone() for g in grads]
        twins = [g.clone().requires_grad_() for g in grads]
        for t, g in zip(twins, grads):
            t.grad = g.clone()
        norm = clip_grad_norm(grads, max_norm)
        ref = torch.nn.utils.clip_grad_norm_(twins, max_norm, foreach=True)
        assert torch.equal(norm, ref)
        assert all(torch.equal(g, t.grad) for g, t in zip(grads, twins))
        after = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
        if max_norm == 0.5:
            assert norm > 1 and abs(float(after) - 0.5) < 1e-5
        else:
            assert all(torch.equal(g, b) for g, b in zip(grads, before))


@pytest.mark.parametrize("ent_coef", [0.0, 0.05])
@pytest.mark.parametrize("discrete", [True, False])
def test_ppo_update_step_is_sgd_on_the_ppo_loss(ent_coef, discrete):
    """One minibatch step of ppo_update with plain SGD moves θ by −lr·∇L, L = L^CLIP + c₁ L^VF − c₂ H
    computed here from the nn.Sequential modules and torch.distributions (entropy left in the loss even
    with c₂ = 0, as a plain implementation would)."""
    torch.manual_seed(0)
    n, a_dim = 64, 2
    pol = ActorCritic(4, a_dim, discrete, log_std_init=-0.2)
    for p in pol.parameters():  # away from the init (tiny policy head), so every term matters
        p.data += 0.3 * torch.randn_like(p)
    ref = ActorCritic(4, a_dim, discrete)
    ref.load_state_dict(pol.state_dict())
    obs = torch.randn(n, 4)
    act = torch.randint(0, a_dim, (n,)) if discrete else torch.randn(n, a_dim)
    old_logp, old_v, adv, ret = torch.randn(n) * 0.1 - 0.7, torch.randn(n), torch.randn(n), torch.randn(n)
    if not discrete:
        old_logp = old_logp - 1.5
    cfg = make_config(PPOConfig, dict(n_epochs=1, batch_size=n, ent_coef=ent_coef, vf_coef=0.5, max_grad_norm=0.0,
                                      norm_adv=True))
    ppo_update(pol, torch.optim.SGD(pol.parameters(), lr=0.1), (obs, act, old_logp, old_v, adv, ret), cfg, 0.2)

    dist = (torch.distributions.Categorical(logits=ref.actor(obs)) if discrete else
            torch.distributions.Normal(ref.actor(obs), torch.exp(ref.log_std)))
    logp = dist.log_prob(act) if discrete else dist.log_prob(act).sum(-1)
    ent = dist.entropy() if discrete else dist.entropy().sum(-1)
    ratio = torch.exp(logp - old_logp)
    a = (adv - adv.mean()) / adv.std()
    pg = -torch.min(ratio * a, torch.clamp(ratio, 0.8, 1.2) * a).mean()
    loss = pg + 0.5 * ((ref.critic(obs).squeeze(-1) - ret) ** 2).mean() - ent_coef * ent.mean()
    loss.backward()
    for (k, p), q in zip(pol.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * q.grad, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("discrete", [True, False])
def test_flat_parameters_are_views_and_the_update_equals_separate_tensors(tmp_path, discrete):
    """flatten_parameters keeps every value, makes parameters and gradients views of two flat tensors,
    and PPO updates with Adam over the flat tensor equal those with Adam over the separate tensors;
    an Adam state over separate tensors (older checkpoints) converts to the flat one exactly."""
    torch.manual_seed(0)
    a = ActorCritic(4, 2, discrete)
    b = ActorCritic(4, 2, discrete)
    b.load_state_dict(a.state_dict())
    before = {k: v.clone() for k, v in a.state_dict().items()}
    flat = a.flatten_parameters()
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())
    assert flat.numel() == sum(p.numel() for p in a.parameters()) and a.flat_grad() is flat.grad
    first, p0 = next(iter(a.named_parameters()))
    with torch.no_grad():
        flat[0] = 7.0  # the first parameter is a view of the buffer
        assert p0.reshape(-1)[0] == 7.0
        flat[0] = before[first].reshape(-1)[0]
    save_policy(a, tmp_path / "p")  # shared storage must not trouble safetensors
    assert all(torch.equal(v, before[k]) for k, v in load_policy(tmp_path / "p")[0].state_dict().items())

    cfg = make_config(PPOConfig, dict(n_epochs=3, batch_size=32))
    opt_a = torch.optim.Adam([flat], lr=3e-3, eps=1e-5)
    opt_b = torch.optim.Adam(b.parameters(), lr=3e-3, eps=1e-5)
    act = torch.randint(0, 2, (64,)) if discrete else torch.randn(64, 2)
    batch = (torch.randn(64, 4), act, torch.randn(64) - 0.7 - 1.5 * (not discrete), torch.randn(64), torch.randn(64),
             torch.randn(64))
    for seed in (1, 2):
        torch.manual_seed(seed)
        ma, _, _ = ppo_update(a, opt_a, batch, cfg, 0.2)
        torch.manual_seed(seed)
        mb, _, _ = ppo_update(b, opt_b, batch, cfg, 0.2)
        for (k, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)
        assert ma.keys() == mb.keys() and all(math.isclose(ma[k], mb[k], rel_tol=1e-4, abs_tol=1e-6) for k in ma)
    # the per-tensor Adam state, converted, continues exactly like the flat one
    c = ActorCritic(4, 2, discrete)
    c.load_state_dict(b.state_dict())
    opt_c = torch.optim.Adam([c.flatten_parameters()], lr=3e-3, eps=1e-5)
    opt_c.load_state_dict(flat_optimizer_state(opt_b.state_dict()))
    torch.testing.assert_close(opt_c.state_dict()["state"][0]["exp_avg_sq"],
                               torch.cat([opt_b.state[p]["exp_avg_sq"].reshape(-1) for p in b.parameters()]),
                               rtol=0, atol=0)
    for opt, pol in ((opt_c, c), (opt_b, b)):
        torch.manual_seed(3)
        ppo_update(pol, opt, batch, cfg, 0.2)
    for p, q in zip(c.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert flat_optimizer_state(opt_c.state_dict()) == opt_c.state_dict()  # already flat: unchanged
    next(a.parameters()).grad = None
    assert a.flat_grad() is None  # detached from the buffer: ppo_update falls back to the separate tensors


def test_python_api_checks_the_config_and_restores_torch_threads(tmp_path):
    import torch

    from dpolab.errors import ConfigError

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = _cfg(tmp_path, "a", seed=3)
        cfg.output_dir = tmp_path / "a"  # a Path, as a notebook passes it
        train(cfg)
        assert torch.get_num_threads() == 2  # --threads 1 was for the run only
        bad = _cfg(tmp_path, "b", seed=3)
        bad.batch_size = 10**6
        with pytest.raises(ConfigError, match="exceeds"):
            train(bad)
        assert not (tmp_path / "b").exists()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("discrete", [True, False])
def test_exact_kl_between_policies_equals_torch_distributions(discrete):
    torch.manual_seed(0)
    old, new = ActorCritic(3, 2, discrete, log_std_init=-0.3).double(), ActorCritic(3, 2, discrete).double()
    for p in new.parameters():
        p.data += 0.3 * torch.randn_like(p)
    obs = torch.randn(6, 3, dtype=torch.float64)
    if discrete:
        want = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=old.actor(obs)),
                                                 torch.distributions.Categorical(logits=new.actor(obs)))
        got = new.kl(old.actor(obs), new.actor(obs))
    else:
        want = torch.distributions.kl_divergence(
            torch.distributions.Normal(old.actor(obs), torch.exp(old.log_std)),
            torch.distributions.Normal(new.actor(obs), torch.exp(new.log_std))).sum(-1)
        got = new.kl(old.actor(obs), new.actor(obs), old.log_std.detach())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(new.kl(new.actor(obs), new.actor(obs), None if discrete else new.log_std.detach()),
                          torch.zeros(6, dtype=torch.float64), atol=1e-14)  # KL(π‖π) = 0


@pytest.mark.parametrize("discrete", [True, False])
def test_kl_penalty_update_step_is_sgd_on_the_penalised_loss(discrete):
    """--objective kl-penalty: one minibatch step with plain SGD moves θ by −lr·∇L with
    L = −(r·Â − β·KL[π_old ‖ π_θ]) + c₁ L^VF (PPO paper eq. 8), the exact KL from torch.distributions."""
    torch.manual_seed(1)
    n, a_dim, beta = 64, 2, 3.0
    pol = ActorCritic(4, a_dim, discrete, log_std_init=-0.2)
    for p in pol.parameters():
        p.data += 0.3 * torch.randn_like(p)
    ref = ActorCritic(4, a_dim, discrete)
    ref.load_state_dict(pol.state_dict())
    obs = torch.randn(n, 4)
    act = torch.randint(0, a_dim, (n,)) if discrete else torch.randn(n, a_dim)
    old_out = pol.actor(obs).detach() + 0.2 * torch.randn(n, a_dim)  # π_old away from π_θ: the KL term matters
    old_log_std = None if discrete else pol.log_std.detach() - 0.1
    old_logp, old_v, adv, ret = torch.randn(n) * 0.1 - 0.7, torch.randn(n), torch.randn(n), torch.randn(n)
    cfg = make_config(PPOConfig, dict(n_epochs=1, batch_size=n, vf_coef=0.5, max_grad_norm=0.0, norm_adv=False,
                                      objective="kl-penalty", kl_coef=beta))
    metrics, _, _ = ppo_update(pol, torch.optim.SGD(pol.parameters(), lr=0.1),
                               (obs, act, old_logp, old_v, adv, ret), cfg, 0.2, penalty=(old_out, old_log_std, beta))

    if discrete:
        dist, old_dist = (torch.distributions.Categorical(logits=ref.actor(obs)),
                          torch.distributions.Categorical(logits=old_out))
        logp, kl = dist.log_prob(act), torch.distributions.kl_divergence(old_dist, dist)
    else:
        dist = torch.distributions.Normal(ref.actor(obs), torch.exp(ref.log_std))
        old_dist = torch.distributions.Normal(old_out, torch.exp(old_log_std))
        logp, kl = dist.log_prob(act).sum(-1), torch.distributions.kl_divergence(old_dist, dist).sum(-1)
    pg = -(torch.exp(logp - old_logp) * adv - beta * kl).mean()
    loss = pg + 0.5 * ((ref.critic(obs).squeeze(-1) - ret) ** 2).mean()
    loss.backward()
    for (k, p), q in zip(pol.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * q.grad, rtol=1e-5, atol=1e-6, msg=k)
    assert metrics["losses/kl"] == pytest.approx(float(kl.mean().detach()), rel=1e-5)


def test_kl_penalty_run_adapts_beta_and_resumes_exactly(tmp_path):
    """β follows the PPO paper's rule from each update's measured KL (logged), is carried by the
    checkpoint, and a resumed run equals the uninterrupted one."""
    kw = dict(seed=5, total_steps=384, objective="kl-penalty", kl_coef=1.0, kl_target=0.001)
    train(_cfg(tmp_path, "full", **kw))
    rows = [r for r in _rows(tmp_path / "full") if "charts/kl_coef" in r]
    assert len(rows) == 6
    for before, after in zip(rows, rows[1:]):  # β of the next update from this update's rollout KL
        d, beta = before["losses/rollout_kl"], before["charts/kl_coef"]
        assert after["charts/kl_coef"] == (beta / 2 if d < 0.001 / 1.5 else 2 * beta if d > 0.0015 else beta)
    assert len({r["charts/kl_coef"] for r in rows}) > 1
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-256", resumed_dir / "ckpt")
    train(_cfg(tmp_path, "resumed", **kw, resume=str(resumed_dir / "ckpt")))
    after = [r for r in _rows(tmp_path / "full") if r["step"] > 256]
    assert after and _rows(resumed_dir) == after


@pytest.mark.parametrize("extra, message", [
    (["--kl-coef", "0.5"], "--kl-coef is read only by --objective kl-penalty"),
    (["--kl-target", "0.01"], "--kl-target is read only by --objective kl-penalty"),
    (["--objective", "kl-penalty", "--kl-target", "0"], "--kl-target must be > 0"),
    (["--objective", "kl-penalty", "--kl-coef", "-1"], "--kl-coef must be >= 0"),
    (["--objective", "kl-penalty", "--kl-coef", "0", "--kl-target", "0.01"], "give a --kl-coef > 0"),
])
def test_kl_penalty_options_are_checked(tmp_path, capsys, extra, message):
    assert main(["rl", "ppo", "--output-dir", str(tmp_path / "x"), *TINY, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


START_ENV = '''
import gymnasium as gym, numpy as np

class StartDiscrete(gym.Env):
    """Discrete(2, start=1): action 2 earns 1, action 1 earns 0; 10-step episodes."""
    observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gym.spaces.Discrete(2, start=1)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, a):
        if not self.action_space.contains(a):
            raise ValueError(f"invalid action {a!r}")
        self.t += 1
        return np.zeros(2, np.float32), float(a == 2), False, self.t >= 10, {}

gym.register("{env_id}", entry_point=StartDiscrete)
'''


@pytest.fixture
def start_env_module(tmp_path, monkeypatch):
    """A module registering a custom env with a Discrete(2, start=1) action space, not yet imported."""
    import sys
    name, env_id = f"dpolab_test_startenv_{tmp_path.name}", "DpolabStartDiscrete-v0"
    (tmp_path / f"{name}.py").write_text(START_ENV.replace("{env_id}", env_id))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, env_id
    sys.modules.pop(name, None)
    gym.registry.pop(env_id, None)


def test_custom_env_as_module_colon_id_with_a_discrete_space_starting_at_1(start_env_module, tmp_path, capsys):
    module, env_id = start_env_module
    # module:EnvId imports the module (which registers the env) as gym.make does; was "doesn't exist"
    assert main(["rl", "ppo", "--env", f"{module}:{env_id}", "--total-steps", "64", "--eval-every", "0",
                 "--output-dir", str(tmp_path / "run"), *TINY]) == 0, capsys.readouterr().err
    # the policy's index 1 is the env's action 2 (was sent as 1, or 0 as the action 1)
    policy = ActorCritic(2, 2, True, [4])
    with torch.no_grad():
        policy.actor[-1].bias.copy_(torch.tensor([0.0, 5.0]))
    assert evaluate(policy, env_id, 3, seed=0) == [10.0, 10.0, 10.0]
    assert main(["rl", "ppo", "--env", "dpolab_no_such_module:X-v0", "--output-dir", str(tmp_path / "b"),
                 *TINY]) == 2
    assert "cannot import module 'dpolab_no_such_module'" in capsys.readouterr().err
