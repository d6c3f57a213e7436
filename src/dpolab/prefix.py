"""Prefix sharing: one forward pass per preference pair, the prompt computed once.

The plain DPO batch (``dpolab.data.collate``) runs ``prompt + chosen`` and ``prompt + rejected`` as two
rows, so every prompt token goes through the model twice. Here each pair becomes ONE row::

    [ prompt (P) | chosen (C) | rejected (R) | pad ]
    positions:  0..P-1 | P..P+C-1 | P..P+R-1 | 0

with a 4D attention mask (True = may attend) that keeps the two branches apart: a prompt or chosen
token attends causally to the prompt and the chosen tokens before it; a rejected token attends to the
prompt and the rejected tokens before it, never to the chosen ones; position ids restart at ``P``
for the rejected branch. Every rejected token therefore sees exactly the context it has in the plain
row ``prompt + rejected`` (the same keys, values and rotary positions), so the log-probs are equal
up to floating-point summation order (``tests/test_perf_prefix.py``: 1e-5 on a tiny Llama).

The first rejected token is predicted by the LAST PROMPT position (``P − 1``), which also predicts
the first chosen token; every other response token is predicted by the position before it in its
own branch. Only those predicting positions go through the output embedding (as in
:func:`dpolab.lm.model_sequence_logps`).

Saving: ``P`` tokens per pair out of ``2P + C + R`` (a third when prompt and responses are equally
long). Needs a model whose forward accepts a custom 4D mask and explicit position ids (transformers'
Llama-family models with the ``sdpa`` or ``eager`` attention return a 4D mask as given).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import Tensor

from dpolab.data.preference import TokenizedPair
from dpolab.lm import _plain_output_head, gather_token_logps

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


@dataclass
class PrefixSharedBatch:
    """``B`` pairs as ``B`` rows ``[prompt | chosen | rejected]`` of length ``L``, right-padded.

    input_ids: (B, L) long.
    segment: (B, L) long; PROMPT/CHOSEN/REJECTED/PAD per position.
    position_ids: (B, L) long; the rejected branch restarts at the prompt length; 0 on pads.
    attention_mask: (B, 1, L, L) bool; True where query ``q`` may attend to key ``k``. Pad queries
        attend to themselves only (no all-masked row, so no NaN), real queries never see pads.
    pred_row, pred_col: (M,) long; the position whose hidden state predicts each response token.
    labels: (M,) long; the response token predicted there.
    target: (M,) long; which output sequence it counts for: ``b`` (chosen of pair b) or ``B + b``
        (rejected of pair b), the row order of :class:`dpolab.data.PreferenceBatch`.
    index: (B,) long; ``TokenizedPair.index`` of each pair.
    """

    input_ids: Tensor
    segment: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    pred_row: Tensor
    pred_col: Tensor
    labels: Tensor
    target: Tensor
    index: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.index.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens in the batch, the work the forward pass does."""
        return int((self.segment != PAD).sum())

    def to(self, device: torch.device | str) -> PrefixSharedBatch:
        return PrefixSharedBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def shared_mask(segment: Tensor) -> Tensor:
    """The ``(B, 1, L, L)`` boolean attention mask of a prefix-shared batch from its ``(B, L)`` segments.

    ``allowed[q, k] = k ≤ q  and  seg[q], seg[k] ≠ PAD  and  (seg[k] = PROMPT or seg[k] = seg[q])``, plus
    ``allowed[q, q]`` for pad queries."""
    L = segment.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment.device).tril()         # (L, L)
    sq, sk = segment[:, :, None], segment[:, None, :]                                 # (B, L, 1), (B, 1, L)
    allowed = causal & (sq != PAD) & (sk != PAD) & ((sk == PROMPT) | (sk == sq))
    pad_q = (segment == PAD)[:, :, None] & torch.eye(L, dtype=torch.bool, device=segment.device)
    return (allowed | pad_q)[:, None]


def collate_prefix_shared(pairs: list[TokenizedPair], pad_token_id: int, *,
                          pad_to_multiple_of: int | None = None) -> PrefixSharedBatch:
    """Pack ``B`` pairs into a :class:`PrefixSharedBatch` (shapes in its docstring).

    Scored tokens are those of :func:`dpolab.data.collate_preference`: every response token (a
    prompt always has at least one token, so each response token has a predictor)."""
    if not pairs:
        raise ValueError("collate_prefix_shared needs at least one pair")
    for p in pairs:
        if not p.prompt_ids:
            raise ValueError(f"pair {p.index} has an empty prompt; prefix sharing needs at least one prompt token")
    B = len(pairs)
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    segment = torch.full((B, width), PAD, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    rows, cols, labels, target = [], [], [], []
    for b, p in enumerate(pairs):
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        input_ids[b, :P + C + R] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids, dtype=torch.long)
        segment[b, :P], segment[b, P:P + C], segment[b, P + C:P + C + R] = PROMPT, CHOSEN, REJECTED
        position_ids[b, :P + C] = torch.arange(P + C)
        position_ids[b, P + C:P + C + R] = torch.arange(P, P + R)
        # chosen token j (at P + j) is predicted by position P + j − 1; rejected token j (at P + C + j)
        # by P + C + j − 1, except j = 0, predicted by the last prompt position P − 1.
        rows += [b] * (C + R)
        cols += list(range(P - 1, P + C - 1)) + [P - 1] + list(range(P + C, P + C + R - 1))
        labels += p.chosen_ids + p.rejected_ids
        target += [b] * C + [B + b] * R
    return PrefixSharedBatch(
        input_ids=input_ids, segment=segment, position_ids=position_ids, attention_mask=shared_mask(segment),
        pred_row=torch.tensor(rows, dtype=torch.long), pred_col=torch.tensor(cols, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long), target=torch.tensor(target, dtype=torch.long),
        index=torch.tensor([p.index for p in pairs], dtype=torch.long))


