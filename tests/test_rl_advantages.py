"""Returns and GAE (dpolab.rl.advantages): hand values, limit cases, loop equivalence, LM masking."""

from __future__ import annotations

import pytest
import torch

from dpolab.rl.advantages import discounted_returns, gae, nstep_returns, shift_values, whiten

D = torch.float64


def _random_rollout(T: int = 13, N: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, N, generator=g, dtype=D)
    values = torch.randn(T, N, generator=g, dtype=D)
    next_values = torch.randn(T, N, generator=g, dtype=D)
    terminated = torch.rand(T, N, generator=g) < 0.15
    truncated = (torch.rand(T, N, generator=g) < 0.15) & ~terminated
    return rewards, values, next_values, terminated, truncated


def _consistent_rollout(seed: int):
    """next_values[t] = values[t+1] inside episodes; at an episode end, an independent V(final obs)."""
    r, v, nv, te, tr = _random_rollout(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    nv = shift_values(v, torch.randn(v.shape[1], generator=g, dtype=D))
    nv = torch.where(te | tr, torch.randn(v.shape, generator=g, dtype=D), nv)
    return r, v, nv, te, tr


def _gae_loop(rewards, values, next_values, terminated, truncated, gamma, lam):
    """Plain scalar loop, one column at a time, straight from the definition."""
    T, N = rewards.shape
    adv = torch.zeros(T, N, dtype=D)
    for n in range(N):
        a = 0.0
        for t in reversed(range(T)):
            nv = 0.0 if terminated[t, n] else float(next_values[t, n])
            delta = float(rewards[t, n]) + gamma * nv - float(values[t, n])
            cont = 0.0 if (terminated[t, n] or truncated[t, n]) else 1.0
            a = delta + gamma * lam * cont * a
            adv[t, n] = a
    return adv


def test_gae_hand_values():
    # One env, T = 3, γ = 0.5, λ = 0.5, r = (1, 2, 3), V(s_t) = (1, 1, 1), V(s_3) = 2, no episode end.
    # δ = (1 + .5·1 − 1, 2 + .5·1 − 1, 3 + .5·2 − 1) = (0.5, 1.5, 3.0)
    # Â_2 = 3.0; Â_1 = 1.5 + .25·3 = 2.25; Â_0 = 0.5 + .25·2.25 = 1.0625; returns = Â + 1.
    r = torch.tensor([[1.0], [2.0], [3.0]], dtype=D)
    v = torch.ones(3, 1, dtype=D)
    nv = shift_values(v, torch.tensor([2.0], dtype=D))
    adv, ret = gae(r, v, nv, None, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.0625, 2.25, 3.0], dtype=D))
    torch.testing.assert_close(ret[:, 0], torch.tensor([2.0625, 3.25, 4.0], dtype=D))
    # Termination at t = 1 (s_2 terminal): δ_1 = 2 − 1 = 1, Â_1 = 1 (no carry), Â_0 = 0.5 + .25·1 = 0.75.
    term = torch.tensor([[False], [True], [False]])
    adv, _ = gae(r, v, nv, term, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.75, 1.0, 3.0], dtype=D))
    # Truncation at t = 1 instead: bootstrap δ_1 = 1.5 as before, but no carry: Â_1 = 1.5, Â_0 = 0.875.
    adv, _ = gae(r, v, nv, None, term, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.875, 1.5, 3.0], dtype=D))


def test_gae_vectorised_equals_plain_loop():
    for seed in range(3):
        r, v, nv, te, tr = _random_rollout(seed=seed)
        for gamma, lam in ((0.99, 0.95), (0.9, 0.0), (1.0, 1.0), (0.5, 0.3)):
            adv, ret = gae(r, v, nv, te, tr, gamma=gamma, lam=lam)
            torch.testing.assert_close(adv, _gae_loop(r, v, nv, te, tr, gamma, lam))
            torch.testing.assert_close(ret, adv + v)


def test_gae_lambda_zero_is_td_error():
    r, v, nv, te, tr = _random_rollout(seed=4)
    adv, _ = gae(r, v, nv, te, tr, gamma=0.9, lam=0.0)
    torch.testing.assert_close(adv, r + 0.9 * (~te) * nv - v)
    torch.testing.assert_close(adv + v, nstep_returns(r, nv, te, tr, gamma=0.9, n=1) + 0 * v)


