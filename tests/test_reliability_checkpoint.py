"""Crash safety of checkpoints (issue 8): a process SIGKILLed while writing a checkpoint leaves the
previous one loadable and ``latest`` naming it; leftovers of a crash are ignored and cleaned up;
a damaged or foreign checkpoint is a clear error on resume, never a traceback or a half-loaded model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpolab.errors import DpolabError
from dpolab.runs.rundir import RunDir

# A child process: checkpoint step-1 completely, then start step-2 whose writer writes a large
# safetensors file and then keeps appending to a second file, announcing itself so the parent
# can SIGKILL it in the middle of the write.
CHILD = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from safetensors.torch import save_file
    from dpolab.runs.rundir import RunDir

    run = RunDir(sys.argv[1], keep_last=3)
    run.save_checkpoint(1, lambda d: save_file({"w": torch.full((64, 64), 1.0)}, str(d / "model.safetensors")))

    def slow_writer(d: Path) -> None:
        save_file({"w": torch.full((512, 512), 2.0)}, str(d / "model.safetensors"))
        with open(d / "big.bin", "wb") as fh:
            for i in range(100000):
                fh.write(b"x" * 65536)
                fh.flush()
                if i == 2:
                    print("WRITING", flush=True)
                time.sleep(0.01)

    run.save_checkpoint(2, slow_writer)
    print("FINISHED", flush=True)
""")


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    run_path = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(run_path)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the child is inside the step-2 writer
        assert line.strip() == "WRITING", line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    run = RunDir(run_path, keep_last=3)
    leftovers = [p.name for p in run.checkpoints.iterdir() if p.name.startswith(".tmp-step-2")]
    assert leftovers, "the kill should have happened mid-write"
    assert [p.name for p in run.list_checkpoints()] == ["step-1"]
    assert (run.checkpoints / "latest").read_text().strip() == "step-1"
    ckpt = run.resolve_checkpoint("latest")
    assert ckpt.name == "step-1"
    assert torch.equal(load_file(str(ckpt / "model.safetensors"))["w"], torch.full((64, 64), 1.0))

    # The next save (a resumed run) removes the leftover and works normally.
    run.save_checkpoint(2, lambda d: save_file({"w": torch.zeros(2)}, str(d / "model.safetensors")))
    assert not any(p.name.startswith(".tmp") for p in run.checkpoints.iterdir())
    assert run.resolve_checkpoint("latest").name == "step-2"
    assert [p.name for p in run.list_checkpoints()] == ["step-1", "step-2"]


def _write(value: float):
    return lambda d: save_file({"w": torch.full((3,), value)}, str(d / "model.safetensors"))


def test_latest_falls_back_to_newest_complete_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run", keep_last=0)
    for step in (2, 10, 5):
        run.save_checkpoint(step, _write(step))
    assert [p.name for p in run.list_checkpoints()] == ["step-2", "step-5", "step-10"]  # numeric order
    assert run.resolve_checkpoint("latest").name == "step-5"  # the pointer, not the highest number
    # A crash between "move the old step-5 aside" and "rename the new one in" leaves a dangling
    # pointer: resolve to the highest complete checkpoint instead of failing.
    os.rename(run.checkpoints / "step-5", run.checkpoints / ".tmp-step-old-5-1")
    assert run.resolve_checkpoint("latest").name == "step-10"
    (run.checkpoints / "latest").unlink()
    assert run.resolve_checkpoint("latest").name == "step-10"
    empty = RunDir(tmp_path / "empty")
    with pytest.raises(DpolabError, match="no checkpoint"):
        empty.resolve_checkpoint("latest")
    with pytest.raises(DpolabError, match="not found"):
        empty.resolve_checkpoint(str(tmp_path / "nowhere"))


