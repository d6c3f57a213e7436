"""The non-finite guard every trainer shares: a NaN/inf loss, gradient or weight stops the run
(naming where), or with ``--skip-nonfinite`` the step is skipped and counted; non-finite weights are
never checkpointed."""

from __future__ import annotations

import torch

from dpolab.errors import NonFiniteError


def nonfinite_error(what: str, step: int, detail: str) -> NonFiniteError:
    return NonFiniteError(f"non-finite {what} at step {step} ({detail}); the run stops without saving "
                          "NaN weights. Re-run with --skip-nonfinite to skip such steps, or lower the "
                          "learning rate.")


def weights_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
