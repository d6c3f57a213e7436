"""A lean process: the CLI answers --help and bad arguments without importing torch (or the other
heavy libraries), and a training process imports only what its options need."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpolab.cli import COMMANDS

HEAVY = ("torch", "transformers", "accelerate", "datasets", "peft", "matplotlib", "gymnasium", "tensorboard",
         "wandb", "mlflow")


def _commands() -> list[list[str]]:
    out = []
    for name, entry in COMMANDS.items():
        out += [[name, sub] for sub in entry] if isinstance(entry, dict) else [[name]]
    return out


PROBE = """
import json, sys
from dpolab.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:  # argparse's --help
    code = exit.code
heavy = sorted(m for m in {heavy} if m in sys.modules)
print("\\n" + json.dumps({{"code": code, "heavy": heavy}}))
"""


def _probe(argv: list[str]) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                         timeout=120)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], *([*c, "--help"] for c in _commands())], ids=" ".join)
def test_help_imports_no_heavy_library(argv):
    out = _probe(argv)
    assert out == {"code": 0, "heavy": []}, out


@pytest.mark.parametrize("argv", [[*c, "--no-such-option"] for c in _commands()], ids=" ".join)
def test_a_bad_argument_is_answered_without_heavy_libraries(argv):
    out = _probe(argv)
    assert out["code"] == 2 and out["heavy"] == [], out


@pytest.mark.parametrize("argv", [["sft", "--model", "m", "--data", "d.jsonl", "--learning-rate", "-1"],
                                  ["dpo", "--model", "m", "--data", "d.jsonl", "--ref-model", "/no/such/folder"],
                                  ["grpo", "--model", "m", "--data", "d.jsonl", "--reward", "a:b",
                                   "--num-generations", "1"]], ids=lambda a: " ".join(a[:1] + a[-2:]))
def test_a_bad_option_value_is_answered_without_heavy_libraries(argv):
    """The folder check of --ref-model and friends imported the model loader (torch, 1.6 s) first."""
    out = _probe(argv)
    assert out["code"] == 2 and out["heavy"] == [], out


TRAIN_PROBE = """
import json, sys
from dpolab.cli import main
code = main(sys.argv[1:])
print("\\n" + json.dumps({"code": code, "loaded": sorted(m for m in %r if m in sys.modules)}))
"""
UNNEEDED = ("matplotlib", "peft", "datasets", "tensorboard", "wandb", "mlflow", "gymnasium")


def test_a_training_process_imports_only_what_its_options_need(tiny_model_dir, tmp_path):
    """DPO on a JSONL file without LoRA, trackers or plots: no PEFT, datasets, plotting, tracking or
    Gymnasium module is loaded (each is imported where an option needs it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_dpo import write_rule_data

    data = write_rule_data(tmp_path / "p.jsonl", n=12)
    argv = ["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"),
            "--max-length", "48", "--max-prompt-length", "24", "--max-steps", "1", "--no-progress"]
    res = subprocess.run([sys.executable, "-c", TRAIN_PROBE % (UNNEEDED,), *argv], capture_output=True, text=True,
                         timeout=240)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"code": 0, "loaded": []}, (out, res.stderr[-2000:])
