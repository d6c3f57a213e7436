"""Evaluation helpers: reward-function loading and validation, win rate (ties half) against hand
values, and the sampled sequence KL against the exact KL of a one-token response."""

from __future__ import annotations

import sys

import pytest
import torch

from dpolab.errors import DpolabError
from dpolab.lm.generation import generate
from dpolab.lm.logps import response_token_logps, sequence_kl
from dpolab.rewards.evaluation import (
    evaluate_policy,
    mean_reward,
    model_win_rate,
    win_rate,
    win_rate_from_rewards,
)
from dpolab.rewards.functions import WeightedRewards, compute_rewards, load_reward_function


def length_reward(prompts, completions):
    return [float(len(c)) for c in completions]


# -- reward functions --------------------------------------------------------------------------------
def test_load_reward_function_from_cwd_module_and_file(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_cwd.py").write_text("def count_a(p, c):\n    return [x.count('a') for x in c]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    fn = load_reward_function("my_rewards_cwd:count_a")
    assert fn(["x"], ["banana"]) == [3]
    fn2 = load_reward_function(f"{tmp_path / 'my_rewards_cwd.py'}:count_a")
    assert fn2(["x"], ["aa"]) == [2]


@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "expected 'module:function'"),
    ("dpolab_no_such_module_xyz:f", "cannot import"),
    ("dpolab.rewards.evaluation:no_such_function", "no attribute"),
    ("dpolab.rewards.evaluation:__all__", "not callable"),
    ("missing_file.py:f", "file not found"),
])
def test_bad_reward_specs_are_clear_errors(spec, message):
    with pytest.raises(DpolabError, match=message):
        load_reward_function(spec)


@pytest.mark.parametrize("fn, message", [
    (lambda p, c: 1.0, "must return a list"),
    (lambda p, c: [1.0], "returned 1 values for 2"),
    (lambda p, c: [1.0, "x"], r"str at position 1 \(prompt 'q', completion 'b'\); expected a float"),
    (lambda p, c: [1.0, float("nan")], r"non-finite value \(nan\) at position 1 \(prompt 'q', completion 'b'\)"),
    (lambda p, c: [True, 1.0], "bool at position 0"),
    (lambda p, c: 1 / 0, "ZeroDivisionError"),
    (lambda p, c: [1.0, 10**400], r"non-finite value \(1000000000.*\(401 characters\)\) at position 1 \(prompt"),
    (lambda p, c: [-1e39, 1.0], r"returned -1e\+39 at position 0 \(prompt 'p', completion 'a'\), beyond float32's"),
])
def test_reward_return_values_are_checked(fn, message):
    with pytest.raises(DpolabError, match=message):
        compute_rewards(fn, ["p", "q"], ["a", "b"])


def test_evaluation_rewards_keep_float64_so_close_rewards_are_no_ties():
    """1 + 1e-8 and 1 are one float32 (a tie in a win rate): eval asks for float64, and a weighted sum
    of rewards is summed in float64 before the caller rounds it."""
    close = lambda p, c: [1.0 + 1e-8 * len(x) for x in c]  # noqa: E731
    r32 = compute_rewards(close, ["p", "q"], ["a", "bb"])
    r64 = compute_rewards(close, ["p", "q"], ["a", "bb"], dtype=torch.float64)
    assert r32[0] == r32[1] and r64.dtype == torch.float64 and r64[1] - r64[0] == pytest.approx(1e-8, rel=1e-6)
    both = WeightedRewards([("close", close), ("zero", lambda p, c: [0.0] * len(c))])
    r = compute_rewards(both, ["p", "q"], ["a", "bb"], dtype=torch.float64)
    assert r[1] - r[0] == pytest.approx(1e-8, rel=1e-6)
    assert compute_rewards(lambda p, c: [1e39, 0.0], ["p", "q"], ["a", "b"], dtype=torch.float64)[0] == 1e39


def test_a_weighted_sum_of_rewards_beyond_float32_is_the_one_line_error():
    big = lambda p, c: [3e38] * len(c)  # noqa: E731
    both = WeightedRewards([("big", big), ("also", big)], [1.0, 2.0])
    with pytest.raises(DpolabError, match=r"weighted sum of the rewards \(big, also\) is beyond float32's range at "
                                          r"position 0"):
        both.score(["p"], ["a"])


def test_compute_rewards_accepts_tensors_and_ints():
    out = compute_rewards(lambda p, c: torch.tensor([1, 2]), ["p", "q"], ["a", "b"])
    assert out.tolist() == [1.0, 2.0] and out.dtype == torch.float32
    assert mean_reward(length_reward, ["", ""], ["abc", "a"]) == pytest.approx(2.0)


# -- win rate -----------------------------------------------------------------------------------------
def test_win_rate_hand_values():
    """a = (1, 2, 3, 4) vs b = (0, 2, 5, 1): win, tie, loss, win -> (1 + ½ + 0 + 1)/4 = 0.625."""
    assert win_rate_from_rewards(torch.tensor([1.0, 2, 3, 4]), torch.tensor([0.0, 2, 5, 1])) == 0.625
    assert win_rate(length_reward, ["x"] * 3, ["aa", "b", "ccc"], ["a", "bb", "ccc"]) == pytest.approx(0.5)
    with pytest.raises(DpolabError):
        win_rate_from_rewards(torch.tensor([1.0]), torch.tensor([1.0, 2.0]))


