"""Stopping cleanly on SIGINT/SIGTERM: finish the step, agree across processes, checkpoint, exit."""

from __future__ import annotations

import signal
import sys


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits cleanly."""

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
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


def resume_hint(command: str, run, signame: str, step: int, steps: int) -> str:
    return (f"stopped by {signame} at step {step}/{steps}; checkpoint saved. Resume with:\n"
            f"  dpolab {command} --config {run.path / 'config.yaml'} --resume latest")
