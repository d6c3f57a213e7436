"""A direct KV-cache decoder for the Llama family (Llama, Mistral without a sliding window, Qwen2, Qwen3).

:func:`~dpolab.lm.generation.generate` spends most of a small model's sampling time in the per-call
work around each matrix product (module calls, mask building, cache bookkeeping; profile in
docs/performance.md), not in the products. This module computes the same forward from the model's
own parameters with fewer, larger operations: the query, key and value projections as one product
and the gate and up projections as one (weights concatenated once per :func:`fast_decoder` call, so
they always match the parameters being trained; only for models where the copies are small), one
preallocated KV buffer per layer, the attention mask of a decode step read from the sampler's own
mask, and the LM head on the last position only. Rotary embeddings come from the model's own ``rotary_emb`` module (every RoPE
scaling type the model supports), the norms use each module's weight and epsilon with the same
float32 arithmetic.

:func:`fast_decoder` returns None, and the caller uses the model's own forward, whenever the exact
same computation cannot be guaranteed: another architecture, a wrapped model (PEFT, DDP, FSDP,
quantised or LoRA-injected layers: anything but ``torch.nn.Linear``), hooks on any module,
sharded (DTensor) parameters, sliding-window or non-full attention layers, an activation other
than SiLU, or an attention implementation other than ``sdpa`` / ``eager``. Tested against the
model's forward in tests/test_decode.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FastDecoder", "fast_decoder"]

# scaled_dot_product_attention takes enable_gqa from torch 2.5 on
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
# fuse the q/k/v and gate/up products (by concatenated weight copies) only up to this many bytes
FUSE_MAX_BYTES = 64 << 20
_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


def fast_decoder(model, capacity: int) -> FastDecoder | None:
    """A :class:`FastDecoder` over ``model``'s current weights with room for ``capacity`` positions,
    or None when the model is not one this decoder computes exactly (see the module docstring)."""
    if type(model).__name__ not in _ARCHITECTURES or not _plain(model):
        return None
    config = model.config
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return None
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return None
    if layer_types is None and getattr(config, "sliding_window", None) and \
            getattr(config, "use_sliding_window", True):
        return None
    inner = model.model
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return None
    if len(inner.layers) != config.num_hidden_layers:
        return None
    return FastDecoder(model, capacity)


def _plain(model) -> bool:
    """Only plain modules: no hooks anywhere, no DTensor parameters, every projection a Linear."""
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return False
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):
            return False
    for p in model.parameters():
        if type(p) is not torch.nn.Parameter or type(p.data) is not torch.Tensor:
            return False
    try:
        layers, head, final_norm = list(model.model.layers), model.lm_head, model.model.norm
        if type(head) is not torch.nn.Linear or not _plain_norm(final_norm):
            return False
        for lay in layers:
            att, mlp = lay.self_attn, lay.mlp
            if any(type(m) is not torch.nn.Linear for m in (att.q_proj, att.k_proj, att.v_proj, att.o_proj,
                                                             mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
                return False
            norms = (lay.input_layernorm, lay.post_attention_layernorm, getattr(att, "q_norm", None),
                     getattr(att, "k_norm", None))
            if not all(n is None or _plain_norm(n) for n in norms):
                return False
    except (AttributeError, TypeError):
        return False
    return True


def _plain_norm(norm) -> bool:
    """An RMSNorm as :func:`_rms` computes it: a weight and an epsilon, no bias."""
    return hasattr(norm, "variance_epsilon") and getattr(norm, "bias", None) is None


def _rms(norm, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm: float32 statistics, weight times the normalised input in its own dtype."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _projections(mods, fuse: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) pairs computing the outputs of ``mods`` side by side: one concatenated pair
    when ``fuse`` (one product instead of several), else each module's own tensors (no copy)."""
    if not fuse:
        return [(m.weight, m.bias) for m in mods]
    weight = torch.cat([m.weight for m in mods], dim=0)
    if all(m.bias is None for m in mods):
        return [(weight, None)]
    return [(weight, torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
                                for m in mods]))]


