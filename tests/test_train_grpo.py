"""`dpolab grpo` and `dpolab rloo` end to end: they raise exact-match accuracy on the built-in copy task
from a partly competent start, 2 CPU processes equal 1 process (uneven last batch included), a real
process stopped by SIGTERM resumes bitwise, and bad input is one clear line."""

from __future__ import annotations

import json
import math
import re
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import _free_port, launch  # noqa: E402, F401
from test_reliability_signals import assert_clean_stop, assert_same_weights, interrupt, metric_rows  # noqa: E402

PROMPTS = ["the movie", "a film", "the plot", "what a", "I hated"]

REWARDS = '''
def frac_alpha(prompts, completions):
    return [sum("a" <= ch <= "z" for ch in c) / max(len(c), 1) for c in completions]

def length(prompts, completions, topic):
    return [len(c) / 10 + (t == "x") for c, t in zip(completions, topic)]

def wrong_length(prompts, completions):
    return [0.0]

def nan(prompts, completions):
    return [float("nan")] * len(completions)

def fails_on_eval(prompts, completions):
    if any(p.startswith("EVAL") for p in prompts):
        raise RuntimeError("cannot score these")
    return [0.5] * len(completions)

def exits(prompts, completions):
    raise SystemExit(3)

_calls = []

def fails_on_process_1(prompts, completions):  # at its second step: both processes are in the loop
    import os
    _calls.append(1)
    if os.environ.get("RANK") == "1" and len(_calls) == 2:
        raise ValueError("cannot score on process 1")
    return [0.5] * len(completions)

def chars(prompts, completions):
    return [float(len(c)) for c in completions]

def chars_offset(prompts, completions):  # float32 rounds 1e8 + n to a multiple of 8
    return [1e8 + len(c) for c in completions]

def numpy_scalars(prompts, completions):
    import numpy as np
    import torch
    return [np.float32(0.5), np.int64(1), torch.tensor(0.25)] * (len(completions) // 3) + \
        [np.float64(1.0)] * (len(completions) % 3)
'''


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "topic": "x" if i % 2 else "y"}) + "\n"
                            for i, p in enumerate(PROMPTS)))
    return path


@pytest.fixture()
def reward_file(tmp_path) -> Path:
    path = tmp_path / "grpo_rewards.py"
    path.write_text(REWARDS)
    return path


def _args(cmd, model_dir, data, out, *extra):
    return [cmd, "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--no-progress",
            "--max-new-tokens", "6", "--log-samples", "0", "--eval-prompts", "0", *map(str, extra)]


def _assert_same_final_weights(a: Path, b: Path, atol: float) -> dict[str, torch.Tensor]:
    """Run ``b``'s final weights equal run ``a``'s within ``atol``; returns ``a``'s."""
    wa, wb = (load_file(str(run / "final" / "model.safetensors")) for run in (a, b))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    return wa


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# -- it learns: the built-in verifiable task ---------------------------------------------------------
@pytest.fixture(scope="module")
def copy_task(tmp_path_factory):
    """The copy task, a tokenizer trained on it and a tiny Llama fine-tuned on its noisy SFT file
    (30% of completions wrong): a start that copies some strings and not others."""
    from dpolab.lm.tiny import tiny_llama, train_tokenizer
    from dpolab.rewards.tasks import write_task

    root = tmp_path_factory.mktemp("copy")
    files = write_task("copy", root / "data", train=256, eval=64, sft=4000, noise=0.3, seed=0)
    texts = [json.loads(x)["prompt"] + json.loads(x)["completion"] for x in files["sft"].read_text().splitlines()]
    tok = train_tokenizer(texts * 3, vocab_size=300)
    model = tiny_llama(len(tok), hidden_size=64, layers=2, heads=4, tokenizer=tok, max_positions=64)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    assert main(["sft", "--model", str(root / "base"), "--data", str(files["sft"]), "--output-dir", str(root / "sft"),
                 "--max-steps", "400", "--batch-size", "32", "--learning-rate", "3e-3", "--max-length", "32",
                 "--eval-fraction", "0", "--no-progress", "--logging-steps", "100"]) == 0
    return root / "sft" / "final", files


def _accuracy(model_dir, eval_file) -> float:
    """Sampled (temperature 1) exact match on the held-out prompts, the protocol of eval/reward."""
    from dpolab.data.prompts import load_prompts
    from dpolab.lm.loading import load_causal_lm, load_tokenizer
    from dpolab.rewards.evaluation import evaluate_policy
    from dpolab.rewards.tasks import exact_match

    tok = load_tokenizer(str(model_dir))
    data = load_prompts(str(eval_file), tok, max_prompt_length=16)
    model = load_causal_lm(str(model_dir))
    return evaluate_policy(model, tok, data.texts, data.ids, exact_match, ref_model=model, max_new_tokens=12,
                           seed=7919, batch_size=64, columns=data.columns(list(range(len(data)))))["reward"]