def test_resaving_a_step_replaces_it_and_rotation_keeps_the_new_one(tmp_path):
    run = RunDir(tmp_path / "run", keep_last=1)
    run.save_checkpoint(6, _write(6.0))
    # A run resumed from an earlier checkpoint saves step 4 while step 6 (abandoned) still exists:
    # the new checkpoint must survive rotation and be `latest`.
    run.save_checkpoint(4, _write(4.0))
    assert run.resolve_checkpoint("latest").name == "step-4"
    assert [p.name for p in run.list_checkpoints()] == ["step-4"]
    run.save_checkpoint(4, _write(44.0))
    ckpt = run.resolve_checkpoint("latest")
    assert load_file(str(ckpt / "model.safetensors"))["w"][0].item() == 44.0
    assert not any(p.name.startswith(".tmp") for p in run.checkpoints.iterdir())


def test_failed_writer_leaves_no_temporary_folder(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_checkpoint(1, _write(1.0))

    def boom(d: Path) -> None:
        (d / "partial").write_text("x")
        raise OSError("disk full")

    from dpolab.errors import DpolabError

    with pytest.raises(DpolabError, match="cannot write checkpoint .*step-2: disk full"):  # one line, not a traceback
        run.save_checkpoint(2, boom)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["latest", "step-1"]


def test_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (1, 2, 3):
        run.log(step, {"loss": 1.0 / step})
    with open(run.metrics_path, "a") as fh:
        fh.write('{"step": 4, "loss": 0.2')  # the process died mid-line
    run.truncate_metrics(3)
    rows = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    run.log(4, {"loss": 0.25})
    assert json.loads(run.metrics_path.read_text().splitlines()[-1]) == {"step": 4, "loss": 0.25}


# -- resuming from damaged or foreign checkpoints (through the DPO CLI) -------------------------
def _dpo(model_dir, data, out, *extra) -> list[str]:
    return ["dpo", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--max-length", "48",
            "--max-prompt-length", "24", "--no-progress", "--eval-fraction", "0", "--batch-size", "4",
            *map(str, extra)]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    from dpolab.cli import main
    from test_train_dpo import write_rule_data

    root = tmp_path_factory.mktemp("dpo-ckpt")
    data = write_rule_data(root / "prefs.jsonl", n=16)
    out = root / "run"
    assert main(_dpo(tiny_model_dir, data, out, "--max-steps", "2", "--learning-rate", "1e-3")) == 0
    return data, out


def _copy_ckpt(run: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(RunDir(run).resolve_checkpoint("latest"), dest))


@pytest.mark.parametrize("damage", ["truncated_weights", "foreign_weights", "no_state", "bad_json",
                                    "state_not_an_object", "window_not_a_list", "pickle_payload"])
def test_damaged_checkpoint_is_a_clear_error(tiny_model_dir, finished_run, tmp_path, capsys, monkeypatch, damage):
    from dpolab.cli import main

    monkeypatch.setenv("PYTEST_TMP_PWNED", str(tmp_path / "PWNED"))
    data, out = finished_run
    ckpt = _copy_ckpt(out, tmp_path / "ckpt")
    if damage == "truncated_weights":
        blob = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    elif damage == "foreign_weights":
        save_file({"other.weight": torch.zeros(3)}, str(ckpt / "model.safetensors"))
    elif damage == "no_state":
        (ckpt / "training_state.pt").unlink()
    elif damage == "bad_json":
        (ckpt / "trainer_state.json").write_text('{"step": "three"')
    elif damage == "state_not_an_object":
        (ckpt / "trainer_state.json").write_text("[1, 2]")
    elif damage == "window_not_a_list":
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "window": 5}))
    elif damage == "pickle_payload":
        # An object that would run code when unpickled: weights_only loading must refuse it.
        torch.save({"optimizer": _Evil(), "scheduler": {}, "rng": {}}, ckpt / "training_state.pt")
    rc = main(_dpo(tiny_model_dir, data, tmp_path / "resumed", "--max-steps", "3", "--resume", ckpt))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and str(ckpt) in err, err
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "resumed" / "final").exists()
    if damage in ("no_state", "bad_json", "state_not_an_object", "window_not_a_list"):
        # found before the model loads and the reference log-probs are computed: nothing written
        assert not (tmp_path / "resumed").exists()
        assert "trainer_state.json" in err or "training_state.pt" in err, err


