"""Sequence log-probabilities of causal language models, computed lean.

The preference losses need, for every sequence, the summed log-probability of its response tokens,
``log π(y|x) = Σ_t log π(y_t | x, y_<t)``. Two costs dominate a naive implementation and both are
avoided here:

* **The float32 log-softmax copy over the vocabulary.** ``logits.float().log_softmax(-1)`` holds a
  ``(B, T, V)`` float32 tensor (gigabytes for a 128k vocabulary) and keeps it alive for backward.
  :func:`gather_token_logps` computes ``log p(label) = logit[label] − logsumexp(logits)`` chunk by
  chunk over rows (upcasting only one chunk at a time), and its backward recomputes the softmax per
  chunk, so neither pass materialises a float32 ``(N, V)`` tensor.
* **lm_head over prompt and padding positions.** :func:`model_sequence_logps` projects only the
  hidden states of positions that predict a response token through the output embedding (a forward
  pre-hook on the model's ``get_output_embeddings()`` selects the rows), for architectures whose
  logits are exactly ``lm_head(hidden)``. It still calls the model's own ``forward``, so wrappers
  (PEFT, accelerate autocast, DDP/FSDP hooks) stay in the loop. Other models fall back to full
  logits.

Alignment convention: token ``t`` is predicted by the logits at position ``t − 1``; a response token
at position 0 has no predictor and is not counted.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from dpolab.errors import DpolabError
from dpolab.lm import inplace_grads

# Architectures whose causal-LM forward ends in ``logits = lm_head(last_hidden_state)`` with no
# scaling or soft-capping afterwards (checked against transformers' modeling files). Others (Gemma 2,
# Cohere, Granite, ...) transform the logits after the head and take the full-logits path.
_PLAIN_HEAD_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo2", "smollm3", "gemma",
})

_TARGET_CHUNK_ELEMENTS = 1 << 24  # 16M elements: a 64 MiB float32 temporary per chunk


class _TokenLogps(torch.autograd.Function):
    """``log softmax(logits)[label]`` over rows of a ``(N, V)`` matrix, chunked in both passes."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, chunk: int) -> Tensor:  # (N, V), (N,) -> (N,)
        out_dtype = torch.promote_types(logits.dtype, torch.float32)
        n = logits.shape[0]
        out = torch.empty(n, dtype=out_dtype, device=logits.device)
        lse = torch.empty(n, dtype=out_dtype, device=logits.device)
        for s in range(0, n, chunk):
            part = logits[s:s + chunk]
            x = part.to(out_dtype)                                                    # (c, V)
            picked = x.gather(-1, labels[s:s + chunk, None]).squeeze(-1)
            # an upcast chunk is a fresh copy, free to overwrite; float32 logits are the caller's
            lse[s:s + chunk] = _logsumexp_(x) if x is not part else torch.logsumexp(x, dim=-1)
            out[s:s + chunk] = picked - lse[s:s + chunk]
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        # d log p(label) / d logits = onehot(label) − softmax(logits), per row
        logits, labels, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad = torch.empty_like(logits)
        grad_out = grad_out.to(lse.dtype)
        for s in range(0, logits.shape[0], chunk):
            g = grad_out[s:s + chunk, None]                                           # (c, 1)
            probs = torch.exp(logits[s:s + chunk].to(lse.dtype) - lse[s:s + chunk, None])
            g_chunk = probs.mul_(-g)                                                  # (c, V)
            g_chunk.scatter_add_(-1, labels[s:s + chunk, None], g)
            grad[s:s + chunk] = g_chunk
        return grad, None, None


