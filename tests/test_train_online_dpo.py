"""`dpolab online-dpo`: the DPO family on pairs sampled from the policy and ranked by a reward. It
raises the reward, ties are skipped and counted, 2 CPU processes equal 1 (uneven last batch), a
real process stopped by SIGTERM resumes bitwise, and bad input is one clear line."""

from __future__ import annotations

import json
import math
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
from test_train_grpo import PROMPTS, REWARDS  # noqa: E402

MORE = REWARDS + '''
def constant(prompts, completions):
    return [1.0] * len(completions)

def chars(prompts, completions):
    return [float(len(c)) for c in completions]

def chars_tiny(prompts, completions):  # differences below float32's resolution at 0.5
    return [0.5 + 1e-9 * len(c) for c in completions]

CALLS = [0]

def ties_on_even_steps(prompts, completions):
    CALLS[0] += 1
    return constant(prompts, completions) if CALLS[0] % 2 == 0 else frac_alpha(prompts, completions)
'''


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture()
def reward_file(tmp_path) -> Path:
    path = tmp_path / "odpo_rewards.py"
    path.write_text(MORE)
    return path


def _args(model_dir, data, out, reward, *extra, fn="frac_alpha"):
    return ["online-dpo", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--no-progress",
            "--max-new-tokens", "6", "--log-samples", "0", "--eval-prompts", "0", "--reward", f"{reward}:{fn}",
            *map(str, extra)]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_raises_the_reward_and_logs_the_dpo_metrics(tiny_model_dir, prompts_file, reward_file, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, prompts_file, out, reward_file, "--max-steps", 25, "--prompts-per-step", 5,
                      "--num-samples", 4, "--learning-rate", "5e-3", "--beta", "0.1", "--eval-prompts", 5,
                      "--max-new-tokens", 8)) == 0
    rows = [r for r in _rows(out) if "loss" in r]
    first = rows[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: π = π_ref, every pair at ln 2
    for key in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "rewards/mean",
                "pairs/ties", "pairs/count", "completions/mean_length"):
        assert key in first, key
    early = sum(r["rewards/mean"] for r in rows[:5]) / 5
    late = sum(r["rewards/mean"] for r in rows[-5:]) / 5
    assert late > early + 0.1, (early, late)
    summary = json.loads((out / "summary.json").read_text())
    assert "eval/reward" in summary and "eval/kl" in summary
    assert summary["pairs/total"] > 0


def test_ties_are_skipped_and_counted(tiny_model_dir, prompts_file, reward_file, tmp_path, capsys):
    out = tmp_path / "ties"
    assert main(_args(tiny_model_dir, prompts_file, out, reward_file, "--max-steps", 2, "--prompts-per-step", 5,
                      fn="constant")) == 0
    assert "warning: no step had a pair to train on" in capsys.readouterr().err  # a run that trained nothing
    assert json.loads((out / "summary.json").read_text())["pairs/total"] == 0
    rows = _rows(out)
    assert all(r["pairs/ties"] == 1.0 and r["pairs/count"] == 0 for r in rows)
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(init[k], final[k]) for k in init)  # no pair, no update


def test_a_logged_window_with_an_all_ties_step_averages_each_metric_over_the_steps_that_have_it(
        tiny_model_dir, prompts_file, reward_file, tmp_path):
    # step 2's pairs all tie: it has no loss; logging every 2 steps must not fail on it, and must log
    # step 1's loss as the window's (the same run logged every step says what step 1's loss was)
    common = ("--max-steps", 4, "--prompts-per-step", 5, "--num-samples", 3, "--learning-rate", "5e-3")
    main(_args(tiny_model_dir, prompts_file, tmp_path / "every", reward_file, *common, "--logging-steps", 1,
               fn="ties_on_even_steps"))
    assert main(_args(tiny_model_dir, prompts_file, tmp_path / "pairs", reward_file, *common, "--logging-steps", 2,
                      fn="ties_on_even_steps")) == 0
    every, pairs = _rows(tmp_path / "every"), _rows(tmp_path / "pairs")
    assert ["loss" in r for r in every] == [True, False, True, False]
    assert [r["step"] for r in pairs] == [2, 4]
    for window, (odd, even) in zip(pairs, (every[0:2], every[2:4])):
        assert window["loss"] == pytest.approx(odd["loss"], abs=1e-12)
        assert window["pairs/ties"] == pytest.approx((odd["pairs/ties"] + even["pairs/ties"]) / 2, abs=1e-12)
        assert even["pairs/ties"] == 1.0


