"""The vocabulary benchmark's model-FLOP count (bench/dpo_vocab.py), against a hand count.

Its MFU includes the LM head, which at a 152k vocabulary holds most of the model's weights: 8 FLOPs
per block parameter per token the blocks run (policy forward and backward, reference forward) and 8
per head weight per response token, over the timed steps only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _vocab_bench():
    spec = importlib.util.spec_from_file_location("dpo_vocab", ROOT / "bench" / "dpo_vocab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_flops_against_a_hand_count(tmp_path):
    pytest.importorskip("transformers")
    from dpolab.lm.tiny import tiny_llama

    tiny_llama(10, hidden_size=8, layers=1, heads=2, intermediate_size=16).save_pretrained(tmp_path)
    # blocks: q, k, v, o 4·8·8 = 256; gate, up, down 3·8·16 = 384; two norms 16; final norm 8
    n, head = 664, 10 * 8
    run, resp = [100, 7, 5, 3], [50, 2, 3, 1]  # step 1 (warm-up) and a count past the last step: untimed
    got = _vocab_bench().step_flops(str(tmp_path), run, resp, warmup=1, steps=3)
    assert got["run_tokens"] == 12 and got["response_tokens"] == 5
    assert got["model_flops"] == 8 * (n * 12 + head * 5) == 66944
    assert got["head_flop_share"] == pytest.approx(400 / 8368, rel=1e-12)
