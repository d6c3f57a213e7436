"""The supervised loop (``dpolab sft``, ``dpolab rm``) keeps the same promises as the DPO loop
(issue 8): a resume between two log rows logs the same averages, a NaN gradient is caught also
with clipping off, and a checkpoint of another model is refused rather than half-loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpolab.cli import main
from test_train_sft import write_sft_data


@pytest.fixture(scope="module")
def sft_rows(tmp_path_factory) -> Path:
    return write_sft_data(tmp_path_factory.mktemp("sft") / "sft.jsonl", n=24)


def _args(model_dir, data, out, *extra) -> list[str]:
    return ["sft", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--max-length", "48",
            "--no-progress", "--eval-fraction", "0", "--batch-size", "4", *map(str, extra)]


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_second"}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_mid_window_resume_logs_the_same_averages(tiny_model_dir, sft_rows, tmp_path):
    common = ("--learning-rate", "1e-3", "--max-steps", "6", "--logging-steps", "2", "--save-steps", "3",
              "--save-total-limit", "5")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(_args(tiny_model_dir, sft_rows, full, *common)) == 0
    assert main(_args(tiny_model_dir, sft_rows, resumed, *common, "--resume", full / "checkpoints" / "step-3")) == 0
    assert [r["step"] for r in _rows(resumed)] == [4, 6]
    assert _rows(resumed) == [r for r in _rows(full) if r["step"] > 3]
    wa = load_file(str(full / "final" / "model.safetensors"))
    wb = load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_sft_nan_gradient_is_caught_with_clipping_off(tiny_model_dir, sft_rows, tmp_path, monkeypatch, capsys):
    import dpolab.train.sft as sft

    original, calls = sft.batch_nll, [0]

    def patched(*args, **kwargs):
        out = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 2:
            return (_NanGrad.apply(out[0]), *out[1:]) if isinstance(out, tuple) else _NanGrad.apply(out)
        return out

    monkeypatch.setattr(sft, "batch_nll", patched)
    out = tmp_path / "run"
    rc = main(_args(tiny_model_dir, sft_rows, out, "--max-steps", "3", "--max-grad-norm", "0", "--save-steps", "1"))
    err = capsys.readouterr().err
    assert calls[0] >= 2, "the patch did not reach the training loss"
    assert rc == 2 and "non-finite gradient norm at step 2" in err, err
    assert not (out / "checkpoints" / "step-2").exists() and not (out / "final").exists()


def test_sft_refuses_a_checkpoint_of_another_model(tiny_model_dir, sft_rows, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sft_rows, out, "--max-steps", "1", "--learning-rate", "1e-3")) == 0
    ckpt = out / "checkpoints" / "step-1"
    save_file({"other.weight": torch.zeros(3)}, str(ckpt / "model.safetensors"))
    assert main(_args(tiny_model_dir, sft_rows, tmp_path / "r", "--max-steps", "2", "--resume", ckpt)) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "Traceback" not in err, err
