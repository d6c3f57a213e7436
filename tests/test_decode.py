"""The direct Llama-family decoder (dpolab.lm.decode) against the model's own forward: float64 logits
of the prompt pass and of every decode step equal to 1e-10 for Llama (MHA and GQA, tied head), Qwen2
(projection biases), Qwen3 (per-head q/k norms) and Mistral; generation through it equal to the
model's own path (tokens and log-probs, ragged prompts, EOS stopping); and the fallback wherever the
same computation is not guaranteed."""

from __future__ import annotations

import pytest
import torch

from dpolab.lm import decode
from dpolab.lm.decode import fast_decoder
from dpolab.lm.generation import generate, left_pad, position_ids_from_mask

V = 96


def _model(arch: str, *, kv_heads: int = 4, tied: bool = False, dtype=torch.float64, **extra):
    import transformers

    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, intermediate_size=48, max_position_embeddings=64,
                  tie_word_embeddings=tied, pad_token_id=0, eos_token_id=2, bos_token_id=1, **extra)
    if arch == "llama":
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        config, cls = transformers.Qwen3Config(head_dim=8, **common), transformers.Qwen3ForCausalLM
    elif arch == "mistral":
        config, cls = transformers.MistralConfig(sliding_window=None, **common), transformers.MistralForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = cls(config).to(dtype).eval()
    with torch.no_grad():  # random biases and norm weights, so that a dropped term would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.3)
    return model


PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
CASES = [("llama", {}), ("llama", {"kv_heads": 2, "tied": True}), ("qwen2", {"kv_heads": 2}),
         ("qwen3", {"kv_heads": 2}), ("mistral", {})]


