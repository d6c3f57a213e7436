"""Stop and resume through real processes (issue 8): a run stopped by SIGTERM/SIGINT mid-way
exits 0 with a resume hint and no traceback, and ``--resume latest`` in the same output directory
then ends with bitwise the same weights and the same metrics as an uninterrupted run.

The interrupted run is a real ``python -m dpolab`` subprocess; the uninterrupted reference and
the resumed continuation run in this process (one intra-op thread everywhere, so the arithmetic
is the same in both processes). The SFT and Gymnasium PPO variants are marked slow (each costs a
cold process start); run them with ``pytest -m slow tests/test_reliability_signals.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main
from test_train_dpo import write_rule_data
from test_train_sft import write_sft_data

TIMING = {"tokens_per_second", "charts/sps", "wall_seconds", "ref_precompute_seconds"}


def metric_rows(run: Path) -> list[dict]:
    """metrics.jsonl without wall-clock fields."""
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def interrupt(argv: list[str], run: Path, *, after_rows: int, sig: int = signal.SIGTERM,
              timeout: float = 240) -> tuple[int, str]:
    """Start ``python -m dpolab ARGV``, send ``sig`` once metrics.jsonl holds ``after_rows`` rows,
    and return (exit code, stderr + stdout). Fails if the run ended before it could be interrupted."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    err_path, out_path = run.parent / f"{run.name}.stderr", run.parent / f"{run.name}.stdout"
    with open(err_path, "w") as err, open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dpolab", *argv], stdout=out, stderr=err, env=env)
        try:
            deadline = time.time() + timeout
            sent = False
            while time.time() < deadline and proc.poll() is None:
                if run.joinpath("metrics.jsonl").exists() and \
                        len(run.joinpath("metrics.jsonl").read_text().splitlines()) >= after_rows:
                    proc.send_signal(sig)
                    sent = True
                    break
                time.sleep(0.01)
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = err_path.read_text() + out_path.read_text()
    assert sent, f"the run ended (rc {rc}) before it could be interrupted:\n{stderr[-2000:]}"
    return rc, stderr


def checkpoint_step(run: Path) -> int:
    return int((run / "checkpoints" / "latest").read_text().strip().split("-")[1])