class _LinearTokenLogps(torch.autograd.Function):
    """``log softmax((h Wᵀ + b) / T)[label]`` for rows ``h`` of an ``(M, H)`` matrix: the output head
    fused into the log-prob, so the ``(M, V)`` logits exist one chunk of rows at a time, in the
    forward pass and again (recomputed) in the backward pass; what backward keeps is ``h`` and the
    weight. Optionally, without gradient, each row's entropy and ``log Σ_v p(v)²`` (WPO)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, temperature, want_entropy, want_sq):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        out, lse = (torch.empty(n, dtype=dtype, device=hidden.device) for _ in range(2))
        ent = torch.empty(n if want_entropy else 0, dtype=dtype, device=hidden.device)
        sq = torch.empty(n if want_sq else 0, dtype=dtype, device=hidden.device)
        for s in range(0, n, chunk):
            z = _chunk_logits(hidden[s:s + chunk], weight, bias, dtype, temperature)  # (c, V)
            picked = z.gather(-1, labels[s:s + chunk, None]).squeeze(-1)
            if want_entropy or want_sq:
                l = torch.logsumexp(z, dim=-1)
            else:
                l = _logsumexp_(z)
            lse[s:s + chunk] = l
            out[s:s + chunk] = picked - l
            if want_entropy:
                ent[s:s + chunk] = l - (torch.softmax(z, dim=-1) * z).sum(-1)
            if want_sq:
                sq[s:s + chunk] = torch.logsumexp(2 * z, dim=-1) - 2 * l
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk, ctx.temperature = chunk, temperature
        ctx.mark_non_differentiable(ent, sq)
        return out, ent, sq

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_ent, _grad_sq):
        # d log p(label) / dz = onehot(label) − softmax(z), z = logits / T, per row
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        chunk, temperature = ctx.chunk, ctx.temperature
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # a step's later passes add into weight.grad itself (dpolab.lm.inplace_grads), no (V, H) copy
        into = inplace_grads.grad_target(weight, lse.dtype) if need_w else None
        grad_w = into
        if need_w and into is None:
            grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
        grad_b = torch.zeros(bias.shape, dtype=lse.dtype, device=bias.device) if need_b and bias is not None else None
        grad_out = grad_out.to(lse.dtype)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            g = grad_out[s:s + chunk, None]                                           # (c, 1)
            # in place: one (c, V) buffer per chunk, and the (V, H) product added into grad_w directly
            dz = _chunk_logits(h, weight, bias, lse.dtype, temperature).sub_(lse[s:s + chunk, None]).exp_().mul_(-g)
            dz.scatter_add_(-1, labels[s:s + chunk, None], g)
            if temperature != 1.0:
                dz.div_(temperature)                                                  # d/d(logits)
            if grad_h is not None:
                grad_h[s:s + chunk] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(dz.T, h.to(lse.dtype))
            if grad_b is not None:
                grad_b += dz.sum(0)
        return (grad_h, None if into is not None or grad_w is None else grad_w.to(weight.dtype),
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None, None, None, None)


def _logsumexp_(z: Tensor) -> Tensor:
    """``logsumexp(z, -1)`` computed in ``z``'s own memory (``z`` is overwritten): no second
    ``(c, V)`` temporary, which ``torch.logsumexp`` allocates for ``exp(z − max)``."""
    m = z.amax(-1, keepdim=True)
    m.masked_fill_(m.isinf(), 0.0)
    return z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, temperature: float) -> Tensor:
    """``(h Wᵀ + b) / T`` in ``dtype``, a fresh tensor the caller may change in place. ``h`` is taken
    in the weight's dtype: bf16 weights under accelerate's bf16 autocast give float32 hidden states
    (its forward converts the outputs), and the model's own head would run in bf16 there. Autocast
    is off here: the head runs in the weight's dtype whether the caller is inside an autocast forward
    (PPO's policy-with-value) or after one (the other trainers, the reference), so the log-probs of
    one model agree in every pass."""
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    with torch.autocast(h.device.type, enabled=False):
        z = torch.nn.functional.linear(h, weight, bias)
    z = z.to(dtype) if z.dtype != dtype else z
    return z.div_(temperature) if temperature != 1.0 else z


def _head_chunk(vocab: int, rows: int) -> int:
    """Rows per chunk: at most ~16M logits, as few chunks as that allows (each one reads the whole
    weight), and those of equal size (the largest chunk sets the temporary's size)."""
    most = max(1, _TARGET_CHUNK_ELEMENTS // max(vocab, 1))
    return -(-rows // -(-rows // most)) if rows > 0 else most


class ResponseRows:
    """Run a causal LM so that only the hidden states chosen by ``select(hidden) -> (M, H) | None``
    reach its output head. With a plain ``nn.Linear`` head the head is bypassed (its rows come back
    as the model's "logits" and :func:`rows_token_logps` fuses the head into the log-probs); with
    other supported heads their logits of those rows come back; otherwise (``select`` returned None,
    or an unsupported architecture) the full logits."""

    def __init__(self, model: torch.nn.Module, select, enabled: bool = True, *, head: torch.nn.Module | None = None):
        self.head = (head if head is not None else plain_output_head(model)) if enabled else None
        self.select, self.selected, self.handle = select, False, None
        self.fused = type(self.head) is torch.nn.Linear and self.head.weight.dim() == 2

    def __enter__(self) -> ResponseRows:
        if self.head is None:
            return self

        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("input")
            rows = self.select(hidden) if hidden is not None else None
            if rows is None:
                return None  # unexpected layout: leave the call alone, full logits are used
            self.selected = True
            return ((rows, *args[1:]), kwargs) if args else (args, {**kwargs, "input": rows})

        self.handle = self.head.register_forward_pre_hook(pre, with_kwargs=True)
        if self.fused:
            plain = self.head.forward
            self.head.forward = lambda x: x if self.selected else plain(x)  # the head runs in the log-prob
        return self

    def __exit__(self, *exc) -> bool:
        if self.handle is not None:
            self.handle.remove()
        if self.fused and "forward" in self.head.__dict__:
            del self.head.forward
        return False

    def token_logps(self, output: Tensor, labels: Tensor, *, temperature: float = 1.0, with_entropy: bool = False,
                    with_sq: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(log-probs (M,), entropies (M,) or None, log Σ p² (M,) or None) of ``labels`` (M,) from what
        the model returned for the selected rows (hidden states when fused, else logits (M, V))."""
        if self.fused and self.selected:
            w, b = self.head.weight, self.head.bias
            chunk = _head_chunk(w.shape[0], output.shape[0])
            lp, ent, sq = _LinearTokenLogps.apply(output, w, b, labels, chunk, float(temperature), with_entropy, with_sq)
            return lp, (ent if with_entropy else None), (sq if with_sq else None)
        logits = output / temperature if temperature != 1.0 else output
        return (gather_token_logps(logits, labels), _entropy_rows(logits.detach()) if with_entropy else None,
                token_log_sq_norms(logits) if with_sq else None)


def gather_token_logps(logits: Tensor, labels: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Log-probability of each label under the softmax of its logits row.

    Args:
        logits: ``(..., V)`` (typically ``(B, T, V)``), any float dtype.
        labels: ``(...)`` integer token ids in ``[0, V)`` (replace ignored positions by a valid id
            first and mask the result).
        chunk_size: rows per chunk; default keeps each chunk near 16M elements.

    Returns:
        ``(...)`` log-probs, float32 for half-precision logits, else the logits' dtype. Computed as
        ``logits.gather − logsumexp`` per chunk of rows, never materialising a float32 log-softmax
        over the vocabulary for the whole batch, in forward or backward.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)          # a view for contiguous logits
    chunk = chunk_size or max(1, _TARGET_CHUNK_ELEMENTS // max(vocab, 1))
    out = _TokenLogps.apply(flat, labels.reshape(-1).long(), int(chunk))
    return out.view(labels.shape)


@torch.no_grad()
def token_log_sq_norms(logits: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """``log Σ_v π(v)²`` of each row's softmax, ``(..., V) -> (...)``, detached: the per-token
    normaliser of WPO's weights (Zhou et al. 2024, arXiv 2406.11827; :mod:`dpolab.losses.weighting`).

    ``= logsumexp(2z) − 2·logsumexp(z)``, chunked over rows in float32 like :func:`gather_token_logps`."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    chunk = chunk_size or max(1, _TARGET_CHUNK_ELEMENTS // max(vocab, 1))
    out = torch.empty(flat.shape[0], dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    for s in range(0, flat.shape[0], chunk):
        x = flat[s:s + chunk].to(out.dtype)
        out[s:s + chunk] = torch.logsumexp(2 * x, dim=-1) - 2 * torch.logsumexp(x, dim=-1)
    return out.view(logits.shape[:-1])


def _shifted(input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token labels and mask aligned with the logits positions, both ``(B, T)``.

    ``labels[:, t] = input_ids[:, t + 1]`` and ``mask[:, t] = loss_mask[:, t + 1]``; the last column
    predicts nothing (mask False, label 0). Shifting the labels instead of slicing the logits keeps
    the logits contiguous (no copy)."""
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    mask = torch.zeros_like(loss_mask, dtype=torch.bool)
    mask[:, :-1] = loss_mask[:, 1:].bool()
    return labels.masked_fill(~mask, 0), mask


def sequence_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the response tokens of each sequence.

    Args:
        logits: ``(B, T, V)`` from ``model(input_ids)``; position ``t − 1`` predicts token ``t``.
        input_ids: ``(B, T)`` token ids.
        loss_mask: ``(B, T)`` bool/int, true where ``input_ids`` is a response token.

    Returns:
        ``(logps, counts)``: ``(B,)`` sums of response-token log-probs (float32, or float64 for
        float64 logits) and ``(B,)`` int64 numbers of response tokens counted.
    """
    if logits.shape[:2] != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
                         f"loss_mask {tuple(loss_mask.shape)}")
    labels, mask = _shifted(input_ids, loss_mask)
    token_logps = gather_token_logps(logits, labels)                                  # (B, T)
    logps = (token_logps * mask).sum(-1)
    return logps, mask.sum(-1)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying ``PreTrainedModel`` behind DDP/DeepSpeed (``.module``) and PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        cfg = getattr(model, "active_peft_config", None)
        if cfg is not None and getattr(cfg, "is_prompt_learning", False):
            return None  # virtual tokens change the sequence layout: use full logits
        model = model.get_base_model()
    return model


def plain_output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The output-embedding module if the model's logits are exactly ``head(last hidden)``."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    if inner is None or getattr(config, "model_type", None) not in _PLAIN_HEAD_MODEL_TYPES:
        return None
    get = getattr(inner, "get_output_embeddings", None)
    return get() if get is not None else None


def model_sequence_logps(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                         position_ids: Tensor | None = None, *, response_only_logits: bool = True,
                         with_sq_norms: bool = False) -> tuple[Tensor, ...]:
    """Run a causal LM and return the summed response-token log-probs of every sequence.

    Args:
        model: a Hugging Face causal LM, possibly PEFT- or accelerate-wrapped.
        input_ids, attention_mask, loss_mask: ``(B, T)``; padding may be on either side.
        position_ids: ``(B, T)`` or ``None`` (then ``cumsum(attention_mask) − 1``, which is right
            for left and right padding alike; pass explicit ones for packed sequences).
        response_only_logits: project only the hidden states that predict response tokens through
            the output embedding (supported architectures; others use full logits anyway).

        with_sq_norms: also return ``(B,)`` sums over response tokens of
            :func:`token_log_sq_norms` (detached; WPO's weights need them).

    Returns:
        ``(logps, counts)`` as :func:`sequence_logps`: ``(B,)`` float32 sums and ``(B,)`` int64
        counts (and the sums of ``with_sq_norms``). Equal to the full-logits path and to
        ``−cross_entropy`` summed over response tokens.
    """
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    labels, mask = _shifted(input_ids, loss_mask)                                     # (B, T)
    rows_of = ResponseRows(model, lambda h: h[mask] if h.shape[:2] == mask.shape else None, response_only_logits)
    with rows_of:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.ndim == 3 and not (rows_of.fused and rows_of.selected):
        logps, counts = sequence_logps(logits, input_ids, loss_mask)
        if not with_sq_norms:
            return logps, counts
        return logps, counts, (token_log_sq_norms(logits) * mask).sum(-1)
    token_logps, _, sq = rows_of.token_logps(logits, labels[mask], with_sq=with_sq_norms)  # (M,)
    rows = mask.nonzero()[:, 0]                                                       # (M,) batch row
    logps = torch.zeros(mask.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    if not with_sq_norms:
        return logps.index_add(0, rows, token_logps), mask.sum(-1)
    return logps.index_add(0, rows, token_logps), mask.sum(-1), torch.zeros_like(logps).index_add(0, rows, sq)


def model_token_logps(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                      position_ids: Tensor | None = None, *, temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs ``log π(x_t | x_<t)`` of the tokens where ``loss_mask`` is set, ``(B, T)``
    (0 elsewhere), from logits divided by ``temperature``; with ``with_entropy`` also the entropy of
    each of those tokens' predictive distributions, ``(B, T)``, detached.

    As :func:`model_sequence_logps`, only the positions that predict a masked token go through the
    output embedding (no ``(B, T, V)`` logits on supported architectures), and token ``t`` is
    predicted at ``t − 1`` (column 0 is never scored)."""
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    labels, mask = _shifted(input_ids, loss_mask)                                     # (B, T) at predictors
    rows_of = ResponseRows(model, lambda h: h[mask] if h.shape[:2] == mask.shape else None)
    with rows_of:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.ndim == 3 and not (rows_of.fused and rows_of.selected):
        logits = logits[mask]                                                         # (M, V)
    token, ent, _ = rows_of.token_logps(logits, labels[mask], temperature=temperature, with_entropy=with_entropy)
    logps = torch.zeros(mask.shape, dtype=token.dtype, device=token.device)
    logps[:, 1:] = logps[:, 1:].masked_scatter(mask[:, :-1], token)                   # back to token positions
    entropy = None
    if with_entropy:
        entropy = torch.zeros_like(logps)
        entropy[:, 1:] = entropy[:, 1:].masked_scatter(mask[:, :-1], ent.detach())
    return logps, entropy


@torch.no_grad()
def _entropy_rows(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per row of an ``(M, V)`` matrix, chunked in float32."""
    chunk = max(1, _TARGET_CHUNK_ELEMENTS // max(logits.shape[-1], 1))
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for s in range(0, logits.shape[0], chunk):
        x = logits[s:s + chunk].float()
        lse = torch.logsumexp(x, -1, keepdim=True)
        out[s:s + chunk] = (lse.squeeze(-1) - (torch.softmax(x, -1) * x).sum(-1))
    return out


# -- log-probs of sampled responses (a Generation of dpolab.lm.generation) -------------------------
def response_token_logps(model, gen, *, temperature: float = 1.0) -> torch.Tensor:
    """log π(y_t | x, y_<t) of each response token, 0 after EOS. Returns (B, R) float32.

    The logits at position P − 1 + t predict response token t; they are divided by ``temperature``
    (> 0) to match the distribution the tokens were sampled from (0, i.e. greedy, counts as 1).
    """
    P = gen.prompt_length
    out = model(input_ids=gen.input_ids, attention_mask=gen.attention_mask, position_ids=gen.position_ids,
                use_cache=False)
    logits = out.logits[:, P - 1:-1]  # (B, R, V)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logps = gather_token_logps(logits, gen.response_ids).float()
    return logps * gen.response_mask


def _reference_context(policy, ref_model):
    """(model to run, context) for the reference: ``ref_model``, or a PEFT policy with adapters off."""
    if ref_model is not None:
        return ref_model, nullcontext()
    if hasattr(policy, "disable_adapter"):
        return policy, policy.disable_adapter()
    raise DpolabError("no reference model given and the policy is not a PEFT (LoRA) model")


@torch.no_grad()
def sequence_kl(policy, ref_model, gen, *, temperature: float = 1.0) -> torch.Tensor:
    """Per-sample Σ_t (log π − log π_ref) over response tokens. Returns (B,) float32; its mean
    estimates KL(π‖π_ref) when ``gen`` was sampled from ``policy``. ``ref_model=None`` uses a PEFT
    policy's base (adapters disabled)."""
    logp = response_token_logps(policy, gen, temperature=temperature)
    model, ctx = _reference_context(policy, ref_model)
    with ctx:
        ref_logp = response_token_logps(model, gen, temperature=temperature)
    return ((logp - ref_logp) * gen.response_mask).sum(dim=1)
