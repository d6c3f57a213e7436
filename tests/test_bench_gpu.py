"""bench/gpu.sh starts: its --dry-run (CPU only) imports every Python piece, parses their arguments,
builds every side's config and the 0.5B model config on the meta device, and exits 0; the parts'
time limits it prints add up to under 8 minutes.

The dry run needs TRL, which lives in the benchmark environment (.venv-bench), not in the test one:
the test runs it with the first interpreter that has TRL ($PYTHON, .venv-bench, this one) and skips,
saying why, when none has.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_python() -> str | None:
    candidates = [os.environ.get("PYTHON"), str(ROOT / ".venv-bench" / "bin" / "python"), sys.executable]
    for python in filter(None, candidates):
        if not Path(python).is_file() and not shutil.which(python):
            continue
        probe = subprocess.run([python, "-c", "import trl, accelerate, torch, dpolab"], capture_output=True)
        if probe.returncode == 0:
            return python
    return None


def test_gpu_script_dry_run_exits_zero():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed: bench/gpu.sh is a bash script")
    python = _bench_python()
    if python is None:
        pytest.skip("no interpreter with trl, accelerate, torch and dpolab (the benchmark environment: "
                    "make .venv-bench/.installed, or set PYTHON)")
    env = {**os.environ, "PYTHON": python, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([bash, str(ROOT / "bench" / "gpu.sh"), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "all checks passed" in out
    assert "instantiates on the meta device" in out and "M parameters" in out
    for side in ("sft ours-default", "sft trl-default", "sft ours-best", "sft trl-best", "dpo ours", "dpo trl"):
        assert f"dry run: {side} config builds" in out, side
    assert "accelerate.commands.launch --config_file examples/accelerate/fsdp.yaml" in out
    # every part's limit plus its kill delay: the whole script ends inside the 8 minutes it promises
    # (and so inside one 600 s device call) even when every part runs into its limit
    total = re.search(r"each plus \d+ s to kill: at most (\d+) s in all", out)
    assert total and int(total.group(1)) < 480, out[:2000]
