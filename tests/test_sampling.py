"""The sampler interface: the in-process sampler equals ``generate`` (greedy and seeded), sees an
optimizer update without copying, satisfies the protocol; per-row seeds are deterministic and
distinct."""

from __future__ import annotations

import torch

from dpolab.lm.generation import generate
from dpolab.lm.sampling import LocalSampler, Sampler, row_seeds

FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "finished")


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def test_local_sampler_equals_generate(tiny_model, tiny_tokenizer):
    prompts = [tiny_tokenizer(x).input_ids for x in ("the movie", "a terrible boring film", "I")]
    sampler = LocalSampler(tiny_model, tiny_tokenizer)
    assert isinstance(sampler, Sampler)
    for kw in ({"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 0.8, "top_k": 30, "top_p": 0.9}):
        got = sampler.sample(prompts, max_new_tokens=7, seeds=[3, 1, 4], **kw)
        want = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=7, seeds=[3, 1, 4], **kw)
        assert _same(got, want), kw
    eos = list(range(3, 100))  # an explicit stop list is passed through
    got = LocalSampler(tiny_model, tiny_tokenizer, eos_token_id=eos).sample(prompts, max_new_tokens=9, seeds=[5, 6, 7])
    assert _same(got, generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=9, seeds=[5, 6, 7], eos_token_id=eos))


def test_local_sampler_sees_updates_without_copying(tiny_model, tiny_tokenizer):
    """An in-place weight change (what an optimizer step does) changes the next sample; sync_weights
    with the same module keeps it, with another module samples from that one."""
    prompts = [tiny_tokenizer("the movie").input_ids]
    sampler = LocalSampler(tiny_model, tiny_tokenizer)
    before = sampler.sample(prompts, max_new_tokens=6, temperature=0, seeds=[0]).response_ids
    with torch.no_grad():
        tiny_model.lm_head.weight.zero_()  # all logits 0: greedy picks token 0 at every step
    sampler.sync_weights(tiny_model)
    assert sampler.model is tiny_model
    after = sampler.sample(prompts, max_new_tokens=6, temperature=0, seeds=[0]).response_ids
    assert not torch.equal(before, after) and after.tolist() == [[0] * 6]

    from dpolab.lm.tiny import tiny_llama

    other = tiny_llama(len(tiny_tokenizer), hidden_size=32, layers=2, heads=4, seed=3, tokenizer=tiny_tokenizer)
    sampler.sync_weights(other)
    got = sampler.sample(prompts, max_new_tokens=6, temperature=0, seeds=[0])
    assert _same(got, generate(other, tiny_tokenizer, prompts, max_new_tokens=6, temperature=0))


def test_row_seeds_are_deterministic_distinct_and_in_range():
    a = row_seeds(7, range(1000))
    assert a == row_seeds(7, list(range(1000)))
    assert len(set(a)) == 1000 and all(0 <= s < 2**63 for s in a)
    assert row_seeds(7, [3, 5]) == [a[3], a[5]]  # a row's seed depends on its index, not on its batch
    assert not set(row_seeds(8, range(1000))) & set(a)