def test_model_against_itself_under_a_constant_reward_is_one_half(tiny_model, tiny_tokenizer):
    ids = [tiny_tokenizer("the movie").input_ids] * 4
    rate = model_win_rate(tiny_model, tiny_model, tiny_tokenizer, ["the movie"] * 4, ids,
                          lambda p, c: [1.0] * len(c), max_new_tokens=3)
    assert rate == 0.5


# -- sequence KL --------------------------------------------------------------------------------------
def test_sequence_kl_is_zero_against_itself_and_matches_token_sums(tiny_model, tiny_tokenizer):
    from dpolab.lm.tiny import tiny_llama

    other = tiny_llama(len(tiny_tokenizer), hidden_size=32, layers=2, heads=4, seed=1, tokenizer=tiny_tokenizer)
    prompts = [tiny_tokenizer("the movie").input_ids, tiny_tokenizer("a terrible boring film").input_ids]
    gen = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert sequence_kl(tiny_model, tiny_model, gen).abs().max() == 0
    kl = sequence_kl(tiny_model, other, gen)
    # by hand: log_softmax over full logits, each row run alone without padding
    for b, p in enumerate(prompts):
        n = int(gen.response_lengths[b])
        seq = torch.tensor([p + gen.response_ids[b, :n].tolist()])
        want = 0.0
        for model, sign in ((tiny_model, 1.0), (other, -1.0)):
            with torch.no_grad():
                lp = torch.log_softmax(model(seq).logits[0, len(p) - 1:-1].double(), -1)
            want += sign * lp.gather(1, seq[0, len(p):, None]).sum().item()
        assert kl[b].item() == pytest.approx(want, abs=1e-4)


def test_sampled_sequence_kl_estimates_the_exact_kl(tiny_model, tiny_tokenizer):
    """One-token responses: KL(π‖π_ref) = Σ_v π(v|x)(log π(v|x) − log π_ref(v|x)) exactly from the
    logits; the mean of 3000 sampled k1 values is within 4.5 standard errors of it. (Random tiny
    models are near-uniform; sharper output layers make the two distributions clearly differ.)"""
    from dpolab.lm.tiny import tiny_llama

    ref = tiny_llama(len(tiny_tokenizer), hidden_size=32, layers=2, heads=4, seed=3, tokenizer=tiny_tokenizer)
    with torch.no_grad():
        ref.lm_head.weight.mul_(20.0)
        tiny_model.lm_head.weight.mul_(10.0)
    prompt = tiny_tokenizer("the plot was").input_ids
    with torch.no_grad():
        lp = torch.log_softmax(tiny_model(torch.tensor([prompt])).logits[0, -1].double(), -1)
        lq = torch.log_softmax(ref(torch.tensor([prompt])).logits[0, -1].double(), -1)
    exact = float((lp.exp() * (lp - lq)).sum())
    gen = generate(tiny_model, tiny_tokenizer, [prompt] * 3000, max_new_tokens=1,
                   generator=torch.Generator().manual_seed(0))
    samples = sequence_kl(tiny_model, ref, gen).double()
    se = float(samples.std()) / len(samples) ** 0.5
    assert exact > 0.5  # the two models differ
    assert abs(float(samples.mean()) - exact) < 4.5 * se, (float(samples.mean()), exact, se)


def test_response_token_logps_use_the_sampling_temperature(tiny_model, tiny_tokenizer):
    prompts = [tiny_tokenizer("the movie").input_ids]
    gen = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        at_two = response_token_logps(tiny_model, gen, temperature=2.0)
        logits = tiny_model(gen.input_ids).logits[0, gen.prompt_length - 1:-1] / 2.0
    want = torch.log_softmax(logits.double(), -1).gather(1, gen.response_ids[0, :, None])[:, 0]
    torch.testing.assert_close(at_two[0].double(), want * gen.response_mask[0], atol=1e-5, rtol=0)


def test_evaluate_policy_with_lora_reference_is_zero_kl_at_init(tiny_model, tiny_tokenizer):
    """A fresh LoRA adapter is a no-op (B = 0), so the policy equals its base: KL exactly 0."""
    from dpolab.lm.loading import apply_lora

    policy = apply_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")
    prompts = ["the movie", "a film"]
    ids = [tiny_tokenizer(p).input_ids for p in prompts]
    out = evaluate_policy(policy, tiny_tokenizer, prompts, ids, length_reward, max_new_tokens=4)
    assert out["kl"] == 0.0
    assert set(out) == {"reward", "reward_std", "kl", "response_length", "eos_fraction"}
    assert 1 <= out["response_length"] <= 4
    with pytest.raises(DpolabError, match="no reference"):
        evaluate_policy(tiny_model, tiny_tokenizer, prompts, ids, length_reward, max_new_tokens=2)


def test_misaligned_inputs_are_refused_and_helpers_compare_in_float64():
    with pytest.raises(DpolabError, match=r"one prompt \(and column value\) per completion, got 1 prompts, "
                                          r"2 completions"):
        compute_rewards(lambda p, c: [0.0] * len(c), ["p"], ["a", "b"])
    with pytest.raises(DpolabError, match=r"2 prompts, 2 completions, 1 column 'answer'"):
        compute_rewards(lambda p, c, answer: [0.0] * len(c), ["p", "q"], ["a", "b"], {"answer": ["x"]})
    close = lambda p, c: [1.0 + 1e-9 * len(x) for x in c]  # noqa: E731 -- one float32, two float64s
    assert win_rate(close, ["p"], ["aa"], ["a"]) == 1.0
    assert mean_reward(close, ["p", "q"], ["a", "aaa"]) == pytest.approx(1.0 + 2e-9, rel=0, abs=1e-15)