@pytest.mark.parametrize("cmd, extra", [
    ("grpo", ("--num-generations", 8, "--learning-rate", "1e-3")),
    ("rloo", ("--num-generations", 8, "--learning-rate", "1e-3", "--beta", "0.01")),
])
def test_raises_exact_match_on_held_out_prompts(copy_task, tmp_path, cmd, extra):
    model_dir, files = copy_task
    start = _accuracy(model_dir, files["eval"])
    out = tmp_path / cmd
    assert main([cmd, "--model", str(model_dir), "--data", str(files["train"]), "--eval-data", str(files["eval"]),
                 "--eval-prompts", "64", "--reward", "dpolab.rewards.tasks:exact_match", "--output-dir", str(out),
                 "--max-steps", "30", "--prompts-per-step", "16", "--max-new-tokens", "12", "--max-prompt-length",
                 "16", "--micro-batch-size", "64", "--no-progress", "--log-samples", "0", *map(str, extra)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    end = _accuracy(out / "final", files["eval"])
    assert summary["eval/reward"] == pytest.approx(end, abs=1e-6)  # eval/reward is this protocol
    assert end > start + 0.15, (start, end)  # measured: 0.11 -> ~0.45 (GRPO) in 30 steps


# -- multi-process: 2 processes equal 1 --------------------------------------------------------------
SGD = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-grad-norm", "0", "--max-steps", "3",
       "--logging-steps", "1", "--lr-scheduler", "constant")


@pytest.mark.parametrize("cmd, extra", [
    ("grpo", ("--beta", "0.1", "--scale-rewards", "batch", "--loss-aggregation", "token")),
    ("rloo", ("--update", "clip")),
    # one optimizer step per batch: the KL of the reward comes from the sampler's log-probs
    ("rloo", ("--num-iterations", 1, "--mini-batches", 1, "--beta", "0.1")),
])
def test_two_processes_equal_one_process(tiny_model_dir, prompts_file, reward_file, tmp_path, cmd, extra):
    """5 prompts, 4 per step globally: step 2 holds ONE prompt (process 1 has none: stand-in rows);
    two iterations of two mini-batches over a shared permutation (or one step), passes of 3 completions."""
    common = [*_args(cmd, tiny_model_dir, prompts_file, "OUT", "--reward", f"{reward_file}:frac_alpha",
                     "--num-generations", 4, "--num-iterations", 2, "--mini-batches", 2, "--micro-batch-size", 3,
                     *SGD, *extra)]
    one, two = tmp_path / "one", tmp_path / "two"
    argv = lambda out, n: [str(out) if a == "OUT" else a for a in common] + ["--prompts-per-step", str(n)]  # noqa: E731
    assert main(argv(one, 4)) == 0
    res = launch("ddp_cpu.yaml", argv(two, 2))
    assert res.returncode == 0, res.stderr[-4000:]
    wa, wb = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert max(float((wa[k] - init[k]).abs().max()) for k in wa) > 1e-2  # the comparison can see a scale error
    for ra, rb in zip(_rows(one), _rows(two)):
        for key in ("rewards/mean", "rewards/std", "completions/mean_length", "kl", "entropy"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-5), (key, ra["step"])


def test_rloo_kl_from_the_sampler_equals_the_extra_pass(tiny_model_dir, prompts_file, reward_file, tmp_path,
                                                        monkeypatch):
    """One optimizer step per batch, β > 0: the KL-shaped reward from the sampler's log-probs gives the
    weights and metrics of the run that recomputes them with a no-grad pass (a sampler without them)."""
    from dpolab.lm import sampling

    argv = lambda out: _args("rloo", tiny_model_dir, prompts_file, out, "--reward", f"{reward_file}:frac_alpha",  # noqa: E731
                             "--num-generations", 4, "--prompts-per-step", 2, "--beta", "0.1", *SGD)
    assert main(argv(tmp_path / "sampler")) == 0
    calls = []
    real = sampling.generate

    def without_logps(*args, with_logps=False, **kw):
        calls.append(with_logps)
        return real(*args, **kw)

    monkeypatch.setattr(sampling, "generate", without_logps)
    assert main(argv(tmp_path / "pass")) == 0
    assert calls and all(calls)  # the trainer asked, the sampler did not give: the pass ran
    wa = load_file(str(tmp_path / "sampler" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "pass" / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)
    rows_a, rows_b = _rows(tmp_path / "sampler"), _rows(tmp_path / "pass")
    for ra, rb in zip(rows_a, rows_b):
        assert ra["kl"] == pytest.approx(rb["kl"], abs=1e-5)
        assert ra["rlhf_reward"] == pytest.approx(rb["rlhf_reward"], abs=1e-5)
    assert len(rows_a) == 3 and max(r["kl"] for r in rows_b) > 1e-3  # the policy moved: the KL term acts


def test_sampling_runs_through_the_direct_decoder(tiny_model_dir, prompts_file, reward_file, tmp_path, monkeypatch):
    """The trainer's sampler uses dpolab.lm.decode on its (unwrapped, hook-free) Llama policy, once
    per step, and a run on the model's own forward (--no-direct-decoder) gives the same weights and
    rewards."""
    from dpolab.lm import decode, generation

    argv = lambda out: _args("grpo", tiny_model_dir, prompts_file, out, "--reward", f"{reward_file}:frac_alpha",  # noqa: E731
                             "--num-generations", 4, "--prompts-per-step", 2, *SGD)
    built = []
    real_init = decode.FastDecoder.__init__
    monkeypatch.setattr(decode.FastDecoder, "__init__", lambda self, *a: (built.append(1), real_init(self, *a))[1])
    assert main(argv(tmp_path / "direct")) == 0
    assert len(built) == len(_rows(tmp_path / "direct")) == 3
    asked = []
    real_fast = generation.fast_decoder
    monkeypatch.setattr(generation, "fast_decoder", lambda *a: (asked.append(1), real_fast(*a))[1])
    assert main([*argv(tmp_path / "forward"), "--no-direct-decoder"]) == 0
    assert len(built) == 3 and not asked  # not even tried
    wa = load_file(str(tmp_path / "direct" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "forward" / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)
    for ra, rb in zip(_rows(tmp_path / "direct"), _rows(tmp_path / "forward")):
        assert ra["rewards/mean"] == pytest.approx(rb["rewards/mean"], abs=1e-6)


@pytest.mark.parametrize("cmd", ["grpo", "rloo"])
def test_gradient_checkpointing_gives_the_same_run(tiny_model_dir, prompts_file, reward_file, tmp_path, monkeypatch,
                                                   cmd):
    """--gradient-checkpointing checkpoints the eval-mode policy's layers in the training passes
    (dpolab.lm.checkpointing) and changes nothing else: the same weights and metrics."""
    import torch.utils.checkpoint as tuc

    argv = lambda out: _args(cmd, tiny_model_dir, prompts_file, out, "--reward", f"{reward_file}:frac_alpha",  # noqa: E731
                             "--num-generations", 4, "--prompts-per-step", 2, "--beta", "0.1", *SGD)
    assert main(argv(tmp_path / "plain")) == 0
    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert main([*argv(tmp_path / "ckpt"), "--gradient-checkpointing"]) == 0
    assert len(calls) >= 3 * 2  # each step's training pass runs both layers checkpointed
    _assert_same_final_weights(tmp_path / "plain", tmp_path / "ckpt", 1e-6)
    for ra, rb in zip(_rows(tmp_path / "plain"), _rows(tmp_path / "ckpt")):
        assert ra["kl"] == pytest.approx(rb["kl"], abs=1e-6)
        assert ra["rewards/mean"] == pytest.approx(rb["rewards/mean"], abs=1e-6)


def test_checkpointed_passes_on_two_processes_equal_one_plain_process(tiny_model_dir, prompts_file, reward_file,
                                                                     tmp_path):
    """DDP's gradient hooks see the checkpointed layers' recompute: 2 processes with
    --gradient-checkpointing give one plain process's weights."""
    common = _args("grpo", tiny_model_dir, prompts_file, "OUT", "--reward", f"{reward_file}:frac_alpha",
                   "--num-generations", 4, "--num-iterations", 2, "--beta", "0.1", *SGD)
    argv = lambda out, n, *x: [str(out) if a == "OUT" else a for a in common] + ["--prompts-per-step", str(n), *x]  # noqa: E731
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(argv(one, 4)) == 0
    res = launch("ddp_cpu.yaml", argv(two, 2, "--gradient-checkpointing"))
    assert res.returncode == 0, res.stderr[-4000:]
    _assert_same_final_weights(one, two, 1e-4)


@pytest.mark.parametrize("cmd, extra", [
    ("grpo", ("--beta", "0.1", "--num-iterations", 2, "--mini-batches", 2)),  # old, reference and training passes
    ("rloo", ()),
])
def test_prefix_sharing_trains_the_same(tiny_model_dir, prompts_file, reward_file, tmp_path, capsys, cmd, extra):
    """Each prompt run once in the log-prob passes (on by default: the start-up check passes on the
    tiny Llama) gives the plain rows' weights and metrics; off with --gradient-checkpointing, and
    asking for both is refused before any training."""
    argv = lambda out, *x: _args(cmd, tiny_model_dir, prompts_file, out, "--reward", f"{reward_file}:frac_alpha",  # noqa: E731
                                 "--num-generations", 4, "--prompts-per-step", 2, *SGD, *extra, *x)
    summary = lambda out: json.loads((out / "summary.json").read_text())  # noqa: E731
    assert main(argv(tmp_path / "shared")) == 0 and summary(tmp_path / "shared")["prefix_sharing"] is True
    assert main(argv(tmp_path / "plain", "--no-prefix-sharing")) == 0
    assert summary(tmp_path / "plain")["prefix_sharing"] is False
    wa = _assert_same_final_weights(tmp_path / "plain", tmp_path / "shared", 1e-5)
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max(float((wa[k] - init[k]).abs().max()) for k in wa) > 1e-2  # the comparison can see a difference
    for ra, rb in zip(_rows(tmp_path / "plain"), _rows(tmp_path / "shared")):
        for key in ("rewards/mean", "kl", "entropy"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-5), key
    assert main(argv(tmp_path / "gc", "--gradient-checkpointing")) == 0
    assert summary(tmp_path / "gc")["prefix_sharing"] is False
    capsys.readouterr()
    assert main(argv(tmp_path / "both", "--gradient-checkpointing", "--prefix-sharing")) == 2
    assert "--prefix-sharing cannot run with --gradient-checkpointing" in capsys.readouterr().err
    assert not (tmp_path / "both" / "checkpoints").exists()


def test_two_processes_log_the_samples_one_process_logs(tiny_model_dir, prompts_file, reward_file, tmp_path):
    """--log-samples N writes the global step's first N completions, gathered from every process in
    process order: the rows one process writes for the same global batch (before, only the main
    process's share: at most N/2 rows, never one of process 1's prompts)."""
    common = [*_args("grpo", tiny_model_dir, prompts_file, "OUT", "--reward", f"{reward_file}:frac_alpha",
                     "--num-generations", 2, *SGD, "--log-samples", 8)]
    argv = lambda out, n: [str(out) if a == "OUT" else a for a in common] + ["--prompts-per-step", str(n)]  # noqa: E731
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(argv(one, 4)) == 0
    res = launch("ddp_cpu.yaml", argv(two, 2))
    assert res.returncode == 0, res.stderr[-3000:]
    ra, rb = ([json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()] for run in (one, two))
    assert len(ra) == len(rb) == 8 * 2 + 2  # steps 1, 2: 8 each; step 3 holds the fifth prompt's 2
    for a, b in zip(ra, rb):
        assert (a["step"], a["prompt"], a["completion"]) == (b["step"], b["prompt"], b["completion"])
        assert b["score"] == pytest.approx(a["score"], abs=1e-6)


def test_a_failure_on_one_process_is_its_line_and_one_line_from_the_other(tiny_model_dir, prompts_file, reward_file,
                                                                          tmp_path):
    """Process 1's reward raises: its error is its one line; process 0, waiting in the step's
    all-reduce, gets a gloo error when process 1 leaves and says so in one line (not a traceback)."""
    res = launch("ddp_cpu.yaml", _args("grpo", tiny_model_dir, prompts_file, tmp_path / "run", "--reward",
                                       f"{reward_file}:fails_on_process_1", "--num-generations", 2,
                                       "--prompts-per-step", 2, "--max-steps", 3))
    assert res.returncode != 0
    assert re.search(r"dpolab grpo: error: reward function fails_on_process_1 raised ValueError at \S+grpo_rewards.py:\d+ "
                     "in fails_on_process_1: cannot score on process 1", res.stderr), res.stderr[-3000:]
    ours = [ln for ln in res.stderr.splitlines() if "src/dpolab" in ln or "dpolab/" in ln and "File" in ln]
    assert ours == [], res.stderr[-3000:]  # no traceback through dpolab (the launcher's own report may follow)
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- exact resume through a real process ---------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["grpo", "rloo"])
def test_sigterm_then_resume_latest_is_bitwise_exact(tiny_model_dir, prompts_file, reward_file, tmp_path, cmd):
    common = _args(cmd, tiny_model_dir, prompts_file, "OUT", "--reward", f"{reward_file}:frac_alpha",
                   "--num-generations", 4, "--prompts-per-step", 2, "--max-steps", 6, "--save-steps", 1,
                   "--learning-rate", "1e-2", "--num-iterations", 2)
    ref, run = tmp_path / "ref", tmp_path / "run"
    with_out = lambda out: [str(out) if a == "OUT" else a for a in common]  # noqa: E731
    assert main(with_out(ref)) == 0
    rc, err = interrupt(with_out(run), run, after_rows=2)
    assert_clean_stop(rc, err, signal.SIGTERM)
    assert not (run / "summary.json").exists()
    assert main([*with_out(run), "--resume", "latest"]) == 0
    assert_same_weights(load_file(str(ref / "final" / "model.safetensors")),
                        load_file(str(run / "final" / "model.safetensors")))
    assert metric_rows(ref) == metric_rows(run)


# -- options, metrics and bad input --------------------------------------------------------------------
def test_metrics_several_weighted_rewards_and_row_fields(tiny_model_dir, prompts_file, reward_file, tmp_path):
    out = tmp_path / "run"
    assert main(_args("grpo", tiny_model_dir, prompts_file, out,
                      "--reward", f"{reward_file}:frac_alpha,{reward_file}:length", "--reward-weights", "1,0.5",
                      "--num-generations", 4, "--prompts-per-step", 2, "--max-steps", 2, "--beta", "0.05",
                      "--epsilon-high", "0.28", "--mask-truncated-completions")) == 0
    row = _rows(out)[0]
    for key in ("rewards/mean", "rewards/std", "rewards/frac_alpha/mean", "rewards/length/mean",
                "frac_reward_zero_std", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "kl", "entropy",
                "completions/mean_length", "completions/clipped_ratio", "grad_norm"):
        assert key in row and math.isfinite(row[key]), key
    assert row["rewards/mean"] == pytest.approx(row["rewards/frac_alpha/mean"] + 0.5 * row["rewards/length/mean"],
                                                abs=1e-5)
    assert row["rewards/length/mean"] >= 0.5  # the `topic` field of the rows reached the reward
    assert row["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1 samples from π = π_ref


def test_bad_input_is_one_clear_line_and_nothing_half_written(tiny_model_dir, prompts_file, reward_file, tmp_path,
                                                              capsys):
    def err(cmd, *extra) -> str:
        out = tmp_path / "bad"
        assert main(_args(cmd, tiny_model_dir, prompts_file, out, "--max-steps", 1, "--num-generations", 2,
                          "--prompts-per-step", 2, *extra)) == 2
        msg = capsys.readouterr().err.strip()
        assert msg.count("\n") == 0 and "Traceback" not in msg, msg
        assert not (out / "summary.json").exists() and not (out / "checkpoints").exists()
        return msg

    assert "returned 1 values for 4" in err("grpo", "--reward", f"{reward_file}:wrong_length")
    assert "non-finite value (nan)" in err("rloo", "--reward", f"{reward_file}:nan")
    assert "no group std" in err("grpo", "--reward", f"{reward_file}:frac_alpha", "--num-generations", 1)
    for scaling in ("batch", "none"):  # advantage r - mean(group of one) = 0: it would train on nothing
        assert "every advantage r - mean(group) is 0" in err("grpo", "--reward", f"{reward_file}:frac_alpha",
                                                             "--num-generations", 1, "--scale-rewards", scaling)
    assert ">= 2" in err("rloo", "--reward", f"{reward_file}:frac_alpha", "--num-generations", 1)
    assert "2 weights for 1 rewards" in err("grpo", "--reward", f"{reward_file}:frac_alpha", "--reward-weights", "1,2")
    for cmd in ("grpo", "rloo"):  # was taken as 0 (never split), silently (online-dpo: its own test file)
        assert "--micro-batch-tokens must be >= 0" in err(cmd, "--reward", "a:b", "--micro-batch-tokens", -5)
    assert "--reward" in err("grpo")
    assert re.search(r"reward function exits raised SystemExit at \S+grpo_rewards.py:\d+ in exits: 3$",
                     err("rloo", "--reward", f"{reward_file}:exits").strip())
    frac = ("--reward", f"{reward_file}:frac_alpha")
    assert "--temperature must be a finite number > 0 (the trainer samples" in err("grpo", *frac, "--temperature", 0)
    assert "--top-p must be in (0, 1], got 1.5" in err("rloo", *frac, "--top-p", 1.5)
    assert "--mini-batches 5 is more than a step's 4 completions per process" in err(
        "grpo", *frac, "--prompts-per-step", 2, "--num-generations", 2, "--mini-batches", 5)
    for cmd in ("grpo", "rloo"):  # 1 − ε <= 0: the lower clip never bound, silently
        assert "--epsilon must be < 1 (the ratio's lower clip is 1 − ε), got 2.0" in err(cmd, *frac, "--epsilon", 2)
    assert "--top-k must be >= 0" in err("grpo", *frac, "--top-k", -2)
    # A row without a field the reward takes: found when the data loads, not when the row is first
    # sampled steps into the run (or, for --eval-data, at the end-of-run evaluation).
    late = tmp_path / "late.jsonl"
    late.write_text(prompts_file.read_text() + json.dumps({"prompt": "no topic"}) + "\n")
    assert f"{late}:6: field 'topic': missing; the reward length takes it" in err(
        "grpo", "--reward", f"{reward_file}:length", "--data", late)
    assert f"{late}:6: field 'topic': missing" in err("rloo", "--reward", f"{reward_file}:length", "--eval-data", late,
                                                      "--eval-prompts", 8)
    assert "'topic': missing" in err("grpo", "--reward", f"{reward_file}:length", "--data", late, "--dry-run")


def test_the_evaluated_rows_get_their_reward_fields_when_a_later_row_lacks_one(tiny_model_dir, prompts_file,
                                                                                reward_file, tmp_path):
    """Only the --eval-prompts rows evaluated need the reward's fields: before, those rows were checked
    but the field was passed only when every row of the whole file held it, so the end-of-run
    evaluation failed after the whole training run."""
    late = tmp_path / "late.jsonl"  # 5 rows with a topic, then one without
    late.write_text(prompts_file.read_text() + json.dumps({"prompt": "no topic"}) + "\n")
    out = tmp_path / "run"
    assert main(_args("grpo", tiny_model_dir, prompts_file, out, "--reward", f"{reward_file}:length",
                      "--num-generations", 2, "--prompts-per-step", 2, "--max-steps", 1, "--eval-data", late,
                      "--eval-prompts", 5)) == 0
    assert math.isfinite(json.loads((out / "summary.json").read_text())["eval/reward"])


def test_only_reward_names_that_coincide_get_a_suffix():
    from dpolab.train.on_policy import distinct_names

    def names(*given):
        return [n for n, _ in distinct_names([(n, None) for n in given])]

    assert names("exact_match", "rand", "rand") == ["exact_match", "rand_0", "rand_1"]
    assert names("final", "len", "final") == ["final_0", "len", "final_1"]
    assert names("a", "b") == ["a", "b"]
    assert names("a_0", "a", "a") == ["a_0_0", "a_1", "a_2"]  # a suffix meeting a name: every name its position


def test_a_failing_final_evaluation_leaves_the_trained_run_resumable(tiny_model_dir, prompts_file, reward_file,
                                                                      tmp_path, capsys):
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"prompt": "EVAL the movie"}) + "\n")
    out = tmp_path / "run"
    common = ("--reward", f"{reward_file}:fails_on_eval", "--num-generations", 2, "--prompts-per-step", 2,
              "--max-steps", 2)
    assert main(_args("grpo", tiny_model_dir, prompts_file, out, *common, "--eval-data", evals, "--eval-prompts", 1)) == 2
    assert "cannot score these" in capsys.readouterr().err
    assert (out / "checkpoints" / "step-2").is_dir() and not (out / "final").exists()
    assert main(_args("grpo", tiny_model_dir, prompts_file, out, *common, "--eval-prompts", 0,
                      "--resume", "latest")) == 0
    assert (out / "final" / "config.json").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_a_reward_may_return_numpy_or_torch_scalars(tiny_model_dir, prompts_file, reward_file, tmp_path):
    out = tmp_path / "run"
    assert main(_args("grpo", tiny_model_dir, prompts_file, out, "--reward", f"{reward_file}:numpy_scalars",
                      "--num-generations", 3, "--prompts-per-step", 2, "--max-steps", 1)) == 0
    assert _rows(out)[0]["rewards/mean"] == pytest.approx((0.5 + 1 + 0.25) / 3)


