"""The DPO trainer's numerical guard and exact resume in process (issue 8).

NaN/inf are injected by wrapping ``dpolab.losses.dpo.preference_loss`` (the trainer imports it
at run time): a NaN loss, a finite loss whose gradient is NaN, and a finite step that blows the
weights up. SGD without momentum and a constant rate make "the step changed nothing" checkable
bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpolab.losses.dpo as dpo_losses
from dpolab.cli import main
from test_train_dpo import write_rule_data


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    return write_rule_data(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", n=32)


def _args(model_dir, data, out, *extra) -> list[str]:
    return ["dpo", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--max-length", "48",
            "--max-prompt-length", "24", "--no-progress", "--eval-fraction", "0", *map(str, extra)]


SGD = ("--optimizer", "sgd", "--learning-rate", "0.05", "--lr-scheduler", "constant", "--batch-size", "2",
       "--grad-accum", "2", "--max-steps", "4", "--logging-steps", "1", "--save-steps", "1",
       "--save-total-limit", "10")


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def inject(monkeypatch, at_call: int, how) -> None:
    """Replace the per-pair losses of the ``at_call``-th training micro-batch by ``how(losses)``."""
    original = dpo_losses.preference_loss
    calls = [0]

    def patched(*args, **kwargs):
        losses, chosen, rejected = original(*args, **kwargs)
        calls[0] += 1
        return (how(losses) if calls[0] == at_call else losses), chosen, rejected

    monkeypatch.setattr(dpo_losses, "preference_loss", patched)


def _ckpt_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step}" / "model.safetensors"))


def _all_finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in weights.values())


# Micro-batch calls: step 1 -> calls 1, 2; step 2 -> 3, 4; step 3 -> 5, 6 (grad_accum 2).
def test_nan_loss_stops_naming_step_and_batch(tiny_model_dir, prefs, tmp_path, monkeypatch, capsys):
    inject(monkeypatch, 6, lambda x: x * float("nan"))
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, prefs, out, *SGD)) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at step 3" in err and "micro-batch 5" in err and "--skip-nonfinite" in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-1", "step-2"]
    assert _all_finite(_ckpt_weights(out, 2))
    assert not (out / "final").exists() and not (out / "summary.json").exists()


def test_skip_nonfinite_skips_the_whole_step_and_counts_it(tiny_model_dir, prefs, tmp_path, monkeypatch, capsys):
    # The NaN comes in the step's SECOND micro-batch, after the first one's backward: the skipped
    # step must discard that gradient too, so the weights after step 3 equal those after step 2.
    inject(monkeypatch, 6, lambda x: x * float("nan"))
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, prefs, out, *SGD, "--skip-nonfinite")) == 0
    # said at the end (a run whose every step was skipped ended "done" with the base model, said nowhere)
    assert "warning: 1 optimizer steps were skipped as non-finite" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1]
    w1, w2, w3, w4 = (_ckpt_weights(out, s) for s in (1, 2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1) and any(not torch.equal(w3[k], w4[k]) for k in w3)
    assert _all_finite(load_file(str(out / "final" / "model.safetensors")))


def test_nan_gradient_is_caught_with_clipping_off(tiny_model_dir, prefs, tmp_path, monkeypatch, capsys):
    inject(monkeypatch, 5, _NanGrad.apply)
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, prefs, out, *SGD, "--max-grad-norm", "0")) == 2
    err = capsys.readouterr().err
    assert "non-finite gradient norm at step 3" in err and "micro-batches 4..5" in err, err
    assert _all_finite(_ckpt_weights(out, 2)) and not (out / "checkpoints" / "step-3").exists()


def test_checkpoint_with_non_finite_weights_is_never_written(tiny_model_dir, prefs, tmp_path, monkeypatch, capsys):
    # Step 1 has finite loss and gradients (scaled by 1e15, norm ~1e15 < float32 max), but with
    # rate 1e30 the update overflows the weights to inf. The step-1 checkpoint must be refused.
    inject(monkeypatch, 1, lambda x: x * 1e15)
    out = tmp_path / "run"
    args = [a if a != "0.05" else "1e30" for a in SGD]
    assert main(_args(tiny_model_dir, prefs, out, *args, "--max-grad-norm", "0", "--skip-nonfinite")) == 2
    err = capsys.readouterr().err
    assert "non-finite weights at step 1" in err, err
    assert not list(out.glob("checkpoints/step-*"))
    assert not (out / "final").exists()


def test_mid_window_resume_logs_the_same_averages(tiny_model_dir, prefs, tmp_path):
    """logging every 2 steps, resumed from step 3: the row at step 4 averages steps 3 and 4, and
    step 3's metrics exist only in the checkpoint's carried window."""
    common = ("--learning-rate", "1e-3", "--batch-size", "4", "--max-steps", "6", "--logging-steps", "2",
              "--save-steps", "3", "--save-total-limit", "5")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(_args(tiny_model_dir, prefs, full, *common)) == 0
    state = json.loads((full / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert len(state["window"]) == 1 and state["tokens_window"] > 0
    assert main(_args(tiny_model_dir, prefs, resumed, *common, "--resume", full / "checkpoints" / "step-3")) == 0

    def rows(run):
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_second"}
                for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in rows(resumed)] == [4, 6]
    assert rows(resumed) == [r for r in rows(full) if r["step"] > 3]
    wa = load_file(str(full / "final" / "model.safetensors"))
    wb = load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)



def test_a_skipped_first_step_raises_no_false_schedule_warning(tiny_model_dir, prefs, tmp_path, monkeypatch):
    """torch warns that the schedule skips its first value when the first optimizer step is skipped;
    the schedule is right (the rate each step used is logged), so the warning is not shown."""
    import warnings

    inject(monkeypatch, 1, lambda x: x * float("nan"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(_args(tiny_model_dir, prefs, tmp_path / "run", *SGD, "--skip-nonfinite")) == 0
    assert not [w for w in seen if "lr_scheduler.step()" in str(w.message)]
