"""How many tokens one forward/backward pass may hold, from the model's size.

A training forward pass keeps every layer's intermediate tensors for the backward pass: for a
Llama-style decoder about ``10·h + 4·i`` values per token and layer (``h`` the hidden size, ``i`` the
MLP width): the attention block's normed input, q, k, v, rotated q and k, attention output and
projected output, and the gated MLP's two projections, its activation and their product. Measured
with ``torch.autograd.graph.saved_tensors_hooks`` on the benchmark's 26M model (h = 512, i = 1376,
7 layers, float32): about 294 KiB per token, against 290 KiB from the formula
(tests/test_perf_chunking.py checks the formula against the saved tensors of a tiny model).

Splitting a micro-batch into passes of at most ``T`` tokens bounds that memory by ``T × bytes per
token`` without changing the gradient (the loss is a sum over pairs). ``auto_forward_tokens`` picks
``T`` so the activations stay within the memory of the transformer blocks' weights (the embedding
and head keep no per-token activations): training state is then weights + gradients + two AdamW
moments (4×) plus at most the blocks' size again for activations. Passes may always hold 32 MiB of
activations (below that the memory is negligible, and small passes of a small model only lose speed
to per-operation overhead). For the DPO benchmark's 26M model that is 297 tokens (about 2 pairs),
for its 3M model 528 tokens; for Llama-3-8B in bfloat16, about 2,200 tokens per pass.
"""

from __future__ import annotations

import torch

MIN_ACTIVATION_BYTES = 32 * 2**20


def activation_bytes_per_token(config, element_size: int) -> int | None:
    """Bytes a training forward pass keeps per token, ``L · (10h + 4i) · element_size``; None when
    the config has no ``hidden_size``/``num_hidden_layers`` (the estimate does not apply)."""
    h = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not h or not layers:
        return None
    inter = getattr(config, "intermediate_size", None) or 4 * h
    return int(layers * (10 * h + 4 * inter) * element_size)


def _vocabulary_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the input embedding's and output head's parameters (none for a model without them)."""
    ids: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)() if hasattr(model, getter) else None
        except (AttributeError, NotImplementedError):
            module = None
        if isinstance(module, torch.nn.Module):
            ids.update(id(p) for p in module.parameters())
    return ids


def auto_forward_tokens(model: torch.nn.Module, mixed_precision: str = "no") -> int:
    """Tokens per forward pass such that activations take about as much memory as the transformer
    blocks' weights, or ``MIN_ACTIVATION_BYTES`` if that is more; 0 (never split) when the model's
    shape is unknown. The embedding and the head are left out: they keep no per-token activations of
    their own here (the head's logits exist one chunk at a time), and counting them would let a
    large vocabulary buy passes whose activations dwarf the blocks' (3,079 tokens instead of 316 for
    a 4-layer model with a 151,936-row vocabulary)."""
    params = list(model.parameters())
    vocab = _vocabulary_parameters(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in params if id(p) not in vocab)
    element = 2 if mixed_precision in ("bf16", "fp16") else (params[0].element_size() if params else 4)
    per_token = activation_bytes_per_token(getattr(model, "config", None), element)
    if not per_token:
        return 0
    return max(weight_bytes, MIN_ACTIVATION_BYTES) // per_token


def resolve_micro_batch_tokens(cfg, model) -> int:
    """The forward-pass token budget: ``--micro-batch-tokens``, or the size-based default
    (:func:`auto_forward_tokens`); 0 with ``--gradient-checkpointing``, whose activations are
    already small (the on-policy trainers checkpoint in eval mode: :mod:`dpolab.lm.checkpointing`)."""
    from dpolab.lm.logps import unwrap_model

    if cfg.micro_batch_tokens is not None:
        return cfg.micro_batch_tokens
    if cfg.gradient_checkpointing:
        return 0
    return auto_forward_tokens(unwrap_model(model) or model, cfg.mixed_precision)