def _project(x: torch.Tensor, pairs) -> torch.Tensor:
    if len(pairs) == 1:
        return F.linear(x, *pairs[0])
    return torch.cat([F.linear(x, w, b) for w, b in pairs], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (Su et al. 2021, arXiv 2104.09864) in the half-split layout: x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class FastDecoder:
    """Prefill and one-token decode steps of a Llama-family causal LM, returning last-position logits.

    Built per generation call (:func:`fast_decoder`), under ``torch.no_grad``: for models whose
    q/k/v and gate/up weights take at most :data:`FUSE_MAX_BYTES` it holds concatenated copies of
    them, which are stale once the optimizer steps; larger models use the parameters themselves.
    """

    def __init__(self, model, capacity: int):
        cfg = model.config
        inner = model.model
        self.capacity = capacity
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        # grouped-query attention: SDPA's enable_gqa (torch >= 2.5), else the key heads repeated
        self.repeat_kv = self.n_heads // self.n_kv if self.n_kv != self.n_heads and not _SDPA_GQA else 1
        self.sdpa_kw = {"enable_gqa": True} if self.n_kv != self.n_heads and _SDPA_GQA else {}
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.head_w = model.lm_head.weight
        self.head_b = model.lm_head.bias
        # the concatenated copies cost their size in memory for the call: only where that is small
        # (there the products are many and short, and fusing them pays); large models run as they are
        fused_bytes = sum(m.weight.numel() * m.weight.element_size() for lay in inner.layers
                          for m in (lay.self_attn.q_proj, lay.self_attn.k_proj, lay.self_attn.v_proj,
                                    lay.mlp.gate_proj, lay.mlp.up_proj))
        self.fused = fused_bytes <= FUSE_MAX_BYTES
        self.layers = []
        for lay in inner.layers:
            att, mlp = lay.self_attn, lay.mlp
            self.layers.append(dict(
                ln1=lay.input_layernorm, ln2=lay.post_attention_layernorm,
                q_norm=getattr(att, "q_norm", None), k_norm=getattr(att, "k_norm", None),
                qkv=_projections([att.q_proj, att.k_proj, att.v_proj], self.fused),
                o_w=att.o_proj.weight, o_b=att.o_proj.bias,
                gate_up=_projections([mlp.gate_proj, mlp.up_proj], self.fused),
                down_w=mlp.down_proj.weight, down_b=mlp.down_proj.bias,
                scale=getattr(att, "scaling", self.head_dim ** -0.5), inter=mlp.gate_proj.weight.shape[0], k=None, v=None))
        self.length = 0

    def _layer(self, L: dict, x: torch.Tensor, cos, sin, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        Hq, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        h = _rms(L["ln1"], x)
        qkv = _project(h, L["qkv"])
        q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.view(B, T, Hq, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if L["q_norm"] is not None:
            q, k = _rms(L["q_norm"], q), _rms(L["k_norm"], k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, heads, T, D)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if L["k"] is None:
            L["k"] = k.new_empty(B, Hkv, self.capacity, D)
            L["v"] = v.new_empty(B, Hkv, self.capacity, D)
        start, end = self.length, self.length + T
        L["k"][:, :, start:end] = k
        L["v"][:, :, start:end] = v
        keys, values = L["k"][:, :, :end], L["v"][:, :, :end]
        if self.repeat_kv > 1:
            keys, values = keys.repeat_interleave(self.repeat_kv, dim=1), values.repeat_interleave(self.repeat_kv, dim=1)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=L["scale"], **self.sdpa_kw)
        a = a.transpose(1, 2).reshape(B, T, Hq * D)
        x = x + F.linear(a, L["o_w"], L["o_b"])
        h = _rms(L["ln2"], x)
        gu = _project(h, L["gate_up"])
        gate, up = gu.split([L["inter"], L["inter"]], dim=-1)
        return x + F.linear(F.silu(gate) * up, L["down_w"], L["down_b"])

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        if self.length + T > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions overflowed")
        x = self.embed(ids)
        cos, sin = self.rotary(x, positions)               # (B, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)      # broadcast over heads
        for L in self.layers:
            x = self._layer(L, x, cos, sin, mask)
        self.length += T
        h = _rms(self.norm, x[:, -1])
        return F.linear(h, self.head_w, self.head_b)        # (B, V)

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids, attention_mask (0/1 or bool), positions: (B, P) -> (B, V) logits of the last position.
        A padding query attends to itself only (its output is never read), so no row is all-masked."""
        P = ids.shape[1]
        real = attention_mask.bool()
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        mask = causal & real[:, None, :]                                   # (B, P, P)
        mask |= torch.eye(P, dtype=torch.bool, device=ids.device)
        return self._forward(ids, positions, mask.unsqueeze(1))

    def expand(self, index: torch.Tensor) -> None:
        """Row ``b`` of the cache becomes what row ``index[b]`` was: prompts prefilled once, then
        given to every row that samples from them."""
        for L in self.layers:
            if L["k"] is not None:
                L["k"], L["v"] = L["k"].index_select(0, index), L["v"].index_select(0, index)

    def step(self, ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row. ids, positions: (B, 1); attention_mask: (B, T) over every cached
        position plus this one -> (B, V) logits."""
        return self._forward(ids, positions, attention_mask.bool()[:, None, None, :])
