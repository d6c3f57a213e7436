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
from dpolab.errors import ConfigError


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


def pad_token_id_for(tokenizer) -> int:
    """The tokenizer's pad id, or its EOS id when it has no pad token (masks never rely on it)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad_token nor an eos_token")
    return int(pad)


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
