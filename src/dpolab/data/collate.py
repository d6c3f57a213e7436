"""Batching preference pairs: chosen and rejected sequences stacked for one forward pass.

Rows ``[0, B)`` hold ``prompt + chosen`` and rows ``[B, 2B)`` hold ``prompt + rejected`` of the same
pairs, right-padded. ``loss_mask`` marks the response tokens, i.e. the labels whose log-probability
is summed: with next-token logits, token ``t`` is scored by ``logits[:, t - 1]``, so a caller uses
``logits[:, :-1]``, ``input_ids[:, 1:]`` and ``loss_mask[:, 1:]``. Every prompt has at least one
token, so ``loss_mask[:, 0]`` is always False and no response token is lost by the shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpolab.data.preference import TokenizedPair
from dpolab.lm.loading import pad_token_id_for  # noqa: F401  (part of dpolab.data's API)
from dpolab.lm.prefix import CHOSEN, PAD, PROMPT, REJECTED, PrefixSharedBatch, shared_mask


@dataclass
class PreferenceBatch:
    """A padded batch of ``B`` pairs as ``2B`` sequences of length ``T``.

    input_ids: (2B, T) long; rows [0, B) chosen, [B, 2B) rejected; right-padded with the pad id.
    attention_mask: (2B, T) long; 1 on real tokens, 0 on pads.
    loss_mask: (2B, T) bool; True where ``input_ids[i, t]`` is a response token.
    position_ids: (2B, T) long; 0..len-1 on real tokens, 0 on pads.
    index: (B,) long; ``TokenizedPair.index`` of each pair.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    index: torch.Tensor

    @property
    def batch_size(self) -> int:
        """``B``, the number of pairs (half the number of rows)."""
        return int(self.index.shape[0])

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> PreferenceBatch:
        """The same batch with every tensor on ``device``."""
        return PreferenceBatch(*(t.to(device, non_blocking=non_blocking) for t in
                                 (self.input_ids, self.attention_mask, self.loss_mask,
                                  self.position_ids, self.index)))


def collate_preference(pairs: list[TokenizedPair], pad_token_id: int, *,
                       pad_to_multiple_of: int | None = None) -> PreferenceBatch:
    """Stack ``B`` pairs into a :class:`PreferenceBatch` (shapes in its docstring).

    ``T`` is the longest ``prompt + response`` in the batch, rounded up to ``pad_to_multiple_of``.
    Masks come from the lengths, so a pad id equal to EOS is harmless.
    """
    if not pairs:
        raise ValueError("collate_preference needs at least one pair")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids)
                                                            for p in pairs]
    lengths = [len(prompt) + len(resp) for prompt, resp in rows]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (prompt, resp) in enumerate(rows):
        input_ids[i, :lengths[i]] = torch.tensor(prompt + resp, dtype=torch.long)
        loss_mask[i, len(prompt):lengths[i]] = True
    positions = torch.arange(width).expand(n, width)
    real = positions < torch.tensor(lengths).unsqueeze(1)  # (2B, T)
    return PreferenceBatch(
        input_ids=input_ids,
        attention_mask=real.long(),
        loss_mask=loss_mask,
        position_ids=torch.where(real, positions, 0),
        index=torch.tensor([p.index for p in pairs], dtype=torch.long),
    )


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