def test_gae_lambda_one_is_discounted_return_minus_value():
    # Consistent values: next_values[t] = values[t+1] inside an episode; truncations bootstrap
    # from the (given) final-observation value, so the Monte Carlo return gets that bootstrap.
    r, v, nv, te, tr = _consistent_rollout(seed=5)
    gamma = 0.95
    adv, ret = gae(r, v, nv, te, tr, gamma=gamma, lam=1.0)
    # discounted return with the bootstrap folded into the reward of truncated/last steps
    last = torch.zeros_like(te)
    last[-1] = True
    boot = torch.where((tr | last) & ~te, gamma * nv, torch.zeros_like(nv))
    mc = discounted_returns(r + boot, te | tr, gamma)
    torch.testing.assert_close(adv, mc - v)
    torch.testing.assert_close(ret, mc)


def test_discounted_returns_hand_values():
    # r = (1, 1, 1), γ = 0.5, episode ends after t = 1: G = (1 + .5·1, 1, 1) = (1.5, 1, 1); with
    # bootstrap 4 after the last step: G_2 = 1 + .5·4 = 3.
    r = torch.ones(3, 1, dtype=D)
    d = torch.tensor([[False], [True], [False]])
    torch.testing.assert_close(discounted_returns(r, d, 0.5, bootstrap=torch.tensor([4.0], dtype=D))[:, 0],
                               torch.tensor([1.5, 1.0, 3.0], dtype=D))


def test_nstep_returns_hand_values_and_limits():
    # T = 4, γ = 0.5, r = 1, next_values V(s_{t+1}) = (10, 20, 30, 40), n = 2, no end:
    # G_0 = 1 + .5 + .25·20 = 6.5; G_1 = 1 + .5 + .25·30 = 9; G_2 = 1 + .5 + .25·40 = 11.5;
    # G_3 (rollout ends) = 1 + .5·40 = 21.
    r = torch.ones(4, 1, dtype=D)
    nv = torch.tensor([[10.0], [20.0], [30.0], [40.0]], dtype=D)
    g = nstep_returns(r, nv, None, gamma=0.5, n=2)
    torch.testing.assert_close(g[:, 0], torch.tensor([6.5, 9.0, 11.5, 21.0], dtype=D))
    # terminated at t = 1: G_0 = 1 + .5·1 = 1.5, G_1 = 1.
    term = torch.tensor([[False], [True], [False], [False]])
    g = nstep_returns(r, nv, term, gamma=0.5, n=2)
    torch.testing.assert_close(g[:2, 0], torch.tensor([1.5, 1.0], dtype=D))
    # n ≥ T with λ = 1 GAE: the same bootstrapped Monte Carlo return
    rr, v, nv2, te, tr = _consistent_rollout(seed=6)
    _, ret = gae(rr, v, nv2, te, tr, gamma=0.9, lam=1.0)
    torch.testing.assert_close(nstep_returns(rr, nv2, te, tr, gamma=0.9, n=rr.shape[0]), ret)
    with pytest.raises(ValueError):
        nstep_returns(r, nv, None, gamma=0.5, n=0)


def test_gae_language_model_masked_rows_equal_unpadded():
    # Three responses of lengths 4, 2, 5 (right padded to T = 5), per-token rewards (KL penalty
    # everywhere, the scalar score on the last real token), used as (B, T) transposed.
    torch.manual_seed(0)
    lengths = torch.tensor([4, 2, 5])
    B, T = 3, 5
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    rewards = torch.randn(B, T, dtype=D) * mask
    values = torch.randn(B, T, dtype=D)
    values_padded = values.masked_fill(~mask, 123.0)  # garbage in the padding must not leak
    terminated = torch.zeros(B, T, dtype=torch.bool)
    terminated[torch.arange(B), lengths - 1] = True
    adv, ret = gae(rewards.T, values_padded.T, shift_values(values_padded.T), terminated.T,
                   gamma=1.0, lam=0.95, mask=mask.T)
    adv, ret = adv.T, ret.T
    for b in range(B):
        L = int(lengths[b])
        row_v = values[b, :L, None]
        a1, r1 = gae(rewards[b, :L, None], row_v, shift_values(row_v), None, gamma=1.0, lam=0.95)
        torch.testing.assert_close(adv[b, :L], a1[:, 0])
        torch.testing.assert_close(ret[b, :L], r1[:, 0])
        assert torch.all(adv[b, L:] == 0) and torch.all(ret[b, L:] == 0)


