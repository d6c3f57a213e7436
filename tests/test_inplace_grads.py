"""A step's later passes add the head's and the input embedding's gradients into ``.grad`` in place
(dpolab.lm.inplace_grads): the same gradients as autograd's accumulation, in float64, with no
``(V, H)`` gradient handed to autograd; only inside the engine's backward and only for one process."""

from __future__ import annotations

import pytest
import torch

from dpolab.lm import inplace_grads
from dpolab.lm.logps import _LinearTokenLogps, model_sequence_logps


class Arrivals:
    """What autograd hands to a parameter's gradient accumulator: per backward call, whether a
    gradient tensor arrived (the fresh ``(V, H)`` one that in-place accumulation avoids)."""

    def __init__(self, param: torch.Tensor):
        self.seen: list[bool] = []
        self.node = param.view_as(param).grad_fn.next_functions[0][0]  # the AccumulateGrad node
        self.handle = self.node.register_prehook(lambda grads: self.seen.append(grads[0] is not None))


def test_fused_head_adds_into_grad_in_place():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(11, 5, dtype=torch.float64, generator=g))
    b = torch.nn.Parameter(torch.randn(11, dtype=torch.float64, generator=g))
    labels = torch.randint(0, 11, (7,), generator=g)
    upstream = torch.randn(7, dtype=torch.float64, generator=g)
    before = torch.randn(11, 5, dtype=torch.float64, generator=g)
    ref = torch.log_softmax(h @ w.T + b, -1).gather(-1, labels[:, None]).squeeze(-1)
    want_h, want_w, want_b = torch.autograd.grad((ref * upstream).sum(), (h, w, b))

    w.grad, b.grad = before.clone(), torch.zeros(11, dtype=torch.float64)
    kept = w.grad
    arrivals = Arrivals(w)
    lp, _, _ = _LinearTokenLogps.apply(h, w, b, labels, 3, 1.0, False, False)
    with inplace_grads.accumulating(True):
        (lp * upstream).sum().backward()
    assert w.grad is kept and arrivals.seen == [False]  # added into .grad, nothing through autograd
    torch.testing.assert_close(w.grad, before + want_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.grad, want_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(h.grad, want_h, rtol=0, atol=1e-12)

    # outside the switch (e.g. torch.autograd.grad elsewhere) autograd gets the gradient, .grad is untouched
    lp, _, _ = _LinearTokenLogps.apply(h, w, b, labels, 3, 1.0, False, False)
    (got_w,) = torch.autograd.grad((lp * upstream).sum(), (w,))
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.grad, before + want_w, rtol=0, atol=1e-12)
    # and with no .grad yet (a step's first pass) the fresh gradient goes to autograd as before
    w.grad = None
    lp, _, _ = _LinearTokenLogps.apply(h, w, b, labels, 3, 1.0, False, False)
    with inplace_grads.accumulating(True):
        (lp * upstream).sum().backward()
    assert arrivals.seen == [False, True]
    torch.testing.assert_close(w.grad, want_w, rtol=0, atol=1e-12)


def test_embedding_adds_into_grad_in_place_and_skips_padding():
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Module()
    model.emb = torch.nn.Embedding(9, 4, padding_idx=0, dtype=torch.float64)
    model.get_input_embeddings = lambda: model.emb
    ids = torch.tensor([[0, 3, 3, 5], [2, 0, 8, 3]])
    upstream = torch.randn(2, 4, 4, dtype=torch.float64, generator=g)
    plain = torch.nn.functional.embedding(ids, model.emb.weight, 0)
    (want,) = torch.autograd.grad((plain * upstream).sum(), (model.emb.weight,))
    assert torch.all(want[0] == 0)

    arrivals = Arrivals(model.emb.weight)
    with inplace_grads.embedding_in_place(model, True):
        assert "forward" in model.emb.__dict__
        (model.emb(ids) * upstream).sum().backward()       # no .grad yet: autograd's own backward
        torch.testing.assert_close(model.emb.weight.grad, want, rtol=0, atol=0)
        before = model.emb.weight.grad.clone()
        with inplace_grads.accumulating(True):
            (model.emb(ids) * upstream).sum().backward()   # the later pass: into .grad
    assert "forward" not in model.emb.__dict__            # the module is restored
    assert arrivals.seen == [True, False]
    torch.testing.assert_close(model.emb.weight.grad, before + want, rtol=0, atol=1e-12)
    assert torch.all(model.emb.weight.grad[0] == 0)