@pytest.mark.parametrize(("arch", "kw"), CASES)
def test_prefill_and_decode_steps_equal_the_model_forward_in_float64(arch, kw):
    model = _model(arch, **kw)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    ids, mask = left_pad(PROMPTS, 0)
    P, steps = ids.shape[1], 5
    dec = fast_decoder(model, P + steps)
    assert dec is not None, arch
    attn = torch.zeros(len(PROMPTS), P + steps, dtype=torch.long)
    attn[:, :P] = mask
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        logits = dec.prefill(ids, attn[:, :P], position_ids_from_mask(mask))
        seq = ids
        for t in range(steps + 1):
            full_mask = attn[:, :P + t]
            ref = model(input_ids=seq, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask)).logits
            torch.testing.assert_close(logits, ref[:, -1], rtol=0, atol=1e-10)
            if t == steps:
                break
            tok = torch.randint(3, V, (len(PROMPTS), 1), generator=gen)
            live = torch.tensor([1, 1, 0 if t >= 2 else 1, 1])  # row 2 "finished" after two tokens
            attn[:, P + t] = live
            seq = torch.cat([seq, tok], dim=1)
            logits = dec.step(tok, attn[:, :P + t + 1], position_ids_from_mask(attn[:, :P + t + 1])[:, -1:])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_unfused_projections_for_large_models_give_the_same_logits(arch, monkeypatch):
    """Above FUSE_MAX_BYTES the decoder uses the parameters themselves (no concatenated copies)."""
    model = _model(arch, kv_heads=2)
    ids, mask = left_pad(PROMPTS, 0)
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        fused = fast_decoder(model, ids.shape[1])
        monkeypatch.setattr(decode, "FUSE_MAX_BYTES", 0)
        plain = fast_decoder(model, ids.shape[1])
        assert fused.fused and not plain.fused
        assert plain.layers[0]["qkv"][0][0] is model.model.layers[0].self_attn.q_proj.weight
        ref = model(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits[:, -1]
        torch.testing.assert_close(plain.prefill(ids, mask, pos), ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(fused.prefill(ids, mask, pos), ref, rtol=0, atol=1e-10)


class _Tok:
    pad_token_id, eos_token_id = 0, 2


@pytest.mark.parametrize(("arch", "kw"), CASES)
def test_generation_through_the_decoder_equals_the_model_path(arch, kw):
    """Same tokens, masks and EOS flags, log-probs to 1e-10, sampled (per-row seeds, top-p) and
    greedy; EOS made likely so that rows stop at different steps."""
    model = _model(arch, **kw)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
        model.lm_head.weight[2:4] = 0.0
        j = int(model.model.norm.weight.abs().argmax())  # stop tokens 2 and 3 follow the sign of one
        model.lm_head.weight[2, j], model.lm_head.weight[3, j] = 8.0, -8.0  # hidden unit: likely at times
    lengths = set()
    for kwargs in ({"seeds": [3, 1, 4, 1]}, {"seeds": [5, 9, 2, 6], "top_p": 0.9}, {"temperature": 0}):
        a = generate(model, _Tok, PROMPTS, max_new_tokens=12, with_logps=True, eos_token_id=[2, 3], **kwargs)
        b = generate(model, _Tok, PROMPTS, max_new_tokens=12, with_logps=True, eos_token_id=[2, 3], fast=False,
                     **kwargs)
        for x, y in zip((a.response_ids, a.response_mask, a.finished), (b.response_ids, b.response_mask, b.finished)):
            assert torch.equal(x, y), (arch, kwargs)
        torch.testing.assert_close(a.logps, b.logps, rtol=0, atol=1e-10)
        lengths |= set(a.response_mask.sum(1)[a.finished].tolist())
    assert lengths and lengths != {12}  # EOS did stop rows early


@pytest.mark.parametrize(("arch", "kw"), CASES)
def test_repeated_prompts_are_prefilled_once(arch, kw, monkeypatch):
    """A group's samples (each prompt given to several rows, their own seeds): the decoder prefills
    each distinct prompt once and hands its cache to the rows; the same tokens and log-probs (1e-10)
    as the model's own path (which also prefills each distinct prompt once, into its preallocated
    cache: tests/test_generation.py checks that against a prefill of every row)."""
    model = _model(arch, **kw)
    prompts = [p for p in PROMPTS for _ in range(3)]
    prefilled = []
    real = decode.FastDecoder.prefill
    monkeypatch.setattr(decode.FastDecoder, "prefill", lambda self, ids, *a: (prefilled.append(ids.shape[0]),
                                                                             real(self, ids, *a))[1])
    seeds = list(range(10, 10 + len(prompts)))
    a = generate(model, _Tok, prompts, max_new_tokens=10, with_logps=True, seeds=seeds)
    b = generate(model, _Tok, prompts, max_new_tokens=10, with_logps=True, seeds=seeds, fast=False)
    assert prefilled == [len(PROMPTS)]
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(a.logps, b.logps, rtol=0, atol=1e-10)
    assert len({tuple(r) for r in a.response_ids[:3].tolist()}) > 1  # the rows of a group drew apart


def test_float32_generation_matches_and_the_decoder_is_used(monkeypatch):
    model = _model("llama", kv_heads=2, dtype=torch.float32)
    built = []
    real = decode.FastDecoder.__init__
    monkeypatch.setattr(decode.FastDecoder, "__init__", lambda self, *a: (built.append(1), real(self, *a))[1])
    a = generate(model, _Tok, PROMPTS, max_new_tokens=8, seeds=[1, 2, 3, 4], with_logps=True)
    b = generate(model, _Tok, PROMPTS, max_new_tokens=8, seeds=[1, 2, 3, 4], with_logps=True, fast=False)
    assert built == [1]
    assert torch.equal(a.response_ids, b.response_ids)
    torch.testing.assert_close(a.logps, b.logps, rtol=0, atol=1e-5)


def test_the_decoder_reads_the_current_weights():
    """Built per call from the parameters: an update between two calls is seen by the second."""
    model = _model("llama")
    before = generate(model, _Tok, PROMPTS, max_new_tokens=6, temperature=0)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(-3.0)
        model.model.layers[1].mlp.up_proj.weight.mul_(2.0)
        model.lm_head.weight[9] += 5.0
    after = generate(model, _Tok, PROMPTS, max_new_tokens=6, temperature=0)
    ref = generate(model, _Tok, PROMPTS, max_new_tokens=6, temperature=0, fast=False)
    assert torch.equal(after.response_ids, ref.response_ids)
    assert not torch.equal(after.response_ids, before.response_ids)


def test_falls_back_wherever_the_computation_is_not_the_same():
    model = _model("llama")
    assert fast_decoder(model, 8) is not None
    hook = model.model.layers[1].mlp.register_forward_hook(lambda *a: None)  # e.g. an activation probe
    assert fast_decoder(model, 8) is None
    hook.remove()
    model.model.layers[0].mlp.down_proj = torch.nn.Sequential(model.model.layers[0].mlp.down_proj)  # not a Linear
    assert fast_decoder(model, 8) is None
    sliding = _model("mistral")
    sliding.config.sliding_window = 16
    assert fast_decoder(sliding, 8) is None
    mixed = _model("qwen2")
    mixed.config.layer_types = ["full_attention", "sliding_attention"]
    assert fast_decoder(mixed, 8) is None
    gelu = _model("llama")
    gelu.config.hidden_act = "gelu"
    assert fast_decoder(gelu, 8) is None
    flash = _model("llama")
    flash.config._attn_implementation = "flash_attention_2"
    assert fast_decoder(flash, 8) is None
    wrapped = torch.nn.Module()
    wrapped.module = _model("llama")
    assert fast_decoder(wrapped, 8) is None


def test_peft_wrapped_models_use_their_own_forward():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model("llama", dtype=torch.float32),
                                peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert fast_decoder(model, 8) is None
    assert fast_decoder(model.get_base_model(), 8) is None  # its q/v projections are LoRA layers now
    generate(model, _Tok, PROMPTS, max_new_tokens=4, seeds=[1, 2, 3, 4])  # and still samples


def test_cache_overflow_is_an_error():
    model = _model("llama")
    ids, mask = left_pad(PROMPTS, 0)
    dec = fast_decoder(model, ids.shape[1])
    with torch.no_grad():
        dec.prefill(ids, mask, position_ids_from_mask(mask))
        with pytest.raises(RuntimeError, match="overflowed"):
            dec.step(ids[:, :1], torch.ones(len(PROMPTS), ids.shape[1] + 1), torch.zeros(len(PROMPTS), 1).long())