def test_another_trainers_checkpoint_is_refused_before_any_work(tiny_model_dir, finished_run, tmp_path, capsys):
    from dpolab.cli import main

    data, out = finished_run
    ckpt = _copy_ckpt(out, tmp_path / "ckpt")
    rc = main(["kto", *_dpo(tiny_model_dir, data, tmp_path / "kto", "--max-steps", "3", "--resume", ckpt)[1:]])
    err = capsys.readouterr().err
    assert rc == 2 and "it is a checkpoint of `dpolab dpo`, not of `dpolab kto`" in err, err
    assert not (tmp_path / "kto").exists()


def test_a_folder_holding_a_run_is_refused_without_resume(tiny_model_dir, finished_run, tmp_path, capsys):
    """A second run into a finished run's folder would append to its metrics.jsonl and leave its
    checkpoints beside the new ones; it is refused, and the folder is left as it was."""
    import shutil

    from dpolab.cli import main

    data, out = finished_run
    run = Path(shutil.copytree(out, tmp_path / "run"))
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for extra in ((), ("--dry-run",)):
        assert main(_dpo(tiny_model_dir, data, run, "--max-steps", "1", *extra)) == 2
        err = capsys.readouterr().err
        assert "already holds a run (metrics.jsonl, summary.json, checkpoints, final)" in err and \
            "--resume latest" in err, err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_checkpoint_of_another_run_does_not_resume_into_a_folder_holding_a_run(tiny_model_dir, finished_run,
                                                                                    tmp_path, capsys):
    """(e.g. a copied run folder whose config.yaml still names the original --output-dir) the resumed
    run would cut that folder's metrics back and overwrite its final/: refused, the folder unchanged."""
    import shutil

    from dpolab.cli import main

    data, out = finished_run
    mine, other = (Path(shutil.copytree(out, tmp_path / name)) for name in ("mine", "other"))
    before = {p.relative_to(mine): p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    ckpt = RunDir(other).resolve_checkpoint("latest")
    assert main(_dpo(tiny_model_dir, data, mine, "--max-steps", "3", "--resume", str(ckpt))) == 2
    err = capsys.readouterr().err
    assert f"--resume {ckpt} is not a checkpoint of --output-dir {mine}, which holds a run of its own" in err, err
    assert f"--output-dir {other}" in err
    assert {p.relative_to(mine): p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before
    # its own checkpoint given as a path, and a branch into a new folder, still resume
    assert main(_dpo(tiny_model_dir, data, mine, "--max-steps", "3", "--resume",
                     str(RunDir(mine).resolve_checkpoint("latest")))) == 0
    assert main(_dpo(tiny_model_dir, data, tmp_path / "branch", "--max-steps", "3", "--resume", str(ckpt))) == 0


def test_an_output_dir_that_is_a_file_is_refused(tiny_model_dir, finished_run, tmp_path, capsys):
    from dpolab.cli import main

    data, _ = finished_run
    path = tmp_path / "afile"
    path.write_text("hi\n")
    for extra in ((), ("--dry-run",)):
        assert main(_dpo(tiny_model_dir, data, path, "--max-steps", "1", *extra)) == 2
        assert f"--output-dir {path} is a file, not a folder" in capsys.readouterr().err
    assert path.read_text() == "hi\n"


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ.get("PYTEST_TMP_PWNED", "/tmp/dpolab-PWNED-never")),))


def test_resume_with_changed_options_warns(tiny_model_dir, finished_run, tmp_path, capsys):
    from dpolab.cli import main

    data, out = finished_run
    ckpt = _copy_ckpt(out, tmp_path / "ckpt")
    assert main(_dpo(tiny_model_dir, data, tmp_path / "r", "--max-steps", "3", "--learning-rate", "2e-3",
                     "--resume", ckpt)) == 0
    err = capsys.readouterr().err
    assert "learning_rate: 0.001 -> 0.002" in err and "max_steps: 2 -> 3" in err, err


