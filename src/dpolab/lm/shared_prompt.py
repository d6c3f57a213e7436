"""Log-probs of a group's completions with their prompt run once.

GRPO and RLOO score ``G`` completions of every prompt. The plain pass runs each row
``[prompt | completion]`` in full, so every prompt token goes through the model ``G`` times. Here the
distinct prompts of a batch run once, with their key/value cache kept (and gradients through it);
the cache is indexed out to the rows (``index_select``, whose backward sums the ``G`` rows'
gradients into their prompt), and the completions run on it in a second forward pass. Each
completion token attends to the same keys and values at the same positions as in its plain row, so
the log-probs are equal up to the kernels' rounding (``tests/test_shared_prompt.py``).

The first completion token is predicted by the prompt's last position (the prompt pass), every
other one by the completion position before it (the completion pass); only those positions reach
the output head, as in :func:`dpolab.lm.logps.model_token_logps`.

Saving: ``(G − 1)·P`` of every ``G·(P + R)`` tokens of a group (prompt ``P``, completion ``R``
tokens), in the training pass and in the no-gradient passes of the old and reference log-probs.
Every call makes two forward calls, whatever the rows (a DDP-wrapped model must be called alike on
every process). Needs a model whose forward takes a key/value cache with gradients (every transformers causal LM
with a dynamic cache); a layer checkpointed in the backward pass would write its cache twice, so it
is not used with activation checkpointing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpolab.lm.generation import Generation, distinct_rows, next_cache_kwargs
from dpolab.lm.logps import ResponseRows, model_token_logps


def prompt_groups(gen) -> tuple[Tensor, Tensor]:
    """``(first (U,), inverse (B,))`` for the distinct prompts (ids and mask) of a Generation's rows:
    ``first[u]``, a row holding prompt ``u``; ``inverse[b]``, the prompt of row ``b``."""
    return distinct_rows(gen.prompt_ids, gen.prompt_mask)


def shared_prompt_token_logps(model: torch.nn.Module, gen, groups: tuple[Tensor, Tensor], *,
                              temperature: float = 1.0, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(log π(y_t | x, y_<t) (B, R), entropies (B, R) or None)`` of a Generation's responses, 0
    after EOS, with the distinct prompts run once (``groups`` from :func:`prompt_groups`); the
    values :func:`dpolab.train.rollouts.response_logps` gives with the plain rows."""
    first, inverse = groups
    P, R = gen.prompt_length, gen.response_ids.shape[1]
    positions = gen.position_ids
    # 1. the distinct prompts; their last position predicts the first response token
    p_ids, p_mask = gen.prompt_ids[first], gen.prompt_mask[first].long()
    rows_p = ResponseRows(model, lambda h: h[:, -1] if h.shape[:2] == p_ids.shape else None)
    with rows_p:
        out_p = model(input_ids=p_ids, attention_mask=p_mask, position_ids=positions[first, :P], use_cache=True)
    cache_kw = next_cache_kwargs(out_p)  # {"cache" | "past_key_values": the prompts' cache}
    next(iter(cache_kw.values())).reorder_cache(inverse)  # (U, ...) -> (B, ...) per layer; differentiable
    # 2. the completions on their prompt's cache; position t predicts response token t + 1
    pred = torch.zeros_like(gen.response_mask)
    pred[:, :-1] = gen.response_mask[:, 1:]
    rows_r = ResponseRows(model, lambda h: h[pred] if h.shape[:2] == pred.shape else None)
    with rows_r:
        out_r = model(input_ids=gen.response_ids, attention_mask=gen.attention_mask, position_ids=positions[:, P:],
                      use_cache=True, **cache_kw)
    first_tok = gen.response_mask[:, 0]
    labels0, labels1 = gen.response_ids[first_tok, 0], gen.response_ids[:, 1:][pred[:, :-1]]
    if all(r.fused and r.selected for r in (rows_p, rows_r)):
        # one fused head call over both passes' hidden rows (its weight gradient is formed once)
        n0 = int(labels0.shape[0])
        hidden = torch.cat([_output(out_p)[inverse[first_tok]], _output(out_r)])
        lp, ent, _ = rows_r.token_logps(hidden, torch.cat([labels0, labels1]), temperature=temperature,
                                        with_entropy=with_entropy)
        lp0, lp1 = lp[:n0], lp[n0:]
        ent0, ent1 = (ent[:n0], ent[n0:]) if with_entropy else (None, None)
    else:
        lp0, ent0 = _rows_logps(rows_p, out_p, lambda lg: lg[:, -1], inverse[first_tok], labels0, temperature,
                                with_entropy)
        lp1, ent1 = _rows_logps(rows_r, out_r, lambda lg: lg[pred], None, labels1, temperature, with_entropy)
    logps = _scatter(first_tok, pred, lp0, lp1, R)
    return logps, (_scatter(first_tok, pred, ent0.detach(), ent1.detach(), R) if with_entropy else None)