def _tiny(arch: str):
    import transformers

    torch.manual_seed(0)
    if arch == "gpt2":  # tied embedding and head: both add into the same .grad
        config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         attn_implementation="eager")
        return transformers.GPT2LMHeadModel(config).double().eval()  # no dropout
    from dpolab.lm.tiny import tiny_llama

    model = tiny_llama(96, hidden_size=32, layers=2, heads=4)
    model.config.pad_token_id = model.model.embed_tokens.padding_idx = 1
    return model.double()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_several_passes_give_autograds_gradients(arch):
    """Three passes of a step through a transformers model (fused head, embedding routed): the same
    gradients, in float64, as autograd's accumulation; the head's and embedding's (V, H) gradients
    reach autograd only in the first pass."""
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(3):
        ids = torch.randint(2, 96, (3, 10), generator=g)
        ids[0, :3] = 1  # padding, left
        attn = (ids != 1).long()
        loss_mask = torch.zeros_like(ids)
        loss_mask[:, 6:] = 1
        batches.append((ids, attn, loss_mask))

    def grads(model, inplace):
        model.zero_grad(set_to_none=True)
        arrivals = Arrivals(model.get_output_embeddings().weight)
        with inplace_grads.embedding_in_place(model, inplace):
            for ids, attn, loss_mask in batches:
                logps, _ = model_sequence_logps(model, ids, attn, loss_mask)
                with inplace_grads.accumulating(inplace):
                    (logps * torch.tensor([0.3, -1.2, 0.7], dtype=logps.dtype)).sum().backward()
        arrivals.handle.remove()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, arrivals.seen

    model = _tiny(arch)
    want, seen_plain = grads(model, False)
    got, seen = grads(model, True)
    assert seen_plain == [True] * 3 and seen == [True, False, False]
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-12, msg=name)


def test_under_bf16_autocast_the_float32_grads_match():
    """bf16 autocast over float32 weights (accelerate's mixed precision): the fused head's float32
    gradient goes into the float32 .grad; three passes give autograd's gradients up to float order."""
    model = _tiny("llama").float()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(2, 96, (2, 12), generator=g) for _ in range(3)]

    def grads(inplace):
        model.zero_grad(set_to_none=True)
        arrivals = Arrivals(model.get_output_embeddings().weight)
        with inplace_grads.embedding_in_place(model, inplace), torch.autocast("cpu", dtype=torch.bfloat16):
            for ids in batches:
                loss_mask = torch.ones_like(ids)
                logps, _ = model_sequence_logps(model, ids, torch.ones_like(ids), loss_mask)
                with inplace_grads.accumulating(inplace):
                    logps.float().sum().backward()
        arrivals.handle.remove()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, arrivals.seen

    want, _ = grads(False)
    got, seen = grads(True)
    assert seen == [True, False, False]
    for name in want:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_allowed_only_for_one_plain_process():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    assert inplace_grads.allowed(SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO))
    assert not inplace_grads.allowed(SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU))
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MULTI_GPU):
        assert not inplace_grads.allowed(SimpleNamespace(num_processes=1, distributed_type=kind))


def test_engine_steps_use_it_and_match_autograd(tiny_model_dir, tmp_path, monkeypatch):
    """SFT with 4 accumulated micro-batches: in-place accumulation is taken for the later passes and
    the trained weights equal those of a run with it off."""
    from safetensors.torch import load_file
    from tests.test_train_sft import _args, write_sft_data

    from dpolab.cli import main

    data = write_sft_data(tmp_path / "sft.jsonl")
    common = ("--batch-size", "2", "--grad-accum", "4", "--max-steps", "2", "--eval-fraction", "0")
    taken = []
    real = inplace_grads.grad_target

    def counting(param, dtype):
        out = real(param, dtype)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(inplace_grads, "grad_target", counting)
    assert main(_args(tiny_model_dir, data, tmp_path / "on", *common)) == 0
    assert sum(taken) == 2 * 2 * 3  # 2 steps × (head + embedding) × the 3 passes after each step's first
    monkeypatch.setattr(inplace_grads, "allowed", lambda acc: False)
    taken.clear()
    assert main(_args(tiny_model_dir, data, tmp_path / "off", *common)) == 0
    assert not any(taken)
    on, off = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("on", "off"))
    for name in on:
        torch.testing.assert_close(on[name], off[name], rtol=1e-5, atol=1e-6, msg=name)
