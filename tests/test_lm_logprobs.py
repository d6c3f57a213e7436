"""Sequence log-probs: equal to −cross_entropy on the HF logits, padding-invariant, lean in memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dpolab.lm.logps import gather_token_logps, model_sequence_logps, sequence_logps


def reference_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7])
def test_gather_token_logps_values_and_gradient_float64(chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=g, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    weights = torch.randn(2, 5, generator=g, dtype=torch.float64)
    ours = gather_token_logps(logits, labels, chunk_size=chunk_size)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    ref = reference_token_logps(logits, labels)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    assert ours.dtype == torch.float64 and ours.shape == (2, 5)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=1e-12)


def test_gather_token_logps_gradcheck():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (4,), generator=g)
    assert torch.autograd.gradcheck(lambda x: gather_token_logps(x, labels, chunk_size=3), (logits,))


def test_gather_token_logps_bf16_upcasts_per_chunk():
    g = torch.Generator().manual_seed(2)
    logits = (4 * torch.randn(3, 4, 50, generator=g)).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 50, (3, 4), generator=g)
    ours = gather_token_logps(logits, labels, chunk_size=5)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference_token_logps(logits.detach().float(), labels), rtol=0, atol=1e-5)
    ours.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    full = logits.detach().float().requires_grad_(True)
    reference_token_logps(full, labels).sum().backward()
    torch.testing.assert_close(logits.grad.float(), full.grad, rtol=0, atol=1e-2)  # bf16 rounding of grads


class _LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_float32_vocab_copy_for_the_whole_batch():
    """bf16 logits (B·T = 32 rows, V = 64): forward and backward stay within one chunk of float32."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 8, 64, generator=g).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 64, (4, 8), generator=g)
    with _LargestFloat32() as mode:
        gather_token_logps(logits, labels, chunk_size=4).sum().backward()
    assert 0 < mode.largest <= 4 * 64          # one chunk of rows, never 32 × 64
    with _LargestFloat32() as naive:            # the pattern it replaces does hold the whole copy
        reference_token_logps(logits.float(), labels).sum().backward()
    assert naive.largest >= 32 * 64


