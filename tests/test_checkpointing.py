"""Activation checkpointing of a model kept in eval mode (`dpolab.lm.checkpointing`, used by the
on-policy trainers' `--gradient-checkpointing`): the layers run again in the backward pass, the
gradients are those of the plain pass, no module changes mode, and the layers are left as found."""

from __future__ import annotations

import torch

from dpolab.lm.checkpointing import checkpointed_layers, decoder_layers


def _loss(model, ids):
    out = model(input_ids=ids, use_cache=False)
    return out.logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).sum()


def _grads(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    with checkpointed_layers(model, **kw):
        _loss(model, ids).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_eval_mode_layers_rerun_in_backward_with_the_same_gradients(tiny_model):
    model = tiny_model.double().eval()
    layers = decoder_layers(model)
    assert len(layers) == 2 and all(type(m).__name__ == "LlamaDecoderLayer" for m in layers)
    calls = []  # the layers' MLPs, called from inside each layer's forward
    for m in layers:
        m.mlp.register_forward_pre_hook(lambda mod, args: calls.append(mod.training))
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))

    plain = _grads(model, ids, enabled=False)
    assert len(calls) == 2                 # one forward per layer
    calls.clear()
    checkpointed = _grads(model, ids)
    # a checkpointed layer runs its forward again in the backward pass, in eval mode throughout
    assert len(calls) == 4 and not any(calls)
    assert not any(m.training for m in model.modules())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-12)

    # left as found: the class's forward again, one forward per layer
    assert all("forward" not in m.__dict__ for m in layers)
    calls.clear()
    _grads(model, ids, enabled=False)
    assert len(calls) == 2


def test_saved_activations_shrink(tiny_model):
    """What the autograd graph keeps for backward: with checkpointing, each layer keeps only its
    inputs, so the bytes saved for backward drop (the head's logits stay in both)."""
    model = tiny_model.eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))

    def saved_bytes(enabled):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.shape, t.stride())] = t.numel() * t.element_size()
            return t

        with checkpointed_layers(model, enabled=enabled), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _loss(model, ids)
        loss.backward()
        return sum(seen.values())

    plain, checkpointed = saved_bytes(False), saved_bytes(True)
    assert checkpointed < 0.8 * plain


def test_sampling_inside_the_block_runs_as_is(tiny_model):
    """Without gradients there is nothing to replay: a no-grad forward (and its KV cache) is untouched."""
    model = tiny_model.eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with checkpointed_layers(model):
            out = model(input_ids=ids, use_cache=True)
    assert torch.equal(out.logits, ref) and out.past_key_values is not None


def test_a_model_without_layers_is_refused():
    import pytest

    from dpolab.errors import ConfigError

    with pytest.raises(ConfigError, match="no decoder layers found in Linear"):
        with checkpointed_layers(torch.nn.Linear(2, 2)):
            pass
