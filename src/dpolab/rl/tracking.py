"""Run bookkeeping shared by the Gymnasium PPO and A2C loops: metrics, checkpoints, final policy, plot.

Metrics go to ``metrics.jsonl`` (always), a tqdm progress bar (``progress``) and the experiment
trackers of ``--report-to`` (asking for one that is not installed is an error rather than a silent
no-op).

A checkpoint (``checkpoints/step-N/state.pt``, written atomically by :class:`dpolab.runs.rundir.RunDir`)
holds everything a resumed run needs to continue exactly as if uninterrupted: network weights,
optimizer state, Python/NumPy/torch RNG states, the update counter, and the vector environment's
state as plain data (physics state, time-limit counters, autoreset flags, environment RNG states;
:func:`dpolab.rl.rollout.env_state`) with the current observations and running episode statistics.
It holds only tensors and plain data and is read with ``torch.load(weights_only=True)``: loading a
checkpoint never runs code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpolab.config import config_to_dict
from dpolab.errors import DpolabError
from dpolab.rl.nets import save_policy
from dpolab.runs.guards import nonfinite_error, weights_finite
from dpolab.runs.rundir import RunDir
from dpolab.runs.seeding import rng_state, set_rng_state

if TYPE_CHECKING:
    import torch

# A resume keeps every option of the checkpoint's run except these, so that config.yaml (rewritten
# by the resumed run) states the settings of the whole run. They change how the run is run (where
# and how often it writes, what it shows, how many threads), never what an update computes; a change
# is said on stderr. The first three differ by nature and are not mentioned.
RUN_OPTIONS = ("output_dir", "resume", "dry_run", "progress", "threads", "tensorboard", "report_to",
               "save_steps", "save_total_limit")
# These may change where the run so far is what it would have been with the new value (checked).
CONDITIONAL = ("stop_return", "skip_nonfinite")


class Tracker:
    """Logs a step's metrics to the run directory, the progress bar and the ``--report-to`` trackers
    (:mod:`dpolab.runs.trackers`; ``--tensorboard`` is ``--report-to tensorboard``)."""

    def __init__(self, run: RunDir, total: int, initial: int, progress: bool, report_to: list[str], desc: str,
                 config: dict[str, Any] | None = None, *, resumed_at: int | None = None):
        from dpolab.runs.trackers import Trackers

        self.run = run
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
        self.trackers = Trackers(report_to, run.path, config or {}, resumed_at=resumed_at)

    def log(self, step: int, metrics: dict[str, Any], advance: int = 0) -> None:
        self.run.log(step, metrics)
        self.trackers.log(metrics, step)
        if self.bar is not None:
            if advance:
                self.bar.update(advance)
            shown = {k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items()
                     if k in ("charts/episodic_return", "eval/mean_return", "losses/approx_kl")}
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int) -> None:
        """Move the progress bar ``n`` environment steps on."""
        if self.bar is not None:
            self.bar.update(n)

    def close(self, status: str = "finished") -> None:
        if self.bar is not None:
            self.bar.close()
        self.trackers.close(status)


def report_to(cfg: Any) -> list[str]:
    """The trackers a Gymnasium run logs to: ``--report-to`` plus ``--tensorboard``, checked installed."""
    from dpolab.runs.trackers import parse_report_to

    value = getattr(cfg, "report_to", None)
    names = value.split(",") if isinstance(value, str) else list(value or [])
    return parse_report_to([*names, "tensorboard"] if cfg.tensorboard else names)  # checked installed alike


def start_run(cfg: Any, algorithm: str, *, create: bool = True) -> tuple[RunDir, dict[str, Any] | None]:
    """Open the output directory; refuse to mix a new run into an existing one unless resuming.
    With ``--resume`` the checkpoint is read and checked first (:func:`read_checkpoint`), so a refused
    resume leaves the run's ``config.yaml`` as it was and creates no folder. Returns the run and
    the checkpoint's state (None for a new run). ``create=False`` (``--dry-run``): only the checks."""
    from dpolab.runs.rundir import check_writable

    check_writable("--output-dir", cfg.output_dir, folder=True)
    run = RunDir(cfg.output_dir, keep_last=cfg.save_total_limit)
    run.check_new_run(cfg.resume)
    state = read_checkpoint(run, cfg.resume, cfg, algorithm) if cfg.resume is not None else None
    if create:
        run.create().lock()
        run.write_config(cfg)
    return run, state


def save_checkpoint(run: RunDir, step: int, cfg: Any, state: dict[str, Any]) -> Path:
    """Write ``state`` plus the RNG states and config as checkpoint ``step-N`` (atomic).

    Refused (a :class:`NonFiniteError`; ``latest`` keeps naming the previous checkpoint) if the
    weights in ``state["policy"]`` hold a NaN/inf."""
    import torch
    if not all(bool(torch.isfinite(v).all()) for v in state["policy"].values()):
        raise nonfinite_error("weights", step, "refusing to write a checkpoint")
    payload = {**state, "rng": rng_state(), "config": config_to_dict(cfg), "step": step}
    return run.save_checkpoint(step, lambda d: torch.save(payload, d / "state.pt"))


