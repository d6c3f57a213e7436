"""The vocabulary matrices' gradients added into ``.grad`` in place, in a step of several passes.

When a step runs several backward passes (gradient accumulation, token-budget passes), autograd
gives each pass after the first a fresh gradient for every parameter and then adds it into the
accumulated ``.grad``. For the output head and the input embedding that fresh gradient is a whole
``(V, H)`` matrix per pass, on top of the training state: 148 MB in float32 at V = 151,936 and
H = 256, 2.5 GB at H = 4096. Their backward functions add into ``.grad`` directly instead (the
fused head in :mod:`dpolab.lm.logps`, the embedding here); the sum is the same, up to the order of
float additions.

Adding into ``.grad`` outside autograd's accumulation skips the hooks that DDP, FSDP and DeepSpeed
place on it, and a ``torch.autograd.grad`` call must not write into ``.grad`` at all. So it happens
only inside :func:`accumulating`, which the engine enters around its own backward calls, and only
for a single process whose model is not wrapped (:func:`allowed`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

# A process-wide switch, not a thread-local one: on accelerators autograd runs backward functions
# on its device threads, not on the thread that called backward.
_on = False


def allowed(accelerator) -> bool:
    """True for one process with no DDP, FSDP or DeepSpeed around the model."""
    # accelerate's DistributedType is a str enum: DistributedType.NO == "NO"
    return getattr(accelerator, "num_processes", 1) == 1 and getattr(accelerator, "distributed_type", "NO") == "NO"


@contextmanager
def accumulating(enabled: bool):
    """Backward functions of the head and the embedding may add into ``.grad`` while inside."""
    global _on
    previous, _on = _on, bool(enabled)
    try:
        yield
    finally:
        _on = previous


def grad_target(param: Tensor, dtype: torch.dtype) -> Tensor | None:
    """``param.grad`` when the running backward may add its ``dtype`` gradient into it in place,
    else None (the caller returns a fresh gradient to autograd, as usual)."""
    if not _on:
        return None
    g = param.grad
    if g is None or g.dtype != dtype or g.shape != param.shape or g.layout != torch.strided or not g.is_contiguous():
        return None
    if getattr(param, "_backward_hooks", None) or getattr(param, "_post_accumulate_grad_hooks", None):
        return None  # someone watches this gradient arrive: leave it to autograd
    return g


class _Embedding(torch.autograd.Function):
    """``F.embedding`` whose weight gradient goes into ``weight.grad`` when :func:`grad_target`
    allows (rows of ``padding_idx`` get none, as in ``nn.Embedding``)."""

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, padding_idx: int | None) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        target = grad_target(weight, weight.dtype)
        if target is None:  # autograd's own embedding backward, a fresh (V, H) gradient
            pad = -1 if ctx.padding_idx is None else ctx.padding_idx
            return None, torch.ops.aten.embedding_dense_backward(grad_out, ids, weight.shape[0], pad, False), None
        idx, g = ids.reshape(-1), grad_out.reshape(-1, weight.shape[1]).to(weight.dtype)
        if ctx.padding_idx is not None:
            keep = idx != ctx.padding_idx
            idx, g = idx[keep], g[keep]
        target.index_add_(0, idx, g)
        return None, None, None


@contextmanager
def embedding_in_place(model: torch.nn.Module, enabled: bool):
    """Route the input embedding of ``model`` through :class:`_Embedding` while inside (a plain
    ``nn.Embedding`` with a trained weight; others are left as they are)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if enabled and callable(get) else None
    if (type(emb) is not torch.nn.Embedding or not emb.weight.requires_grad or emb.max_norm is not None
            or emb.scale_grad_by_freq or emb.sparse or "forward" in emb.__dict__):
        yield
        return
    emb.forward = lambda ids: _Embedding.apply(ids, emb.weight, emb.padding_idx)
    try:
        yield
    finally:
        del emb.forward