SGD = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-grad-norm", "0", "--max-steps", "3",
       "--lr-scheduler", "constant", "--num-samples", "3", "--micro-batch-size", "1", "--beta", "0.5")


@pytest.mark.parametrize("label", ["rank", "bradley_terry"])
def test_two_processes_equal_one_process(tiny_model_dir, prompts_file, reward_file, tmp_path, label):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(tiny_model_dir, prompts_file, one, reward_file, *SGD, "--prompts-per-step", 4,
                      "--label", label)) == 0
    res = launch("ddp_cpu.yaml", _args(tiny_model_dir, prompts_file, two, reward_file, *SGD, "--prompts-per-step", 2,
                                       "--label", label))
    assert res.returncode == 0, res.stderr[-4000:]
    wa, wb = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert max(float((wa[k] - init[k]).abs().max()) for k in init) > 1e-2
    for ra, rb in zip(_rows(one), _rows(two)):
        for key in ("loss", "rewards/margins", "rewards/mean", "pairs/count", "pairs/ties"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), (key, ra["step"])


def test_prefix_shared_pairs_train_as_the_plain_rows(tiny_model_dir, prompts_file, reward_file, tmp_path):
    """Each sampled pair as one row [prompt|chosen|rejected] (policy and live reference passes) gives
    the plain two rows' losses, metrics and weights; the summary says which layout ran."""
    runs = {"plain": "--no-prefix-sharing", "shared": "--prefix-sharing"}
    for name, flag in runs.items():
        assert main(_args(tiny_model_dir, prompts_file, tmp_path / name, reward_file, *SGD, "--prompts-per-step", 4,
                          "--micro-batch-size", 2, flag)) == 0
        assert json.loads((tmp_path / name / "summary.json").read_text())["prefix_sharing"] is (name == "shared")
    wa, wb = (load_file(str(tmp_path / n / "final" / "model.safetensors")) for n in runs)
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max(float((wa[k] - init[k]).abs().max()) for k in init) > 1e-2
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    rows = [_rows(tmp_path / n) for n in runs]
    assert len(rows[0]) == len(rows[1]) == 3
    for ra, rb in zip(*rows):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "pairs/count"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), (key, ra["step"])


def test_sigterm_then_resume_latest_is_bitwise_exact(tiny_model_dir, prompts_file, reward_file, tmp_path):
    common = ("--prompts-per-step", 2, "--num-samples", 2, "--max-steps", 6, "--save-steps", 1,
              "--learning-rate", "1e-2")
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_args(tiny_model_dir, prompts_file, ref, reward_file, *common)) == 0
    rc, err = interrupt(_args(tiny_model_dir, prompts_file, run, reward_file, *common), run, after_rows=2)
    assert_clean_stop(rc, err, signal.SIGTERM)
    assert main([*_args(tiny_model_dir, prompts_file, run, reward_file, *common), "--resume", "latest"]) == 0
    assert_same_weights(load_file(str(ref / "final" / "model.safetensors")),
                        load_file(str(run / "final" / "model.safetensors")))
    assert metric_rows(ref) == metric_rows(run)


