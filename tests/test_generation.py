"""The sampling loop: per-row EOS stopping and masking, filters against hand values, the sampled
distribution, seeding (one generator, or one seed per row independent of the batch), the periodic
EOS check, the last-position-only prompt pass, and equivalence of the KV-cached loop with full
forwards and HF greedy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dpolab.errors import DpolabError
from dpolab.lm import generation
from dpolab.lm.generation import (
    Generation,
    decode_responses,
    filter_logits,
    generate,
    inverse_cdf_draw,
    left_pad,
    sample_next,
)

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


def test_the_models_generation_config_stop_ids_stop_a_row_by_default():
    """A chat model's end-of-turn token (Llama 3's <|eot_id|>) is in its generation_config, not the
    tokenizer's EOS: every sampler (generate, eval, the on-policy trainers) stops there too."""
    from types import SimpleNamespace

    lm = ScriptedLM([[5, 7, 6, 6], [4, 4, EOS, 6]])
    lm.generation_config = SimpleNamespace(eos_token_id=[EOS, 7])
    gen = generate(lm, TOK, [[1], [1]], max_new_tokens=4, temperature=0)
    assert gen.response_ids.tolist() == [[5, 7, PAD], [4, 4, EOS]] and gen.finished.tolist() == [True, True]
    lm = ScriptedLM([[5, 7, 6, 6], [4, 4, EOS, 6]])
    lm.generation_config = SimpleNamespace(eos_token_id=[EOS, 7])
    assert generate(lm, TOK, [[1], [1]], max_new_tokens=4, temperature=0, eos_token_id=EOS).response_ids[0].tolist() \
        == [5, 7, 6, 6]  # an explicit stop list is used as given


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


def test_decode_drops_a_stop_token_that_is_not_the_tokenizers_eos(tiny_tokenizer):
    """A model's generation_config may stop on other ids than the tokenizer's EOS (an ordinary
    token): a finished row ends with the token that stopped it, and its text is not the completion's."""
    ids = tiny_tokenizer("the movie").input_ids
    stop = tiny_tokenizer(" was").input_ids[-1]
    gen = Generation(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool),
                     torch.tensor([ids + [stop]]), torch.tensor([[True] * (len(ids) + 1)]), torch.tensor([True]))
    assert decode_responses(tiny_tokenizer, gen) == ["the movie"]


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


def test_sampled_log_probs_equal_a_full_forward(tiny_model, tiny_tokenizer):
    """``with_logps``: the tempered log-probs of the drawn tokens from the cached loop (left-padded
    batch, filters on) = log-softmax(logits / T) of one full forward over prompt+response at those
    tokens (no filter), 0 after EOS; the tokens themselves do not change; greedy uses T = 1."""
    from dpolab.train.rollouts import rollout_token_logps

    prompts = [tiny_tokenizer(x).input_ids for x in ("the movie", "a terrible boring film with awful", "I")]
    for kw in ({"temperature": 0.7, "top_k": 20}, {"temperature": 1.0, "top_p": 0.9}, {"temperature": 0}):
        plain = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=8, seeds=[4, 5, 6], **kw)
        gen = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=8, seeds=[4, 5, 6], with_logps=True, **kw)
        assert plain.logps is None and _equal(plain, gen)
        full = rollout_token_logps(tiny_model, gen, kw["temperature"] or 1.0, 2)[0]
        torch.testing.assert_close(gen.logps, full, rtol=0, atol=1e-5)
        assert (gen.logps[~gen.response_mask] == 0).all() and (gen.logps[gen.response_mask] < 0).all()
        assert torch.equal(gen.select([2, 0]).logps, gen.logps[[2, 0]])


def test_bad_arguments_are_user_errors():
    lm = ScriptedLM([[1]])
    with pytest.raises(DpolabError, match="no tokens"):
        generate(lm, TOK, [[]], max_new_tokens=2)
    with pytest.raises(DpolabError, match="max_new_tokens"):
        generate(lm, TOK, [[1]], max_new_tokens=0)
    with pytest.raises(DpolabError, match="no prompts"):
        left_pad([], 0)


