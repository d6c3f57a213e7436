"""Prefix-shared forward ([prompt | chosen | rejected], one row per pair) equals the plain forward."""

from __future__ import annotations

import pytest
import torch

from dpolab.data import collate_preference
from dpolab.data.collate import collate_prefix_shared
from dpolab.data.preference import TokenizedPair
from dpolab.lm.logps import model_sequence_logps
from dpolab.lm.prefix import (
    CHOSEN,
    PAD,
    PROMPT,
    REJECTED,
    prefix_shared_logps,
    shared_mask,
)


def _pairs(vocab: int, seed: int = 0, n: int = 5) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(4, vocab, (k,), generator=g).tolist()

    # varied lengths, including a 1-token prompt and a 1-token response
    pairs = [TokenizedPair(ids(1, 9), ids(1, 12), ids(1, 12), i, False) for i in range(n)]
    pairs[0] = TokenizedPair(pairs[0].prompt_ids[:1], pairs[0].chosen_ids, [7], 0, False)
    return pairs


def test_mask_by_hand():
    # one row: prompt [a b], chosen [c], rejected [d e], one pad
    seg = torch.tensor([[PROMPT, PROMPT, CHOSEN, REJECTED, REJECTED, PAD]])
    m = shared_mask(seg)[0, 0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],   # a
        [1, 1, 0, 0, 0, 0],   # b
        [1, 1, 1, 0, 0, 0],   # c: prompt + itself
        [1, 1, 0, 1, 0, 0],   # d: prompt, NOT c
        [1, 1, 0, 1, 1, 0],   # e: prompt, d, itself
        [0, 0, 0, 0, 0, 1],   # pad: itself only
    ])
    assert torch.equal(m, expected)


def test_collate_positions_and_predictors():
    p = TokenizedPair([10, 11], [20, 21], [30, 31, 32], 3, False)
    b = collate_prefix_shared([p], pad_token_id=0)
    assert b.input_ids.tolist() == [[10, 11, 20, 21, 30, 31, 32]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    # chosen 20 <- pos 1, 21 <- pos 2; rejected 30 <- pos 1 (last prompt), 31 <- pos 4, 32 <- pos 5
    assert b.pred_col.tolist() == [1, 2, 1, 4, 5]
    assert b.labels.tolist() == [20, 21, 30, 31, 32]
    assert b.target.tolist() == [0, 0, 1, 1, 1]
    assert b.index.tolist() == [3] and b.num_tokens == 7


def test_empty_prompt_rejected():
    with pytest.raises(ValueError, match="empty prompt"):
        collate_prefix_shared([TokenizedPair([], [1], [2], 0, False)], pad_token_id=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_equals_plain_forward_values_and_gradients(tiny_tokenizer, attn):
    from dpolab.lm.tiny import tiny_llama

    model = tiny_llama(len(tiny_tokenizer), hidden_size=32, layers=2, heads=4, tokenizer=tiny_tokenizer)
    model.config._attn_implementation = attn
    pairs = _pairs(len(tiny_tokenizer))
    plain = collate_preference(pairs, tiny_tokenizer.pad_token_id)
    ref, ref_counts = model_sequence_logps(model, plain.input_ids, plain.attention_mask, plain.loss_mask,
                                           plain.position_ids)
    w = torch.linspace(-1, 1, ref.shape[0])
    (g_ref,) = torch.autograd.grad((ref * w).sum(), model.model.embed_tokens.weight)
    shared = collate_prefix_shared(pairs, tiny_tokenizer.pad_token_id, pad_to_multiple_of=8)
    ours, counts = prefix_shared_logps(model, shared)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), model.model.embed_tokens.weight)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-5)
    # and the shared row is shorter than the two plain rows together
    assert shared.num_tokens < int(plain.attention_mask.sum())


def test_full_logits_fallback_matches(tiny_tokenizer, monkeypatch):
    from dpolab.lm import prefix
    from dpolab.lm.tiny import tiny_llama

    model = tiny_llama(len(tiny_tokenizer), hidden_size=32, layers=1, heads=4, tokenizer=tiny_tokenizer)
    pairs = _pairs(len(tiny_tokenizer), seed=3, n=3)
    shared = collate_prefix_shared(pairs, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        fast, _ = prefix_shared_logps(model, shared)
        monkeypatch.setattr(prefix, "plain_output_head", lambda m: None)
        full, _ = prefix_shared_logps(model, shared)
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)


def test_check_passes_on_a_llama_and_names_what_breaks(tiny_model):
    """check_prefix_sharing: None for a model that honours 4D masks and position ids; a reason for
    one whose attention ignores the mask (rejected tokens would see chosen ones), and for one that
    ignores explicit positions."""
    from dpolab.train.pair_layout import check_prefix_sharing

    pairs = _pairs(tiny_model.config.vocab_size)
    vocab = tiny_model.config.vocab_size
    assert check_prefix_sharing(tiny_model, pairs, 0, vocab) is None
    with torch.no_grad():  # sharpen the random model: attention far from uniform, confident logits
        for name, p in tiny_model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "lm_head")):
                p.mul_(30)
    assert check_prefix_sharing(tiny_model, pairs, 0, vocab) is None

    class NoMask(torch.nn.Module):  # plain causal attention over the row, whatever it is given
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
            return self.inner(input_ids=input_ids, **kw)

    class NoPositions(NoMask):
        def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)

    assert "rejected tokens see the chosen ones" in check_prefix_sharing(NoMask(tiny_model), pairs, 0, vocab)
    assert "differ from the plain batch" in check_prefix_sharing(NoPositions(tiny_model), pairs, 0, vocab)