def _temporaries_bytes(fn) -> int:
    """Bytes allocated by the elementwise ops ``sub`` and ``exp`` while ``fn`` runs (the profiler's
    memory record sees the temporaries inside composite ops such as ``torch.logsumexp``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages() if e.key in ("aten::sub", "aten::exp"))


def test_chunk_logsumexp_allocates_no_second_chunk():
    """The upcast chunk of bf16 logits, and the fused head's chunk of logits, take their logsumexp in
    place: no (c, V) float32 temporary besides the chunk itself (torch.logsumexp makes one)."""
    from dpolab.lm.logps import _LinearTokenLogps

    g = torch.Generator().manual_seed(4)
    chunk_bytes = 16 * 4096 * 4
    logits = torch.randn(64, 4096, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 4096, (64,), generator=g)
    assert _temporaries_bytes(lambda: torch.logsumexp(logits[:16].float(), -1)) >= chunk_bytes  # the probe sees it
    assert _temporaries_bytes(lambda: gather_token_logps(logits, labels, chunk_size=16)) < chunk_bytes
    h, w = torch.randn(64, 8, generator=g), torch.randn(4096, 8, generator=g)
    assert _temporaries_bytes(lambda: _LinearTokenLogps.apply(h, w, None, labels, 16, 1.0, False, False)) < chunk_bytes


def _right_padded_batch(tokenizer):
    """Three (prompt, response) pairs of different lengths, right-padded, with response masks."""
    pairs = [("the movie was", " great fun and I loved every minute"),
             ("a terrible", " film"),
             ("User: hello there\nAssistant:", " hi, how can I help?")]
    rows, masks = [], []
    for prompt, response in pairs:
        p = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + r)
        masks.append([False] * len(p) + [True] * len(r))
    T = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    loss_mask = torch.tensor([m + [False] * (T - len(m)) for m in masks])
    return input_ids, attention_mask, loss_mask


def _cross_entropy_logps(logits, input_ids, loss_mask):
    """−F.cross_entropy on the HF logits, summed over response tokens (the independent reference)."""
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), input_ids[:, 1:], reduction="none")
    return -(nll * loss_mask[:, 1:]).sum(-1)


def test_sequence_logps_equals_cross_entropy(tiny_model, tiny_tokenizer):
    input_ids, attention_mask, loss_mask = _right_padded_batch(tiny_tokenizer)
    with torch.no_grad():
        logits = tiny_model(input_ids=input_ids, attention_mask=attention_mask).logits
    logps, counts = sequence_logps(logits, input_ids, loss_mask)
    assert logps.dtype == torch.float32 and logps.shape == (3,)
    torch.testing.assert_close(logps, _cross_entropy_logps(logits, input_ids, loss_mask), rtol=0, atol=1e-5)
    assert counts.tolist() == loss_mask.sum(-1).tolist()


def test_model_sequence_logps_fast_path_equals_full_logits_and_cross_entropy(tiny_model, tiny_tokenizer):
    input_ids, attention_mask, loss_mask = _right_padded_batch(tiny_tokenizer)
    fast, counts = model_sequence_logps(tiny_model, input_ids, attention_mask, loss_mask)
    (g_fast,) = torch.autograd.grad(fast.sum(), tiny_model.lm_head.weight)
    full, counts_full = model_sequence_logps(tiny_model, input_ids, attention_mask, loss_mask,
                                             response_only_logits=False)
    (g_full,) = torch.autograd.grad(full.sum(), tiny_model.lm_head.weight)
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_fast, g_full, rtol=1e-4, atol=1e-6)
    assert counts.tolist() == counts_full.tolist() == loss_mask.sum(-1).tolist()
    with torch.no_grad():
        logits = tiny_model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(fast.detach(), _cross_entropy_logps(logits, input_ids, loss_mask), rtol=0, atol=1e-5)


def test_fast_path_really_skips_prompt_and_padding_rows(tiny_model, tiny_tokenizer):
    input_ids, attention_mask, loss_mask = _right_padded_batch(tiny_tokenizer)
    seen = []
    handle = tiny_model.lm_head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            model_sequence_logps(tiny_model, input_ids, attention_mask, loss_mask)
    finally:
        handle.remove()
    # only the M predicting rows reach the head, which is fused into the log-prob (it passes the hidden
    # states through; the (M, V) logits are formed chunk by chunk inside the log-prob)
    assert seen == [(int(loss_mask[:, 1:].sum()), tiny_model.config.hidden_size)]
    assert not tiny_model.lm_head._forward_pre_hooks  # the hook is removed again
    assert "forward" not in tiny_model.lm_head.__dict__  # and the head is its own again


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_equals_per_example_calls(tiny_model, tiny_tokenizer, padding_side):
    input_ids, attention_mask, loss_mask = _right_padded_batch(tiny_tokenizer)
    if padding_side == "left":  # move each row's padding to the front
        lengths = attention_mask.sum(-1)
        for i, n in enumerate(lengths.tolist()):
            for t in (input_ids, attention_mask, loss_mask):
                t[i] = torch.roll(t[i], shifts=t.shape[1] - n)
    with torch.no_grad():
        batched, counts = model_sequence_logps(tiny_model, input_ids, attention_mask, loss_mask)
        singles = []
        for i in range(input_ids.shape[0]):
            keep = attention_mask[i].bool()
            s, c = model_sequence_logps(tiny_model, input_ids[i, keep][None], attention_mask[i, keep][None],
                                        loss_mask[i, keep][None])
            singles.append(s)
            assert c.item() == counts[i].item()
    torch.testing.assert_close(batched, torch.cat(singles), rtol=0, atol=1e-5)


def test_peft_wrapped_model(tiny_model, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    input_ids, attention_mask, loss_mask = _right_padded_batch(tiny_tokenizer)
    with torch.no_grad():
        base, _ = model_sequence_logps(tiny_model, input_ids, attention_mask, loss_mask)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    model = get_peft_model(tiny_model, lora)
    fast, _ = model_sequence_logps(model, input_ids, attention_mask, loss_mask)
    full, _ = model_sequence_logps(model, input_ids, attention_mask, loss_mask, response_only_logits=False)
    torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-5)  # sums near 130: one float32 ulp is 1.5e-5
    assert (fast.detach() - base).abs().max() > 1e-3  # the (non-zero) adapters change the log-probs
    fast.sum().backward()                              # gradients reach the adapters through the fast path
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad(), model.disable_adapter():
        disabled, _ = model_sequence_logps(model, input_ids, attention_mask, loss_mask)
    torch.testing.assert_close(disabled, base, rtol=0, atol=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match="labels shape"):
        gather_token_logps(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="shape mismatch"):
        sequence_logps(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("extras", [True, False])
@pytest.mark.parametrize("temperature, chunk", [(1.0, 3), (0.7, 100)])
def test_fused_head_log_probs_equal_the_plain_head_with_their_gradients(temperature, chunk, extras):
    """The output head fused into the log-prob (logits one chunk of rows at a time, recomputed in
    backward) gives the values, entropies, log Σp² and gradients of log_softmax(h Wᵀ + b) in float64
    (without the extras, the chunk's logsumexp runs in place)."""
    from dpolab.lm.logps import _LinearTokenLogps

    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (7,), generator=g)
    upstream = torch.randn(7, dtype=torch.float64, generator=g)
    lp, ent, sq = _LinearTokenLogps.apply(h, w, b, labels, chunk, temperature, extras, extras)
    grads = torch.autograd.grad((lp * upstream).sum(), (h, w, b))
    z = (h @ w.T + b) / temperature
    ref = torch.log_softmax(z, -1).gather(-1, labels[:, None]).squeeze(-1)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad((ref * upstream).sum(), (h, w, b))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if not extras:
        assert ent.numel() == 0 and sq.numel() == 0
        return
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1).detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(sq, (p * p).sum(-1).log().detach(), rtol=0, atol=1e-12)
    assert not ent.requires_grad and not sq.requires_grad


def test_fused_head_chunks_are_as_few_as_the_budget_allows_and_even():
    from dpolab.lm.logps import _head_chunk

    v = 1 << 20  # 16 rows of logits within the 16M-element budget
    assert [_head_chunk(v, m) for m in (0, 5, 16, 17, 32, 40, 48)] == [16, 5, 16, 9, 16, 14, 16]
    assert _head_chunk(1 << 30, 3) == 1  # a vocabulary past the budget: one row at a time
