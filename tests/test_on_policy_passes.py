"""The on-policy trainers' token budget per training pass (``--micro-batch-tokens``): a pass holds at
most ``budget // width`` completions (at least one), and splitting changes no weight (GRPO, RLOO,
PPO, online DPO end to end against unsplit runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main
from dpolab.train import rollouts

sys.path.insert(0, str(Path(__file__).parent))

REWARDS = '''
def frac_alpha(prompts, completions):
    return [sum("a" <= ch <= "z" for ch in c) / max(len(c), 1) for c in completions]
'''


def _engine():
    return SimpleNamespace(device=torch.device("cpu"), accelerator=SimpleNamespace(num_processes=1))


def test_pass_sizes_hand_values():
    rows = list(range(10))
    sizes = lambda **kw: [int(p.batch.numel()) for p in rollouts.row_passes(_engine(), rows, 4, len, "t", **kw)]  # noqa: E731
    assert sizes() == [4, 4, 2]                               # no budget: --micro-batch-size
    assert sizes(width=30, budget=0) == [4, 4, 2]             # 0: never split
    assert sizes(width=30, budget=95) == [3, 3, 3, 1]         # 95 // 30 = 3 rows a pass
    assert sizes(width=30, budget=1000) == [4, 4, 2]          # the budget never enlarges a pass
    assert sizes(width=30, budget=10) == [1] * 10             # narrower than a row: one row a pass
    even = [int(p.batch.numel()) for p in rollouts.row_passes(_engine(), list(range(16)), 16, len, "t",
                                                              width=40, budget=528)]
    assert even == [8, 8]                                     # 528 // 40 = 13 a pass: two even passes
    units = [p.units for p in rollouts.row_passes(_engine(), rows, 4, len, "t", width=30, budget=95)]
    assert units == [3, 3, 3, 1]


def test_shared_prompt_pass_sizes_hand_values():
    """Passes that run each of their prompts once: rows grouped by prompt, each distinct prompt's
    width (10) counted once and each row's response (14 − 10 = 4) per row."""
    prompt_of = [0, 0, 0, 0, 1, 1, 1, 1]
    rows = [5, 0, 7, 2, 4, 1, 6, 3]  # a mini-batch's permutation

    def parts(size, budget):
        return [p.batch.tolist() for p in rollouts.row_passes(_engine(), rows, size, len, "t", width=14, budget=budget,
                                                              prompt_of=prompt_of, prompt_width=10)]

    # 4 rows of prompt 0: 10 + 16 = 26; a 5th row with prompt 1: 20 + 20 = 40 (fits); a 6th: 44 does
    # not: two passes, which run as two of even size
    assert parts(16, 40) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert parts(16, 0) == [[0, 1, 2, 3, 4, 5, 6, 7]]           # no budget: --micro-batch-size only
    assert parts(2, 0) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert parts(16, 5) == [[r] for r in range(8)]              # narrower than a row: one row a pass
    # 4 prompts of 8 tokens, 4 responses of 32 each, a budget of 528: 15 rows fit (4·8 + 15·32 = 512),
    # so two passes, as 8 and 8 (272 tokens each) rather than 15 and 1
    sixteen = [p.batch.numel() for p in rollouts.row_passes(_engine(), list(range(16)), 16, len, "t", width=40,
                                                            budget=528, prompt_of=[r // 4 for r in range(16)],
                                                            prompt_width=8)]
    assert sixteen == [8, 8]
    # the plain layout would hold 40 // 14 = 2 rows a pass
    assert [p.batch.numel() for p in rollouts.row_passes(_engine(), rows, 16, len, "t", width=14, budget=40)] == [2] * 4


@pytest.fixture()
def files(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie", "a film", "the plot", "I"]))
    reward = tmp_path / "passes_rewards.py"
    reward.write_text(REWARDS)
    return prompts, reward


CASES = {
    "grpo": ("--num-generations", 4, "--prompts-per-step", 2),
    "rloo": ("--num-generations", 4, "--prompts-per-step", 2, "--beta", "0.1"),
    "ppo": ("--rollout-batch-size", 4, "--mini-batch-size", 4, "--ppo-epochs", 1),
    "online-dpo": ("--prompts-per-step", 3, "--num-samples", 2),
}


@pytest.mark.parametrize("cmd", list(CASES))
def test_split_passes_give_the_same_weights(cmd, tiny_model_dir, files, tmp_path, monkeypatch):
    prompts, reward = files
    seen = []
    real = rollouts.row_passes

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(max(int(p.batch.numel()) for p in out))
        return out

    monkeypatch.setattr(rollouts, "row_passes", recording)

    def run(out, tokens):
        argv = [cmd, "--model", str(tiny_model_dir), "--data", str(prompts), "--output-dir", str(out),
                "--no-progress", "--max-new-tokens", "6", "--log-samples", "0", "--eval-prompts", "0",
                "--reward", f"{reward}:frac_alpha", "--optimizer", "sgd", "--learning-rate", "0.5",
                "--max-grad-norm", "0", "--max-steps", "2", "--micro-batch-tokens", str(tokens), *map(str, CASES[cmd])]
        assert main(argv) == 0
        sizes, seen[:] = list(seen), []
        return load_file(str(out / "final" / "model.safetensors")), sizes

    whole, whole_sizes = run(tmp_path / "whole", 0)
    split, split_sizes = run(tmp_path / "split", 1)
    assert max(whole_sizes) > 1 and max(split_sizes) == 1  # one completion (pair) per pass when split
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], atol=1e-5, rtol=0)
    assert any(not torch.equal(whole[k], load_file(str(tiny_model_dir / "model.safetensors"))[k]) for k in whole)


def test_default_budget_is_sized_by_the_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from dpolab.train.memory import auto_forward_tokens, resolve_micro_batch_tokens

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = SimpleNamespace(micro_batch_tokens=None, gradient_checkpointing=False, mixed_precision="no")
    assert resolve_micro_batch_tokens(cfg, model) == auto_forward_tokens(model) > 0
    checkpointing = SimpleNamespace(**{**vars(cfg), "gradient_checkpointing": True})
    assert resolve_micro_batch_tokens(checkpointing, model) == 0  # checkpointed passes: no budget