# -- inverse-CDF draws -----------------------------------------------------------------------------
def test_inverse_cdf_draw_hand_values():
    """Weights (0, 1, 0, 3, 0): CDF (0, 1, 1, 4, 4) / 4. u in [0, 1/4) -> 1, u in [1/4, 1) -> 3;
    zero weights are never drawn, not even at u = 0 or u just below 1 (a product that rounds up).
    The same on a larger vocabulary."""
    w = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0]]).expand(6, 5)
    u = torch.tensor([0.0, 0.1, 0.25 - 1e-12, 0.25, 0.7, 1 - 2**-53], dtype=torch.float64)
    assert inverse_cdf_draw(w, u).tolist() == [1, 1, 1, 3, 3, 3]
    assert inverse_cdf_draw(torch.tensor([[5.0]]), torch.tensor([0.5], dtype=torch.float64)).tolist() == [0]
    # a larger vocabulary (blocks of 64, a partial last block): the same weights in blocks 1 and the
    # last, zeros everywhere else (whole zero blocks, zeros at both ends)
    big = torch.zeros(6, 5000)
    big[:, 70], big[:, 4990] = 1.0, 3.0
    assert inverse_cdf_draw(big, u).tolist() == [70, 70, 70, 4990, 4990, 4990]


def test_sampling_from_non_finite_logits_is_one_clear_error():
    """NaN logits (diverged weights) made softmax NaN and the block search ran off the end: an index
    RuntimeError traceback in generate, eval and a trainer's final evaluation; greedy decoding took
    the NaN's index silently."""
    from dpolab.errors import DpolabError

    logits = torch.zeros(2, 20)
    logits[1, 3] = float("nan")
    for temperature in (1.0, 0.7, 0.0):
        with pytest.raises(DpolabError, match="the model's next-token logits are not finite"):
            sample_next(logits, temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert sample_next(torch.zeros(2, 20), temperature=0.0).tolist() == [0, 0]
    logits[1, 3] = float("inf")  # an overflow: inf - inf in the softmax is NaN too
    with pytest.raises(DpolabError, match="not finite"):
        sample_next(logits, generator=torch.Generator().manual_seed(0))


def test_inverse_cdf_draw_equals_one_level_search():
    """The two-level search (blocks of ≈ √V, vocabularies not a multiple of the block, zero runs)
    picks the same index as one float64 cumulative sum over the whole row."""
    g = torch.Generator().manual_seed(0)
    for V in (3, 320, 4096, 4099, 10007, 32000):
        w = torch.softmax(3 * torch.randn(64, V, generator=g), -1)
        w[:, ::7] = 0.0
        u = torch.rand(64, generator=g, dtype=torch.float64)
        cdf = w.double().cumsum(-1)
        ref = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1)
        assert torch.equal(inverse_cdf_draw(w, u), ref), V


def test_inverse_cdf_draw_frequencies():
    """60,000 draws over 37 weights (a third of them zero): each frequency within 4.5 standard
    errors of w / Σw, and no zero-weight index drawn."""
    n, g = 60_000, torch.Generator().manual_seed(1)
    w = torch.rand(37, generator=g)
    w[::3] = 0.0
    draws = inverse_cdf_draw(w.expand(n, 37), torch.rand(n, generator=g, dtype=torch.float64))
    freq = torch.bincount(draws, minlength=37).double() / n
    p = (w / w.sum()).double()
    assert ((freq - p).abs() <= 4.5 * torch.sqrt(p * (1 - p) / n)).all()
    assert freq[::3].sum() == 0


# -- per-row seeds ----------------------------------------------------------------------------------
def _rows(gen: Generation) -> list[tuple[list[int], bool]]:
    """Each row's response tokens (up to its length) and whether it finished."""
    return [(gen.response_ids[i, :int(n)].tolist(), bool(gen.finished[i])) for i, n in enumerate(gen.response_lengths)]


def test_per_row_seeds_do_not_depend_on_the_batch(tiny_model, tiny_tokenizer):
    """The same 8 prompts (lengths 2-9 tokens) sampled in one batch of 8 and in two reordered batches
    of 4 (other neighbours, other positions, other padding widths) give each row identical tokens,
    masks and EOS flags, for several seed sets and filters; EOS = a few frequent tokens, so rows
    finish at different steps."""
    texts = ["the movie", "a terrible boring film with awful", "I hated", "what a delightful story, charming",
             "the plot was clever", "User: hello", "the worst film of the year, a total", "music"]
    prompts = [tiny_tokenizer(x).input_ids for x in texts]
    eos = list(range(3, 40))
    for base, kw in ((0, {}), (100, {"top_p": 0.9}), (7, {"top_k": 20, "temperature": 0.7})):
        seeds = [base + 11 * i for i in range(8)]
        whole = _rows(generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=10, seeds=seeds,
                               eos_token_id=eos, **kw))
        split = {}
        for part in ([5, 0, 7, 2], [3, 6, 1, 4]):
            gen = generate(tiny_model, tiny_tokenizer, [prompts[i] for i in part], max_new_tokens=10,
                           seeds=[seeds[i] for i in part], eos_token_id=eos, **kw)
            split.update(zip(part, _rows(gen)))
        assert [split[i] for i in range(8)] == whole, base
        assert len({tuple(t) for t, _ in whole}) > 1 and 0 < sum(f for _, f in whole) < 8