def _output(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _rows_logps(rows_of: ResponseRows, out, select_logits, take, labels, temperature, with_entropy):
    """Token log-probs (and entropies) of the selected positions of one pass; ``take`` indexes the
    selected rows again (the prompt rows out to their completions)."""
    logits = _output(out)
    if logits.ndim == 3 and not (rows_of.fused and rows_of.selected):
        logits = select_logits(logits)  # full-logits fallback
    if take is not None:
        logits = logits[take]
    lp, ent, _ = rows_of.token_logps(logits, labels, temperature=temperature, with_entropy=with_entropy)
    return lp, ent


def _scatter(first_tok: Tensor, pred: Tensor, col0: Tensor, rest: Tensor, R: int) -> Tensor:
    """``(B, R)`` from the first tokens' values (where ``first_tok``) and the others' (where ``pred``
    marks their predictor), 0 elsewhere."""
    B = first_tok.shape[0]
    head = torch.zeros(B, dtype=col0.dtype, device=col0.device).masked_scatter(first_tok, col0)
    tail = torch.zeros(B, R - 1, dtype=rest.dtype, device=rest.device).masked_scatter(pred[:, :-1], rest)
    return torch.cat([head[:, None], tail], dim=1)


@torch.no_grad()
def check_shared_prompts(model: torch.nn.Module, prompts: list[list[int]], vocab_size: int, *,
                         device: torch.device | str = "cpu") -> str | None:
    """Whether :func:`shared_prompt_token_logps` is exact for ``model``: None if so, else the reason.

    Without gradients, in the model's current mode, on two of ``prompts`` (token ids) with two
    completions each of seeded random tokens, one of them shorter and one prompt left-padded (its
    rows start with pads): the per-token log-probs of the shared pass against the plain rows, within
    1e-4 per token for float32 weights, 5e-2 for 16-bit ones."""
    prompts = [p for p in prompts if p][:2]
    if not prompts:
        return "no prompt with a token to check it on"
    P, R = max(len(p) for p in prompts) + 1, 4
    gen_ids = torch.Generator().manual_seed(0)
    ids = torch.zeros(2 * len(prompts), P, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[2 * i:2 * i + 2, P - len(p):] = torch.tensor(p)
        mask[2 * i:2 * i + 2, P - len(p):] = True
    resp = torch.randint(0, vocab_size, (ids.shape[0], R), generator=gen_ids)
    resp_mask = torch.ones_like(resp, dtype=torch.bool)
    resp_mask[1, R // 2:] = False
    gen = Generation(ids, mask, resp.masked_fill(~resp_mask, 0), resp_mask,
                     torch.ones(ids.shape[0], dtype=torch.bool)).to(device)
    loss_mask = torch.cat([torch.zeros_like(gen.prompt_mask), gen.response_mask], dim=1)
    try:
        plain, _ = model_token_logps(model, gen.input_ids, gen.attention_mask, loss_mask, gen.position_ids)
        shared, _ = shared_prompt_token_logps(model, gen, prompt_groups(gen))
    except Exception as e:  # a model whose forward takes no cache this way
        return f"its forward failed with a shared prompt cache ({type(e).__name__}: {e})"
    dtype = next(model.parameters()).dtype
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    err = float((plain[:, P:] - shared).abs().max())
    if not err <= tol:
        return f"the shared-prompt log-probs differ from the plain rows' by {err:.2e} per token (tolerance {tol:g})"
    return None
