"""Multi-process training through ``accelerate launch`` on 2 CPU processes (gloo).

Exactness: with DDP each process backpropagates W * (its loss sum) / (the step's GLOBAL count),
so 2 processes x 8 pairs must give the weights of 1 process x 16 pairs. The data sizes make the
second micro-batch hold ONE row (uneven: process 1 gets none and runs a stand-in row with weight 0)
and the third start a new epoch, so uneven and empty shards are exercised. SGD without clipping
makes any loss-scale error show in the weights (a factor 2 error moves them by ~lr * |grad|).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main
from dpolab.errors import DpolabError

sys.path.insert(0, str(Path(__file__).parent))
from test_train_dpo import write_rule_data  # noqa: E402
from test_train_sft import write_sft_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
SGD = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-grad-norm", "0", "--max-steps", "3",
       "--logging-steps", "1", "--lr-scheduler", "constant", "--no-progress")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, argv: list[str], *, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file examples/accelerate/CONFIG -m dpolab ARGV`` on ``nproc``
    CPU processes; the whole process group is killed on timeout (no stray workers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT / "src")}
    cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "examples" / "accelerate" / config),
           "--num_processes", str(nproc), "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           "-m", "dpolab", *map(str, argv)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"accelerate launch timed out after {timeout}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(one: Path, two: Path, metric_keys: tuple[str, ...]) -> None:
    wa, wb, init = _weights(one), _weights(two), load_file(str(one.parent / "init.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    moved = max(float((wa[k] - init[k]).abs().max()) for k in wa if k in init)
    assert moved > 1e-2, "the weights hardly moved: the comparison would not detect a scale error"
    # metrics are reduced across processes: the logged step means equal the single-process ones
    ma, mb = _metrics(one), _metrics(two)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        for key in metric_keys:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-5), (key, ra["step"])
    # written once, by the main process: one checkpoint, no temporary folders left behind
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["latest", "step-3"]


def _save_init(model_dir: Path, where: Path) -> None:
    (where / "init.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())


def test_dpo_two_processes_equal_one_process_with_shared_reference(tiny_model_dir, tmp_path):
    """17 pairs, 2 x 8 per process vs 16 in one process; the reference pass is precomputed once
    (each process scores its block, the tables are summed) and must equal the single-process one.
    The two processes also split their slices into passes of <= 40 tokens (a different number per
    process: stand-in passes keep them aligned) and still match the unsplit single process."""
    data = write_rule_data(tmp_path / "prefs.jsonl", n=17, seed=1)
    eval_data = write_rule_data(tmp_path / "eval.jsonl", n=5, seed=2)  # odd: blocks of 3 and 2
    _save_init(tiny_model_dir, tmp_path)
    common = ["dpo", "--model", tiny_model_dir, "--data", data, "--eval-data", eval_data, "--max-length", 48,
              "--max-prompt-length", 24, "--precompute-ref", *SGD]
    assert main([*map(str, common), "--output-dir", str(tmp_path / "one"), "--batch-size", "16"]) == 0
    res = launch("ddp_cpu.yaml", [*common, "--output-dir", tmp_path / "two", "--batch-size", 8,
                                  "--micro-batch-tokens", 40])
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("done:") == 1  # the final message comes from the main process only
    _assert_same_run(tmp_path / "one", tmp_path / "two",
                     ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "eval/loss"))
    sa = json.loads((tmp_path / "one" / "summary.json").read_text())
    sb = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert sb["eval/loss"] == pytest.approx(sa["eval/loss"], abs=1e-5)
    assert sb["eval/rewards/margins"] == pytest.approx(sa["eval/rewards/margins"], abs=1e-5)
    (ca,), (cb,) = [list((tmp_path / r / "cache").glob("ref-logps-*.safetensors")) for r in ("one", "two")]
    ta, tb = load_file(str(ca)), load_file(str(cb))
    assert tb["train"].shape == (17, 2) and tb["eval"].shape == (5, 2)
    assert (tb["train"] != 0).all() and (tb["eval"] != 0).all()  # every row filled by some process
    for split in ("train", "eval"):
        torch.testing.assert_close(tb[split], ta[split], atol=1e-5, rtol=0)


def test_a_dry_run_on_two_processes_prints_one_report(tiny_model_dir, tmp_path):
    """--dry-run's report is one JSON document on stdout (each process printed its own before)."""
    data = write_rule_data(tmp_path / "prefs.jsonl", n=6, seed=1)
    res = launch("ddp_cpu.yaml", ["dpo", "--model", tiny_model_dir, "--data", data, "--max-length", 48,
                                  "--max-prompt-length", 24, "--output-dir", tmp_path / "run", "--dry-run"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["data"]["rows"] == 6 and not (tmp_path / "run").exists()


def test_sft_two_processes_equal_one_process(tiny_model_dir, tmp_path):
    """SFT divides by the step's target TOKENS over all processes (an all-reduce per step):
    completions of different lengths make a per-process normaliser visibly wrong."""
    data = write_sft_data(tmp_path / "sft.jsonl", n=17, seed=3)
    eval_data = write_sft_data(tmp_path / "eval.jsonl", n=5, seed=4)
    _save_init(tiny_model_dir, tmp_path)
    common = ["sft", "--model", tiny_model_dir, "--data", data, "--eval-data", eval_data, "--max-length", 48, *SGD]
    assert main([*map(str, common), "--output-dir", str(tmp_path / "one"), "--batch-size", "16"]) == 0
    res = launch("ddp_cpu.yaml", [*common, "--output-dir", tmp_path / "two", "--batch-size", 8])
    assert res.returncode == 0, res.stderr[-4000:]
    _assert_same_run(tmp_path / "one", tmp_path / "two", ("loss", "eval/loss"))
    sa = json.loads((tmp_path / "one" / "summary.json").read_text())
    sb = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert sb["eval/loss"] == pytest.approx(sa["eval/loss"], abs=1e-5)
    assert sb["eval/tokens"] == sa["eval/tokens"]  # each eval token counted once


def test_fsdp_on_cpu_processes(tiny_model_dir, tmp_path):
    """FSDP through accelerate on 2 CPU processes: runs and saves a model that loads in one
    process where accelerate supports it; otherwise a clear one-line error (never a silent DDP
    run) and the test is skipped with that reason (docs/scaling.md)."""
    from dpolab.train.distributed import FSDP_ON_CPU

    data = write_rule_data(tmp_path / "prefs.jsonl", n=8)
    out = tmp_path / "fsdp"
    res = launch("fsdp.yaml", ["dpo", "--model", tiny_model_dir, "--data", data, "--output-dir", out,
                               "--max-length", 48, "--max-prompt-length", 24, "--eval-fraction", 0,
                               "--batch-size", 4, "--max-steps", 1, "--no-progress"])
    if res.returncode != 0:
        assert FSDP_ON_CPU in res.stderr, res.stderr[-4000:]
        assert "dpolab/train" not in res.stderr, res.stderr[-4000:]  # a one-line error, not our traceback
        assert not out.exists()
        pytest.skip(f"accelerate {__import__('accelerate').__version__} + torch {torch.__version__}: {FSDP_ON_CPU}")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_fsdp_on_one_cpu_process_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`accelerate launch --num_processes 1` with FSDP (bench/gpu.sh's form) on a machine without a
    GPU: the same one-line error as with several processes, before anything is written."""
    from dpolab.train.distributed import FSDP_ON_CPU, _has_accelerator_device

    if _has_accelerator_device():
        pytest.skip("this machine has an accelerator device: FSDP is set up there")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    data = write_rule_data(tmp_path / "prefs.jsonl", n=8)
    out = tmp_path / "fsdp1"
    code = main(["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and FSDP_ON_CPU in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_torchrun_without_gpu_forms_a_cpu_group(tmp_path):
    """``torchrun`` on a machine without GPU: accelerate alone would make each process a
    single-process run (they would overwrite one run directory); make_accelerator forms the gloo
    group, and the reduction helpers sum over it."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import json\n"
        "from dpolab.train import distributed\n"
        "acc = distributed.make_accelerator()\n"
        "r = acc.process_index\n"
        # process 0: rows (1.0 w=1), (3.0 w=1); process 1: a stand-in row (w=0) -> mean 2.0 over 2 examples
        "rows = [{'x': 1.0}, {'x': 3.0}] if r == 0 else [{'x': 100.0}]\n"
        "w = [1, 1] if r == 0 else [0]\n"
        "means, total, sums = distributed.reduce_weighted(acc, rows, w, {'tokens': 10 * (r + 1)})\n"
        "shards = distributed.eval_shards(5, 2, acc)\n"
        "import pathlib, sys\n"
        "pathlib.Path(sys.argv[1], f'rank{r}.json').write_text(json.dumps({'rank': r, 'world': acc.num_processes,\n"
        "    'means': means, 'total': total, 'sums': sums, 'shards': shards}))\n"
        "import torch.distributed as dist\n"
        "dist.destroy_process_group()  # as dpolab.cli does: a live group can abort a rank at exit\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT / "src")}
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=180, start_new_session=True)
    assert res.returncode == 0, res.stderr[-3000:]
    # one file per rank: two processes printing to one stdout can interleave their lines
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in rows] == [2, 2]
    for r in rows:
        assert r["means"] == {"x": 2.0} and r["total"] == 2.0 and r["sums"] == {"tokens": 30.0}
    # 5 rows, blocks of ceil(5/2) = 3: [0,1,2] and [3,4]; batches of 2, the same count on both
    assert rows[0]["shards"] == [[0, 1], [2]] and rows[1]["shards"] == [[3, 4], []]
    assert res.stderr.count("note: no GPU found: the 2 processes run on the CPU (gloo)") == 1  # said once


def test_deepspeed_requested_without_the_package_is_one_line(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    from dpolab.train.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(DpolabError, match="the `deepspeed` package is not installed"):
        make_accelerator()


def test_accelerate_cpu_launch_that_starts_one_process_is_refused(tiny_model_dir, tmp_path):
    """The command a user types, ``accelerate launch --cpu --num_processes 2 -m dpolab dpo ...``,
    starts ONE process (accelerate needs mpirun for CPU processes): the run says so in one line and
    points to the CPU config and torchrun, instead of training alone with the per-process batch."""
    data = write_rule_data(tmp_path / "prefs.jsonl", n=8)
    out = tmp_path / "alone"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([str(ACCELERATE), "launch", "--cpu", "--num_processes", "2", "-m", "dpolab", "dpo",
                          "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out)],
                         env=env, capture_output=True, text=True, timeout=180, start_new_session=True)
    assert res.returncode != 0
    # the child's own line; accelerate >= 1.16 also re-raises the child's stderr tail in its traceback
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("dpolab dpo: error:")]
    assert len(line) == 1 and "started ONE" in line[0] and "examples/accelerate/ddp_cpu.yaml" in line[0], res.stderr
    # (accelerate's own launcher prints a traceback of the failed child; none comes from dpolab)
    assert "src/dpolab" not in res.stderr and not out.exists()
    # a plain single-process launch is left alone
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "ok"),
                 "--max-steps", "1", "--max-length", "48", "--max-prompt-length", "24", "--no-progress"]) == 0