def save_final(run: RunDir, policy: torch.nn.Module, extra: dict[str, Any], step: int) -> None:
    """Write ``final/`` (safetensors + config.json) atomically; refused if a weight is NaN/inf."""
    if not weights_finite(policy):
        raise nonfinite_error("weights", step, "refusing to write final/")
    save_policy(policy, run.final, extra)


def read_checkpoint(run: RunDir, spec: str, cfg: Any, algorithm: str) -> dict[str, Any]:
    """Read the checkpoint named by ``spec`` (``latest`` or a path) and check it was made by
    ``algorithm`` with ``cfg``'s training settings (only :data:`RUN_OPTIONS` may differ, and
    :data:`CONDITIONAL` where the run so far fits them; changes are printed); changes nothing. :func:`restore_checkpoint` then applies
    it, and the caller restores the networks, optimizer and collector from it."""
    import torch
    path = run.resolve_checkpoint(spec)
    if not (path / "state.pt").is_file():
        raise DpolabError(f"--resume: {path} has no state.pt")
    try:  # tensors and plain data only: a planted pickle payload is refused, never run
        state = torch.load(path / "state.pt", weights_only=True)
        saved, now = state["config"], dataclasses.asdict(cfg)
        for key in ("policy", "optimizer", "collector", "update", "step", "rng"):
            state[key]  # noqa: B018 - presence check
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as err:
        from dpolab.runs.checkpoint import unreadable_state

        raise DpolabError(unreadable_state(path / "state.pt", err)) from None
    # Checkpoints from before "algorithm" was saved: PPO's config alone has clip_eps.
    made_by = state.get("algorithm") or ("ppo" if "clip_eps" in saved else "a2c")
    if made_by != algorithm:
        raise DpolabError(f"--resume: checkpoint {path} was made by `dpolab rl {made_by}`, not "
                          f"`dpolab rl {algorithm}`; resume it with the command that made it")
    diff = [k for k in now if k in saved and saved[k] != now[k] and k not in RUN_OPTIONS + CONDITIONAL]
    if diff:
        raise DpolabError(f"--resume: checkpoint {path} was made with different "
                          + ", ".join(f"{k}={saved[k]!r} (now {now[k]!r})" for k in diff)
                          + "; a resumed run keeps its training settings (start a new run in another --output-dir)")
    stop = now.get("stop_return")
    if "stop_return" in saved and stop != saved["stop_return"] and stop is not None and state.get("best", -math.inf) >= stop:
        raise DpolabError(f"--resume: --stop-return {stop} (was {saved['stop_return']}): an evaluation before "
                          f"checkpoint {path} reached {state['best']:g}, so the run would have stopped there")
    if saved.get("skip_nonfinite") and not now.get("skip_nonfinite") and state.get("skipped_steps", 0):
        raise DpolabError(f"--resume: --no-skip-nonfinite: the run skipped {state['skipped_steps']} non-finite "
                          f"step(s) before checkpoint {path} with --skip-nonfinite")
    changed = [k for k in RUN_OPTIONS[3:] + CONDITIONAL if k in saved and saved[k] != now.get(k)]
    if changed:
        print("--resume: run options changed (they change no update): "
              + ", ".join(f"{k}={saved[k]!r} (now {now.get(k)!r})" for k in changed), file=sys.stderr)
    return state


def restore_checkpoint(run: RunDir, state: dict[str, Any]) -> None:
    """Restore the RNG states of a checkpoint :func:`read_checkpoint` returned, cut
    ``metrics.jsonl`` back to its step, remove later checkpoints (as their metrics are cut) and an
    earlier finish's ``summary.json``."""
    set_rng_state(state["rng"])
    run.truncate_metrics(state["step"])
    run.discard_checkpoints_after(state["step"])
    run.unfinish()


def plot_learning_curve(run: RunDir, title: str) -> Path | None:
    """Plot training episodic returns and evaluation means against steps into ``learning_curve.png``."""
    if not run.metrics_path.exists():
        return None
    # a Figure of its own: pyplot's global backend (a notebook's) is left as the user set it
    from matplotlib.figure import Figure

    rows = [json.loads(x) for x in run.metrics_path.read_text().splitlines() if x.strip()]
    train = [(r["step"], r["charts/episodic_return"]) for r in rows if "charts/episodic_return" in r]
    evals = [(r["step"], r["eval/mean_return"]) for r in rows if "eval/mean_return" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.7, label="training episodes (mean per rollout)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="evaluation (mean return)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episodic return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run.path / "learning_curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def dry_run_summary(cfg: Any, envs) -> dict:
    """--dry-run: the config was validated and the environment built; print what a run would do, write
    nothing, close the environments."""
    import json

    try:
        obs, act = envs.single_observation_space, envs.single_action_space
        summary = {"dry_run": True, "env": cfg.env, "n_envs": cfg.n_envs, "total_steps": cfg.total_steps,
                   "observation_space": str(obs), "action_space": str(act), "output_dir": cfg.output_dir}
    finally:
        envs.close()
    print(json.dumps(summary, indent=2))
    return summary
