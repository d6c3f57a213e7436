"""`--report-to`: every trainer also logs to TensorBoard, MLflow and Weights & Biases through
accelerate's trackers. The tests read back what each tracker wrote (TensorBoard's event files with
its event reader, MLflow's local store with its client, W&B's offline run files) and find the
metric names and values of metrics.jsonl; the resolved config is the run's hyper-parameters; sample
tables reach the trackers of sampling trainers; a tracker that is not installed is a one-line error
before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dpolab.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_train_grpo import PROMPTS, REWARDS  # noqa: E402
from test_train_sft import write_sft_data  # noqa: E402

pytest.importorskip("tensorboard")


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (logdir,) = [p for p in (run / "tensorboard").iterdir() if p.is_dir()]
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    for tag in acc.Tags().get("tensors", []):  # text summaries (sample tables) are tensors
        out.setdefault(f"text:{tag}", [(e.step, 0.0) for e in acc.Tensors(tag)])
    return out


def test_sft_logs_to_all_three_trackers(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = write_sft_data(tmp_path / "sft.jsonl", n=24)
    out = tmp_path / "run"
    assert main(["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
                 "--max-length", "48", "--max-steps", "4", "--batch-size", "4", "--logging-steps", "2",
                 "--eval-steps", "2", "--no-progress", "--report-to", "tensorboard,mlflow,wandb"]) == 0
    rows = _rows(out)
    logged = {(r["step"], k): v for r in rows for k, v in r.items() if k != "step"}

    tb = _tensorboard_scalars(out)
    for key in ("loss", "learning_rate", "grad_norm", "eval/loss"):
        assert key in tb, (key, sorted(tb))
        for step, value in tb[key]:
            assert value == pytest.approx(logged[(step, key)], rel=1e-6), (key, step)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "dpolab"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx({s: v for (s, k), v in logged.items() if k == "loss"}, rel=1e-6)
    assert run.data.params["learning_rate"] == "2e-05" and run.data.params["max_steps"] == "4"  # the config

    (run_file,) = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    history, config = _wandb_records(run_file)
    for step, key in [(s, k) for s, k in logged if k in ("loss", "eval/loss", "learning_rate")]:
        assert history[step][key] == pytest.approx(logged[(step, key)], rel=1e-6), (key, step)
    assert config["max_steps"] == 4


def _wandb_records(path: Path) -> tuple[dict[int, dict[str, float]], dict]:
    """History rows by step and the config of an offline W&B run file: the log-file layout W&B writes
    (a 7-byte header, 32 KiB blocks of records with a 7-byte header: crc32, length, type), each
    record a protobuf ``Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, records, partial = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            partial += chunk
        elif kind == 4:
            records.append(partial + chunk)
            partial = b""
    history, config = {}, {}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            history[int(row["_step"])] = row
        elif rec.WhichOneof("record_type") == "config":
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in rec.config.update})
    return history, config


def test_sampling_trainer_sends_sample_tables(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp_path / "trk_rewards.py").write_text(REWARDS)
    out = tmp_path / "grpo"
    assert main(["grpo", "--model", str(tiny_model_dir), "--data", str(prompts), "--output-dir", str(out),
                 "--reward", f"{tmp_path / 'trk_rewards.py'}:frac_alpha", "--num-generations", "2",
                 "--prompts-per-step", "2", "--max-steps", "2", "--max-new-tokens", "4", "--eval-prompts", "0",
                 "--log-samples", "2", "--no-progress", "--report-to", "tensorboard"]) == 0
    tb = _tensorboard_scalars(out)
    assert [s for s, _ in tb["rewards/mean"]] == [1, 2]
    assert any(k.startswith("text:samples") for k in tb), sorted(tb)


def test_gymnasium_trainer_reports_too(tmp_path):
    out = tmp_path / "ppo"
    assert main(["rl", "ppo", "--env", "CartPole-v1", "--total-steps", "128", "--n-envs", "2", "--n-steps", "32",
                 "--batch-size", "32", "--n-epochs", "1", "--eval-every", "64", "--eval-episodes", "1",
                 "--no-progress", "--output-dir", str(out), "--report-to", "tensorboard"]) == 0
    tb = _tensorboard_scalars(out)
    assert "losses/policy" in tb and "eval/mean_return" in tb


def test_a_tracker_that_is_not_installed_fails_before_any_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "never"
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl"), "--output-dir",
                 str(out), "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--report-to wandb needs the wandb package" in err and err.count("\n") == 0
    assert not out.exists()
    assert main(["rl", "ppo", "--output-dir", str(out), "--report-to", "tensorbored"]) == 2
    assert "unknown tracker 'tensorbored'" in capsys.readouterr().err