def assert_clean_stop(rc: int, stderr: str, sig: int) -> None:
    assert rc == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert signal.Signals(sig).name in stderr and "--resume latest" in stderr, stderr[-3000:]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_dpo_sigterm_then_resume_latest_is_bitwise_exact(tiny_model_dir, tmp_path):
    sig = signal.SIGTERM
    data = write_rule_data(tmp_path / "prefs.jsonl")
    # logging every 2 steps: a stop on an odd step leaves a half-full metrics window, which the
    # checkpoint must carry for the logged averages to match.
    argv = ["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--max-length", "48",
            "--max-prompt-length", "24", "--no-progress", "--max-steps", "40", "--batch-size", "4",
            "--learning-rate", "1e-3", "--logging-steps", "2", "--save-steps", "0", "--eval-fraction", "0.1"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main([*argv, "--output-dir", str(ref)]) == 0

    rc, stderr = interrupt([*argv, "--output-dir", str(run)], run, after_rows=1, sig=sig)
    assert_clean_stop(rc, stderr, sig)
    stopped_at = checkpoint_step(run)
    assert 2 <= stopped_at < 40 and not (run / "final").exists() and not (run / "summary.json").exists()
    state = json.loads((run / "checkpoints" / f"step-{stopped_at}" / "trainer_state.json").read_text())
    assert state["step"] == stopped_at and len(state["window"]) == stopped_at % 2

    # Exactly the command the hint prints: the run's own config.yaml plus --resume latest.
    hint = f"dpolab dpo --config {run / 'config.yaml'} --resume latest"
    assert hint in stderr
    assert main(hint.split()[1:]) == 0
    assert_same_weights(load_file(str(ref / "final" / "model.safetensors")),
                        load_file(str(run / "final" / "model.safetensors")))
    assert metric_rows(run) == metric_rows(ref)
    summary = {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k not in TIMING}
    assert summary == {k: v for k, v in json.loads((ref / "summary.json").read_text()).items() if k not in TIMING}


@pytest.mark.slow  # the same loop contract as DPO's (train/engine.py); ~30 s here
def test_sft_sigint_then_resume_latest_is_bitwise_exact(tiny_model_dir, tmp_path):
    data = write_sft_data(tmp_path / "sft.jsonl")
    argv = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--max-length", "48", "--no-progress",
            "--max-steps", "40", "--batch-size", "4", "--learning-rate", "1e-3", "--logging-steps", "1",
            "--save-steps", "0", "--eval-fraction", "0"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main([*argv, "--output-dir", str(ref)]) == 0

    rc, stderr = interrupt([*argv, "--output-dir", str(run)], run, after_rows=2, sig=signal.SIGINT)
    assert_clean_stop(rc, stderr, signal.SIGINT)
    assert 2 <= checkpoint_step(run) < 40 and not (run / "final").exists()

    assert main([*argv, "--output-dir", str(run), "--resume", "latest"]) == 0
    assert_same_weights(load_file(str(ref / "final" / "model.safetensors")),
                        load_file(str(run / "final" / "model.safetensors")))
    assert metric_rows(run) == metric_rows(ref)


@pytest.mark.slow
def test_gym_ppo_sigterm_then_resume_latest_is_bitwise_exact(tmp_path):
    from dpolab.rl.nets import load_policy

    argv = ["rl", "ppo", "--env", "CartPole-v1", "--total-steps", "4096", "--n-envs", "2", "--n-steps", "32",
            "--batch-size", "32", "--n-epochs", "2", "--eval-every", "1024", "--eval-episodes", "2",
            "--save-steps", "0", "--seed", "3", "--no-progress"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main([*argv, "--output-dir", str(ref)]) == 0

    rc, stderr = interrupt([*argv, "--output-dir", str(run)], run, after_rows=2)
    assert_clean_stop(rc, stderr, signal.SIGTERM)
    assert 0 < checkpoint_step(run) < 4096 and not (run / "final").exists()

    assert main([*argv, "--output-dir", str(run), "--resume", "latest"]) == 0
    assert metric_rows(run) == metric_rows(ref)
    a, _ = load_policy(ref / "final")
    b, _ = load_policy(run / "final")
    assert_same_weights(a.state_dict(), b.state_dict())


def test_one_request_delivered_twice_is_one_stop_and_a_later_second_stops_at_once():
    """A launcher forwards the SIGTERM a scheduler also sent to its processes: each gets it twice,
    milliseconds apart, and must still finish its step and checkpoint; a second request later
    (a user's second Ctrl-C) stops at once."""
    from dpolab.runs.signals import StopSignal

    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's copy
        os.kill(os.getpid(), signal.SIGINT)   # a scheduler's or a terminal's, within the same moment
        assert stop.received == "SIGTERM"
        stop._at -= StopSignal.SAME_REQUEST_SECONDS  # as if the first came that long ago
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs between bytecodes, at the latest here
                time.sleep(0.01)


def test_a_signal_arriving_as_the_process_ends_keeps_its_exit_status():
    """A SIGTERM just after a finished run (its outputs complete) ended the process with 143, so a
    scheduler saw a failed job: once the command has returned, the executable ignores SIGINT/SIGTERM."""
    script = ("import os, signal, time\n"
              "from dpolab import cli\n"
              "cli.main = lambda: 0\n"
              "code = cli.entry()\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "time.sleep(0.2)\n"
              "raise SystemExit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


def test_the_stop_message_of_a_multi_process_run_resumes_with_as_many(tmp_path):
    """It printed the one-process command, which a checkpoint of 2 processes refuses."""
    from dpolab.runs.rundir import RunDir
    from dpolab.runs.signals import resume_hint

    run = RunDir(tmp_path / "run")
    one = resume_hint("grpo", run, "SIGTERM", 9, 40)
    assert one.endswith(f"Resume with:\n  dpolab grpo --config {run.path / 'config.yaml'} --resume latest")
    two = resume_hint("grpo", run, "SIGTERM", 9, 40, processes=2)
    assert "Resume with 2 processes" in two
    assert two.endswith(f"torchrun --nproc_per_node 2 -m dpolab grpo --config {run.path / 'config.yaml'} --resume latest")