def test_bad_input_is_one_clear_line(tiny_model_dir, prompts_file, reward_file, tmp_path, capsys):
    def err(*extra, fn="frac_alpha") -> str:
        out = tmp_path / "bad"
        assert main(_args(tiny_model_dir, prompts_file, out, reward_file, "--max-steps", 1, *extra, fn=fn)) == 2
        msg = capsys.readouterr().err.strip()
        assert msg.count("\n") == 0 and "Traceback" not in msg, msg
        assert not (out / "summary.json").exists() and not (out / "checkpoints").exists()
        return msg

    assert "--num-samples must be >= 2" in err("--num-samples", 1)
    assert "returned 1 values for" in err(fn="wrong_length")
    assert "non-finite value (nan)" in err(fn="nan")
    assert "no room for the completions" in err("--max-new-tokens", 300)
    assert "use it with `dpolab dpo`" in err("--loss", "bco_pair")
    assert "--micro-batch-tokens must be >= 0" in err("--micro-batch-tokens", -1)
    assert "--loss sigmoid: --rpo-alpha must be >= 0" in err("--rpo-alpha", -1)  # was a traceback mid-run
    assert "--loss cpo: --cpo-alpha must be >= 0" in err("--loss", "cpo", "--cpo-alpha", -1)


def test_a_reference_free_loss_keeps_its_reference_model_for_eval_kl(tiny_model_dir):
    """Online DPO measures eval/kl against --ref-model whatever the loss: with a reference-free loss
    (SimPO) the option is used, not refused as `dpolab dpo` refuses it."""
    from dpolab.train.online_dpo import OnlineDPOConfig

    OnlineDPOConfig(model=str(tiny_model_dir), data="p.jsonl", reward=["a:b"], loss="simpo",
                    ref_model=str(tiny_model_dir)).validate()


# -- evaluation: a function of the model and the seed; prompt room checked up front --------------------
def test_evaluation_draws_each_prompt_from_its_own_seed(tiny_model, tiny_tokenizer):
    """evaluate_samples (every on-policy trainer's eval/*) gives the same numbers at every batch size,
    and prompt i's completion is the one its own seed draws (was: one generator across batches)."""
    from types import SimpleNamespace

    from dpolab.lm.generation import decode_responses, generate, sample_completions
    from dpolab.lm.sampling import row_seeds
    from dpolab.lm.tiny import tiny_llama
    from dpolab.train.on_policy import evaluate_samples

    ref = tiny_llama(len(tiny_tokenizer), hidden_size=32, layers=2, heads=4, seed=1, tokenizer=tiny_tokenizer)
    ids = [tiny_tokenizer(p).input_ids for p in PROMPTS]
    cfg = SimpleNamespace(max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0, seed=3, direct_decoder=True)
    reward = lambda prompts, completions: [float(len(c)) for c in completions]  # noqa: E731
    runs = [evaluate_samples(cfg, tiny_model, tiny_tokenizer, (PROMPTS, ids, {}, 0), reward, ref, bs)
            for bs in (1, 2, 5)]
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for k in runs[0]:
            assert other[k] == pytest.approx(runs[0][k], abs=1e-5), (k, runs)
    texts, _ = sample_completions(tiny_model, tiny_tokenizer, ids, max_new_tokens=6, seed=3 + 7919, batch_size=2)
    for i, p in enumerate(ids):
        alone = generate(tiny_model, tiny_tokenizer, [p], max_new_tokens=6, seeds=row_seeds(3 + 7919, [i]))
        assert texts[i] == decode_responses(tiny_tokenizer, alone)[0], i


def test_eval_metrics_do_not_depend_on_the_micro_batch_size(tiny_model_dir, prompts_file, reward_file, tmp_path):
    """--micro-batch-size is a memory setting: eval/* must not change with it (it changed them all)."""
    summaries = []
    for mbs in (1, 2):
        out = tmp_path / f"mbs{mbs}"
        assert main(_args(tiny_model_dir, prompts_file, out, reward_file, "--max-steps", 1, "--prompts-per-step", 2,
                          "--num-samples", 3, "--learning-rate", "1e-2", "--eval-prompts", 4,
                          "--micro-batch-size", mbs)) == 0
        summaries.append(json.loads((out / "summary.json").read_text()))
    evals = [{k: v for k, v in s.items() if k.startswith("eval/")} for s in summaries]
    assert {"eval/reward", "eval/reward_std", "eval/kl", "eval/response_length"} <= set(evals[0])
    assert evals[1].keys() == evals[0].keys()
    for k in evals[0]:
        assert evals[1][k] == pytest.approx(evals[0][k], abs=1e-5), (k, evals)