def test_sigkill_leftover_then_resume_through_cli(tiny_model_dir, finished_run, tmp_path):
    """A crashed save's temporary folder next to a good checkpoint does not confuse --resume latest."""
    import shutil

    from dpolab.cli import main

    data, out = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    tmp = run / "checkpoints" / ".tmp-step-3-999999"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00" * 10)  # garbage, half-written
    t0 = time.time()
    assert main(_dpo(tiny_model_dir, data, run, "--max-steps", "3", "--learning-rate", "1e-3",
                     "--resume", "latest")) == 0
    assert time.time() - t0 < 120
    assert not tmp.exists() and RunDir(run).resolve_checkpoint("latest").name == "step-3"
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_resume_after_the_end_of_run_evaluation_logs_it_once(tiny_model_dir, finished_run, tmp_path):
    """The final checkpoint is written before the end-of-run evaluation (a failing evaluation leaves
    the run resumable), so that evaluation's row has the checkpoint's step but follows it: a resume
    from that checkpoint (a crash after the row, before summary.json) drops the row and logs it once,
    as the uninterrupted run did; the checkpoint records how many rows preceded it."""
    import shutil

    from dpolab.cli import main

    data, _ = finished_run
    out = tmp_path / "run"
    argv = _dpo(tiny_model_dir, data, out, "--max-steps", "2", "--learning-rate", "1e-3", "--eval-fraction", "0.25",
                "--logging-steps", "1")
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval/loss" in r) for r in rows] == [(1, False), (2, False), (2, True)]
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    assert main([*argv, "--resume", "latest"]) == 0
    again = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval/loss" in r) for r in again] == [(1, False), (2, False), (2, True)]
    assert again[:2] == rows[:2] and again[2]["eval/loss"] == pytest.approx(rows[2]["eval/loss"], abs=1e-6)
    # the saved configuration repeats the run, it does not resume it (in a new folder: "no checkpoint")
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["resume"] is None
    assert "resume: latest" not in (out / "final" / "README.md").read_text()


def test_a_resumed_finished_run_is_unfinished_until_it_finishes_again(tiny_model_dir, finished_run, tmp_path,
                                                                       monkeypatch, capsys):
    """summary.json says a run finished (written last); a resume that extends a finished run removes
    it, so a continuation that fails or stops is not taken for finished with the earlier summary."""
    import shutil

    from dpolab.cli import main
    from dpolab.errors import DpolabError
    from dpolab.train.engine import Engine

    data, out = finished_run
    run = Path(shutil.copytree(out, tmp_path / "run"))
    assert json.loads((run / "summary.json").read_text())["steps"] == 2

    def failing(self, algo):
        raise DpolabError("the evaluation failed")

    monkeypatch.setattr(Engine, "evaluate", failing)
    assert main(_dpo(tiny_model_dir, data, run, "--max-steps", "3", "--learning-rate", "1e-3",
                     "--resume", "latest")) == 2
    assert "the evaluation failed" in capsys.readouterr().err
    assert not (run / "summary.json").exists() and RunDir(run).resolve_checkpoint("latest").name == "step-3"
    monkeypatch.undo()
    assert main(_dpo(tiny_model_dir, data, run, "--max-steps", "3", "--learning-rate", "1e-3",
                     "--resume", "latest")) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_a_checkpoint_resumes_only_with_the_number_of_processes_that_wrote_it(tiny_model_dir, finished_run, tmp_path,
                                                                             capsys):
    """Its data position (micro-batches of batch_size × W rows) and its global batch hold for W
    processes: on another count the run would skip or repeat rows and change its batch, silently."""
    import shutil

    from dpolab.cli import main

    data, out = finished_run
    run = Path(shutil.copytree(out, tmp_path / "run"))
    state_file = RunDir(run).resolve_checkpoint("latest") / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["processes"] == 1
    state_file.write_text(json.dumps({**state, "processes": 2}))
    assert main(_dpo(tiny_model_dir, data, run, "--max-steps", "3", "--learning-rate", "1e-3", "--resume", "latest")) == 2
    err = capsys.readouterr().err
    assert "was written by a run of 2 processes, and this one has 1: resume it with 2" in err, err
    assert json.loads((run / "summary.json").read_text())["steps"] == 2  # refused before anything changed