def test_a_tracker_that_cannot_start_is_one_line_and_leaves_no_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """E.g. W&B without an API key: its own error, said in one line naming the tracker."""
    from accelerate import tracking

    class NoLogin:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("No API key configured.\nUse `wandb login` to log in.")

    monkeypatch.setattr(tracking, "TensorBoardTracker", NoLogin)
    assert main(["rl", "ppo", "--env", "CartPole-v1", "--total-steps", "64", "--n-envs", "2", "--n-steps", "32",
                 "--batch-size", "32", "--n-epochs", "1", "--eval-every", "0", "--eval-episodes", "1",
                 "--no-progress", "--output-dir", str(tmp_path / "ppo"), "--report-to", "tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--report-to tensorboard: cannot start the tracker: RuntimeError: No API key configured.")
    assert err.count("\n") == 0
    assert not (tmp_path / "ppo").exists()  # the new run's folder (config.yaml) is not left behind
    sft_data = write_sft_data(tmp_path / "sft.jsonl", n=8)
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("the user's")
    assert main(["sft", "--model", str(tiny_model_dir), "--data", str(sft_data), "--max-steps", "1",
                 "--batch-size", "2", "--output-dir", str(existing), "--report-to", "tensorboard"]) == 2
    assert "cannot start the tracker" in capsys.readouterr().err
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]  # a folder it did not make: only its files go


def test_two_mlflow_runs_in_one_process_log_to_their_own_folders(tiny_model_dir, tmp_path, monkeypatch):
    """MLflow 3 exports the tracking URI the first run set to os.environ: the second run of a process
    (a sweep, a notebook, the demo's stages) took it for the user's and logged into the first folder."""
    import os

    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    data = write_sft_data(tmp_path / "sft.jsonl", n=24)
    for name in ("a", "b"):
        assert main(["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / name),
                     "--max-length", "48", "--max-steps", "1", "--batch-size", "4", "--no-progress",
                     "--report-to", "mlflow"]) == 0
        assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name in ("a", "b"):
        client = MlflowClient(tracking_uri=(tmp_path / name / "mlruns").as_uri())
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        assert [r.info.run_name for r in runs] == [name], (name, [r.info.run_name for r in runs])


def test_a_resume_replaces_the_tensorboard_steps_it_logs_again(tiny_model_dir, tmp_path):
    """A run that crashed after logging steps 3 and 4 and resumed from step 2 logged 3 and 4 again: two
    values per step in TensorBoard, one in metrics.jsonl (which the resume cuts back)."""
    data = write_sft_data(tmp_path / "sft.jsonl", n=24)
    out = tmp_path / "run"
    args = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--max-length", "48",
            "--max-steps", "4", "--batch-size", "4", "--logging-steps", "1", "--save-steps", "2", "--eval-steps", "0",
            "--no-progress", "--report-to", "tensorboard"]
    assert main(args) == 0
    assert main([*args, "--resume", str(out / "checkpoints" / "step-2"), "--learning-rate", "5e-3"]) == 0
    rows = {r["step"]: r["loss"] for r in _rows(out) if "loss" in r}
    tb = _tensorboard_scalars(out)["loss"]
    assert [s for s, _ in tb] == [1, 2, 3, 4], tb
    assert all(v == pytest.approx(rows[s], rel=1e-6) for s, v in tb)


def test_rl_tensorboard_flag_without_the_package_is_the_install_hint(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = tmp_path / "never"
    assert main(["rl", "ppo", "--output-dir", str(out), "--tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--report-to tensorboard needs the tensorboard package" in err and err.count("\n") == 0, err
    assert not out.exists()


def test_mlflow_records_a_stopped_run_as_killed_and_a_failed_one_as_failed(tiny_model_dir, tmp_path, monkeypatch):
    """Every run was FINISHED in MLflow (and exit code 0 in W&B), also one stopped by a signal (resumable)
    or ended by an error, so a dashboard could not tell them from complete runs."""
    import os
    import signal

    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from dpolab.train.engine import Engine

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = write_sft_data(tmp_path / "sft.jsonl", n=24)
    original = Engine.optimizer_step

    def stopped(self, *args, **kwargs):
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    def failing(self, *args, **kwargs):
        if self.step == 1:
            raise RuntimeError("a failure inside the step")
        return original(self, *args, **kwargs)

    for name, patch in (("done", None), ("stopped", stopped), ("failed", failing)):
        if patch:
            monkeypatch.setattr(Engine, "optimizer_step", patch)
        argv = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / name),
                "--max-length", "48", "--max-steps", "3", "--batch-size", "4", "--no-progress", "--report-to", "mlflow"]
        if name == "failed":
            with pytest.raises(RuntimeError, match="a failure inside the step"):
                main(argv)
        else:
            assert main(argv) == 0
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name, status in (("done", "FINISHED"), ("stopped", "KILLED"), ("failed", "FAILED")):
        client = MlflowClient(tracking_uri=(tmp_path / name / "mlruns").as_uri())
        (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        assert run.info.status == status, name
