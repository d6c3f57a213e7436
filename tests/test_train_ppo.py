"""`dpolab ppo` end to end on tiny in-process models: it raises a simple reward with a bounded KL,
saves a reloadable policy and value head, resumes exactly, runs with LoRA / a separate value model /
a trained-format reward model / chat prompts, and reports bad input as one clear line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main

PROMPTS = ["the movie", "a film", "the plot", "what a", "I hated", "the music", "a story", "the worst",
           "great fun", "awful acting", "the ending", "a delightful", "clever and", "boring film", "warm and",
           "hello there"]

REWARD_SOURCE = '''
def frac_alpha(prompts, completions):
    """Fraction of the completion's characters that are lowercase ASCII letters (0 if empty)."""
    return [sum("a" <= ch <= "z" for ch in c) / max(len(c), 1) for c in completions]


def wrong_length(prompts, completions):
    return [0.0]
'''


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


@pytest.fixture()
def reward_file(tmp_path) -> Path:
    path = tmp_path / "ppo_test_rewards.py"
    path.write_text(REWARD_SOURCE, encoding="utf-8")
    return path


def _args(model_dir, data, out, *extra):
    return ["ppo", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--no-progress",
            "--max-new-tokens", "8", *map(str, extra)]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_ppo_raises_reward_with_bounded_kl_and_final_reloads(tiny_model_dir, prompts_file, reward_file, tmp_path,
                                                              monkeypatch):
    """25 PPO steps, β = 0.1, on r = fraction of lowercase letters in the completion (in [0, 1]).

    KL bound: a policy whose regularised objective E_π[r] − β KL(π‖π_ref) is at least the
    reference's E_ref[r] (PPO improves that objective from π_ref) has KL ≤ (max r − E_ref[r]) / β."""
    from transformers import AutoModelForCausalLM

    from dpolab.data.prompts import load_prompts
    from dpolab.lm.loading import load_tokenizer
    from dpolab.lm.value_head import load_value_head
    from dpolab.rewards.evaluation import evaluate_policy
    from dpolab.rewards.functions import load_reward_function

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(prompts_file.read_text() * 4)  # 64 evaluation samples
    # The reward is found as module:function in the current directory.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    out = tmp_path / "run"
    beta, steps = 0.1, 25
    rc = main(_args(tiny_model_dir, prompts_file, out, "--reward", "ppo_test_rewards:frac_alpha",
                    "--max-steps", steps, "--rollout-batch-size", 16, "--mini-batch-size", 8, "--ppo-epochs", 2,
                    "--learning-rate", "1e-2", "--kl-coef", beta, "--eval-data", eval_file, "--eval-prompts", 64,
                    "--log-samples", 3))
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps

    # The initial policy under the same evaluation protocol (same prompts, seed and sampling).
    tok = load_tokenizer(str(tiny_model_dir))
    data = load_prompts(str(eval_file), tok)
    init_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reward = load_reward_function(f"{reward_file}:frac_alpha")
    init = evaluate_policy(init_model, tok, data.texts, data.ids, reward, ref_model=init_model, max_new_tokens=8,
                           seed=0 + 7919, batch_size=16)
    assert init["kl"] == 0.0
    assert summary["eval/reward"] > init["reward"] + 0.1, (summary["eval/reward"], init)
    assert 0 < summary["eval/kl"] < (1.0 - init["reward"]) / beta, summary["eval/kl"]

    rows = _rows(out)
    train_rows = [r for r in rows if "objective/kl" in r]
    assert len(train_rows) == steps
    assert {"objective/kl", "objective/entropy", "objective/scores", "objective/scores_std", "losses/policy",
            "losses/value", "losses/clipfrac", "losses/approx_kl", "losses/explained_variance",
            "objective/kl_coef"} <= set(train_rows[0])
    assert train_rows[0]["objective/kl"] == 0.0 and train_rows[0]["policy/ratio"] == pytest.approx(1.0, abs=0.05)
    assert all(r["objective/kl_coef"] == beta for r in train_rows)  # fixed β
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * steps and {"step", "prompt", "completion", "score", "kl"} <= set(samples[0])

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    ids = torch.tensor([tok("the movie").input_ids])
    assert torch.isfinite(model(ids).logits).all()
    head = load_value_head(out / "final")
    assert head.linear.weight.shape == (1, model.config.hidden_size)
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "latest").is_file()


def test_resume_equals_uninterrupted_run(tiny_model_dir, prompts_file, reward_file, tmp_path):
    """Adaptive β and a step-seeded sampler: resuming at step 2 of 3 reproduces the weights, the
    value head and the logged metrics of the uninterrupted run (β restored from the checkpoint)."""
    common = ("--reward", f"{reward_file}:frac_alpha", "--rollout-batch-size", 4, "--mini-batch-size", 2,
              "--ppo-epochs", 1, "--learning-rate", "1e-2", "--max-steps", 3, "--save-steps", 1,
              "--save-total-limit", 5, "--eval-prompts", 0, "--log-samples", 0, "--adaptive-kl",
              "--target-kl", "0.01", "--max-new-tokens", 4)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(_args(tiny_model_dir, prompts_file, full, *common)) == 0
    assert main(_args(tiny_model_dir, prompts_file, resumed, "--resume", full / "checkpoints" / "step-2",
                      *common)) == 0
    wa, wb = load_file(str(full / "final" / "model.safetensors")), load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ha = load_file(str(full / "final" / "value_head.safetensors"))
    hb = load_file(str(resumed / "final" / "value_head.safetensors"))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    strip = ("seconds_per_step", "tokens_per_second")
    tail = lambda run: [{k: v for k, v in r.items() if k not in strip} for r in _rows(run) if r["step"] > 2]  # noqa: E731
    assert tail(full) == tail(resumed)
    betas = [r["objective/kl_coef"] for r in _rows(full)]
    # Step 1 samples from π = π_ref: KL 0 < target/1.5, so the adaptive β halves for step 2.
    assert betas[0] == 0.05 and betas[1] == 0.025 and _rows(full)[0]["objective/kl"] == 0.0


@pytest.mark.parametrize("value_model", [False, True])
def test_gradient_checkpointing_gives_the_same_run(tiny_model_dir, prompts_file, reward_file, tmp_path, monkeypatch,
                                                   value_model):
    """--gradient-checkpointing checkpoints the eval-mode layers of the policy (and of a separate
    value model) in PPO's passes: the same policy and value head as the plain run."""
    import torch.utils.checkpoint as tuc

    common = ("--reward", f"{reward_file}:frac_alpha", "--rollout-batch-size", 4, "--mini-batch-size", 2,
              "--ppo-epochs", 2, "--optimizer", "sgd", "--learning-rate", "0.5", "--max-grad-norm", 0,
              "--max-steps", 2, "--eval-prompts", 0, "--max-new-tokens", 4,
              *(("--value-model", tiny_model_dir) if value_model else ()))
    assert main(_args(tiny_model_dir, prompts_file, tmp_path / "plain", *common)) == 0
    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert main(_args(tiny_model_dir, prompts_file, tmp_path / "ckpt", "--gradient-checkpointing", *common)) == 0
    # 2 steps x 2 epochs x 2 mini-batches, 2 layers in each model
    assert len(calls) == 2 * 2 * 2 * 2 * (2 if value_model else 1)
    for name in ("model.safetensors", "value_head.safetensors"):
        wa, wb = (load_file(str(tmp_path / r / "final" / name)) for r in ("plain", "ckpt"))
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)


def test_lora_with_separate_value_model(tiny_model_dir, prompts_file, reward_file, tmp_path):
    """LoRA: the reference is the base with adapters off, so the first step's KL is exactly 0; the
    merged policy reloads without LoRA weights; the separate value model is saved next to it."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    assert main(_args(tiny_model_dir, prompts_file, out, "--reward", f"{reward_file}:frac_alpha", "--lora",
                      "--lora-r", 4, "--value-model", tiny_model_dir, "--max-steps", 2, "--rollout-batch-size", 4,
                      "--mini-batch-size", 4, "--ppo-epochs", 1, "--learning-rate", "1e-2", "--eval-prompts", 4,
                      "--max-new-tokens", 4)) == 0
    rows = _rows(out)
    assert rows[0]["objective/kl"] == 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert "eval/kl" in summary and "eval/reward" in summary
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert (out / "final" / "value_model" / "config.json").is_file()
    assert (out / "final" / "value_head.safetensors").is_file()


def test_reward_model_and_chat_prompts(tiny_model_dir, tiny_tokenizer, reward_file, tmp_path, capsys):
    """--reward-model with a sequence-classification folder, summed with a Python reward; prompts
    given as chat messages are rendered with the template and a generation prompt. The reward is named
    after its run (`rm` for rm/final: every dpolab reward model's folder is a final/)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    rm_dir = tmp_path / "rm" / "final"
    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(rm_dir)
    tiny_tokenizer.save_pretrained(rm_dir)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in PROMPTS[:4]))
    out = tmp_path / "rmrun"
    assert main(_args(tiny_model_dir, data, out, "--reward-model", rm_dir, "--reward", f"{reward_file}:frac_alpha",
                      "--reward-weights", "0.5,2", "--max-steps", 1, "--rollout-batch-size", 4,
                      "--mini-batch-size", 4, "--ppo-epochs", 1, "--eval-prompts", 4, "--max-new-tokens", 4)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert isinstance(summary["eval/reward"], float)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])  # each reward's mean, and their sum
    assert row["objective/scores"] == pytest.approx(0.5 * row["rewards/frac_alpha/mean"] + 2 * row["rewards/rm/mean"],
                                                    abs=1e-5)
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("<|user|>") and sample["prompt"].endswith("<|assistant|>\n")
    # a reward model is no policy or reference (its LM head would be random), but a value network may
    # start from it (only its hidden states are read)
    common = ("--reward", f"{reward_file}:frac_alpha", "--max-steps", 1, "--rollout-batch-size", 2,
              "--mini-batch-size", 2, "--ppo-epochs", 1, "--max-new-tokens", 4)
    for extra in ((), ("--ref-model", rm_dir)):
        model = tiny_model_dir if extra else rm_dir
        assert main(_args(model, data, tmp_path / "bad", *common, *extra)) == 2
        assert f"'{rm_dir}' is a LlamaForSequenceClassification (a reward model), not a causal LM" in \
            capsys.readouterr().err
    assert main(_args(tiny_model_dir, data, tmp_path / "value", *common, "--value-model", rm_dir)) == 0


def test_bad_input_is_one_clear_line(tiny_model_dir, prompts_file, reward_file, tmp_path, capsys):
    def err(*extra, data=prompts_file) -> str:
        out = tmp_path / "bad"
        assert main(_args(tiny_model_dir, data, out, "--max-steps", 1, "--rollout-batch-size", 2,
                          "--mini-batch-size", 2, *extra)) == 2
        msg = capsys.readouterr().err.strip()
        assert msg.count("\n") == 0 and "Traceback" not in msg
        return msg

    assert "give --reward module:function and/or --reward-model" in err()
    assert "--cliprange must be < 1" in err("--reward", f"{reward_file}:frac_alpha", "--cliprange", 1.5)
    assert "1 weights for 2 rewards" in err("--reward", f"{reward_file}:frac_alpha", "--reward-model", "x",
                                            "--reward-weights", "1")
    assert "expected 'module:function'" in err("--reward", "nocolon")
    assert "returned 1 values for 2" in err("--reward", f"{reward_file}:wrong_length")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert f"{bad}:2" in err("--reward", f"{reward_file}:frac_alpha", data=bad)
    assert "--mini-batch-size must not exceed" in err("--reward", "a:b", "--mini-batch-size", 8)
    assert "--vf-coef must be >= 0" in err("--reward", "a:b", "--vf-coef", -1)  # would maximise the value error
    assert "--micro-batch-tokens must be >= 0" in err("--reward", "a:b", "--micro-batch-tokens", -5)
    assert not (tmp_path / "bad").exists() or not (tmp_path / "bad" / "summary.json").exists()


def test_dry_run_checks_data_and_reward_without_training(tiny_model_dir, prompts_file, reward_file, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(_args(tiny_model_dir, prompts_file, out, "--reward", f"{reward_file}:frac_alpha", "--dry-run")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["prompts"] == len(PROMPTS)
    assert report["reward_probe_on_empty_completions"] == [0.0, 0.0]
    assert not out.exists()


# -- prompt data ----------------------------------------------------------------------------------------
def test_load_prompts_plain_and_chat_rows(tiny_tokenizer, tmp_path):
    from dpolab.data.prompts import load_prompts

    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "the movie was", "extra": 1}, {"messages": [{"role": "user", "content": "hello there"}]},
            {"prompt": ""}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_prompts(str(path), tiny_tokenizer)
    chat_text = tiny_tokenizer.apply_chat_template(rows[1]["messages"], tokenize=False, add_generation_prompt=True)
    assert data.texts == ["the movie was", chat_text, ""]
    assert chat_text == "<|user|>\nhello there</s>\n<|assistant|>\n"
    assert data.ids[0] == tiny_tokenizer("the movie was", add_special_tokens=False).input_ids
    assert data.ids[1] == tiny_tokenizer(chat_text, add_special_tokens=False).input_ids
    assert data.ids[2] == [tiny_tokenizer.bos_token_id]  # an empty prompt still gives a context
    assert data.locations[1] == f"{path}:2"


def test_prompt_truncation_keeps_the_end_and_the_bos(tiny_tokenizer):
    """A tokenizer that prepends BOS itself: the prompt is [BOS] + text ids; cut to 4 tokens it
    keeps BOS and the last 3 text tokens."""
    import copy

    from tokenizers import processors

    from dpolab.data.prompts import special_prefix, tokenize_prompts

    tok = copy.deepcopy(tiny_tokenizer)
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert special_prefix(tok) == [bos] and special_prefix(tiny_tokenizer) == []
    text = "the plot was clever and the music was wonderful"
    plain = tok(text, add_special_tokens=False).input_ids
    assert len(plain) > 4
    (ids,), cut = tokenize_prompts([text], tok, max_prompt_length=4)
    assert ids == [bos] + plain[-3:] and cut == [True]
    (ids,), cut = tokenize_prompts([text], tok, max_prompt_length=100)
    assert ids == [bos] + plain and cut == [False]
    (ids,), cut = tokenize_prompts([text], tok, max_prompt_length=1)
    assert ids == [bos] and cut == [True]  # never more than --max-prompt-length tokens


def test_chat_prompts_are_sampled_with_the_ids_they_are_trained_on(tiny_tokenizer):
    """A tokenizer that prepends BOS itself and a chat template that does not write it: the
    on-policy, generate and eval prompt of a conversation is the prompt SFT and DPO train on."""
    import copy

    from tokenizers import processors

    from dpolab.data.loading import Record
    from dpolab.data.preference import parse_preference, tokenize_preference
    from dpolab.data.prompts import render_prompt, tokenize_prompts

    tok = copy.deepcopy(tiny_tokenizer)
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    turns = [{"role": "user", "content": "the plot was clever"}]
    text, chat = render_prompt({"messages": turns}, tok)
    assert chat and not text.startswith("<s>")
    (ids,), _ = tokenize_prompts([text], tok)
    pair = tokenize_preference(parse_preference(Record({"prompt": turns, "chosen": "yes", "rejected": "no"}, "x", 1)),
                               tok, max_length=64, max_prompt_length=32)
    assert ids[0] == bos and ids == list(pair.prompt_ids)
    (twice,), _ = tokenize_prompts(["<s>" + text], tok)  # a template that writes BOS itself: still one
    assert twice == ids
    # the conversational prompt-only form (turns in 'prompt', as a pair gives them) renders as 'messages'
    assert render_prompt({"prompt": turns}, tok) == (text, True)


@pytest.mark.parametrize("row, message", [
    ({"text": "x"}, r"needs a 'prompt' string or a 'messages' list \(the row has 'text'\)"),
    ({"Prompt": "x"}, r"needs a 'prompt' string or a 'messages' list \(did you mean 'Prompt'\?\)"),
    ({"prompt": 3}, "field 'prompt': expected a string or a list of {role, content} turns, got int"),
    ({"prompt": "a", "messages": []}, "both 'prompt' and 'messages'"),
    ({"messages": []}, "field 'messages': expected a non-empty list"),
    ({"messages": [{"role": "user"}]}, "turn 0 must be an object"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "the last turn is"),
    ({"messages": [{"role": "User", "content": "q"}]},
     r"field 'messages\[0\].role': role 'User': did you mean 'user'\?"),
    ({"messages": [{"role": " ", "content": "q"}]}, "role is empty"),
    ({"prompt": []}, "field 'prompt': expected a non-empty list"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "field 'prompt': the last turn is"),
])
def test_bad_prompt_rows_name_file_line_and_field(tiny_tokenizer, tmp_path, row, message):
    from dpolab.data.prompts import load_prompts
    from dpolab.errors import DataError

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message) as info:
        load_prompts(str(path), tiny_tokenizer)
    assert str(info.value).startswith(f"{path}:2")


def test_chat_prompts_need_a_chat_template(tiny_tokenizer, tmp_path):
    import copy

    from dpolab.data.prompts import load_prompts
    from dpolab.errors import DataError

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="no chat template"):
        load_prompts(str(path), tok)


@pytest.mark.parametrize(("saved_adaptive", "adaptive", "kl_coef", "expected"), [
    (False, False, 0.5, 0.5),   # a fixed --kl-coef changed at resume takes effect
    (True, False, 0.2, 0.2),    # switched to a fixed β
    (True, True, 0.5, 0.0125),  # the adaptive controller carries its adapted β on
    (False, True, 0.2, 0.2),    # switched to --adaptive-kl: starts from --kl-coef
    (None, True, 0.2, 0.0125),  # a checkpoint from before the controller kind was recorded
])
def test_resume_keeps_only_an_adaptive_kl_coefficient(saved_adaptive, adaptive, kl_coef, expected):
    from dpolab.losses.ppo import AdaptiveKLController, FixedKLController
    from dpolab.train.ppo import PPO, PPOConfig

    algo = object.__new__(PPO)
    algo.cfg = PPOConfig(model="m", data="d", kl_coef=kl_coef, adaptive_kl=adaptive)
    algo.kl_ctl = AdaptiveKLController(kl_coef, 6.0) if adaptive else FixedKLController(kl_coef)
    state = {"kl_coef": 0.0125} if saved_adaptive is None else {"kl_coef": 0.0125, "adaptive_kl": saved_adaptive}
    algo.load_state_dict(state)
    assert algo.kl_ctl.beta == expected
    assert algo.state_dict() == {"kl_coef": expected, "adaptive_kl": adaptive}


def test_a_side_model_that_cannot_read_the_policys_tokens_is_refused_before_loading(
        tiny_model_dir, tiny_tokenizer, prompts_file, reward_file, tmp_path, capsys):
    """A --value-model with fewer vocabulary rows, or a --ref-model/--value-model with fewer positions
    than prompt + completion, failed with an IndexError traceback at step 1 (a --dry-run passed); the
    configs are checked with the data, the error naming the flag."""
    from dpolab.lm.tiny import tiny_llama

    small_vocab, short = tmp_path / "v290", tmp_path / "short"
    tiny_llama(290, hidden_size=32, layers=2, heads=4, tokenizer=tiny_tokenizer).save_pretrained(small_vocab)
    tiny_llama(len(tiny_tokenizer), hidden_size=32, layers=2, heads=4, tokenizer=tiny_tokenizer,
               max_positions=8).save_pretrained(short)
    reward = ["--reward", f"{reward_file}:frac_alpha"]
    cases = [(["--value-model", small_vocab], f"--value-model {small_vocab} has a vocabulary of 290 tokens"),
             (["--value-model", short], f"the 8 positions of {short}"),
             (["--ref-model", short], f"the 8 positions of {short}"),
             (["--ref-model", tmp_path / "missing", "--dry-run"], "cannot load --ref-model"),
             (["--value-model", small_vocab, "--dry-run"], "has a vocabulary of 290 tokens")]
    for extra, message in cases:
        out = tmp_path / "run"
        assert main(_args(tiny_model_dir, prompts_file, out, *reward, *extra, "--max-steps", 1)) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0 and "Traceback" not in err, (extra, err)
        assert not out.exists(), extra


def test_adaptive_kl_refuses_a_zero_starting_coefficient(tiny_model_dir, prompts_file, tmp_path, capsys):
    """Halving or doubling β = 0 leaves it 0: --adaptive-kl --kl-coef 0 never adapted (the KL grew to
    500x its target with β 0 throughout)."""
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, prompts_file, out, "--reward", "x:y", "--adaptive-kl", "--kl-coef", 0)) == 2
    assert "--adaptive-kl needs --kl-coef > 0" in capsys.readouterr().err
