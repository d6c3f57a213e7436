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
    (lambda p, c: [None, 1.0], "NoneType at position 0"),
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


def test_booleans_trl_style_and_async_rewards_are_scored():
    """An exact-match reward's booleans are 1.0/0.0 (they were refused); TRL's f(completions, **kwargs)
    gets the texts by name (it got two positional arguments: a TypeError), with the columns; an async
    reward is awaited (it returned a coroutine)."""
    import numpy as np

    assert compute_rewards(lambda p, c: [x == "a" for x in c], ["p", "q"], ["a", "b"]).tolist() == [1.0, 0.0]
    assert compute_rewards(lambda p, c: np.array([True, False]), ["p", "q"], ["a", "b"]).tolist() == [1.0, 0.0]
    seen = {}

    def trl_style(completions, **kwargs):
        seen.update(kwargs, completions=completions)
        return [float(len(x)) for x in completions]

    out = compute_rewards(trl_style, ["p", "q"], ["a", "bb"], {"answer": ["1", "2"]})
    assert out.tolist() == [1.0, 2.0] and seen == {"prompts": ["p", "q"], "completions": ["a", "bb"],
                                                    "answer": ["1", "2"]}
    assert compute_rewards(lambda c, p, answer: [float(a) for a in answer], ["p"], ["a"], {"answer": ["3"]}
                           ).tolist() == [3.0]  # our form: the first two positional, whatever their names

    async def asked(prompts, completions):
        return [0.5] * len(completions)

    assert compute_rewards(asked, ["p"], ["a"]).tolist() == [0.5]


def test_row_fields_named_like_the_texts_are_not_passed_as_columns():
    """A prompt row's `completions` field (UltraFeedback's files have one) was passed as a column too:
    'got multiple values for argument completions', also for a reward that reads no column."""
    columns = {"completions": [["x", "y"]], "prompts": ["?"], "answer": ["1"]}
    assert compute_rewards(lambda prompts, completions, **kw: [float(len(kw))], ["p"], ["a"], columns).tolist() == [1.0]
    assert compute_rewards(length_reward, ["p"], ["abc"], columns).tolist() == [3.0]
    both = WeightedRewards([("len", length_reward), ("kw", lambda p, c, **kw: [float(len(kw))])])
    assert both.score(["p"], ["ab"], columns)[0].tolist() == [3.0]


def test_an_error_inside_a_reward_names_its_file_and_line(tmp_path, monkeypatch):
    """The message named the exception only (a bare assert: nothing after its name); now the line of the
    reward's own code it came from, also from a helper the reward calls. A reward file imports the
    modules beside it, as `python file.py` would."""
    folder = tmp_path / "rw"
    folder.mkdir()
    (folder / "rw_helpers.py").write_text("def util(x):\n    return 1 / 0\n")
    (folder / "rw_main.py").write_text("from rw_helpers import util\n\n\ndef deep(p, c):\n    return [util(x) for x in c]\n"
                                       "\n\ndef bare(p, c):\n    assert False\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    deep = load_reward_function(f"{folder / 'rw_main.py'}:deep")
    with pytest.raises(DpolabError, match=r"reward function deep raised ZeroDivisionError at .*rw_helpers.py:2 in util: "
                                          "division by zero"):
        compute_rewards(deep, ["p"], ["a"])
    bare = load_reward_function(f"{folder / 'rw_main.py'}:bare")
    with pytest.raises(DpolabError, match=r"reward function bare raised AssertionError at .*rw_main.py:9 in bare$"):
        compute_rewards(bare, ["p"], ["a"])


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


def _reward_model_dir(path, tokenizer, max_positions: int = 256):
    from transformers import AutoModelForSequenceClassification

    from dpolab.lm.tiny import tiny_llama

    config = tiny_llama(len(tokenizer), hidden_size=32, layers=1, heads=4, max_positions=max_positions,
                        tokenizer=tokenizer).config
    config.num_labels = 1
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_a_reward_model_with_another_tokenizer_reads_the_whole_texts(tiny_tokenizer, tmp_path):
    """A reward model with the policy's tokenizer reads the prompt cut to --max-prompt-length as the
    policy does; one with another tokenizer was cut to that many of its own tokens (the prompt's start
    and the completion's end gone, though the policy saw them) and now reads both whole."""
    from types import SimpleNamespace

    from dpolab.lm.tiny import train_tokenizer
    from dpolab.rewards.functions import score
    from dpolab.train.on_policy import reward_function

    other = train_tokenizer(["abc def ghi", "xyz uvw", "the story was kind"] * 10, vocab_size=270)
    assert other.get_vocab() != tiny_tokenizer.get_vocab()
    same_dir, other_dir = (_reward_model_dir(tmp_path / n, t) for n, t in (("same", tiny_tokenizer), ("other", other)))
    cfg = SimpleNamespace(reward=None, reward_model=[same_dir, other_dir], reward_weights=None, max_prompt_length=3,
                          max_new_tokens=4, trust_remote_code=False, dtype="float32")
    rewards = reward_function(cfg, torch.device("cpu"), tiny_tokenizer)
    prompts, completions = ["what a delightful story, charming", "the worst film"], ["and warm", "of the year, a mess"]
    _, terms = rewards.score(prompts, completions, dtype=torch.float64)
    (same_name, _), (other_name, _) = rewards.named
    assert terms[same_name].tolist() == pytest.approx(score(same_dir, prompts, completions, max_prompt_length=3,
                                                            max_length=8), abs=1e-6)
    assert terms[other_name].tolist() == pytest.approx(score(other_dir, prompts, completions), abs=1e-6)
    assert terms[other_name].tolist() != pytest.approx(score(other_dir, prompts, completions, max_prompt_length=3,
                                                             max_length=8), abs=1e-6)


def test_rows_beyond_a_reward_models_positions_or_vocabulary_name_it(tiny_tokenizer, tmp_path):
    """Both were an IndexError from inside the reward model's forward ('index out of range in self'),
    under the name reward_model_function.<locals>.scorer."""
    from types import SimpleNamespace

    from dpolab.train.on_policy import reward_function

    short = _reward_model_dir(tmp_path / "short", tiny_tokenizer, max_positions=8)
    cfg = SimpleNamespace(reward=None, reward_model=[short], reward_weights=None, max_prompt_length=None,
                          max_new_tokens=4, trust_remote_code=False, dtype="float32")
    rewards = reward_function(cfg, torch.device("cpu"), tiny_tokenizer)
    with pytest.raises(DpolabError, match=rf"reward model {short}: prompt 0 \('what a delightful story'\) and its "
                                          r"completion are \d+ of its tokens, more than its 8 positions"):
        rewards.score(["what a delightful story"], ["charming and warm, the worst film of the year"])
    small = tmp_path / "small"
    _reward_model_dir(small, tiny_tokenizer)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(small)
    model.resize_token_embeddings(100)  # fewer rows than its tokenizer's ids
    model.save_pretrained(small)
    cfg.reward_model = [str(small)]
    with pytest.raises(DpolabError, match=r"its tokenizer gives id \d+ \(prompt 0\), beyond its 100 embedding rows"):
        reward_function(cfg, torch.device("cpu"), tiny_tokenizer).score(["the worst film"], ["of the year"])