def test_a_run_that_left_no_checkpoint_is_not_sent_to_resume(tiny_model_dir, finished_run, tmp_path, capsys):
    """A run stopped before its first checkpoint (killed, or a failure on another process) leaves
    metrics but nothing to resume: the refusal says so instead of advising --resume latest, which
    fails in its turn."""
    from dpolab.cli import main

    data, _ = finished_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    assert main(_dpo(tiny_model_dir, data, run, "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "already holds a run (metrics.jsonl) that left no checkpoint to resume; remove the folder" in err, err
    assert main(_dpo(tiny_model_dir, data, run, "--max-steps", "1", "--resume", "latest")) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "start it again in a new or emptied --output-dir" in err, err


def test_atomic_write_leaves_no_file_when_the_text_cannot_be_encoded(tmp_path):
    from dpolab.runs.rundir import atomic_write_text

    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(tmp_path / "out.jsonl", "a\ud800")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("moment", ["evaluate", "save_checkpoint", "optimizer_step"])
def test_a_signal_during_the_end_of_run_work_is_a_clean_stop_and_resumes_to_the_same_summary(
        tiny_model_dir, finished_run, tmp_path, capsys, monkeypatch, moment):
    """SIGTERM while the final checkpoint is written or the end-of-run evaluation runs: the run stops
    as between steps (the resume hint, exit 0, no summary.json), and the resume finishes it with the
    summary an uninterrupted run writes (its training metrics come from the checkpoint)."""
    from dpolab.cli import main
    from dpolab.train.engine import Engine

    data, _ = finished_run
    argv = lambda out: _dpo(tiny_model_dir, data, out, "--max-steps", "2", "--eval-fraction", "0.25",  # noqa: E731
                            "--logging-steps", "1", "--save-steps", "0")
    assert main(argv(tmp_path / "ref")) == 0
    original = getattr(Engine, moment)
    calls = []

    def signalled(self, *args, **kwargs):
        if self.step == (1 if moment == "optimizer_step" else 2) and not calls:  # optimizer_step: the last step
            calls.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, moment, signalled)
    out = tmp_path / "run"
    assert main(argv(out)) == 0
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 2/2; checkpoint saved. Resume with" in err, err
    assert not (out / "summary.json").exists() and not (out / "final").exists()
    monkeypatch.setattr(Engine, moment, original)
    assert main([*argv(out), "--resume", "latest"]) == 0
    ref, got = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "ref", out))
    ref.pop("wall_seconds"), got.pop("wall_seconds")
    assert got.keys() == ref.keys() and "loss" in got
    for k in ref:  # but the clock's
        assert got[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-9) or "second" in k, k
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [(r["step"], "eval/loss" in r) for r in rows(out)] == [(r["step"], "eval/loss" in r) for r in rows(tmp_path / "ref")]


def test_an_interrupted_final_save_leaves_no_temporary_folder_and_keeps_the_old_one(tmp_path):
    from dpolab.runs.checkpoint import save_pretrained_atomic

    class Model:
        def __init__(self, fail=False):
            self.fail = fail

        def save_pretrained(self, path, **kw):
            Path(path).mkdir(parents=True)
            (Path(path) / "model.safetensors").write_text("new")
            if self.fail:
                raise KeyboardInterrupt

    final = tmp_path / "final"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    (tmp_path / ".final.tmp-1").mkdir()  # left by a killed earlier save
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_atomic(Model(fail=True), None, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"] and (final / "model.safetensors").read_text() == "old"
    save_pretrained_atomic(Model(), None, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"] and (final / "model.safetensors").read_text() == "new"


def test_resume_drops_a_samples_line_cut_short_by_a_kill(tmp_path):
    """As metrics.jsonl's: the resume used to fail on it with a JSON traceback, every time."""
    from dpolab.train.on_policy import truncate_samples

    run = RunDir(tmp_path)
    (tmp_path / "samples.jsonl").write_text('{"step": 1, "prompt": "a"}\n{"step": 2, "prompt": "b"}\n'
                                            '{"step": 3, "prompt": "c"}\n{"step": 4, "prompt": "the mo')
    truncate_samples(run, 2)
    assert (tmp_path / "samples.jsonl").read_text() == '{"step": 1, "prompt": "a"}\n{"step": 2, "prompt": "b"}\n'


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64"),
                                     Exception("Error while serializing: I/O error: No space left on device "
                                               "(os error 28)")])  # safetensors' SafetensorError
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, failure):
    from dpolab.errors import DpolabError

    run = RunDir(tmp_path / "run").create()
    run.save_checkpoint(1, lambda d: (d / "model.safetensors").write_text("one"))

    def full(d: Path) -> None:
        (d / "model.safetensors").write_text("half")
        raise failure

    with pytest.raises(DpolabError, match=r"cannot write checkpoint .*step-2: .*MiB free on its disk\); the previous "
                                          r"checkpoint is intact") as info:
        run.save_checkpoint(2, full)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["latest", "step-1"]
    assert run.resolve_checkpoint("latest").name == "step-1"


