"""A group's prompt run once (`dpolab.lm.shared_prompt`): the completions' log-probs, entropies and
gradients equal the plain rows' (left-padded prompts, completions of different lengths, a
temperature), fewer tokens go through the model, the start-up check accepts a model that is exact
this way and names the problem of one that is not, and GRPO / RLOO train the same either way."""

from __future__ import annotations

import pytest
import torch

from dpolab.lm.generation import Generation
from dpolab.lm.shared_prompt import check_shared_prompts, prompt_groups, shared_prompt_token_logps
from dpolab.train.rollouts import response_logps


def _generation(vocab: int, G: int = 3, seed: int = 0) -> Generation:
    """Two prompts (lengths 5 and 3, left-padded to 6) with G completions each, lengths 1 to 5."""
    g = torch.Generator().manual_seed(seed)
    P, R = 6, 5
    prompts = [torch.randint(3, vocab, (5,), generator=g), torch.randint(3, vocab, (3,), generator=g)]
    ids = torch.zeros(2 * G, P, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i * G:(i + 1) * G, P - len(p):] = p
        mask[i * G:(i + 1) * G, P - len(p):] = True
    lengths = torch.tensor([5, 1, 3, 4, 2, 5][:2 * G])
    resp_mask = torch.arange(R)[None, :] < lengths[:, None]
    resp = torch.randint(3, vocab, (2 * G, R), generator=g).masked_fill(~resp_mask, 0)
    return Generation(ids, mask, resp, resp_mask, lengths < R)


def test_groups_of_rows_with_the_same_prompt(tiny_model):
    gen = _generation(tiny_model.config.vocab_size)
    first, inverse = prompt_groups(gen)
    assert len(first) == 2 and inverse.tolist() == [inverse[0]] * 3 + [inverse[3]] * 3 and inverse[0] != inverse[3]
    assert torch.equal(gen.prompt_ids[first][inverse], gen.prompt_ids)
    first, inverse = prompt_groups(gen.select([3, 0]))  # no prompt repeats
    assert len(first) == 2 and sorted(inverse.tolist()) == [0, 1]


def test_rows_without_a_repeated_prompt_give_the_same(tiny_model):
    model = tiny_model.eval()
    gen = _generation(model.config.vocab_size).select([0, 4])
    with torch.no_grad():
        torch.testing.assert_close(response_logps(model, gen, 1.0, shared=True)[0], response_logps(model, gen, 1.0)[0],
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_entropies_and_gradients_equal_the_plain_rows(tiny_model, temperature):
    model = tiny_model.eval()
    gen = _generation(model.config.vocab_size)
    params = [p for p in model.parameters()]

    def run(shared):
        lp, ent = response_logps(model, gen, temperature, with_entropy=True, shared=shared)
        weights = torch.linspace(-1, 1, lp.numel()).view_as(lp)  # a loss that weighs every token differently
        return lp, ent, torch.autograd.grad((lp * weights).sum(), params)

    lp0, ent0, g0 = run(False)
    lp1, ent1, g1 = run(True)
    assert (lp0[~gen.response_mask] == 0).all() and (lp1[~gen.response_mask] == 0).all()
    assert (lp0[gen.response_mask] < 0).all()
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=0, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fewer_tokens_run_through_the_model(tiny_model):
    model = tiny_model.eval()
    gen = _generation(model.config.vocab_size, G=3)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    with torch.no_grad():
        response_logps(model, gen, 1.0)
        plain = sum(seen)
        seen.clear()
        response_logps(model, gen, 1.0, shared=True)
    assert plain == 6 * (6 + 5) and sum(seen) == 2 * 6 + 6 * 5  # each prompt once, not three times


def test_full_logits_fallback_gives_the_same(tiny_model, monkeypatch):
    """A model whose head dpolab does not fuse (full logits, selected afterwards): the same values."""
    import dpolab.lm.logps as logps

    model = tiny_model.eval()
    gen = _generation(model.config.vocab_size)
    first = prompt_groups(gen)
    fused, _ = shared_prompt_token_logps(model, gen, first, temperature=0.7)
    monkeypatch.setattr(logps, "_PLAIN_HEAD_MODEL_TYPES", frozenset())
    full, _ = shared_prompt_token_logps(model, gen, first, temperature=0.7)
    torch.testing.assert_close(full, fused, rtol=0, atol=1e-5)


class _Forgetful(torch.nn.Module):
    """A causal LM that ignores the cache it is given: its completions lose their prompt."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False, cache=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask[:, -input_ids.shape[1]:],
                          position_ids=position_ids, use_cache=use_cache)


def test_the_check_accepts_an_exact_model_and_names_the_problem_of_another(tiny_model):
    model = tiny_model.eval()
    vocab = model.config.vocab_size
    assert check_shared_prompts(model, [[5, 6, 7], [8, 9]], vocab) is None
    problem = check_shared_prompts(_Forgetful(model), [[5, 6, 7], [8, 9]], vocab)
    assert problem is not None and "differ from the plain rows' by" in problem
    assert check_shared_prompts(model, [[]], vocab) == "no prompt with a token to check it on"