def test_per_row_seeds_reproduce_and_differ(tiny_model, tiny_tokenizer):
    """Same seeds -> same tokens; another seed changes the row; a row's first 4 tokens do not depend
    on max_new_tokens (its t-th token uses the t-th uniform of its own generator)."""
    prompts = [tiny_tokenizer("the movie").input_ids] * 3
    draw = lambda seeds, n=8: generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=n, seeds=seeds,  # noqa: E731
                                       eos_token_id=[]).response_ids
    a = draw([1, 2, 3])
    assert torch.equal(a, draw([1, 2, 3]))
    assert torch.equal(a[:, :4], draw([1, 2, 3], 4))
    assert len({tuple(r) for r in a.tolist()}) == 3  # one prompt, three seeds: three responses
    assert torch.equal(a[0], draw([1, 9, 9])[0]) and not torch.equal(a[1], draw([1, 9, 9])[1])


def test_seed_arguments_are_checked():
    lm = ScriptedLM([[1], [1]])
    with pytest.raises(DpolabError, match="one seed per prompt"):
        generate(lm, TOK, [[1], [1]], max_new_tokens=2, seeds=[0])
    with pytest.raises(DpolabError, match="not both"):
        generate(lm, TOK, [[1], [1]], max_new_tokens=2, seeds=[0, 1], generator=torch.Generator())
    with pytest.raises(DpolabError, match="eos_check_every"):
        generate(lm, TOK, [[1], [1]], max_new_tokens=2, eos_check_every=0)


# -- periodic EOS check ------------------------------------------------------------------------------
def test_periodic_eos_check_gives_the_same_generation():
    """Both rows end at step 1. Checked every step the loop stops there (2 forwards); checked every
    3 steps it runs one more step, whose pads are trimmed: the same ids, masks and flags."""
    script = [[5, EOS, 5, 5, 5], [EOS, 5, 5, 5, 5]]
    every, lm1 = {}, ScriptedLM(script)
    every[1] = generate(lm1, TOK, [[1], [1]], max_new_tokens=5, temperature=0, eos_check_every=1)
    lm3 = ScriptedLM(script)
    every[3] = generate(lm3, TOK, [[1], [1]], max_new_tokens=5, temperature=0, eos_check_every=3)
    assert len(lm1.calls) == 2 and len(lm3.calls) == 3
    for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "finished"):
        assert torch.equal(getattr(every[1], f), getattr(every[3], f)), f
    assert every[3].response_ids.tolist() == [[5, EOS], [EOS, PAD]]


def test_periodic_eos_check_on_a_sampled_batch(tiny_model, tiny_tokenizer):
    """Seeded sampling with frequent EOS tokens (rows end at different steps, all before 16):
    checks every 1, 3 and 8 steps (the last two run steps past the end) give equal Generations."""
    prompts = [tiny_tokenizer(x).input_ids for x in ("the movie", "a film", "I hated the ending", "what")]
    gens = [generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=16, seeds=[4, 5, 6, 7],
                     eos_token_id=list(range(3, 100)), eos_check_every=k) for k in (1, 3, 8)]
    lengths = gens[0].response_lengths.tolist()
    assert gens[0].finished.all() and len(set(lengths)) > 1 and gens[0].response_ids.shape[1] == max(lengths) < 8
    for g in gens[1:]:
        for f in ("response_ids", "response_mask", "finished"):
            assert torch.equal(getattr(gens[0], f), getattr(g, f)), f


# -- last-position-only prompt pass, preallocated KV cache -------------------------------------------
def _fields(gen: Generation) -> tuple[torch.Tensor, ...]:
    return gen.prompt_ids, gen.prompt_mask, gen.response_ids, gen.response_mask, gen.finished


def _equal(a: Generation, b: Generation) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_fields(a), _fields(b)))


def _greedy_and_sampled(model, tokenizer, prompts):
    return [generate(model, tokenizer, prompts, max_new_tokens=6, temperature=0),
            generate(model, tokenizer, prompts, max_new_tokens=6, seeds=[1, 2, 3], top_p=0.95),
            generate(model, tokenizer, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(0))]


PROMPTS = ("the movie", "a terrible boring film with awful", "I")