def test_a_first_checkpoint_that_does_not_fit_claims_no_previous_one(tmp_path, monkeypatch):
    """The message said "the previous checkpoint is intact" where there was none, and rounded the free
    space of a nearly full disk to "0 MiB"."""
    import collections
    import shutil

    from dpolab.errors import DpolabError

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 3 * 2**10, 3 * 2**10))
    run = RunDir(tmp_path / "run").create()

    def full(d: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(DpolabError, match=r"step-1: .*\(3 KiB free on its disk\); nothing of it is left \(the run "
                                          r"had no earlier checkpoint\)$"):
        run.save_checkpoint(1, full)
    assert not run.list_checkpoints()


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that claims ``folder`` (RunDir.lock) and sleeps; returned once it holds it."""
    from dpolab.runs.rundir import LOCK_FILE

    code = (f"import time; from dpolab.runs.rundir import RunDir; RunDir({str(folder)!r}).create().lock(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held" and (folder / LOCK_FILE).exists()
    return proc


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    """Two runs started at once into one --output-dir mixed their metrics, and one removed the
    other's checkpoint in progress: the folder is claimed by its run until the run ends (an flock:
    a process that dies, however it dies, leaves a claim the next run takes)."""
    from dpolab.errors import DpolabError
    from dpolab.runs.rundir import LOCK_FILE

    run = RunDir(tmp_path / "run").create()
    other = _holder(run.path)
    try:
        with pytest.raises(DpolabError, match=rf"--output-dir {run.path} is in use by another run \(process "
                                              rf"{other.pid} on"):
            run.lock()
    finally:
        other.kill()  # SIGKILL: no cleanup ran, the file stays
        other.wait()
    assert (run.path / LOCK_FILE).exists()
    run.lock()  # its process has ended: the claim is taken over
    assert (run.path / LOCK_FILE).read_text().split()[1] == str(os.getpid())
    run.lock()  # this process again (a second run from one Python process)
    run.unlock()
    assert not (run.path / LOCK_FILE).exists()
    (run.path / LOCK_FILE).write_text("")  # empty, as a crash right after creating it leaves it
    run.lock()
    run.unlock()


def test_a_resume_into_a_folder_in_use_is_refused_before_it_touches_the_run(tiny_model_dir, finished_run, tmp_path,
                                                                           capsys):
    import shutil

    from dpolab.cli import main

    data, out = finished_run
    run = Path(shutil.copytree(out, tmp_path / "run"))
    other = _holder(run)
    try:
        # (the reference cache may gain the rows the refused run computed before it was refused)
        files = lambda: {p.relative_to(run): p.read_bytes() for p in run.rglob("*")  # noqa: E731
                         if p.is_file() and p.parent.name != "cache"}
        before = files()
        assert main(_dpo(tiny_model_dir, data, run, "--max-steps", "3", "--resume", "latest")) == 2
        assert "is in use by another run" in capsys.readouterr().err
        assert files() == before  # metrics not cut back, summary.json kept
    finally:
        other.kill()
        other.wait()


def test_the_folder_of_a_live_run_without_a_checkpoint_is_said_to_be_in_use(tmp_path):
    """A second run into the folder of a live run that had not checkpointed yet was told the folder's
    run left no checkpoint and to remove the folder (or, resuming, that it stopped)."""
    from dpolab.errors import DpolabError

    run = RunDir(tmp_path / "run").create()
    (run.path / "metrics.jsonl").write_text('{"step": 1}\n')
    other = _holder(run.path)
    try:
        for resume in (None, "latest"):
            with pytest.raises(DpolabError, match=rf"--output-dir {run.path} is in use by another run \(process "
                                                  rf"{other.pid} on"):
                run.check_new_run(resume)
    finally:
        other.kill()
        other.wait()
    with pytest.raises(DpolabError, match="left no checkpoint to resume"):  # its process ended: as before
        run.check_new_run(None)


def test_a_file_system_without_flock_runs_unclaimed_with_a_note(tmp_path, monkeypatch, capsys):
    """ENOSYS/ENOLCK (Lustre without -o flock, some FUSE/NFS set-ups) is no other run: a note, not a
    refusal of every run."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = RunDir(tmp_path / "run").create()
    run.lock()
    assert "cannot lock" in capsys.readouterr().err
    run.unlock()