def test_a_prompt_without_room_is_refused_up_front_naming_its_row(tiny_model_dir, prompts_file, reward_file,
                                                                   tmp_path, capsys):
    """A prompt past the model's positions minus --max-new-tokens: one line naming the file and line of
    the longest, before training; --eval-data rows included (they crashed the final evaluation)."""
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "the movie"}) + "\n" + json.dumps({"prompt": "the movie was great " * 40})
                    + "\n" + json.dumps({"prompt": "a film " * 60}) + "\n")

    def run(data, *extra):
        return main(_args(tiny_model_dir, data, tmp_path / "run", reward_file, "--max-steps", 1,
                          "--max-prompt-length", 1000, *extra))

    def err(data, *extra) -> str:
        assert run(data, *extra) == 2
        msg = capsys.readouterr().err.strip()
        assert msg.count("\n") == 0 and "Traceback" not in msg, msg
        assert not (tmp_path / "run" / "checkpoints").exists()
        return msg

    for msg in (err(long), err(prompts_file, "--eval-data", long, "--eval-prompts", 3)):
        assert f"{long}:2: the longest prompt" in msg and "no room for the completions" in msg, msg
    assert run(prompts_file, "--eval-data", long, "--eval-prompts", 1) == 0  # only the rows evaluated count


# -- the options say what online DPO does --------------------------------------------------------------
def test_the_loss_help_lists_exactly_the_losses_online_dpo_accepts():
    """--help listed bco_pair and aot (the shared DPO help), which online DPO refuses: its own help
    lists the pair-only losses of the registry, and every other registered loss is refused."""
    import dataclasses
    import re

    from dpolab.errors import ConfigError
    from dpolab.losses.dpo import LOSS_REGISTRY
    from dpolab.train.online_dpo import ONLINE_LOSSES, OnlineDPOConfig

    pair_only = {n for n, spec in LOSS_REGISTRY.items() if not spec.required and not spec.batch_level}
    assert sorted(ONLINE_LOSSES) == sorted(pair_only)
    text = next(f for f in dataclasses.fields(OnlineDPOConfig) if f.name == "loss").metadata["help"]
    words = set(re.findall(r"[a-z_]+", text))
    assert pair_only <= words and not (set(LOSS_REGISTRY) - pair_only) & words, text
    refused = sorted(set(LOSS_REGISTRY) - pair_only)
    assert refused == ["aot", "aot_unpaired", "bco_pair"]
    for name in (*refused, f"sigmoid,{refused[0]}"):
        with pytest.raises(ConfigError, match="use it with `dpolab dpo`"):
            OnlineDPOConfig(model="m", data="p.jsonl", reward=["a:b"], loss=name).validate()
    for name in ONLINE_LOSSES:  # each accepted alone
        OnlineDPOConfig(model="m", data="p.jsonl", reward=["a:b"], loss=name).validate()


# -- a --ref-model of another vocabulary: one line when it loads, in every trainer that takes one -------
@pytest.fixture()
def small_vocab_ref(tmp_path, tiny_tokenizer) -> Path:
    from dpolab.lm.tiny import tiny_llama

    path = tmp_path / "ref290"
    tiny_llama(290, hidden_size=32, layers=2, heads=4, tokenizer=tiny_tokenizer).save_pretrained(path)
    return path


