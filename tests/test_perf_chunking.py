"""Forward passes within a token budget: the split, the activation-memory estimate behind the
default budget, and the budget's floor."""

from __future__ import annotations

import torch

from dpolab.data.batching import split_by_tokens
from dpolab.train.memory import MIN_ACTIVATION_BYTES, activation_bytes_per_token, auto_forward_tokens


def test_split_by_tokens_by_hand():
    widths = {0: 10, 1: 30, 2: 12, 3: 25, 4: 100}
    w = [widths[i] for i in range(5)]
    # narrowest first: 0 (10), 2 (12), 3 (25), 1 (30), 4 (100); budget 60:
    # [0, 2] costs 2*12 = 24; adding 3 would cost 3*25 = 75 > 60 -> cut; [3, 1] costs 2*30 = 60;
    # 4 alone (wider than the budget).
    assert split_by_tokens([0, 1, 2, 3, 4], w, 60) == [[0, 2], [3, 1], [4]]
    assert split_by_tokens([0, 1, 2, 3, 4], w, 0) == [[0, 1, 2, 3, 4]]       # 0: never split
    assert split_by_tokens([4, 0], w, 1) == [[0], [4]]                       # one row per pass at least
    assert split_by_tokens([], w, 60) == [[]]                                # an empty slice stays one stand-in


def test_split_keeps_every_row_once_and_within_budget():
    g = torch.Generator().manual_seed(0)
    widths = torch.randint(1, 200, (300,), generator=g).tolist()
    rows = torch.randperm(300, generator=g)[:57].tolist()
    for budget in (50, 256, 1000):
        groups = split_by_tokens(rows, widths, budget)
        assert sorted(i for grp in groups for i in grp) == sorted(rows)
        for grp in groups:
            assert len(grp) == 1 or len(grp) * max(widths[i] for i in grp) <= budget


def test_activation_estimate_matches_the_saved_tensors(tiny_model):
    """The formula L·(10h + 4i)·bytes against what autograd really keeps for backward (parameters
    excluded), on a tiny Llama in float32: within 25%."""
    model = tiny_model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids)  # the decoder layers (the head is response-only in training)
    per_token = sum(seen.values()) / ids.numel()
    estimate = activation_bytes_per_token(model.config, 4)
    assert 0.75 * estimate <= per_token <= 1.25 * estimate, (per_token, estimate)


def test_auto_budget_is_weights_over_activations_with_a_floor(tiny_model):
    class Cfg:
        hidden_size, num_hidden_layers, intermediate_size = 512, 7, 1376

    # the benchmark's 26M model: 290 KiB per token in float32
    assert activation_bytes_per_token(Cfg, 4) == 7 * (10 * 512 + 4 * 1376) * 4
    tiny_per_token = activation_bytes_per_token(tiny_model.config, 4)
    assert auto_forward_tokens(tiny_model) == MIN_ACTIVATION_BYTES // tiny_per_token  # a tiny model: the floor
    big = torch.nn.Linear(4096, 8192)  # 128 MiB of weights
    big.config = Cfg
    assert auto_forward_tokens(big) == (4096 * 8192 + 8192) * 4 // (7 * (10 * 512 + 4 * 1376) * 4)
    assert auto_forward_tokens(big, "bf16") == 2 * auto_forward_tokens(big)  # 16-bit activations
    assert auto_forward_tokens(torch.nn.Linear(2, 2)) == 0  # unknown shape: never split


def test_auto_budget_leaves_out_the_embedding_and_head(monkeypatch):
    """The vocabulary's rows keep no per-token activations: a larger vocabulary buys no larger passes."""
    from dpolab.lm.tiny import tiny_llama
    from dpolab.train import memory

    monkeypatch.setattr(memory, "MIN_ACTIVATION_BYTES", 0)  # no floor: the weights decide
    small, large = (tiny_llama(v, hidden_size=32, layers=2, heads=2, intermediate_size=64) for v in (64, 4096))
    blocks = sum(p.numel() * 4 for n, p in small.named_parameters() if "embed" not in n and "lm_head" not in n)
    per_token = activation_bytes_per_token(small.config, 4)
    assert memory.auto_forward_tokens(small) == memory.auto_forward_tokens(large) == blocks // per_token
    assert sum(p.numel() for p in large.parameters()) > 10 * sum(p.numel() for p in small.parameters())