def test_a_symlinked_checkpoint_folder_of_this_run_resumes(tmp_path):
    """A checkpoint moved to other storage and linked back is still this run's."""
    run = RunDir(tmp_path / "run").create()
    run.save_checkpoint(1, lambda d: (d / "model.safetensors").write_text("one"))
    (run.path / "metrics.jsonl").write_text('{"step": 1}\n')
    elsewhere = tmp_path / "scratch" / "step-1"
    elsewhere.parent.mkdir()
    (run.checkpoints / "step-1").rename(elsewhere)
    (run.checkpoints / "step-1").symlink_to(elsewhere, target_is_directory=True)
    assert run.resolve_checkpoint("latest").name == "step-1"
    assert run.resolve_checkpoint(str(run.checkpoints / "step-1")).name == "step-1"


def test_a_users_config_yaml_in_the_output_dir_is_not_replaced(tiny_model_dir, finished_run, tmp_path, capsys):
    """``--config config.yaml --output-dir .``: the run wrote its own config.yaml over the user's file
    (and removed it when a tracker could not start); refused before any work, the file unchanged. A
    config.yaml a run wrote (a start-up stopped before its first step) is written again."""
    from dpolab.cli import main

    data, _ = finished_run
    run = tmp_path / "run"
    run.mkdir()
    mine = f"model: {tiny_model_dir}\ndata: {data}\nmax_steps: 1\n"
    (run / "config.yaml").write_text(mine)
    assert main(["dpo", "--config", str(run / "config.yaml"), "--output-dir", str(run)]) == 2
    assert "holds a config.yaml that this run would replace" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == mine
    from dpolab.runs.rundir import CONFIG_HEADER

    (run / "config.yaml").write_text(CONFIG_HEADER + mine)
    assert main(["dpo", "--config", str(run / "config.yaml"), "--output-dir", str(run), "--batch-size", "4"]) == 0
    assert (run / "config.yaml").read_text().startswith("# dpolab: ")
    assert (run / "final").is_dir()


def test_files_written_beside_a_final_model_arrive_with_it(tiny_model, tiny_tokenizer, tmp_path):
    """LM PPO wrote its value head into final/ after the rename: a stop in between left a final/
    without its critic. Now written into the temporary folder; a failure there leaves no final/."""
    from dpolab.runs.checkpoint import save_pretrained_atomic

    def head(folder):
        (folder / "value_head.safetensors").write_bytes(b"x")

    save_pretrained_atomic(tiny_model, tiny_tokenizer, tmp_path / "final", also=head)
    assert (tmp_path / "final" / "value_head.safetensors").is_file()

    def fails(folder):
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        save_pretrained_atomic(tiny_model, tiny_tokenizer, tmp_path / "other", also=fails)
    assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".other.tmp-*"))
