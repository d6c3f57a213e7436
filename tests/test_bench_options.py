"""The benchmarks' options: ``--quick`` sets short-run defaults and options given explicitly still
apply; bad arguments are usage errors before anything runs; results are written only where asked."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _parse():
    spec = importlib.util.spec_from_file_location("dpo_vs_trl", ROOT / "bench" / "dpo_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="small,medium")
    ap.add_argument("--repeats", type=int, default=3)
    a = module.parse_args_with_quick(ap, {"models": "small", "repeats": 1})
    return a.models, a.repeats


def test_quick_sets_defaults_and_explicit_options_win(monkeypatch):
    for argv, expected in (([], ("small,medium", 3)), (["--quick"], ("small", 1)),
                           (["--quick", "--repeats", "3"], ("small", 3)),
                           (["--repeats", "5", "--quick", "--models", "medium"], ("medium", 5)),
                           (["--repeats", "2"], ("small,medium", 2))):
        monkeypatch.setattr("sys.argv", ["bench", *argv])
        assert _parse() == expected, argv


# -- argument errors: refused up front, before any data, model or worker (audit 44) ----------------
def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("script, args, message", [
    # an unknown name is an argparse error naming the choices (was a KeyError after the set-up)
    ("dpo_vs_trl.py", ["--models", "small,foo"], "argument --models: unknown 'foo' (choose from small, medium"),
    ("sft_rm_vs_trl.py", ["--models", "foo", "--dry-run"], "argument --models: unknown 'foo' (choose from small"),
    ("sft_rm_vs_trl.py", ["--tasks", "sft,dpo"], "argument --tasks: unknown 'dpo' (choose from sft, rm"),
    ("kto_vs_trl.py", ["--models", "large"], "argument --models: unknown 'large' (choose from small, medium"),
    ("dpo_vocab.py", ["--vocabs", "64k"], "argument --vocabs: unknown '64k' (choose from 32k, 152k"),
    ("grpo_rloo_vs_trl.py", ["--algos", "grpo,ppo"], "argument --algos: unknown 'ppo' (choose from grpo, rloo"),
    ("generation_vs_hf.py", ["--quick", "--models", "foo"], "argument --models: unknown 'foo' (choose from tiny"),
    ("generation_vs_hf.py", ["--modes", "beam"], "argument --modes: unknown 'beam'"),
    ("generation_vs_hf.py", ["--shapes", "16by8"], "argument --shapes: expected BATCHxNEW_TOKENS"),
    # no timed step left by --warmup-steps (was a ZeroDivisionError or an empty median after every side ran)
    ("dpo_vs_trl.py", ["--quick", "--warmup-steps", "8"], "--warmup-steps 8 leaves no timed step: small runs 8"),
    ("dpo_vs_trl.py", ["--steps", "2", "--warmup-steps", "2"], "leaves no timed step"),
    ("sft_rm_vs_trl.py", ["--models", "medium", "--warmup-steps", "8"], "leaves no timed step"),
    ("kto_vs_trl.py", ["--warmup-steps", "8"], "--warmup-steps 8 leaves no timed step: medium runs 8"),
    ("kto_vs_trl.py", ["--warmup-steps", "0"], "--warmup-steps must be >= 1"),
    ("dpo_vocab.py", ["--run-steps", "2", "--warmup-steps", "2"], "leaves no timed step"),
    ("dpo_vocab.py", ["--warmup-steps", "0"], "--warmup-steps must be >= 1"),
    ("grpo_rloo_vs_trl.py", ["--quick", "--warmup-steps", "5"], "--warmup-steps 5 leaves no timed step"),
    ("online_dpo_vs_trl.py", ["--steps", "1", "--warmup-steps", "1"], "leaves no timed step"),
    # kto_vs_trl.py runs on the CPU in float32 only: it offers no GPU preset
    ("kto_vs_trl.py", ["--gpu"], "unrecognized arguments: --gpu"),
    ("kto_vs_trl.py", ["--device", "cuda"], "invalid choice: 'cuda'"),
])
def test_bad_arguments_are_usage_errors(script, args, message):
    p = _run(script, *args)
    assert p.returncode == 2, (p.stdout, p.stderr[-2000:])
    assert message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_kto_help_offers_no_gpu_options():
    p = _run("kto_vs_trl.py", "--help")
    assert p.returncode == 0, p.stderr
    for option in ("--gpu", "--device", "--precision", "meta device"):
        assert option not in p.stdout, option


def test_generation_writes_results_only_where_asked(tmp_path, monkeypatch):
    """A narrowed run without --json writes no file (it replaced bench/generation_vs_hf_results.json);
    with --json it writes there."""
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("generation_vs_hf", ROOT / "bench" / "generation_vs_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "spawn", lambda a, model, threads: {"rows": []})  # no benchmark run
    committed = ROOT / "bench" / "generation_vs_hf_results.json"
    before = committed.read_bytes() if committed.exists() else None
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["generation_vs_hf.py", "--models", "tiny", "--shapes", "4x8", "--repeats", "1"])
    module.main()
    assert (committed.read_bytes() if committed.exists() else None) == before
    assert not list(tmp_path.iterdir())
    out = tmp_path / "gen.json"
    monkeypatch.setattr("sys.argv", ["generation_vs_hf.py", "--models", "tiny", "--repeats", "1", "--json", str(out)])
    module.main()
    assert out.is_file()