def test_task_command_bad_input_writes_nothing(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, says in ((["copy", "--output-dir", afile], "is a file; give a folder name"),
                       (["copy", "--task", "add", "--output-dir", tmp_path / "t"], "the task is given twice"),
                       (["add", "--train", "3000", "--output-dir", tmp_path / "t"], "fewer than 3000 distinct prompts besides the 128 evaluation prompts"),
                       (["add", "--sft", "2400", "--output-dir", tmp_path / "t"], "ask for fewer (--sft 2400)"),
                       # said at once (it drew 100 x N prompts first: minutes, or forever)
                       (["copy", "--train", "1000000000000", "--output-dir", tmp_path / "t"],
                        "fewer than 1000000000000 distinct prompts"),
                       (["add", "--eval", "1000000000000", "--output-dir", tmp_path / "t"],
                        "fewer than 1000000000000 distinct prompts")):
        assert main(["task", *map(str, argv)]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    assert main(["task", "copy", "--sft", "5", "--output-dir", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    assert main(["task", "copy", "--sft", "0", "--output-dir", str(tmp_path / "t")]) == 0  # no empty sft.jsonl,
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["eval.jsonl", "train.jsonl"]  # nor the old one
    assert "sft:" not in capsys.readouterr().out


def test_task_command_writes_disjoint_files(tmp_path, capsys):
    assert main(["task", "add", "--output-dir", str(tmp_path / "t"), "--train", "50", "--eval", "20", "--sft", "30",
                 "--noise", "0.5"]) == 0
    read = lambda n: [json.loads(x) for x in (tmp_path / "t" / f"{n}.jsonl").read_text().splitlines()]  # noqa: E731
    train, evals, sft = read("train"), read("eval"), read("sft")
    assert len(train) == 50 and len(evals) == 20 and len(sft) == 30
    assert not {r["prompt"] for r in evals} & ({r["prompt"] for r in train} | {r["prompt"] for r in sft})
    a, b = map(int, train[0]["prompt"][:-1].split("+"))
    assert train[0]["answer"] == str(a + b)
    from dpolab.rewards.tasks import exact_match

    assert exact_match(["p", "q"], [" 19 ", "18"], ["19", "19"]) == [1.0, 0.0]


def test_loss_masks_keep_masked_truncations_counted():
    from dpolab.train.critic_free import loss_masks

    response = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)  # row 3: a stand-in row
    finished = torch.tensor([True, False, False])  # row 2 was cut at --max-new-tokens
    mask, counted = loss_masks(response, finished, mask_truncated=False)
    assert torch.equal(mask, response) and counted.tolist() == [True, True, False]
    mask, counted = loss_masks(response, finished, mask_truncated=True)
    assert mask.tolist() == [[True, True, False], [False] * 3, [False] * 3]
    assert counted.tolist() == [True, True, False]


@pytest.mark.parametrize("cmd", ["grpo", "rloo"])
def test_missing_eos_penalty_and_masked_truncations_reach_the_step(tiny_model_dir, prompts_file, reward_file,
                                                                   tmp_path, cmd):
    """One step each from the same weights and seed, so the same completions: the penalty lowers the
    logged score by P per truncated completion; masking truncations changes the update."""
    def run(name, *extra):
        assert main(_args(cmd, tiny_model_dir, prompts_file, tmp_path / name, "--reward", f"{reward_file}:frac_alpha",
                          "--num-generations", 4, "--prompts-per-step", 4, "--max-steps", 1,
                          "--max-new-tokens", 4, *extra)) == 0
        return _rows(tmp_path / name)[0]

    base, pen, masked = run("base"), run("pen", "--missing-eos-penalty", 0.5), run("masked",
                                                                                    "--mask-truncated-completions")
    clipped = base["completions/clipped_ratio"]
    assert 0 < clipped < 1  # some completions end with EOS, some are cut: both cases are in the step
    assert pen["completions/clipped_ratio"] == clipped and masked["completions/clipped_ratio"] == clipped
    assert pen["rewards/mean"] == pytest.approx(base["rewards/mean"] - 0.5 * clipped, abs=1e-6)
    wb, wm = (load_file(str(tmp_path / n / "final" / "model.safetensors")) for n in ("base", "masked"))
    assert any(not torch.equal(wb[k], wm[k]) for k in wb)


def test_dry_run_reports_truncated_evaluation_prompts(tiny_model_dir, prompts_file, reward_file, tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "the movie was great fun and the music " * (i + 1)}) + "\n"
                            for i in range(3)) + json.dumps({"prompt": "a"}) + "\n")
    assert main(_args("grpo", tiny_model_dir, prompts_file, tmp_path / "run", "--reward", f"{reward_file}:frac_alpha",
                      "--eval-data", long, "--eval-prompts", 4, "--max-prompt-length", 6, "--dry-run")) == 0
    report = json.loads(capsys.readouterr().out)["data"]
    assert (report["eval_prompts"], report["eval_truncated"]) == (4, 3)


