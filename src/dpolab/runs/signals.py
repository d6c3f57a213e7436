"""Stopping cleanly on SIGINT/SIGTERM: finish the step, agree across processes, checkpoint, exit."""

from __future__ import annotations

import os
import signal
import sys
import time


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits cleanly. A second
    signal stops at once, unless it comes within ``SAME_REQUEST_SECONDS`` of the first: a launcher
    (torchrun, accelerate launch) forwards the signal it gets to every process, and a scheduler
    (SLURM, systemd) or Ctrl-C signals the launcher and its processes alike, so a process of a
    multi-process run gets one request twice, milliseconds apart."""

    SAME_REQUEST_SECONDS = 2.0

    def __init__(self):
        self.received: str | None = None
        self._at = 0.0
        self._old: dict = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            if time.monotonic() - self._at < self.SAME_REQUEST_SECONDS:  # the same request, delivered twice
                return
            raise KeyboardInterrupt  # a second request: stop now
        self.received, self._at = signal.Signals(signum).name, time.monotonic()
        if os.environ.get("RANK", "0") == "0":  # said once for a multi-process run, as its stop line is
            print(f"\n{self.received} received: finishing this step, then saving a checkpoint...", file=sys.stderr)

    def agreed(self, accelerator=None) -> str | None:
        """The signal name if any process received one (all processes must stop at the same step,
        or the next collective operation would hang); ``None`` to go on."""
        if accelerator is None or accelerator.num_processes <= 1:
            return self.received
        import torch

        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        if float(accelerator.reduce(flag, reduction="sum").item()) > 0:
            return self.received or "a signal to another process"
        return None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def resume_hint(command: str, run, signame: str, step: int, steps: int, processes: int = 1) -> str:
    """The stop message; a run of several processes resumes with as many (one is refused), under
    its launcher, which the process does not know: ``torchrun`` is named as the example."""
    args = f"{command} --config {run.path / 'config.yaml'} --resume latest"
    if processes > 1:
        return (f"stopped by {signame} at step {step}/{steps}; checkpoint saved. Resume with {processes} processes, "
                f"under the launcher this run had, e.g.:\n  torchrun --nproc_per_node {processes} -m dpolab {args}")
    return f"stopped by {signame} at step {step}/{steps}; checkpoint saved. Resume with:\n  dpolab {args}"