def _mask_for(model: torch.nn.Module, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """SDPA takes the boolean mask as is; eager attention adds it, so give it 0 / dtype-min."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "sdpa") == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def prefix_shared_logps(model: torch.nn.Module, batch: PrefixSharedBatch) -> tuple[Tensor, Tensor]:
    """Summed response log-probs of all ``2B`` sequences of a prefix-shared batch, one forward pass.

    Returns ``(logps, counts)``, each ``(2B,)``: rows ``[0, B)`` chosen, ``[B, 2B)`` rejected, as
    :func:`dpolab.lm.model_sequence_logps` returns for the plain ``(2B, T)`` batch of the same pairs.
    ``model``: a Hugging Face causal LM (possibly PEFT-wrapped) accepting a 4D attention mask."""
    B = batch.batch_size
    head = _plain_output_head(model)
    handle = None
    if head is not None:
        def select(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("input")
            if hidden is None or hidden.shape[:2] != batch.input_ids.shape:
                return None
            chosen_rows = hidden[batch.pred_row, batch.pred_col]                      # (M, H)
            return ((chosen_rows, *args[1:]), kwargs) if args else (args, {**kwargs, "input": chosen_rows})

        handle = head.register_forward_pre_hook(select, with_kwargs=True)
    dtype = next(model.parameters()).dtype
    try:
        out = model(input_ids=batch.input_ids, attention_mask=_mask_for(_inner(model), batch.attention_mask, dtype),
                    position_ids=batch.position_ids, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.ndim == 3:                                                              # full logits fallback
        logits = logits[batch.pred_row, batch.pred_col]
    token_logps = gather_token_logps(logits, batch.labels)                            # (M,)
    logps = torch.zeros(2 * B, dtype=token_logps.dtype, device=token_logps.device)
    counts = torch.bincount(batch.target, minlength=2 * B)
    return logps.index_add(0, batch.target, token_logps), counts


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    from dpolab.lm import _unwrap

    return _unwrap(model) or model


def check_prefix_sharing(model: torch.nn.Module, pairs: list[TokenizedPair], pad_token_id: int, vocab_size: int,
                         device: torch.device | str = "cpu") -> str | None:
    """Whether prefix sharing is exact for ``model``: None if so, else the reason it is not.

    Run on two of ``pairs`` (those with the longest rejected responses) before training, without gradients, in eval mode, two ways:

    1. the shared row against the plain ``(2B, T)`` batch: equal log-probs up to rounding (catches
       a model that ignores explicit position ids, or gets the layout wrong);
    2. the shared row again with every chosen token replaced: the rejected log-probs must not move
       (catches attention that ignores the 4D mask and lets rejected tokens see chosen ones; masked
       keys contribute exact zeros, so this holds to float rounding for any weights, even random).

    Tolerances per scored token: (1) 1e-4 for float32 weights, 5e-2 for 16-bit ones (the layouts
    round differently); (2) 1e-6 and 1e-3 (the same computation with other, masked-out values: equal
    up to kernel nondeterminism). A model whose attention is uniform (random weights) is exact in the
    shared layout whatever its positions, and passes (1); check (2) does not depend on the weights.
    ``model`` may be wrapped (DDP, FSDP: every process must then run the check, as every forward is
    collective).
    """
    from dpolab.data import collate_preference
    from dpolab.lm import model_sequence_logps

    # the pairs with the longest rejected responses: a rejected token after the first is what could
    # see the chosen branch (the first is predicted by the last prompt position)
    pairs = heapq.nlargest(2, (p for p in pairs if p.prompt_ids), key=lambda p: len(p.rejected_ids))
    if not pairs:
        return "no pair with a prompt token to check it on"
    altered = [TokenizedPair(p.prompt_ids, [(t + 1) % vocab_size for t in p.chosen_ids],
                             p.rejected_ids, p.index, p.truncated) for p in pairs]
    dtype = next(model.parameters()).dtype
    full = dtype in (torch.float32, torch.float64)
    tol, tol_same = (1e-4, 1e-6) if full else (5e-2, 1e-3)
    B = len(pairs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            plain = collate_preference(pairs, pad_token_id).to(device)
            lp_plain, counts = model_sequence_logps(model, plain.input_ids, plain.attention_mask, plain.loss_mask,
                                                    plain.position_ids)
            lp_shared, _ = prefix_shared_logps(model, collate_prefix_shared(pairs, pad_token_id).to(device))
            lp_alt, _ = prefix_shared_logps(model, collate_prefix_shared(altered, pad_token_id).to(device))
    except Exception as err:  # a model whose forward rejects a 4D mask or explicit positions
        return f"the model's forward does not accept the shared layout ({type(err).__name__}: {err})"
    finally:
        model.train(was_training)
    if ((lp_alt[B:] - lp_shared[B:]).abs() > tol_same * counts[B:].float()).any():
        return "rejected tokens see the chosen ones (the attention ignores the 4D mask)"
    if ((lp_shared - lp_plain).abs() > tol * counts.float()).any():
        worst = float((lp_shared - lp_plain).abs().max())
        return f"the shared row's log-probs differ from the plain batch's by {worst:.3g}"
    return None
