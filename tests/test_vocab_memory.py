"""Memory that grows with the vocabulary only by the weights: in a training step of every LM trainer
no (tokens × vocabulary) tensor is kept for the backward pass. Measured with autograd's
saved-tensor hooks (what a step keeps alive between its forward and backward passes), at two
vocabulary sizes, through the same log-prob paths the trainers use."""

from __future__ import annotations

import pytest
import torch

from dpolab.lm.tiny import tiny_llama

SMALL, LARGE = 256, 32768


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (parameters, which exist anyway, excluded)."""

    def __init__(self, model):
        self.params = {p.data_ptr() for p in model.parameters()}
        self.total, self.largest = 0, 0

    def pack(self, t):
        if t.data_ptr() not in self.params:
            self.total += t.numel() * t.element_size()
            self.largest = max(self.largest, t.numel())
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def _pairs(vocab):
    from dpolab.data.preference import TokenizedPair

    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(4, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(ids(6), ids(14), ids(12), i, False) for i in range(4)]


def _step_dpo(model, vocab, prefix):
    from dpolab.train.pair_layout import batch_logps, collate_pairs

    logps, _ = batch_logps(model, collate_pairs(prefix, _pairs(vocab), 0))
    return logps.sum()


def _step_sft(model, vocab):
    from dpolab.lm.logps import model_sequence_logps

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (4, 32), generator=g)
    mask = torch.ones_like(ids)
    loss_mask = mask.clone()
    loss_mask[:, :8] = 0
    return -model_sequence_logps(model, ids, mask, loss_mask)[0].sum()


def _gen(vocab):
    from dpolab.lm.generation import Generation

    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(4, vocab, (4, 6), generator=g)
    response = torch.randint(4, vocab, (4, 20), generator=g)
    return Generation(prompt, torch.ones_like(prompt, dtype=torch.bool), response,
                      torch.ones_like(response, dtype=torch.bool), torch.ones(4, dtype=torch.bool))


def _step_grpo(model, vocab):
    from dpolab.train.rollouts import response_logps

    logps, ent = response_logps(model, _gen(vocab), 0.8, with_entropy=True)
    return logps.sum()


def _step_ppo(model, vocab):
    from dpolab.lm.value_head import PolicyWithValue, ValueHead

    g = _gen(vocab)
    pv = PolicyWithValue(model, ValueHead(model.config.hidden_size))
    logps, values, _ = pv(g.input_ids, g.attention_mask, g.position_ids, prompt_length=g.prompt_length,
                          response_ids=g.response_ids, response_mask=g.response_mask, with_entropy=True)
    return logps.sum() + values.sum()


STEPS = {"dpo": lambda m, v: _step_dpo(m, v, False), "dpo-prefix-shared": lambda m, v: _step_dpo(m, v, True),
         "sft": _step_sft, "grpo-rloo-online": _step_grpo, "ppo": _step_ppo}


@pytest.mark.parametrize("name", STEPS)
def test_saved_memory_does_not_grow_with_the_vocabulary(name):
    kept = {}
    for vocab in (SMALL, LARGE):
        model = tiny_llama(vocab, hidden_size=32, layers=1, heads=2)
        with SavedBytes(model) as saved:
            loss = STEPS[name](model, vocab)
        loss.backward()
        kept[vocab] = saved
        assert all(p.grad is not None for p in model.lm_head.parameters())  # the head is trained
    scored = 4 * 26  # at most this many positions are scored in any step here
    full = scored * (LARGE - SMALL) * 4  # what one float32 (tokens x vocab) tensor would add
    grown = kept[LARGE].total - kept[SMALL].total
    assert grown < 0.05 * full, (name, grown, full)
    assert kept[LARGE].largest < scored * LARGE / 8, (name, kept[LARGE].largest)
