"""Activation checkpointing for a model in eval mode (the on-policy trainers' policy).

transformers checkpoints a decoder layer only while the layer is in training mode, and training mode
would turn dropout back on: the on-policy trainers keep their policy in eval mode so that a
completion's log-probs under the policy that sampled it are exactly those of the training pass (the
first ratio is 1). :func:`checkpointed_layers` checkpoints the decoder layers themselves instead,
with every module left in the mode it is in: each layer keeps only its inputs for the backward pass
and runs its forward again there (Chen et al. 2016, arXiv 1604.06174). The recomputed forward is
the same computation, so the gradients are those of the plain passes.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of ``model`` (and of any model inside it: a value model, PEFT's wrapper):
    transformers' checkpointable layers (``GradientCheckpointingLayer``), else the classes a model
    names in ``_no_split_modules`` (transformers versions before that class)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers
        GradientCheckpointingLayer = None
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers, prefixes = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in prefixes):
            continue  # inside a layer already taken: checkpointing the outer one is enough
        if (GradientCheckpointingLayer is not None and isinstance(m, GradientCheckpointingLayer)) \
                or type(m).__name__ in names:
            layers.append(m)
            prefixes.append(name + ".")
    return layers


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # no backward to replay for: run as is
        return forward(*args, **kwargs)
    # eval mode draws no random numbers, so the RNG state need not be replayed
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


@contextlib.contextmanager
def checkpointed_layers(model: torch.nn.Module, enabled: bool = True):
    """Within the block, every decoder layer of ``model`` runs checkpointed in its forward passes
    that record gradients (the backward passes must run within the block too). Raises
    :class:`dpolab.errors.ConfigError` when ``model`` has no layer it can find."""
    if not enabled:
        yield
        return
    layers = decoder_layers(model)
    if not layers:
        from dpolab.errors import ConfigError

        raise ConfigError(f"--gradient-checkpointing: no decoder layers found in {type(model).__name__} "
                          "(neither transformers' GradientCheckpointingLayer nor a class in _no_split_modules)")
    # an instance attribute shadows the class's forward, keeping nn.Module.__call__ and its hooks;
    # one set there already (accelerate's device hooks) is wrapped and put back
    before = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward)
    try:
        yield
    finally:
        for layer, old in zip(layers, before):
            if old is None:
                del layer.forward
            else:
                layer.forward = old
