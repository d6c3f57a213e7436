"""What an algorithm file gives the engine (:mod:`dpolab.train.engine`): its passes and loss, or
its own step, its evaluation, checkpoint contents and final folder. Free of heavy imports, so a
trainer's module (its config, its ``--help``) loads without torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from dpolab.train.engine import Engine


@dataclass
class Pass:
    """One forward/backward pass of an optimizer step.

    batch: what the algorithm's loss takes (on the device). units: loss units it holds (tokens,
    pairs, ...), the normaliser's share. tokens: tokens the model reads (throughput). where: named in
    a non-finite error. real: False for a stand-in (a row run with weight 0 so that this process
    joins the collective operations of a pass it has no data for)."""

    batch: Any
    units: int
    tokens: int
    where: str = ""
    real: bool = True


class Algorithm:
    """What an algorithm file supplies to the :class:`Engine` (override what applies).

    Offline algorithms implement :meth:`passes` and :meth:`loss` and inherit :meth:`step`;
    on-policy ones override :meth:`step` (collect experience, then call
    :meth:`Engine.optimizer_step` as often as they optimize)."""

    name = ""                       # the command: progress bar and resume hint
    bar_keys: tuple[str, ...] = ("loss",)
    summary_keys: tuple[str, ...] = ("steps", "eval/loss", "loss", "wall_seconds")
    train_mode = True               # model.train() while training (False: dropout stays off)
    micro_batches = 1               # micro-batches of the data order per step

    def passes(self, engine: Engine, group: list[tuple[int, list[int]]]) -> list[Pass]:
        raise NotImplementedError

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """(SUM of the batch's per-unit losses, a scalar with grad; detached per-unit mean stats)."""
        raise NotImplementedError

    def step(self, engine: Engine, group: list[tuple[int, list[int]]]) -> dict[str, float] | None:
        """One step on the micro-batches ``group`` [(k, rows)]; returns its metrics (None: skipped)."""
        where = f"micro-batches {group[0][0]}..{group[-1][0]}"
        return engine.optimizer_step(self.passes(engine, group), self.loss, where=where)

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, unprefixed (the engine adds ``eval/``); ``{}`` without an eval set."""
        return {}

    def save_final(self, engine: Engine, path: Path, state_dict: dict | None) -> None:
        """Write ``final/`` (main process only; ``state_dict``: the gathered weights when sharded):
        the trained causal LM in Hugging Face format with its tokenizer, LoRA adapters merged."""
        from dpolab.runs.checkpoint import save_pretrained_atomic

        final = engine.unwrapped
        if getattr(self, "lora", False):
            final = final.merge_and_unload()
        save_pretrained_atomic(final, engine.tokenizer, path, state_dict=state_dict)

    def checkpoint_files(self, state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """The safetensors files of a checkpoint: ``model.safetensors`` with every weight (LoRA runs:
        the adapters only)."""
        lora = getattr(self, "lora", False)
        return {"model.safetensors": {k: v for k, v in state_dict.items() if not lora or "lora_" in k}}

    def load_checkpoint(self, engine: Engine, directory: Path) -> None:
        from dpolab.runs.checkpoint import load_checkpoint_weights

        load_checkpoint_weights(engine.unwrapped, directory, partial=getattr(self, "lora", False))

    def state_dict(self) -> dict[str, Any]:
        """JSON-able algorithm state a checkpoint carries (e.g. an adaptive KL coefficient)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def on_log(self, engine: Engine, step: int, logged: dict[str, float]) -> None:
        """After each logging step (e.g. write sample completions)."""

    def on_resume(self, engine: Engine, step: int) -> None:
        """On resume, main process: drop what the algorithm logged after ``step``."""

    def summary(self, engine: Engine) -> dict[str, Any]:
        """Extra entries of ``summary.json``: by default the rows the data loader skipped and truncated."""
        report = engine.report
        return {f"data/{k}_rows": report[k] for k in ("skipped", "truncated") if k in report}


