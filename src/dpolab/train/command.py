"""What every trainer command does around its run: parse the options, print the ``--dry-run``
report, say where the result is."""

from __future__ import annotations

import json
from pathlib import Path


def dry_run_report(cfg, report: dict) -> dict:
    """``--dry-run``: print the data report and resolved config; return the summary a run returns
    instead of training (numeric report entries as ``data/...``, and the summary's own
    ``data/skipped_rows``/``data/truncated_rows``)."""
    from dpolab.train.distributed import is_main_process

    if is_main_process():  # one JSON document on stdout, however many processes
        print(json.dumps({"data": report, "config": vars(cfg)}, indent=2))
    return {"dry_run": True, **{f"data/{k}": v for k, v in report.items() if isinstance(v, (int, float))},
            **{f"data/{k}_rows": report[k] for k in ("skipped", "truncated") if k in report}}


def cli(cfg_cls, train, argv: list[str], prog: str, description: str, *, final: str = "final model") -> int:
    """A trainer's command: parse its options (``--config`` YAML, flags), train, say where the result is."""
    from dpolab.config import parse_config

    cfg = parse_config(cfg_cls, argv, prog=prog, description=description)
    summary = train(cfg)
    from dpolab.train.distributed import is_main_process

    if not summary.get("dry_run") and not summary.get("stopped") and is_main_process():
        print(f"done: {cfg.output_dir} ({final} in {Path(cfg.output_dir) / 'final'})")
    return 0