def test_float64_inputs_keep_gamma_in_float64():
    # γ = 0.9 is not a float32 number: a float32 γ would be off by 2.4e-8 relative
    r = torch.tensor([[0.0], [1.0]], dtype=D)
    v = torch.tensor([[0.0], [1.0]], dtype=D)
    nv = torch.tensor([[1.0], [0.0]], dtype=D)
    term = torch.tensor([[False], [True]])
    exact = dict(rtol=0, atol=1e-15)
    adv, _ = gae(r, v, nv, term, gamma=0.9, lam=0.8)
    # δ = (0 + .9·1 − 0, 1 + 0 − 1) = (.9, 0); Â_0 = .9 + .9·.8·0 = .9
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.9, 0.0], dtype=D), **exact)
    torch.testing.assert_close(discounted_returns(r, None, 0.9)[:, 0], torch.tensor([0.9, 1.0], dtype=D), **exact)
    g = nstep_returns(r, nv, None, gamma=0.9, n=1)  # r_t + γ·V(s_{t+1})
    torch.testing.assert_close(g[:, 0], torch.tensor([0.9, 1.0], dtype=D), **exact)


def test_gae_rejects_bad_shapes():
    with pytest.raises(ValueError, match="time first"):
        gae(torch.zeros(3), torch.zeros(3), torch.zeros(3), None, gamma=0.9, lam=0.9)
    with pytest.raises(ValueError, match="mismatch"):
        gae(torch.zeros(3, 2), torch.zeros(3, 1), torch.zeros(3, 2), None, gamma=0.9, lam=0.9)
    with pytest.raises(ValueError, match="gamma"):
        gae(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), None, gamma=1.5, lam=0.9)


def test_whiten():
    # x = (1, 2, 3, 4): mean 2.5, unbiased var = (2.25 + .25 + .25 + 2.25)/3 = 5/3
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D)
    expected = (x - 2.5) / (5 / 3) ** 0.5
    torch.testing.assert_close(whiten(x, eps=0.0), expected)
    torch.testing.assert_close(whiten(x, shift_mean=False, eps=0.0), expected + 2.5)
    # masked: only (1, 2, 3, 4) of a padded (2, 3) count; padding gives 0
    xp = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, -7.0]], dtype=D)
    m = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    out = whiten(xp, m, eps=0.0)
    torch.testing.assert_close(out[m], expected)
    assert torch.all(out[~m] == 0)
    with pytest.raises(ValueError):
        whiten(xp, torch.zeros_like(m))


def test_whiten_default_eps_and_constant_input():
    # default eps = 1e-8 is inside the root: x = (1, 2, 3, 4) -> (x − 2.5)/√(5/3 + 1e-8); without it the
    # result moves by ≈ 1.5·½·1e-8/(5/3)^1.5 ≈ 3.5e-9, far above the 1e-14 tolerance
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D)
    torch.testing.assert_close(whiten(x), (x - 2.5) / (5 / 3 + 1e-8) ** 0.5, rtol=0, atol=1e-14)
    # all-equal input (a common GRPO/PPO batch): var = 0, so (x − mean)·(0 + eps)^−½ = 0, not 0·∞ = NaN;
    # shift_mean=False gives back the mean, 3; masked, the same on the selected entries and 0 elsewhere
    c = torch.full((4,), 3.0, dtype=D)
    torch.testing.assert_close(whiten(c), torch.zeros(4, dtype=D), rtol=0, atol=0)
    torch.testing.assert_close(whiten(c, shift_mean=False), c, rtol=0, atol=0)
    cm = torch.tensor([[3.0, 3.0, 99.0]], dtype=D)
    m = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    torch.testing.assert_close(whiten(cm, m), torch.zeros(1, 3, dtype=D), rtol=0, atol=0)
