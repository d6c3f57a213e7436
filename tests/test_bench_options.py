"""The benchmarks' ``--quick``: it sets short-run defaults, and options given explicitly still apply."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

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
