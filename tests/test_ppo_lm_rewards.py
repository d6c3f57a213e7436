"""LM-PPO pieces against hand-computed float64 values: where the per-token reward lands (right and
left padding, truncated responses), the k1/k3 penalties, score shaping, GAE per row, and the clipped
policy/value losses as the trainer reduces them."""

from __future__ import annotations

import math

import pytest
import torch

from dpolab.lm.token_rewards import (
    explained_variance,
    last_token_index,
    masked_mean,
    per_token_rewards,
    shape_scores,
    token_advantages,
)
from dpolab.losses.ppo import clipped_value_loss, ppo_clip_loss

F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


# -- per-token rewards --------------------------------------------------------------------------------
def test_score_on_last_real_token_right_padding_and_truncated_rows():
    """Row 0: EOS at index 2, then pads. Row 1: truncated (no EOS), all 4 tokens real. Row 2: one token.

    rewards[b, t] = −β (logp − ref) on real tokens, + score on the last real token; β = 0.1.
    Row 0: kl = (−1 − −2, −0.5 − −0.5, −2 − −1) = (1, 0, −1) -> (−0.1, 0, 0.1 + 2) ; pad -> 0.
    Row 1: kl = (0.5, 0.5, 0.5, 0.5) -> −0.05 each, + 3 on index 3.
    Row 2: kl = (−0.2) -> 0.02 + (−1) on index 0.
    """
    logps = t([[-1.0, -0.5, -2.0, -7.0], [-1.0, -1.0, -1.0, -1.0], [-1.0, -9.0, -9.0, -9.0]])
    ref = t([[-2.0, -0.5, -1.0, -3.0], [-1.5, -1.5, -1.5, -1.5], [-0.8, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    scores = t([2.0, 3.0, -1.0])
    rewards, kl = per_token_rewards(scores, logps, ref, mask, kl_coef=0.1)
    expected = t([[-0.1, 0.0, 0.1 + 2.0, 0.0],
                  [-0.05, -0.05, -0.05, -0.05 + 3.0],
                  [0.02 - 1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(kl, t([[1.0, 0.0, -1.0, 0.0], [0.5] * 4, [-0.2, 0, 0, 0]]), rtol=0, atol=1e-12)
    assert (rewards[~mask] == 0).all()  # never on a pad, whatever the log-probs there


def test_score_on_last_real_token_left_padding():
    """Left padding (real tokens at the end) and a row padded on both sides: the score goes to the
    last True of the mask. With β = 0 the rewards are the score alone."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    z = torch.zeros(3, 5, dtype=F64)
    rewards, _ = per_token_rewards(t([1.0, 2.0, 3.0]), z, z, mask, kl_coef=0.0)
    expected = torch.zeros(3, 5, dtype=F64)
    expected[0, 4], expected[1, 4], expected[2, 3] = 1.0, 2.0, 3.0
    torch.testing.assert_close(rewards, expected, rtol=0, atol=0)
    assert last_token_index(mask).tolist() == [4, 4, 3]


def test_last_token_index_rejects_empty_rows():
    with pytest.raises(ValueError):
        last_token_index(torch.tensor([[1, 0], [0, 0]], dtype=torch.bool))


def test_k3_penalty_hand_values():
    """k3 = (ρ − 1) − log ρ, ρ = π_ref/π. logp = −1, ref = −1.5: log ρ = −0.5,
    k3 = e^−0.5 − 1 + 0.5 = 0.10653065971263342; logp = −2, ref = −1: log ρ = 1, k3 = e − 2."""
    logps, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    rewards, kl = per_token_rewards(t([0.5]), logps, ref, mask, kl_coef=0.2, kl_estimator="k3")
    k3 = [math.exp(-0.5) - 0.5, math.e - 2.0]
    torch.testing.assert_close(kl, t([k3]), rtol=0, atol=1e-12)
    torch.testing.assert_close(rewards, t([[-0.2 * k3[0], -0.2 * k3[1] + 0.5]]), rtol=0, atol=1e-12)
    assert (kl >= 0).all()


def test_shape_scores_penalty_then_clip():
    """Penalty 1 on rows without EOS, then clip to [−1.5, 1.5]: (3, 0.5, −1) with finished
    (T, F, F) -> (3, −0.5, −2) -> (1.5, −0.5, −1.5)."""
    out = shape_scores(t([3.0, 0.5, -1.0]), torch.tensor([True, False, False]), missing_eos_penalty=1.0,
                       reward_clip=1.5)
    torch.testing.assert_close(out, t([1.5, -0.5, -1.5]), rtol=0, atol=0)
    same = shape_scores(t([3.0, 0.5]), torch.tensor([False, False]))
    torch.testing.assert_close(same, t([3.0, 0.5]), rtol=0, atol=0)


# -- advantages over response tokens --------------------------------------------------------------------
def test_token_advantages_one_episode_per_row_hand_values():
    """γ = 1, λ = 0.5. Row 0 (EOS at 1, then a pad): r = (0.1, 1.0), V = (0.5, 0.2).
    δ1 = 1 − 0.2 = 0.8 (terminal), δ0 = 0.1 + 0.2 − 0.5 = −0.2; A1 = 0.8, A0 = −0.2 + 0.5·0.8 = 0.2.
    Returns = A + V = (0.7, 1.0). The pad (r = 9, V = 9 there) is ignored: A = G = 0.
    Row 1 (truncated, 3 real tokens): r = (0, 0, 2), V = (1, 1, 1): δ = (0 + 1 − 1, 0 + 1 − 1, 2 − 1)
    = (0, 0, 1), A2 = 1, A1 = 0 + 0.5·1 = 0.5, A0 = 0 + 0.5·0.5 = 0.25; returns (1.25, 1.5, 2)."""
    rewards = t([[0.1, 1.0, 9.0], [0.0, 0.0, 2.0]])
    values = t([[0.5, 0.2, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv, ret = token_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, t([[0.2, 0.8, 0.0], [0.25, 0.5, 1.0]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, t([[0.7, 1.0, 0.0], [1.25, 1.5, 2.0]]), rtol=0, atol=1e-12)


def test_token_advantages_lambda_one_is_reward_to_go_minus_value():
    """λ = γ = 1: A_t = Σ_{s≥t} r_s − V_t within the row (the scalar score reaches every token)."""
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 6, generator=g, dtype=F64), torch.randn(4, 6, generator=g, dtype=F64)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 1 + [0] * 5, [1] * 5 + [0]], dtype=torch.bool)
    adv, _ = token_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = (rewards * mask).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, (to_go - values) * mask, rtol=0, atol=1e-12)


# -- losses as the trainer reduces them ---------------------------------------------------------------
def test_clipped_policy_and_value_losses_masked_mean_hand_values():
    """ε = 0.2. Token ratios r = exp(logp − old): (e^0.1, e^−0.5, e^0.3); advantages (1, −2, 3).
    Token 0: min(1.10517·1, 1.10517·1) = 1.1051709 -> loss −1.1051709 (inside the clip).
    Token 1: r = 0.60653 < 0.8; A < 0: min(0.60653·−2, 0.8·−2) = −1.6 -> loss 1.6 (clipped).
    Token 2: a pad (mask 0), ignored. Masked mean = (−1.1051709 + 1.6)/2 = 0.24741455.
    Value, ε = 0.2: V = (1.5, 0.0), V_old = (1.0, 0.1), G = (2.0, 1.0):
    token 0: max((1.5−2)², (1.2−2)²) = 0.64; token 1: max(1, (0−1)²) = 1 -> mean 0.82.
    clipfrac = (0 + 1)/2 = 0.5."""
    old = t([[0.0, 0.0, 0.0]])
    logp = t([[0.1, -0.5, 0.3]])
    adv = t([[1.0, -2.0, 3.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    pg, stats = ppo_clip_loss(logp, old, adv, 0.2)
    assert masked_mean(pg, mask).item() == pytest.approx((-math.exp(0.1) + 1.6) / 2, abs=1e-12)
    assert masked_mean(stats["clipfrac"], mask).item() == pytest.approx(0.5, abs=1e-12)
    vf, _ = clipped_value_loss(t([[1.5, 0.0]]), t([[1.0, 0.1]]), t([[2.0, 1.0]]), 0.2)
    assert masked_mean(vf, torch.ones(1, 2, dtype=torch.bool)).item() == pytest.approx(0.82, abs=1e-12)


def test_explained_variance_hand_values():
    """G = (1, 2, 3) real, V = (1, 2, 2): Var[G] = 2/3, G − V = (0, 0, 1): Var = 2/9 -> 1 − 1/3 = 2/3.
    A perfect critic gives 1; a pad (G = 100) changes nothing."""
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    ret, val = t([[1.0, 2.0, 3.0, 100.0]]), t([[1.0, 2.0, 2.0, 0.0]])
    assert explained_variance(val, ret, mask) == pytest.approx(2 / 3, abs=1e-12)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0, abs=1e-12)


# -- the value head -----------------------------------------------------------------------------------
def test_policy_with_value_response_positions_and_value_head(tiny_model, tiny_tokenizer, tmp_path):
    """The response-only forward (``prompt_length``, LM head on the kept rows only) equals slicing the
    full forward at positions P−1 … T−2; values are w·h + b on the last hidden state, from the
    policy (shared) or from a separate value model; the head round-trips through safetensors."""
    from dpolab.lm.generation import generate
    from dpolab.lm.tiny import tiny_llama
    from dpolab.lm.value_head import PolicyWithValue, ValueHead, load_value_head, save_value_head

    head = ValueHead(32)
    assert head(torch.randn(2, 3, 32)).abs().max() == 0  # zero-initialised
    with torch.no_grad():
        head.linear.weight.normal_(generator=torch.Generator().manual_seed(0))
        head.linear.bias.fill_(0.25)
    prompts = [tiny_tokenizer("the movie").input_ids, tiny_tokenizer("a terrible boring film").input_ids]
    gen = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    P = gen.prompt_length
    for value_model in (None, tiny_llama(len(tiny_tokenizer), hidden_size=32, layers=2, heads=4, seed=5)):
        model = PolicyWithValue(tiny_model, head, value_model)
        with torch.no_grad():
            full_logits, full_values = model(gen.input_ids, gen.attention_mask, gen.position_ids)
            logits, values = model(gen.input_ids, gen.attention_mask, gen.position_ids, prompt_length=P)
            critic = value_model or tiny_model
            hidden = critic(input_ids=gen.input_ids, attention_mask=gen.attention_mask,
                            position_ids=gen.position_ids, output_hidden_states=True).hidden_states[-1]
        assert logits.shape == (2, gen.response_ids.shape[1], len(tiny_tokenizer))
        torch.testing.assert_close(logits, full_logits[:, P - 1:-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, full_values[:, P - 1:-1])
        torch.testing.assert_close(full_values, hidden @ head.linear.weight[0] + 0.25, atol=1e-5, rtol=1e-5)
    save_value_head(head, tmp_path)
    again = load_value_head(tmp_path)
    assert torch.equal(again.linear.weight, head.linear.weight) and torch.equal(again.linear.bias, head.linear.bias)
