"""Every trainer's ``final/README.md`` is a Hub model card: ``huggingface_hub.ModelCard.load`` reads
it, finds the base model, the library and its tags, and the run's final metrics (equal to
summary.json), and the text holds the configuration and the command that reproduces the run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dpolab.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_train_dpo import write_rule_data  # noqa: E402
from test_train_grpo import PROMPTS, REWARDS  # noqa: E402
from test_train_sft import write_sft_data  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    (root / "card_rewards.py").write_text(REWARDS)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {"prefs": write_rule_data(root / "prefs.jsonl", n=16), "sft": write_sft_data(root / "sft.jsonl", n=16),
            "prompts": prompts, "reward": f"{root / 'card_rewards.py'}:frac_alpha"}


def _commands(model, i):
    lm = ["--max-steps", "1", "--no-progress", "--model", str(model)]
    short = ["--max-length", "48", "--max-prompt-length", "24", "--batch-size", "4", "--eval-fraction", "0.25"]
    onp = ["--data", str(i["prompts"]), "--reward", i["reward"], "--max-new-tokens", "4", "--eval-prompts", "2",
           "--log-samples", "0"]
    return {
        "sft": ["sft", *lm, "--data", str(i["sft"]), "--max-length", "48", "--batch-size", "4"],
        "rm": ["rm", *lm, "--data", str(i["prefs"]), *short],
        "dpo": ["dpo", *lm, "--data", str(i["prefs"]), *short],
        "kto": ["kto", *lm, "--data", str(i["prefs"]), *short],
        "ppo": ["ppo", *lm, *onp, "--rollout-batch-size", "2", "--mini-batch-size", "2"],
        "grpo": ["grpo", *lm, *onp, "--prompts-per-step", "2", "--num-generations", "2"],
        "rloo": ["rloo", *lm, *onp, "--prompts-per-step", "2", "--num-generations", "2"],
        "online-dpo": ["online-dpo", *lm, *onp, "--prompts-per-step", "2"],
        "rl ppo": ["rl", "ppo", "--total-steps", "64", "--n-envs", "2", "--n-steps", "32", "--batch-size", "32",
                   "--n-epochs", "1", "--eval-episodes", "1", "--no-progress"],
        "rl a2c": ["rl", "a2c", "--total-steps", "40", "--n-envs", "2", "--eval-episodes", "1", "--no-progress"],
    }


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "kto", "ppo", "grpo", "rloo", "online-dpo", "rl ppo",
                                     "rl a2c"])
def test_every_trainer_writes_a_model_card(tiny_model_dir, inputs, tmp_path, command):
    from huggingface_hub import ModelCard

    out = tmp_path / command.replace(" ", "-")
    assert main([*_commands(tiny_model_dir, inputs)[command], "--output-dir", str(out)]) == 0
    card = ModelCard.load(out / "final" / "README.md")
    data = card.data.to_dict()
    summary = json.loads((out / "summary.json").read_text())
    assert data["library_name"] == "dpolab" and command.replace(" ", "-") in data["tags"]
    assert data["dpolab"]["command"] == f"dpolab {command}"
    metrics = data["dpolab"]["metrics"]
    for key, value in summary.items():
        assert metrics[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    if not command.startswith("rl "):
        assert data["base_model"] == str(tiny_model_dir)
        assert any(k.startswith("eval/") for k in metrics), metrics  # every LM trainer evaluated here
    assert f"dpolab {command} --config config.yaml" in card.text and "## Configuration" in card.text


@pytest.mark.parametrize("module", ["dpo", "sft", "rm", "ppo", "kto", "grpo", "rloo", "online_dpo"])
def test_method_section_cites_the_method_paper(module):
    """The card's Method section is the first paragraph of the trainer module's docstring: it names
    the paper (authors and year)."""
    import importlib
    import re

    from dpolab.runs.model_card import method_text

    mod = importlib.import_module(f"dpolab.train.{module}")
    algo = next(v for v in vars(mod).values() if isinstance(v, type) and v.__module__ == mod.__name__
                and isinstance(getattr(v, "name", None), str))
    assert re.search(r"\w+ (et al\. |& \w+ )?(19|20)\d\d\b", method_text(object.__new__(algo)))
