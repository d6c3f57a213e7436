"""The preference collator: exact tensors for hand-built pairs, the BPE boundary, an over-long row,
an empty response, padding options."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpolab.data import (
    PreferenceExample,
    TokenizedPair,
    collate_preference,
    pad_token_id_for,
    tokenize_preference,
)
from dpolab.errors import ConfigError

EOS = 2


def pairs_by_hand() -> list[TokenizedPair]:
    return [TokenizedPair([5, 6], [7, EOS], [8, 9, EOS], index=10, truncated=False),
            TokenizedPair([11], [12, 13, 14, EOS], [EOS], index=3, truncated=False)]  # empty rejected


def test_exact_tensors_for_hand_built_pairs():
    batch = collate_preference(pairs_by_hand(), pad_token_id=0)
    # Rows: chosen 0 = [5,6 | 7,2], chosen 1 = [11 | 12,13,14,2], rejected 0 = [5,6 | 8,9,2],
    # rejected 1 = [11 | 2]; T = 5; "|" is the prompt/response boundary.
    assert torch.equal(batch.input_ids, torch.tensor([[5, 6, 7, 2, 0], [11, 12, 13, 14, 2],
                                                      [5, 6, 8, 9, 2], [11, 2, 0, 0, 0]]))
    assert torch.equal(batch.attention_mask, torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1],
                                                           [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]))
    assert torch.equal(batch.loss_mask, torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1],
                                                      [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool))
    assert torch.equal(batch.position_ids, torch.tensor([[0, 1, 2, 3, 0], [0, 1, 2, 3, 4],
                                                         [0, 1, 2, 3, 4], [0, 1, 0, 0, 0]]))
    assert torch.equal(batch.index, torch.tensor([10, 3]))
    assert batch.batch_size == 2
    assert (batch.input_ids.dtype, batch.attention_mask.dtype, batch.position_ids.dtype,
            batch.index.dtype, batch.loss_mask.dtype) == (torch.long,) * 4 + (torch.bool,)


def test_pad_to_multiple_and_pad_equal_to_eos():
    batch = collate_preference(pairs_by_hand(), pad_token_id=EOS, pad_to_multiple_of=4)
    assert batch.input_ids.shape == (4, 8)
    # Pads carry the EOS id, yet the masks come from lengths: the same as with pad id 0.
    assert torch.equal(batch.input_ids[3], torch.tensor([11, EOS, EOS, EOS, EOS, EOS, EOS, EOS]))
    reference = collate_preference(pairs_by_hand(), pad_token_id=0)
    assert torch.equal(batch.loss_mask[:, :5], reference.loss_mask) and not batch.loss_mask[:, 5:].any()
    assert torch.equal(batch.attention_mask[:, :5], reference.attention_mask)
    assert not batch.attention_mask[:, 5:].any() and not batch.position_ids[:, 5:].any()


def test_to_device_and_errors():
    batch = collate_preference(pairs_by_hand(), pad_token_id=0)
    moved = batch.to("cpu")
    assert moved.batch_size == 2 and torch.equal(moved.loss_mask, batch.loss_mask)
    with pytest.raises(ValueError, match="at least one pair"):
        collate_preference([], pad_token_id=0)


def test_pad_token_id_for():
    assert pad_token_id_for(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0
    assert pad_token_id_for(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    with pytest.raises(ConfigError):
        pad_token_id_for(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _example(prompt, chosen, rejected):
    return PreferenceExample(prompt, chosen, rejected, "d.jsonl", 1)


def test_bpe_boundary_uses_separately_tokenized_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, response = "the plot was clev", "er"
    # Precondition: tokenized jointly, "clev"+"er" merge into different tokens at the boundary.
    assert _enc(tok, prompt + response) != _enc(tok, prompt) + _enc(tok, response)
    pair = tokenize_preference(_example(prompt, response, " and"), tok, max_length=64, max_prompt_length=32)
    batch = collate_preference([pair], pad_token_id=tok.pad_token_id)
    expected = _enc(tok, prompt) + _enc(tok, response) + [tok.eos_token_id]
    n_prompt = len(_enc(tok, prompt))
    assert batch.input_ids[0, :len(expected)].tolist() == expected
    assert batch.loss_mask[0].tolist() == [False] * n_prompt + [True] * (len(expected) - n_prompt) + \
        [False] * (batch.input_ids.shape[1] - len(expected))
    assert tok.decode(expected) == prompt + response + tok.eos_token


def test_over_long_row(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = "the movie was great fun and I loved every minute"
    response = " the plot was clever and the music was wonderful"
    p, r = _enc(tok, prompt), _enc(tok, response) + [tok.eos_token_id]
    assert len(p) > 8 and len(r) > 8  # so both get cut
    pair = tokenize_preference(_example(prompt, response, " no"), tok, max_length=16, max_prompt_length=8)
    assert pair.truncated and pair.prompt_ids == p[-8:] and pair.chosen_ids == r[:8]
    assert pair.rejected_ids == _enc(tok, " no") + [tok.eos_token_id]
    batch = collate_preference([pair], pad_token_id=tok.pad_token_id)
    assert batch.input_ids.shape[1] == 16
    assert batch.input_ids[0].tolist() == p[-8:] + r[:8]
    assert batch.loss_mask[0].tolist() == [False] * 8 + [True] * 8
    n_rej = len(pair.rejected_ids)
    assert batch.loss_mask[1].tolist() == [False] * 8 + [True] * n_rej + [False] * (8 - n_rej)


def test_empty_response_is_a_single_eos_label(tiny_tokenizer):
    tok = tiny_tokenizer
    pair = tokenize_preference(_example("the movie", "", " was great"), tok, max_length=64, max_prompt_length=32)
    assert pair.chosen_ids == [tok.eos_token_id]
    batch = collate_preference([pair], pad_token_id=tok.pad_token_id)
    n = len(_enc(tok, "the movie"))
    assert batch.loss_mask[0].nonzero().flatten().tolist() == [n]
    assert batch.input_ids[0, n].item() == tok.eos_token_id
    assert not batch.loss_mask[:, 0].any()  # the first token is never a label (next-token shift)


_ids = st.lists(st.integers(3, 50), max_size=6)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(3, 50), min_size=1, max_size=6),
                          _ids.map(lambda x: x + [EOS]), _ids.map(lambda x: x + [EOS])),
                min_size=1, max_size=4))
def test_rows_match_their_pairs_elementwise(raw):
    """Every cell of every tensor, checked one by one against the pair it came from."""
    pairs = [TokenizedPair(p, c, r, index=i, truncated=False) for i, (p, c, r) in enumerate(raw)]
    batch = collate_preference(pairs, pad_token_id=0)
    B = len(pairs)
    for row in range(2 * B):
        pair = pairs[row % B]
        seq = pair.prompt_ids + (pair.chosen_ids if row < B else pair.rejected_ids)
        for t in range(batch.input_ids.shape[1]):
            real = t < len(seq)
            assert batch.input_ids[row, t].item() == (seq[t] if real else 0)
            assert batch.attention_mask[row, t].item() == int(real)
            assert batch.position_ids[row, t].item() == (t if real else 0)
            assert batch.loss_mask[row, t].item() == (len(pair.prompt_ids) <= t < len(seq))
    assert batch.input_ids.shape[1] == max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
                                           for p in pairs)