def test_per_token_metrics_are_means_over_the_step_however_it_is_split(tiny_model_dir, prompts_file, reward_file,
                                                                        tmp_path):
    """entropy, kl and the clip ratios are per-token means over the generation step: split into 8
    mini-batches (several of them with every completion truncated and masked, no loss token) they
    equal the one mini-batch's values (learning rate 0: the same weights throughout). They were the
    plain mean of the optimizer steps' means, zeros of the empty ones included (half the entropy)."""
    def run(name, *extra):
        assert main(_args("grpo", tiny_model_dir, prompts_file, tmp_path / name, "--reward", f"{reward_file}:frac_alpha",
                          "--num-generations", 4, "--prompts-per-step", 4, "--max-steps", 1, "--max-new-tokens", 4,
                          "--mask-truncated-completions", "--learning-rate", 0, "--beta", 0.1, *extra)) == 0
        return _rows(tmp_path / name)[0]

    one, split = run("one"), run("split", "--mini-batches", 8, "--num-iterations", 2)
    assert 0 < one["completions/clipped_ratio"] < 1
    for key in ("entropy", "kl"):
        assert split[key] == pytest.approx(one[key], rel=1e-5), key
    assert one["entropy"] > 0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_under_bf16_mixed_precision_the_start_policy_has_zero_kl_to_itself(tiny_model_dir, prompts_file,
                                                                          reward_file, tmp_path, lora):
    """Under --mixed-precision bf16 the reference scored in float32 (a separate model) or outside the
    autocast (LoRA's base), RLOO's old log-probs came from the float32 sampler and PPO's fused head ran
    in bf16 inside its policy-with-value forward: at step 1, the policy being its reference, the KL
    read 1e-4 (entering RLOO's and PPO's rewards). Every pass now scores one model alike: exactly 0."""
    from dpolab.cli import main

    runs = {"grpo": ["grpo", "--beta", "0.1"], "rloo": ["rloo"], "ppo": ["ppo", "--rollout-batch-size", "4",
                                                                          "--mini-batch-size", "4"]}
    for name, (cmd, *extra) in runs.items():
        out = tmp_path / name
        args = _args(cmd, tiny_model_dir, prompts_file, out, "--reward", f"{reward_file}:frac_alpha", "--max-steps",
                     1, "--learning-rate", 0, "--mixed-precision", "bf16", "--eval-prompts", 4, *extra,
                     *(["--lora"] if lora else []))
        if cmd != "ppo":
            args += ["--prompts-per-step", "4", "--num-generations", "2"]
        assert main(args) == 0, name
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        kl = rows[0]["objective/kl" if cmd == "ppo" else "kl"]
        assert kl == 0.0, (name, kl)
        if cmd == "ppo":
            assert rows[0]["policy/ratio"] == 1.0
        assert rows[-1]["eval/kl"] == 0.0, (name, rows[-1])  # PPO's too: its raw policy under the autocast