def test_a_reference_of_another_vocabulary_is_refused_in_one_line(tiny_model_dir, tiny_tokenizer, prompts_file,
                                                                  reward_file, small_vocab_ref, tmp_path, capsys):
    """A --ref-model with fewer embedding rows than the policy's vocabulary failed with an IndexError
    at step 1 of online DPO: each trainer refuses it when it loads (on_policy.reference_model for
    online-dpo, grpo, rloo and ppo; reference.make_reference for dpo and kto, cached or live)."""
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": p, "chosen": " great fun", "rejected": " awful mess"}) + "\n"
                             for p in PROMPTS))
    on_policy = ["--data", str(prompts_file), "--reward", f"{reward_file}:frac_alpha", "--max-new-tokens", "6",
                 "--log-samples", "0", "--eval-prompts", "0"]
    runs = {"online-dpo": ["online-dpo", *on_policy], "grpo": ["grpo", *on_policy, "--beta", "0.1"],
            "dpo": ["dpo", "--data", str(prefs)], "dpo live": ["dpo", "--data", str(prefs), "--no-precompute-ref"],
            "kto": ["kto", "--data", str(prefs)]}
    for what, argv in runs.items():
        out = tmp_path / what.replace(" ", "-")
        assert main([*argv, "--model", str(tiny_model_dir), "--ref-model", str(small_vocab_ref), "--output-dir",
                     str(out), "--no-progress", "--max-steps", "1"]) == 2, what
        msg = capsys.readouterr().err.strip()
        assert msg.count("\n") == 0 and "Traceback" not in msg, (what, msg)
        assert f"--ref-model {small_vocab_ref} has a vocabulary of 290 tokens" in msg, (what, msg)
        assert f"fewer than the policy {tiny_model_dir}'s {len(tiny_tokenizer)}" in msg, (what, msg)
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists(), what


def test_the_reference_vocabulary_check_reads_a_model_or_a_policy_folder(tiny_model, tiny_model_dir,
                                                                         small_vocab_ref):
    from dpolab.errors import ConfigError
    from dpolab.lm.loading import check_reference_vocabulary, load_causal_lm, vocabulary_size

    assert vocabulary_size(tiny_model_dir) == vocabulary_size(tiny_model) == vocabulary_size(str(tiny_model_dir))
    check_reference_vocabulary(tiny_model, tiny_model_dir, ref_name="r", policy_name="p")  # the same: accepted
    small = load_causal_lm(str(small_vocab_ref))
    for policy in (tiny_model, tiny_model_dir):
        with pytest.raises(ConfigError, match="--ref-model r has a vocabulary of 290 tokens"):
            check_reference_vocabulary(small, policy, ref_name="r", policy_name="p")
    # a policy whose config cannot be read here: left to the model load, not refused
    check_reference_vocabulary(small, small_vocab_ref / "missing", ref_name="r", policy_name="p")
    # a larger reference holds every id of the policy's (one family's sizes pad their embeddings differently)
    check_reference_vocabulary(tiny_model, small, ref_name="r", policy_name="p")


