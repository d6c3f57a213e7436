"""Sampling responses from a causal LM with a KV cache: our own short loop, seeded and per-row EOS aware.

Why not ``model.generate``: PPO needs (i) reproducible draws from an explicit ``torch.Generator``
(so a resumed run repeats an uninterrupted one), (ii) the exact response mask (True up to and
including EOS, False on what follows) and (iii) whether each row produced EOS. The loop is a dozen
lines: one forward over the left-padded prompts, then one token per step reusing
``past_key_values``.

Layout of a batch (``P`` = longest prompt, ``R`` = longest response)::

    prompt_ids   (B, P)  left-padded:  [pad pad p0 p1 p2]
    response_ids (B, R)  right-padded: [r0 r1 EOS pad pad]
    input_ids    (B, P+R) = prompt_ids ++ response_ids, position ids counting real tokens only

The logits at position ``P - 1 + t`` of ``input_ids`` predict response token ``t``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dpolab.errors import DpolabError

__all__ = ["Generation", "decode_responses", "filter_logits", "generate", "left_pad", "position_ids_from_mask",
           "sample_completions", "sample_next"]


@dataclass
class Generation:
    """Prompts and sampled responses, padded. Shapes: ``B`` rows, ``P`` prompt, ``R`` response length.

    prompt_ids: (B, P) long, left-padded with the pad id.  prompt_mask: (B, P) bool, real prompt tokens.
    response_ids: (B, R) long, right-padded with the pad id after EOS (or after ``max_new_tokens``).
    response_mask: (B, R) bool, True on generated tokens up to and including EOS.
    finished: (B,) bool, True where the row produced EOS (False = truncated at ``max_new_tokens``).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def prompt_length(self) -> int:
        """P: the response starts at column P of :attr:`input_ids`."""
        return int(self.prompt_ids.shape[1])

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P+R) prompt and response ids."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P+R) long: 1 on real prompt tokens and on response tokens up to EOS."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1).long()

    @property
    def position_ids(self) -> torch.Tensor:
        """(B, P+R): 0 at each row's first real token, counting real tokens (pads repeat a neighbour)."""
        return position_ids_from_mask(self.attention_mask)

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) long: response tokens per row, EOS included."""
        return self.response_mask.sum(dim=1)

    def to(self, device) -> Generation:
        return Generation(*(t.to(device) for t in (self.prompt_ids, self.prompt_mask, self.response_ids,
                                                   self.response_mask, self.finished)))

    def select(self, rows) -> Generation:
        """The sub-batch of ``rows`` (an index tensor or list)."""
        return Generation(self.prompt_ids[rows], self.prompt_mask[rows], self.response_ids[rows],
                          self.response_mask[rows], self.finished[rows])


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 attention mask -> (B, T) positions: cumulative count of real tokens minus one, ≥ 0."""
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists to ``(B, P)`` ids and a bool mask (True on real tokens)."""
    if not sequences:
        raise DpolabError("generate: no prompts given")
    if any(len(s) == 0 for s in sequences):
        raise DpolabError("generate: a prompt has no tokens; every prompt needs at least one")
    P = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), P), dtype=torch.bool)
    for i, s in enumerate(sequences):
        ids[i, P - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, P - len(s):] = True
    return ids, mask


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the nucleus (top-p) to −inf. logits: (B, V) -> (B, V).

    Nucleus (Holtzman et al. 2019, arXiv 1904.09751): keep the smallest set of most likely tokens
    whose probability sums to at least ``top_p``; the most likely token is always kept.
    ``top_k = 0`` and ``top_p = 1`` disable the filters.
    """
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise DpolabError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    out = logits
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # (B, 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from ``softmax(filter(logits / temperature))``; ``temperature = 0`` is greedy.

    logits: (B, V) -> (B,) long. Draws use ``generator`` (on its own device) for reproducibility.
    """
    if temperature < 0:
        raise DpolabError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    gen_device = generator.device if generator is not None else probs.device
    draw = torch.multinomial(probs.to(gen_device), 1, generator=generator)
    return draw.squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model, tokenizer, prompts_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None,
             eos_token_id: int | Sequence[int] | None = None) -> Generation:
    """Sample one response per prompt with a KV cache, stopping each row at its first EOS.

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids, past_key_values,
            use_cache=True)`` returning ``.logits`` and ``.past_key_values``); run in eval mode (no
            dropout) and restored to its previous mode afterwards.
        tokenizer: supplies ``pad_token_id`` (falls back to EOS) and ``eos_token_id``.
        prompts_ids: B lists of prompt token ids (each non-empty).
        max_new_tokens: at most this many response tokens per row (EOS included).
        eos_token_id: stop token(s); default ``tokenizer.eos_token_id``.
    Returns a :class:`Generation`, on the model's device; ``R`` = the longest response produced.
    """
    if max_new_tokens < 1:
        raise DpolabError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise DpolabError("generate: the tokenizer has no EOS token")
    eos_ids = torch.as_tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos_ids[0])
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts_ids, pad))
    eos_ids = eos_ids.to(device)
    B = prompt_ids.shape[0]

    was_training = model.training
    model.eval()
    try:
        attn = prompt_mask.long()                      # (B, P + t)
        step_ids, step_pos = prompt_ids, position_ids_from_mask(attn)
        cache_kw: dict = {}
        done = torch.zeros(B, dtype=torch.bool, device=device)
        tokens, masks = [], []
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, use_cache=True,
                        **cache_kw)
            cache_kw = _next_cache_kwargs(out)
            tok = sample_next(out.logits[:, -1, :], temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator)  # (B,)
            live = ~done
            tok = torch.where(live, tok, torch.full_like(tok, pad))
            tokens.append(tok)
            masks.append(live)
            done = done | (live & torch.isin(tok, eos_ids))
            if bool(done.all()):
                break
            attn = torch.cat([attn, live.long().unsqueeze(1)], dim=1)
            step_ids, step_pos = tok.unsqueeze(1), step_pos[:, -1:] + 1
    finally:
        model.train(was_training)
    return Generation(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=torch.stack(tokens, 1),
                      response_mask=torch.stack(masks, 1), finished=done)


def _next_cache_kwargs(out) -> dict:
    """The KV cache of a forward's output, as the keyword the next forward takes: ``cache`` in
    transformers ≥ 5.2x, ``past_key_values`` before (the older name is deprecated there)."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    if "cache" in fields:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def decode_responses(tokenizer, gen: Generation) -> list[str]:
    """Response texts: the tokens before EOS (EOS and padding dropped, special tokens skipped)."""
    out = []
    eos = tokenizer.eos_token_id
    for ids, mask in zip(gen.response_ids.tolist(), gen.response_mask.tolist()):
        real = [t for t, m in zip(ids, mask) if m]
        if real and real[-1] == eos:
            real = real[:-1]
        out.append(tokenizer.decode(real, skip_special_tokens=True))
    return out


@torch.no_grad()
def sample_completions(model, tokenizer, prompts_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                       batch_size: int = 32) -> tuple[list[str], list[Generation]]:
    """Sample one completion per prompt (seeded), in batches. Returns (texts, per-batch Generations)."""
    device = next(model.parameters()).device
    gen_rng = torch.Generator(device=device).manual_seed(seed)
    texts, gens = [], []
    for i in range(0, len(prompts_ids), batch_size):
        gen = generate(model, tokenizer, prompts_ids[i:i + batch_size], max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, generator=gen_rng)
        texts.extend(decode_responses(tokenizer, gen))
        gens.append(gen)
    return texts, gens