@pytest.mark.parametrize("cmd", ["grpo", "rloo"])
def test_a_rewards_offset_does_not_round_its_differences_away(cmd, tiny_model_dir, prompts_file, reward_file, tmp_path):
    """Group baselines are offset-invariant: 1e8 + n trains as n does. Scored in float32, 1e8 + n was
    rounded to multiples of 8, so most groups had no reward spread and nothing was learned."""
    common = ("--max-steps", 2, "--prompts-per-step", 5, "--num-generations", 4, "--learning-rate", "0.5",
              "--optimizer", "sgd", "--max-new-tokens", 8)
    for fn in ("chars", "chars_offset"):
        assert main(_args(cmd, tiny_model_dir, prompts_file, tmp_path / fn, "--reward", f"{reward_file}:{fn}",
                          *common)) == 0
    _assert_same_final_weights(tmp_path / "chars", tmp_path / "chars_offset", atol=1e-5)
    if cmd == "grpo":
        assert [r["frac_reward_zero_std"] for r in _rows(tmp_path / "chars")] == \
            [r["frac_reward_zero_std"] for r in _rows(tmp_path / "chars_offset")]


def test_the_two_printed_samples_come_from_two_prompts(tmp_path, capsys):
    """A group's completions of one prompt were printed together: once they agree, one line twice."""
    from dpolab.runs.rundir import RunDir
    from dpolab.train.on_policy import log_samples

    rows = [{"prompt": "a", "completion": "x", "score": 1.0}, {"prompt": "a", "completion": "x", "score": 1.0},
            {"prompt": "b", "completion": "y", "score": 0.0}]
    log_samples(RunDir(tmp_path), 3, rows, 3)
    printed = capsys.readouterr().err.splitlines()
    assert len(printed) == 2 and "'a' -> 'x'" in printed[0] and "'b' -> 'y'" in printed[1], printed
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3  # the file keeps every row
    log_samples(RunDir(tmp_path), 4, rows[:1], 1)
    assert len(capsys.readouterr().err.splitlines()) == 1
