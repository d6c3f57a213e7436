"""The sampling loop: per-row EOS stopping and masking, filters against hand values, the sampled
distribution, seeding, and equivalence of the KV-cached loop with full forwards and HF greedy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dpolab.errors import DpolabError
from dpolab.lm.generation import Generation, decode_responses, filter_logits, generate, left_pad, sample_next

EOS, PAD, V = 2, 0, 8


class ScriptedLM(nn.Module):
    """Emits ``script[b][k]`` as the overwhelmingly likely token at generation step k of row b
    (logit 50 vs 0), and records the shapes it was called with (to check the KV-cache protocol)."""

    def __init__(self, script: list[list[int]]):
        super().__init__()
        self.script = script
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, past_key_values=None, **kw):
        k = len(self.calls)
        self.calls.append((tuple(input_ids.shape), tuple(attention_mask.shape), past_key_values))
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], V)
        for b, row in enumerate(self.script):
            logits[b, -1, row[min(k, len(row) - 1)]] = 50.0
        return SimpleNamespace(logits=logits, past_key_values=("cache", k))


TOK = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)


def test_stops_each_row_at_eos_and_masks_what_follows():
    """Row 0 ends at step 1, row 1 at step 3, row 2 never (truncated at max_new_tokens = 5). After
    EOS a row gets pads and mask False; EOS itself is inside the mask."""
    lm = ScriptedLM([[5, EOS, 6, 6, 6], [4, 4, 4, EOS, 7], [3, 3, 3, 3, 3]])
    gen = generate(lm, TOK, [[1, 7], [7], [1, 1, 1]], max_new_tokens=5, temperature=0)
    assert gen.response_ids.tolist() == [[5, EOS, PAD, PAD, PAD], [4, 4, 4, EOS, PAD], [3, 3, 3, 3, 3]]
    assert gen.response_mask.tolist() == [[True, True, False, False, False], [True] * 4 + [False], [True] * 5]
    assert gen.finished.tolist() == [True, True, False]
    assert gen.response_lengths.tolist() == [2, 4, 5]
    # left-padded prompts, and the KV-cache protocol: the whole prompt once, then one token per step
    assert gen.prompt_ids.tolist() == [[PAD, 1, 7], [PAD, PAD, 7], [1, 1, 1]]
    assert [c[0] for c in lm.calls] == [(3, 3)] + [(3, 1)] * 4
    assert [c[1] for c in lm.calls] == [(3, 3), (3, 4), (3, 5), (3, 6), (3, 7)]
    assert lm.calls[0][2] is None and lm.calls[1][2] == ("cache", 0)
    # attention mask of the whole sequence: prompt tokens and response up to EOS
    assert gen.attention_mask[0].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]
    assert gen.position_ids[0].tolist() == [0, 0, 1, 2, 3, 3, 3, 3]


def test_loop_ends_when_every_row_has_finished():
    lm = ScriptedLM([[5, EOS, 5], [EOS, 5, 5]])
    gen = generate(lm, TOK, [[1], [1]], max_new_tokens=10, temperature=0)
    assert len(lm.calls) == 2 and gen.response_ids.shape == (2, 2)
    assert gen.response_mask.tolist() == [[True, True], [True, False]]
    assert gen.finished.all()


def test_decode_drops_eos_and_padding(tiny_tokenizer):
    ids = tiny_tokenizer("the movie").input_ids
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    R = len(ids) + 2
    gen = Generation(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool),
                     torch.tensor([ids + [eos, pad], ids + [ids[0], ids[0]]]),
                     torch.tensor([[True] * (len(ids) + 1) + [False], [True] * R]), torch.tensor([True, False]))
    texts = decode_responses(tiny_tokenizer, gen)
    assert texts[0] == "the movie"
    assert texts[1].startswith("the movie") and len(texts[1]) > len("the movie")


def test_filter_logits_hand_values():
    """p = (0.5, 0.3, 0.15, 0.05). Mass of strictly more likely tokens: (0, 0.5, 0.8, 0.95).
    top_p = 0.7 keeps tokens whose preceding mass < 0.7: {0, 1}; top_p = 0.81 keeps {0, 1, 2};
    top_k = 3 drops the last; top_p = 0.01 keeps only the most likely."""
    p = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # shuffled order
    logits = p.log()
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_p=0.7)) == [1, 3]
    assert kept(filter_logits(logits, top_p=0.81)) == [0, 1, 3]
    assert kept(filter_logits(logits, top_k=3)) == [0, 1, 3]
    assert kept(filter_logits(logits, top_p=0.01)) == [1]
    assert kept(filter_logits(logits, top_k=2, top_p=0.99)) == [1, 3]
    renorm = torch.softmax(filter_logits(logits, top_p=0.7), -1)
    torch.testing.assert_close(renorm, torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    with pytest.raises(DpolabError):
        filter_logits(logits, top_p=0.0)


def test_sample_next_matches_tempered_distribution():
    """20,000 draws from logits (0, 1, 2) at temperature 2: p ∝ exp(z/2) = (1, e^0.5, e) / Σ.
    Each frequency is within 4.5 standard errors (√(p(1−p)/n) ≤ 0.0036)."""
    n = 20_000
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(n, 3)
    draws = sample_next(logits, temperature=2.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).double() / n
    z = torch.tensor([1.0, math.exp(0.5), math.e], dtype=torch.float64)
    p = z / z.sum()
    assert ((freq - p).abs() < 4.5 * torch.sqrt(p * (1 - p) / n)).all(), (freq, p)
    greedy = sample_next(torch.tensor([[0.0, 3.0, 1.0]]), temperature=0)
    assert greedy.tolist() == [1]


def test_seeded_sampling_is_reproducible(tiny_model, tiny_tokenizer):
    prompts = [tiny_tokenizer("the movie").input_ids, tiny_tokenizer("a film").input_ids]
    draw = lambda seed: generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=6,  # noqa: E731
                                 generator=torch.Generator().manual_seed(seed))
    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_kv_cache_loop_equals_full_forward_and_hf_greedy(tiny_model, tiny_tokenizer):
    """Greedy tokens from the cached loop on a left-padded batch = argmax of one full forward over
    prompt+response = HF ``generate`` run on each prompt alone (no padding)."""
    texts = ["the movie", "a terrible boring film with awful"]
    prompts = [tiny_tokenizer(x).input_ids for x in texts]
    gen = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=6, temperature=0)
    with torch.no_grad():
        logits = tiny_model(input_ids=gen.input_ids, attention_mask=gen.attention_mask,
                            position_ids=gen.position_ids).logits
    P = gen.prompt_length
    assert torch.equal(logits[:, P - 1:-1].argmax(-1)[gen.response_mask], gen.response_ids[gen.response_mask])
    for i, p in enumerate(prompts):
        ref = tiny_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  max_new_tokens=6, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
        n = int(gen.response_lengths[i])
        assert ref[0, len(p):len(p) + n].tolist() == gen.response_ids[i, :n].tolist()


def test_bad_arguments_are_user_errors():
    lm = ScriptedLM([[1]])
    with pytest.raises(DpolabError, match="no tokens"):
        generate(lm, TOK, [[]], max_new_tokens=2)
    with pytest.raises(DpolabError, match="max_new_tokens"):
        generate(lm, TOK, [[1]], max_new_tokens=0)
    with pytest.raises(DpolabError, match="no prompts"):
        left_pad([], 0)
