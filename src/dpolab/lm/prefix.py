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

from dataclasses import dataclass

import torch
from torch import Tensor

from dpolab.lm.logps import ResponseRows, plain_output_head, unwrap_model

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


def last_of_segment(segment: Tensor, which: int) -> Tensor:
    """``(B,)`` column of each row's last position in segment ``which`` (CHOSEN or REJECTED)."""
    cols = torch.arange(segment.shape[1], device=segment.device).expand_as(segment)
    return torch.where(segment == which, cols, -1).amax(dim=1)


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


def attention_mask_for(model: torch.nn.Module, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """SDPA takes the boolean mask as is; eager attention adds it, so give it 0 / dtype-min."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "sdpa") == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def prefix_shared_logps(model: torch.nn.Module, batch: PrefixSharedBatch, *,
                        with_sq_norms: bool = False) -> tuple[Tensor, ...]:
    """Summed response log-probs of all ``2B`` sequences of a prefix-shared batch, one forward pass.

    Returns ``(logps, counts)``, each ``(2B,)``: rows ``[0, B)`` chosen, ``[B, 2B)`` rejected, as
    :func:`dpolab.lm.model_sequence_logps` returns for the plain ``(2B, T)`` batch of the same pairs.
    ``model``: a Hugging Face causal LM (possibly PEFT-wrapped) accepting a 4D attention mask.
    ``with_sq_norms``: also the ``(2B,)`` sums of :func:`dpolab.lm.logps.token_log_sq_norms` (WPO)."""
    B = batch.batch_size
    head = plain_output_head(model)
    rows_of = ResponseRows(model, lambda h: h[batch.pred_row, batch.pred_col]
                           if h.shape[:2] == batch.input_ids.shape else None, head is not None, head=head)
    dtype = next(model.parameters()).dtype
    with rows_of:
        out = model(input_ids=batch.input_ids, attention_mask=attention_mask_for(_inner(model), batch.attention_mask, dtype),
                    position_ids=batch.position_ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.ndim == 3 and not (rows_of.fused and rows_of.selected):                  # full logits fallback
        logits = logits[batch.pred_row, batch.pred_col]
    token_logps, _, sq = rows_of.token_logps(logits, batch.labels, with_sq=with_sq_norms)  # (M,)
    logps = torch.zeros(2 * B, dtype=token_logps.dtype, device=token_logps.device)
    counts = torch.bincount(batch.target, minlength=2 * B)
    if not with_sq_norms:
        return logps.index_add(0, batch.target, token_logps), counts
    return logps.index_add(0, batch.target, token_logps), counts, torch.zeros_like(logps).index_add(0, batch.target, sq)


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return unwrap_model(model) or model
