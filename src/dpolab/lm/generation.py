"""Sampling responses from a causal LM with a KV cache: our own short loop, seeded and per-row EOS aware.

Why not ``model.generate``: PPO needs (i) reproducible draws from an explicit ``torch.Generator``
(so a resumed run repeats an uninterrupted one), or from one seed per row (so a row's response does
not depend on which process or batch sampled it), (ii) the exact response mask (True up to and
including EOS, False on what follows) and (iii) whether each row produced EOS. The loop is short:
one forward over the left-padded prompts (LM head on the last position only), then one token per
step reusing the KV cache, writing into preallocated token, mask and attention-mask tensors.
Sampling draws one uniform per row and step and inverts the CDF (``inverse_cdf_draw``), where
``torch.multinomial`` draws one exponential per vocabulary entry; docs/performance.md has the
measurements against ``model.generate``.

Layout of a batch (``P`` = longest prompt, ``R`` = longest response)::

    prompt_ids   (B, P)  left-padded:  [pad pad p0 p1 p2]
    response_ids (B, R)  right-padded: [r0 r1 EOS pad pad]
    input_ids    (B, P+R) = prompt_ids ++ response_ids, position ids counting real tokens only

The logits at position ``P - 1 + t`` of ``input_ids`` predict response token ``t``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dpolab.errors import DpolabError
from dpolab.lm.decode import fast_decoder

__all__ = ["Generation", "decode_responses", "filter_logits", "generate", "inverse_cdf_draw", "left_pad",
           "position_ids_from_mask", "row_seeds", "sample_completions", "sample_next"]


@dataclass
class Generation:
    """Prompts and sampled responses, padded. Shapes: ``B`` rows, ``P`` prompt, ``R`` response length.

    prompt_ids: (B, P) long, left-padded with the pad id.  prompt_mask: (B, P) bool, real prompt tokens.
    response_ids: (B, R) long, right-padded with the pad id after EOS (or after ``max_new_tokens``).
    response_mask: (B, R) bool, True on generated tokens up to and including EOS.
    finished: (B,) bool, True where the row produced EOS (False = truncated at ``max_new_tokens``).
    logps: (B, R) float32 or None: log-softmax of the sampling forward's logits divided by the
    temperature (no top-k/top-p filter) at each response token, 0 after EOS; only when asked for.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor
    logps: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def prompt_length(self) -> int:
        """P: the response starts at column P of :attr:`input_ids`."""
        return int(self.prompt_ids.shape[1])

    @property
    def width(self) -> int:
        """P + R: padded tokens per row of :attr:`input_ids`."""
        return int(self.prompt_ids.shape[1] + self.response_ids.shape[1])

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
                                                   self.response_mask, self.finished)),
                          logps=None if self.logps is None else self.logps.to(device))

    def select(self, rows) -> Generation:
        """The sub-batch of ``rows`` (an index tensor or list)."""
        return Generation(self.prompt_ids[rows], self.prompt_mask[rows], self.response_ids[rows],
                          self.response_mask[rows], self.finished[rows],
                          logps=None if self.logps is None else self.logps[rows])


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 attention mask -> (B, T) positions: cumulative count of real tokens minus one, ≥ 0."""
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def distinct_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first (U,), inverse (B,))`` for the distinct rows of ``(B, P)`` left-padded prompt ids and
    their mask: ``first[u]``, a row holding prompt ``u``; ``inverse[b]``, the prompt of row ``b``."""
    key = torch.cat([ids, mask.long()], dim=1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(key.shape[0], device=key.device)
    first = torch.full((uniq.shape[0],), key.shape[0], dtype=torch.long, device=key.device)
    return first.scatter_reduce_(0, inverse, rows, "amin"), inverse


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
                generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from ``softmax(filter(logits / temperature))``; ``temperature = 0`` is greedy.

    logits: (B, V) -> (B,) long. Each row's token is the inverse CDF of its distribution at one
    uniform: ``uniforms`` (B,) in [0, 1) if given (so a row's draw depends only on its own
    uniform), else ``torch.rand(B)`` from ``generator`` (on its own device) for reproducibility.
    """
    if temperature < 0:
        raise DpolabError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        best = logits.argmax(dim=-1)
        if not torch.isfinite(logits.gather(-1, best[:, None])).all():  # argmax picks a NaN where there is one
            raise _not_finite()
        return best
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
    if uniforms is None:
        gen_device = generator.device if generator is not None else probs.device
        uniforms = torch.rand(probs.shape[0], generator=generator, device=gen_device, dtype=torch.float64)
    return inverse_cdf_draw(probs, uniforms.to(device=probs.device, dtype=torch.float64))


def inverse_cdf_draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index ``i`` of each row with probability ``weights[i] / sum(weights)``, from one uniform per row.

    weights: (B, V) ≥ 0 float32 (any positive total), uniforms: (B,) float64 in [0, 1) -> (B,) long.
    ``torch.multinomial(p, 1)`` draws B·V exponentials per call (its Gumbel-max fast path); this
    needs one uniform per row. Two levels, so that no cumulative sum runs over the whole vocabulary:
    a block of ``bs`` ≈ √V indices is chosen from the blocks' masses (float64 cumulative sum of the
    float32 block sums), then an index inside it from the same uniform rescaled to the block. Zero
    weights are never chosen (every search lands on a strict increase of a cumulative sum).
    """
    B, V = weights.shape
    bs = 1 << max(0, (max(V, 2) - 1).bit_length() // 2)  # power of two ≈ √V
    nb = -(-V // bs)
    if nb * bs != V:
        weights = torch.nn.functional.pad(weights, (0, nb * bs - V))
    blocks = weights.view(B, nb, bs)
    block_mass = blocks.sum(-1).double()                              # (B, nb)
    cum = block_mass.cumsum(-1)                                       # (B, nb)
    total = cum[:, -1]
    if not (torch.isfinite(total) & (total > 0)).all():  # NaN logits: the search would run off the blocks
        raise _not_finite()
    target = _below(uniforms.unsqueeze(1) * cum[:, -1:], cum[:, -1:])  # (B, 1) in [0, total)
    j = torch.searchsorted(cum, target, right=True)                   # (B, 1) block index
    mass_j = block_mass.gather(1, j)
    start = cum.gather(1, j) - mass_j
    frac = ((target - start) / mass_j).clamp_(min=0.0)               # position inside block j, ~[0, 1)
    inner = blocks.gather(1, j.unsqueeze(-1).expand(B, 1, bs)).squeeze(1).cumsum(-1, dtype=torch.float64)
    k = torch.searchsorted(inner, _below(frac * inner[:, -1:], inner[:, -1:]), right=True)
    return (j * bs + k).squeeze(1)


def _not_finite() -> DpolabError:
    return DpolabError("cannot sample: the model's next-token logits are not finite (NaN or inf): its weights "
                       "diverged (a learning rate too high?) or overflowed (fp16); nothing to sample from")


def _below(x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``x`` clamped strictly below ``total`` (a product ``u · total`` can round up to ``total``)."""
    return torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))


def stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and the model's generation-config EOS ids: chat models often end a turn
    with a token (``<|eot_id|>``) other than the tokenizer's EOS."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([extra] if isinstance(extra, int) else list(extra or []))
    return sorted(int(i) for i in ids if i is not None)


@torch.no_grad()
def generate(model, tokenizer, prompts_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None,
             eos_token_id: int | Sequence[int] | None = None,
             seeds: Sequence[int] | None = None,
             eos_check_every: int | None = None, with_logps: bool = False, fast: bool = True) -> Generation:
    """Sample one response per prompt with a KV cache, stopping each row at its first EOS.

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids, cache | past_key_values,
            use_cache=True)`` returning ``.logits`` and ``.cache`` / ``.past_key_values``); run in
            eval mode (no dropout) and restored to its previous mode afterwards. When its ``forward``
            takes ``logits_to_keep`` (or ``num_logits_to_keep``), the prompt pass computes the LM
            head on the last position only; a transformers model with full-attention layers gets a
            KV cache allocated once for ``P + max_new_tokens`` positions (same values as its own).
        tokenizer: supplies ``pad_token_id`` (falls back to EOS) and ``eos_token_id``.
        prompts_ids: B lists of prompt token ids (each non-empty).
        max_new_tokens: at most this many response tokens per row (EOS included).
        generator: one generator for the whole batch (B uniforms per step).
        eos_token_id: stop token(s); default :func:`stop_ids` (the tokenizer's EOS and the model's
            ``generation_config`` EOS ids, e.g. a chat model's end-of-turn); ``[]`` never stops early.
        seeds: one int per prompt; row i's draws then come only from a generator seeded with
            ``seeds[i]`` (its t-th token uses its t-th uniform), so its tokens do not depend on the
            other rows of the batch, its position or the padding width (up to floating-point
            effects of the batched forward). Exclusive with ``generator``.
        eos_check_every: test "every row has finished" every this many steps (default: every step
            on CPU, where it costs nothing; every 8 on accelerators, where it waits for the
            device). Finished rows keep producing pads, so the result does not depend on it.
        with_logps: also return :attr:`Generation.logps`, the tempered log-probs of the drawn tokens
            under the forward that drew them (greedy: at temperature 1).
        fast: use :mod:`dpolab.lm.decode`'s direct decoder where it computes this model exactly
            (Llama-family architectures without wrappers or hooks); False, or any other model,
            runs the model's own forward.
    Returns a :class:`Generation`, on the model's device; ``R`` = the longest response produced.
    """
    if max_new_tokens < 1:
        raise DpolabError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = stop_ids(model, tokenizer) if eos_token_id is None else eos_token_id
    if eos_token_id is None and not eos:
        raise DpolabError("generate: the tokenizer has no EOS token")
    eos_ids = torch.as_tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long)
    fallback = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else int(eos_ids[0])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts_ids, pad))
    eos_ids = eos_ids.to(device)
    B, P = prompt_ids.shape
    N = max_new_tokens
    if seeds is not None and generator is not None:
        raise DpolabError("generate: give either seeds (one per prompt) or one generator, not both")
    if seeds is not None and len(seeds) != B:
        raise DpolabError(f"generate: {len(seeds)} seeds for {B} prompts; give one seed per prompt")
    if eos_check_every is None:
        eos_check_every = 1 if device.type == "cpu" else 8
    if eos_check_every < 1:
        raise DpolabError(f"eos_check_every must be >= 1, got {eos_check_every}")
    uniforms = None if temperature == 0 else _step_uniforms(N, B, seeds, generator, device)  # (N, B)
    decoder = fast_decoder(model, P + N) if fast else None
    cache_kw = {} if decoder is not None else _preallocated_cache_kwargs(model, P + N)
    prefill_kw = {} if decoder is not None else {**_prefill_kwargs(model), **cache_kw}

    was_training = model.training
    model.eval()
    try:
        # preallocated: a column per step is written in place, the model sees a prefix view
        attn = torch.zeros(B, P + N, dtype=torch.long, device=device)  # (B, P + N)
        attn[:, :P] = prompt_mask
        tokens = torch.full((B, N), pad, dtype=torch.long, device=device)
        masks = torch.zeros((B, N), dtype=torch.bool, device=device)
        logps = torch.zeros((B, N), dtype=torch.float32, device=device) if with_logps else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        prompt_pos = position_ids_from_mask(prompt_mask)
        next_pos = prompt_pos[:, -1:] + 1                              # (B, 1) position of response token 0
        # a prompt given to several rows (a group's samples) is prefilled once, its cache copied to
        # the rows: by the direct decoder, or into the preallocated cache (the model's own growing
        # cache is of a class not known here, so it keeps one prefill row per row)
        first, inverse = distinct_rows(prompt_ids, prompt_mask)
        grouped = len(first) < B and (decoder is not None or bool(cache_kw))
        if decoder is not None:
            if grouped:
                logits = decoder.prefill(prompt_ids[first], attn[first, :P], prompt_pos[first])[inverse]
                decoder.expand(inverse)
            else:
                logits = decoder.prefill(prompt_ids, attn[:, :P], prompt_pos)
        else:
            rows = first if grouped else slice(None)
            out = model(input_ids=prompt_ids[rows], attention_mask=attn[rows, :P], position_ids=prompt_pos[rows],
                        use_cache=True, **prefill_kw)
            logits = out.logits[:, -1, :]
            if grouped:
                logits = logits[inverse]
                next(iter(cache_kw.values())).reorder_cache(inverse)  # (U, ...) -> (B, ...) per layer
        for t in range(N):
            tok = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                              uniforms=None if uniforms is None else uniforms[t])  # (B,)
            live = ~done
            if logps is not None:
                scaled = logits.float() / (temperature or 1.0)
                lp = torch.log_softmax(scaled, dim=-1).gather(1, tok.unsqueeze(1)).squeeze(1)
                logps[:, t] = lp.masked_fill(done, 0.0)
            tok = tok.masked_fill(done, pad)
            tokens[:, t] = tok
            masks[:, t] = live
            if eos_ids.numel():
                done = done | (live & torch.isin(tok, eos_ids))
            if t + 1 == N or ((t + 1) % eos_check_every == 0 and bool(done.all())):
                break
            attn[:, P + t] = live
            if decoder is not None:
                logits = decoder.step(tok.unsqueeze(1), attn[:, :P + t + 1], next_pos + t)
            else:
                out = model(input_ids=tok.unsqueeze(1), attention_mask=attn[:, :P + t + 1],
                            position_ids=next_pos + t, use_cache=True, **next_cache_kwargs(out))
                logits = out.logits[:, -1, :]
    finally:
        model.train(was_training)
    R = int(masks.sum(1).max())  # steps run after every row finished hold only pads
    return Generation(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=tokens[:, :R],
                      response_mask=masks[:, :R], finished=done, logps=None if logps is None else logps[:, :R])


def _step_uniforms(N: int, B: int, seeds: Sequence[int] | None, generator: torch.Generator | None,
                   device: torch.device) -> torch.Tensor:
    """(N, B) float64 uniforms in [0, 1): row t holds the draws of step t. With ``seeds``, column i
    is the first N uniforms of ``torch.Generator().manual_seed(seeds[i])`` (on the CPU, so the
    same on every device)."""
    if seeds is None:
        gen_device = generator.device if generator is not None else device
        return torch.rand(N, B, generator=generator, device=gen_device, dtype=torch.float64).to(device)
    cols = [torch.rand(N, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds]
    return torch.stack(cols, dim=1).to(device)


def _prefill_kwargs(model) -> dict:
    """``{"logits_to_keep": 1}`` (or the older ``num_logits_to_keep``) when the model's forward (or a
    PEFT wrapper's base model's) takes it: the prompt pass then runs the LM head on one position
    instead of ``P`` (a (B, P, V) float tensor and its matmul saved)."""
    candidates = [model]
    if hasattr(model, "get_base_model"):
        candidates.append(model.get_base_model())
    for m in candidates:
        try:
            params = inspect.signature(m.forward).parameters
        except (TypeError, ValueError):
            continue
        for name in ("logits_to_keep", "num_logits_to_keep"):
            if name in params:
                return {name: 1}
    return {}


def _preallocated_cache_kwargs(model, capacity: int) -> dict:
    """A transformers KV cache whose layers write into buffers of ``capacity`` positions (a
    ``PreallocatedLayer`` per layer), as the prompt pass's keyword; ``{}`` (the model's own
    growing cache) where that cannot be set up exactly: not a transformers model, a version without
    ``Cache(layers=...)``, or layers other than full attention (sliding windows, linear attention)."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config, layer_class = getattr(base, "config", None), _preallocated_layer_class()
    if config is None or layer_class is None:
        return {}
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    n_layers, layer_types = getattr(config, "num_hidden_layers", None), getattr(config, "layer_types", None)
    if not isinstance(n_layers, int) or getattr(config, "is_encoder_decoder", False):
        return {}
    if layer_types is None and getattr(config, "sliding_window", None):
        return {}
    if layer_types is not None and (len(layer_types) != n_layers or any(t != "full_attention" for t in layer_types)):
        return {}
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return {}
    name = next((k for k in ("cache", "past_key_values") if k in params), None)
    if name is None:
        return {}
    try:
        return {name: Cache(layers=[layer_class(capacity) for _ in range(n_layers)])}
    except TypeError:
        return {}


@functools.cache
def _preallocated_layer_class():
    """transformers' growing cache layer with its per-step ``torch.cat`` (a copy of the whole cache,
    O(T) per step) replaced by a write into a buffer allocated once; attention sees the first T
    positions, the same values as the concatenated tensor."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def lazy_initialization(self, key_states, value_states, *args, **kwargs) -> None:
            (B, H, _, D), Dv = key_states.shape, value_states.shape[-1]  # (B, heads, T, head dim)
            self.device = key_states.device
            self.key_buffer = key_states.new_empty(B, H, self.capacity, D)
            self.value_buffer = value_states.new_empty(B, value_states.shape[1], self.capacity, Dv)
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, end = self.length, self.length + key_states.shape[-2]
            if end > self.capacity:
                raise DpolabError(f"generate: KV cache of {self.capacity} positions overflowed")
            self.key_buffer[:, :, start:end].copy_(key_states)
            self.value_buffer[:, :, start:end].copy_(value_states)
            self.length = end
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def reorder_cache(self, beam_idx) -> None:  # rows of the buffers (a group prefill's copy-out)
            if self.is_initialized:
                idx = beam_idx.to(self.key_buffer.device)
                self.key_buffer = self.key_buffer.index_select(0, idx)
                self.value_buffer = self.value_buffer.index_select(0, idx)
                self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]

    return PreallocatedLayer


def next_cache_kwargs(out) -> dict:
    """The KV cache of a forward's output, as the keyword the next forward takes: ``cache`` in
    transformers ≥ 5.2x, ``past_key_values`` before (the older name is deprecated there)."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    if "cache" in fields:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def decode_responses(tokenizer, gen: Generation) -> list[str]:
    """Response texts: the tokens before the stop token (the stop token, the tokenizer's EOS or one
    of the model's ``generation_config`` stop ids, and padding dropped; special tokens skipped), read
    as text after the prompt (a SentencePiece "▁" start mark is a space: :mod:`dpolab.lm.continuation`;
    after a prompt of special tokens only, as a text's start)."""
    from dpolab.lm.continuation import decode_continuation

    out = []
    eos = tokenizer.eos_token_id
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    for ids, mask, done, prompt, real_prompt in zip(gen.response_ids.tolist(), gen.response_mask.tolist(),
                                                    gen.finished.tolist(), gen.prompt_ids.tolist(),
                                                    gen.prompt_mask.tolist()):
        real = [t for t, m in zip(ids, mask) if m]
        if real and (done or real[-1] == eos):  # a finished row ends with the token that stopped it
            real = real[:-1]
        if any(m and t not in specials for t, m in zip(prompt, real_prompt)):
            out.append(decode_continuation(tokenizer, real))
        else:
            out.append(tokenizer.decode(real, skip_special_tokens=True))
    return out


_MASK64 = (1 << 64) - 1


def row_seeds(seed: int, rows: Sequence[int]) -> list[int]:
    """Per-row seeds for ``generate(seeds=...)`` from one step seed and each row's global index
    (e.g. the prompt's index in the dataset, or its rank-independent position in the step), so the
    same row gets the same draws whichever process or batch samples it. Each is the splitmix64 mix
    (Steele, Lea and Flood 2014, "Fast splittable pseudorandom number generators") of
    ``seed`` and the row, in [0, 2^63)."""
    out = []
    for r in rows:
        z = (int(seed) * 0x9E3779B97F4A7C15 + (int(r) + 1) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        out.append((z ^ (z >> 31)) >> 1)
    return out


@torch.no_grad()
def sample_completions(model, tokenizer, prompts_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                       batch_size: int = 32, fast: bool = True) -> tuple[list[str], list[Generation]]:
    """Sample one completion per prompt, in batches of ``batch_size`` (``fast``: as for :func:`generate`).
    Prompt ``i`` (its index in ``prompts_ids``) draws from its own seed, ``row_seeds(seed, [i])``
    (:func:`row_seeds`), so its completion does not depend on the batch size or
    the device (up to floating-point effects of the batched forward). Returns (texts, per-batch
    Generations)."""
    seeds = row_seeds(seed, range(len(prompts_ids)))
    texts, gens = [], []
    for i in range(0, len(prompts_ids), batch_size):
        gen = generate(model, tokenizer, prompts_ids[i:i + batch_size], max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds[i:i + batch_size],
                       fast=fast)
        texts.extend(decode_responses(tokenizer, gen))
        gens.append(gen)
    return texts, gens
