"""Reward models: an LM backbone with a scalar head, read at the last real token (docs/reward-model.md).

A reward model is a Hugging Face ``AutoModelForSequenceClassification`` with ``num_labels=1`` (for
Llama: ``LlamaForSequenceClassification``, a linear ``score`` head on the final hidden states).
:class:`RewardModel` runs the backbone and applies the head only at each row's last real token,
found from the attention mask (so a pad id equal to EOS cannot move it). :func:`dpolab.rewards.functions.score`
scores (prompt, completion) texts tokenized exactly as in training.
"""

from __future__ import annotations

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

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None,
                segment: Tensor | None = None) -> Tensor:
        """``(B,)`` rewards of the rows; with ``segment`` (a prefix-shared batch of
        :mod:`dpolab.lm.prefix`: ``B`` rows ``[prompt | chosen | rejected]``, a ``(B, 1, L, L)`` mask)
        ``(2B,)``: each pair's chosen reward (rows ``[0, B)``) then its rejected one, read at the last
        token of each branch, whose context is exactly that of the plain row ``prompt + response``."""
        if segment is not None:
            return self._shared_rewards(input_ids, attention_mask, position_ids, segment)
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

    def _shared_rewards(self, input_ids, mask, position_ids, segment) -> Tensor:
        from dpolab.lm.prefix import CHOSEN, REJECTED, attention_mask_for, last_of_segment

        if not self._plain_head:
            raise DpolabError("this reward model's head is not a plain score module: prefix sharing is not supported")
        dtype = next(self.model.parameters()).dtype
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask_for(self.model, mask, dtype),
                                       position_ids=position_ids, use_cache=False).last_hidden_state  # (B, L, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        ends = torch.cat([hidden[rows, last_of_segment(segment, CHOSEN)],
                          hidden[rows, last_of_segment(segment, REJECTED)]])                     # (2B, H)
        return self.model.score(ends)[:, 0].float()                                            # (2B,)


def pad_apart_from_eos(tokenizer) -> str | None:
    """Give a tokenizer that pads with EOS (it had no pad token) a pad token that no response ends
    with: its BOS, else its UNK, where that differs from EOS; returns the token, or None where there
    is none. Hugging Face's sequence-classification forward reads the reward at the last token that
    is not the pad id: with EOS as the pad that is the token before the EOS every response ends
    with, one token before where ``RewardModel`` reads it. Padded positions are masked, so which
    token pads changes nothing else."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id != eos:
        return None
    for name in ("bos_token", "unk_token"):
        token, token_id = getattr(tokenizer, name, None), getattr(tokenizer, name + "_id", None)
        if token is not None and token_id is not None and token_id != eos:
            tokenizer.pad_token = token
            return token
    return None


def load_reward_model(name_or_path: str, tokenizer, *, dtype: str = "auto", trust_remote_code: bool = False,
                      trained: bool = False):
    """A ``AutoModelForSequenceClassification`` with ``num_labels=1`` and ``pad_token_id`` set, from a
    causal-LM checkpoint (the head is newly initialised) or a saved reward model. ``trained`` (scoring,
    not training): a folder saved as another architecture (a causal LM) is refused, since its score
    head would be random."""
    from transformers import AutoModelForSequenceClassification

    from dpolab.lm.loading import load_pretrained, pad_token_id_for

    try:
        model = load_pretrained(AutoModelForSequenceClassification, str(name_or_path), dtype=dtype,
                      trust_remote_code=trust_remote_code, num_labels=1)
    except (KeyError, ValueError) as err:  # no sequence-classification class for this architecture
        raise DpolabError(f"cannot build a reward model from '{name_or_path}': {err}") from None
    except RuntimeError as err:  # a saved classification head whose size is not num_labels=1
        if "ignore_mismatched_sizes" not in str(err):
            raise
        from transformers import AutoConfig

        labels = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code).num_labels
        if labels == 1:  # another weight's size differs from the config: transformers' own error says which
            raise
        raise DpolabError(f"'{name_or_path}' has a {labels}-label head; a reward model needs 1") from None
    saved_as = [a for a in (getattr(model.config, "architectures", None) or []) if isinstance(a, str)]
    if trained and saved_as and not any(a.endswith("ForSequenceClassification") for a in saved_as):
        raise DpolabError(f"'{name_or_path}' is a {saved_as[0]}, not a reward model: its score head would be "
                          "random; train one from it with `dpolab rm` and pass that run's final/")
    if model.config.num_labels != 1:
        raise DpolabError(f"'{name_or_path}' has a {model.config.num_labels}-label head; a reward model needs 1")
    model.config.pad_token_id = pad_token_id_for(tokenizer)
    return model