def test_eval_refuses_a_reference_of_fewer_vocabulary_rows_before_sampling(tiny_model_dir, tiny_tokenizer,
                                                                           prompts_file, reward_file,
                                                                           small_vocab_ref, tmp_path, capsys):
    tiny_tokenizer.save_pretrained(small_vocab_ref)  # the same tokenizer, a smaller embedding
    out = tmp_path / "eval.json"
    assert main(["eval", "--models", str(tiny_model_dir), "--ref-model", str(small_vocab_ref), "--data",
                 str(prompts_file), "--reward", f"{reward_file}:frac_alpha", "--max-new-tokens", "4",
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--ref-model {small_vocab_ref} has a vocabulary of 290 tokens" in err, err
    assert not out.exists()


def test_a_reference_with_another_tokenizer_of_the_same_size_is_refused(tiny_model_dir, tiny_tokenizer,
                                                                        prompts_file, reward_file, tmp_path,
                                                                        capsys):
    """A --ref-model with as many rows as the policy's but its own, other tokenizer scored other tokens
    silently (the size check passes); a folder with the run's tokenizer plus added tokens is accepted."""
    from dpolab.errors import ConfigError
    from dpolab.lm.loading import check_reference_vocabulary, load_causal_lm
    from dpolab.lm.tiny import tiny_llama, train_tokenizer

    other = train_tokenizer(OTHER_CORPUS, vocab_size=320)
    ref_dir = tmp_path / "other-tok"
    tiny_llama(len(tiny_tokenizer), hidden_size=32, layers=2, heads=4, tokenizer=other).save_pretrained(ref_dir)
    other.save_pretrained(ref_dir)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": p, "chosen": " great fun", "rejected": " awful mess"}) + "\n"
                             for p in PROMPTS))
    runs = {"grpo": ["grpo", "--data", str(prompts_file), "--reward", f"{reward_file}:frac_alpha", "--beta", "0.1",
                     "--max-new-tokens", "4", "--log-samples", "0", "--eval-prompts", "0"],
            "dpo": ["dpo", "--data", str(prefs)]}
    for what, argv in runs.items():
        out = tmp_path / what
        assert main([*argv, "--model", str(tiny_model_dir), "--ref-model", str(ref_dir), "--output-dir", str(out),
                     "--no-progress", "--max-steps", "1"]) == 2, what
        msg = capsys.readouterr().err.strip()
        assert msg.count("\n") == 0 and f"--ref-model {ref_dir} has another tokenizer than the run's" in msg, msg
        assert not (out / "metrics.jsonl").exists(), what
    ref = load_causal_lm(str(ref_dir))
    with pytest.raises(ConfigError, match="tokens have other ids"):
        check_reference_vocabulary(ref, tiny_model_dir, ref_name=str(ref_dir), policy_name="p",
                                   tokenizer=tiny_tokenizer)
    # the run's tokenizer with an added token (a chat marker, say): every shared token keeps its id
    added = tmp_path / "added-tok"
    tiny_tokenizer.save_pretrained(added)
    from transformers import AutoTokenizer

    grown = AutoTokenizer.from_pretrained(added)
    grown.add_tokens(["<|turn|>"])
    grown.save_pretrained(added)
    check_reference_vocabulary(ref, tiny_model_dir, ref_name=str(added), policy_name="p", tokenizer=tiny_tokenizer)
    # no tokenizer in the folder (weights only), or no run tokenizer given: not compared
    check_reference_vocabulary(ref, tiny_model_dir, ref_name=str(tmp_path), policy_name="p", tokenizer=tiny_tokenizer)
    check_reference_vocabulary(ref, tiny_model_dir, ref_name=str(ref_dir), policy_name="p")


OTHER_CORPUS = [
    "an entirely different corpus of words, so the merges and their ids differ",
    "zebras quickly jump over lazy foxes while pianos hum in xylophone keys",
] * 30


def test_rewards_that_differ_below_float32s_resolution_are_not_ties(tiny_model_dir, prompts_file, reward_file,
                                                                    tmp_path):
    """Pairs are the best and worst completion by score: 0.5 + 1e-9·n orders completions as n does.
    Scored in float32, every score was 0.5: all ties, no pair, nothing trained, said nowhere."""
    common = ("--max-steps", 2, "--prompts-per-step", 5, "--num-samples", 4, "--learning-rate", "5e-3",
              "--max-new-tokens", 8)
    for fn in ("chars", "chars_tiny"):
        assert main(_args(tiny_model_dir, prompts_file, tmp_path / fn, reward_file, *common, fn=fn)) == 0
    plain, tiny = _rows(tmp_path / "chars"), _rows(tmp_path / "chars_tiny")
    assert [r["pairs/count"] for r in tiny] == [r["pairs/count"] for r in plain]
    assert all(r["pairs/count"] > 0 for r in plain)
    wa, wb = (load_file(str(tmp_path / fn / "final" / "model.safetensors")) for fn in ("chars", "chars_tiny"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # DPO reads the ranking only
