"""Reward models: an LM backbone with a scalar head, read at the last real token (docs/reward-model.md).

A reward model is a Hugging Face ``AutoModelForSequenceClassification`` with ``num_labels=1`` (for
Llama: ``LlamaForSequenceClassification``, a linear ``score`` head on the final hidden states).
:class:`RewardModel` runs the backbone and applies the head only at each row's last real token,
found from the attention mask (so a pad id equal to EOS cannot move it). :func:`score` scores
(prompt, completion) pairs tokenized exactly as in training (``dpolab.data.preference``: prompt and
completion tokenized separately and concatenated, EOS appended).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from dpolab.errors import DpolabError


def last_token_index(attention_mask: Tensor) -> Tensor:
    """``(B,)`` index of the last 1 in each row of a ``(B, T)`` 0/1 mask (right or left padding)."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.long()).argmax(-1)


class RewardModel(nn.Module):
    """Wraps a ``*ForSequenceClassification`` model with one label: ``forward`` returns ``(B,)``
    float32 rewards, the head applied to the hidden state of each row's last real token.

    Architectures whose head is not a ``score`` module on the backbone's last hidden state fall back
    to the model's own forward (which pools at the last non-pad token id)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        head = getattr(model, "score", None)
        self._plain_head = isinstance(head, nn.Module) and getattr(model, "base_model", model) is not model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if not self._plain_head:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            return out.logits[:, 0].float()
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, use_cache=False).last_hidden_state  # (B, T, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask)]                                       # (B, H)
        return self.model.score(last)[:, 0].float()                                                 # (B,)


def load_reward_model(name_or_path: str, tokenizer, *, dtype: str = "auto", trust_remote_code: bool = False):
    """A ``AutoModelForSequenceClassification`` with ``num_labels=1`` and ``pad_token_id`` set, from a
    causal-LM checkpoint (the head is newly initialised) or a saved reward model."""
    from transformers import AutoModelForSequenceClassification

    from dpolab.data.collate import pad_token_id_for
    from dpolab.train.common import _load

    try:
        model = _load(AutoModelForSequenceClassification, str(name_or_path), dtype=dtype,
                      trust_remote_code=trust_remote_code, num_labels=1)
    except (KeyError, ValueError) as err:  # no sequence-classification class for this architecture
        raise DpolabError(f"cannot build a reward model from '{name_or_path}': {err}") from None
    if model.config.num_labels != 1:
        raise DpolabError(f"'{name_or_path}' has a {model.config.num_labels}-label head; a reward model needs 1")
    model.config.pad_token_id = pad_token_id_for(tokenizer)
    return model


def encode_pairs(tokenizer, prompts: Sequence[str], completions: Sequence[str], *,
                 max_length: int | None = None, max_prompt_length: int | None = None) -> list[list[int]]:
    """Token ids of ``prompt + completion + EOS`` per pair, exactly as the preference data pipeline
    builds a chosen/rejected row (same specials and truncation)."""
    from dpolab.data.preference import _assemble, _encode_many, _specials

    if len(prompts) != len(completions):
        raise DpolabError(f"{len(prompts)} prompts but {len(completions)} completions")
    for name, texts in (("prompts", prompts), ("completions", completions)):
        if not all(isinstance(t, str) for t in texts):
            raise DpolabError(f"{name} must be strings")
    sp = _specials(tokenizer)
    max_length = max_length or 1 << 30
    max_prompt_length = max_prompt_length or max_length - 1
    out = []
    for p, c in zip(_encode_many(tokenizer, list(prompts)), _encode_many(tokenizer, list(completions))):
        pair = _assemble(p, c, c, sp, max_length=max_length, max_prompt_length=max_prompt_length, index=0)
        if pair is None:
            raise DpolabError("a completion has no token left after truncation; raise max_length")
        out.append(pair.prompt_ids + pair.chosen_ids)
    return out


@torch.no_grad()
def score(model, prompts: Sequence[str], completions: Sequence[str], *, tokenizer=None, batch_size: int = 32,
          max_length: int | None = None, max_prompt_length: int | None = None) -> list[float]:
    """Rewards ``r(prompt_i, completion_i)``, one float per pair, in order.

    ``model``: a folder or hub name of a reward model (``dpolab rm``'s ``final/``), a loaded
    ``*ForSequenceClassification`` model, or a :class:`RewardModel`. ``tokenizer`` defaults to the
    one saved with the model. ``max_length``/``max_prompt_length`` truncate as in training (default:
    no truncation)."""
    from dpolab.train.common import load_tokenizer

    if isinstance(model, (str, Path)):
        tokenizer = tokenizer or load_tokenizer(str(model))
        model = load_reward_model(str(model), tokenizer)
    if tokenizer is None:
        inner = model.model if isinstance(model, RewardModel) else model
        source = getattr(inner, "name_or_path", "") or getattr(getattr(inner, "config", None), "_name_or_path", "")
        if not source:
            raise DpolabError("score() needs tokenizer= for a model loaded without a name or path")
        tokenizer = load_tokenizer(source)
    if batch_size < 1:
        raise DpolabError("batch_size must be >= 1")
    rm = model if isinstance(model, RewardModel) else RewardModel(model)
    was_training = rm.training
    rm.eval()
    from dpolab.data.collate import pad_token_id_for

    pad = pad_token_id_for(tokenizer)
    device = next(rm.parameters()).device
    rows = encode_pairs(tokenizer, prompts, completions, max_length=max_length, max_prompt_length=max_prompt_length)
    out: list[float] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, :len(r)], mask[j, :len(r)] = torch.tensor(r), 1
        out += rm(ids.to(device), mask.to(device)).tolist()
    rm.train(was_training)
    return out
