"""Experiment trackers (``--report-to``): what a run writes to ``metrics.jsonl`` also goes to TensorBoard,
Weights & Biases or MLflow, through accelerate's tracker classes, with the resolved config as the
run's hyper-parameters and, for the trainers that sample, tables of sampled completions.

Each tracker is an optional dependency (``pip install 'dpolab[tracking]'``); asking for one that is
not installed is a one-line error before any work starts (:func:`parse_report_to`). Files stay in
the run directory: ``tensorboard/``, ``mlruns/`` (MLflow's local store, unless
``MLFLOW_TRACKING_URI`` says otherwise) and ``wandb/`` (W&B honours ``WANDB_MODE``, e.g. ``offline``).
Only the main process of a multi-process run writes.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from dpolab.errors import ConfigError

#: --report-to name -> the package it needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """The trackers ``--report-to`` names (``none``, one name, or a comma-separated list), each
    checked to be known and installed."""
    if value is None:
        return []
    names = [n.strip().lower() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    names = [n for n in names if n != "none"]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--report-to: unknown tracker '{name}'; choose from none, {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"--report-to {name} needs the {TRACKERS[name]} package: pip install 'dpolab[tracking]'")
    return list(dict.fromkeys(names))


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The config as flat scalar hyper-parameters (lists and None as text), as trackers accept them."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in config.items()}


class Trackers:
    """The trackers of one run: ``log`` numeric metrics at a step, ``log_samples`` rows of sampled
    completions as a table, ``close`` at the end. With no tracker every call is a no-op."""

    def __init__(self, names: list[str], run_dir: str | Path, config: dict[str, Any], *,
                 resumed_at: int | None = None):
        from accelerate import tracking

        self.trackers = []
        self._set_env: dict[str, str] = {}  # what this run put in os.environ, taken out again at close
        run_dir, run_name = Path(run_dir).resolve(), Path(run_dir).resolve().name
        for name in names:
            try:
                self._start(tracking, name, run_dir, run_name, config, resumed_at)
            except Exception as err:  # e.g. W&B without an API key, an MLflow server that does not answer
                self.close()
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise ConfigError(f"--report-to {name}: cannot start the tracker: {type(err).__name__}: {first}"
                                  ) from None

    def _start(self, tracking, name: str, run_dir: Path, run_name: str, config: dict[str, Any],
               resumed_at: int | None) -> None:
        """Start tracker ``name`` and log the run's configuration to it. A run resumed at step ``N``
        purges the TensorBoard events of steps after ``N`` (logged before a crash, then cut from
        metrics.jsonl and logged again), so each step holds one value as in metrics.jsonl."""
        if name == "tensorboard":
            kwargs = {} if resumed_at is None else {"purge_step": resumed_at + 1}
            tracker = tracking.TensorBoardTracker(run_name, run_dir / "tensorboard", **kwargs)
        elif name == "wandb":
            tracker = tracking.WandBTracker(os.environ.get("WANDB_PROJECT", "dpolab"), name=run_name,
                                            dir=str(run_dir))
        else:
            import mlflow

            if "MLFLOW_TRACKING_URI" not in os.environ:  # the local file store, inside the run directory
                if "MLFLOW_ALLOW_FILE_STORE" not in os.environ:  # MLflow 3 asks to opt in
                    self._set_env["MLFLOW_ALLOW_FILE_STORE"] = os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
                # MLflow 3 exports the URI to os.environ: the next run of this process (a sweep, the
                # demo's stages) took it for the user's and logged into this run's folder
                mlflow.set_tracking_uri((run_dir / "mlruns").as_uri())
                if "MLFLOW_TRACKING_URI" in os.environ:
                    self._set_env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
            tracker = tracking.MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME", "dpolab"), run_name=run_name)
        tracker.start()
        tracker.store_init_configuration(_hparams(config))
        self.trackers.append((name, tracker))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for _, tracker in self.trackers:
            tracker.log(values, step=step)

    def log_samples(self, rows: list[dict], step: int, name: str = "samples") -> None:
        """A table of sample rows (all with the same keys): a W&B table, a TensorBoard text summary,
        an MLflow JSON artifact."""
        if not rows or not self.trackers:
            return
        columns = list(rows[0])
        data = [[r.get(c) for c in columns] for r in rows]
        for kind, tracker in self.trackers:
            if kind == "wandb":
                tracker.log_table(name, columns=columns, data=data, step=step)
            elif kind == "tensorboard":
                lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                lines += ["| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |"
                          for row in data]
                tracker.writer.add_text(name, "\n".join(lines), global_step=step)
            else:
                import mlflow

                mlflow.log_dict({"columns": columns, "data": data}, f"{name}/step-{step}.json")

    def close(self, status: str = "finished") -> None:
        """End every tracker's run; ``status`` ``"failed"`` (an exception) or ``"stopped"`` (a signal,
        the run resumable) is what MLflow records and W&B's exit code says (both called every run
        finished and successful)."""
        for kind, tracker in self.trackers:
            if kind == "mlflow" and status != "finished":
                import mlflow

                mlflow.end_run(status="FAILED" if status == "failed" else "KILLED")
            elif kind == "wandb" and status != "finished":
                tracker.run.finish(exit_code=1 if status == "failed" else 143)
            else:
                tracker.finish()
        self.trackers = []
        if "MLFLOW_TRACKING_URI" in self._set_env:
            import mlflow

            mlflow.set_tracking_uri(None)  # MLflow's own default again (and its variable unset)
        for key, value in self._set_env.items():
            if os.environ.get(key) == value:
                del os.environ[key]
        self._set_env = {}


def open_trackers(report_to, run_dir: str | Path, config: dict[str, Any], *,
                  resumed_at: int | None = None) -> Trackers:
    return Trackers(parse_report_to(report_to), run_dir, config, resumed_at=resumed_at)