def test_prompt_pass_on_the_last_position_equals_full_logits(tiny_model, tiny_tokenizer, monkeypatch):
    """The HF model takes ``logits_to_keep``: the prompt pass gets ``logits_to_keep=1`` and returns
    (B, 1, V) logits (the decode steps get none). Greedy, per-row-seeded and generator-seeded
    tokens equal those of the full (B, P, V) path, and the kept logits equal the full ones."""
    prompts = [tiny_tokenizer(x).input_ids for x in PROMPTS]
    seen = []
    hook = tiny_model.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((kwargs.get("logits_to_keep"), tuple(out.logits.shape))),
        with_kwargs=True)
    fast = _greedy_and_sampled(tiny_model, tiny_tokenizer, prompts)
    P, V = fast[0].prompt_length, tiny_model.config.vocab_size
    monkeypatch.setattr(generation, "_prefill_kwargs", lambda model: {})
    seen_full = len(seen)
    full = _greedy_and_sampled(tiny_model, tiny_tokenizer, prompts)
    hook.remove()
    assert seen[0] == (1, (3, 1, V)) and seen[1][0] is None
    assert seen[seen_full] == (None, (3, P, V))
    assert all(_equal(a, b) for a, b in zip(fast, full))
    ids, mask = left_pad(prompts, tiny_tokenizer.pad_token_id)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        last = tiny_model(input_ids=ids, attention_mask=mask.long(), position_ids=pos, logits_to_keep=1).logits
        every = tiny_model(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
    torch.testing.assert_close(last[:, 0], every[:, -1], rtol=0, atol=1e-5)


def test_preallocated_kv_cache_equals_the_growing_cache(tiny_model, tiny_tokenizer, monkeypatch):
    """The HF model gets a cache whose layers write into buffers of P + max_new_tokens positions;
    the tokens are those of transformers' own growing (concatenating) cache, greedy and sampled."""
    prompts = [tiny_tokenizer(x).input_ids for x in PROMPTS]
    layers = []
    hook = tiny_model.register_forward_hook(lambda m, args, kwargs, out: layers.append(type(out.cache.layers[0])),
                                            with_kwargs=True)
    fast = _greedy_and_sampled(tiny_model, tiny_tokenizer, prompts)
    monkeypatch.setattr(generation, "_preallocated_cache_kwargs", lambda model, capacity: {})
    n_fast = len(layers)
    grown = _greedy_and_sampled(tiny_model, tiny_tokenizer, prompts)
    hook.remove()
    assert {c.__name__ for c in layers[:n_fast]} == {"PreallocatedLayer"}
    assert {c.__name__ for c in layers[n_fast:]} == {"DynamicLayer"}
    assert all(_equal(a, b) for a, b in zip(fast, grown))


def test_preallocated_cache_is_used_only_where_exact(tiny_model):
    """Not for a model without a transformers config, nor for sliding-window or mixed layers."""
    assert generation._preallocated_cache_kwargs(ScriptedLM([[1]]), 8) == {}
    assert len(set(generation._preallocated_cache_kwargs(tiny_model, 8)) & {"cache", "past_key_values"}) == 1
    tiny_model.config.layer_types = ["full_attention", "sliding_attention"]
    assert generation._preallocated_cache_kwargs(tiny_model, 8) == {}


def _float64_lm(arch: str):
    import transformers

    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)
        return transformers.GPT2LMHeadModel(config).double().eval()
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)
    return transformers.LlamaForCausalLM(config).double().eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_repeated_prompts_prefill_once_through_the_models_own_forward(arch, monkeypatch):
    """Without the direct decoder (GPT-2; Llama with fast=False) a prompt given to several rows (a
    group's samples, own seeds) is prefilled once into the preallocated cache, which is then copied
    out to its rows: the same tokens and log-probs (float64, 1e-10) as a prefill of every row."""
    model = _float64_lm(arch)
    prompts = [p for p in [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]] for _ in range(3)]
    seeds = list(range(10, 10 + len(prompts)))
    prefill_rows: list[int] = []
    model.register_forward_pre_hook(lambda m, args, kw: prefill_rows.append(kw["input_ids"].shape), with_kwargs=True)
    grouped = generate(model, TOK, prompts, max_new_tokens=8, with_logps=True, seeds=seeds, eos_token_id=[],
                       fast=False)
    B = len(prompts)
    monkeypatch.setattr(generation, "distinct_rows", lambda ids, mask: (torch.arange(B), torch.arange(B)))
    each = generate(model, TOK, prompts, max_new_tokens=8, with_logps=True, seeds=seeds, eos_token_id=[], fast=False)
    assert prefill_rows[0] == (4, 6) and prefill_rows[8] == (B, 6)  # 8 calls each: a prefill, 7 steps
    assert all(s == (B, 1) for s in prefill_rows[1:8] + prefill_rows[9:])
    assert torch.equal(grouped.response_ids, each.response_ids)
    torch.testing.assert_close(grouped.logps, each.logps, rtol=0, atol=1e-10)
    assert len({tuple(r) for r in grouped.response_ids[:3].tolist()}) > 1  # the rows of a group drew apart