def test_a_second_accelerator_in_one_process_may_change_the_precision():
    """A sweep or notebook that runs a float32 then a bf16 trainer in one process: accelerate keeps
    its state process-wide and refused the second precision ("restart your runtime")."""
    from dpolab.train.distributed import make_accelerator

    assert make_accelerator("no").mixed_precision == "no"
    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"


def test_unset_mixed_precision_takes_the_launchers(tiny_model_dir, tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16` (or an accelerate config file saying so) sets
    ACCELERATE_MIXED_PRECISION; dpolab's own default overrode it with "no", so the examples' bf16
    configs trained in float32. Unset, the launcher's is used (and written to config.yaml); given,
    dpolab's option wins."""
    import yaml

    from dpolab.cli import main
    from dpolab.train.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert make_accelerator(None).mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(f'{{"prompt": "q{i}", "completion": " a{i}"}}\n' for i in range(8)))
    out = tmp_path / "run"
    assert main(["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "1", "--batch-size", "2", "--no-progress"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["mixed_precision"] == "bf16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert make_accelerator(None).mixed_precision == "no"


def test_fp16_on_the_cpu_is_refused():
    """accelerate's fp16 autocast runs only on accelerators: on the CPU the flag changed nothing, silently."""
    from dpolab.train.distributed import make_accelerator

    with pytest.raises(DpolabError, match="--mixed-precision fp16 needs a GPU"):
        make_accelerator("fp16")
    assert make_accelerator("no").mixed_precision == "no"
