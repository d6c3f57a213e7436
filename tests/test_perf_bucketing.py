"""Length-bucketed batch order: a permutation per epoch, less padding, seeded, exactly resumable."""

from __future__ import annotations

import itertools

import pytest
import torch

from dpolab.data.batching import BatchOrder, BucketedBatchOrder, padding_fraction
from dpolab.errors import ConfigError


def _lengths(n: int = 203, seed: int = 0) -> list[int]:
    return torch.randint(5, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_each_epoch_is_a_permutation_with_one_short_batch():
    lengths = _lengths()
    order = BucketedBatchOrder(lengths, batch_size=8, seed=1, pool_batches=4)
    assert order.per_epoch == 26  # ceil(203 / 8)
    for epoch in range(3):
        batches = order.epoch_batches(epoch)
        rows = sorted(i for b in batches for i in b)
        assert rows == list(range(203))
        assert sorted(len(b) for b in batches) == [3] + [8] * 25  # 203 = 25 * 8 + 3
    assert order.epoch_batches(0) != order.epoch_batches(1)  # epochs differ


def test_less_padding_than_random_batches():
    lengths = _lengths(800)
    bucketed = BucketedBatchOrder(lengths, batch_size=8, seed=0, pool_batches=32).epoch_batches(0)
    plain = BatchOrder(len(lengths), 8, 0)
    random_batches = [idx for _, idx in itertools.islice(plain.iterate(0), plain.per_epoch)]
    # uniform lengths on [5, 400): random batches of 8 waste ~ 1 - E[x]/E[max of 8] ≈ 1 - 202/356 ≈ 43%
    assert padding_fraction(lengths, random_batches) > 0.3
    assert padding_fraction(lengths, bucketed) < 0.05


def test_padding_fraction_by_hand():
    # batches [5, 3] and [4]: real 12, padded 2*5 + 4 = 14 -> 1 - 12/14
    assert padding_fraction([5, 3, 4], [[0, 1], [2]]) == pytest.approx(1 - 12 / 14)


def test_seeded_and_resumable():
    lengths = _lengths()
    a = BucketedBatchOrder(lengths, batch_size=8, seed=5, pool_batches=4)
    full = list(itertools.islice(a.iterate(0), 70))  # crosses two epoch boundaries
    resumed = list(itertools.islice(BucketedBatchOrder(lengths, 8, 5, pool_batches=4).iterate(37), 33))
    assert resumed == full[37:]
    other = list(itertools.islice(BucketedBatchOrder(lengths, 8, 6, pool_batches=4).iterate(0), 70))
    assert other != full


def test_ranks_split_each_global_batch():
    lengths = _lengths(50)
    r0 = BucketedBatchOrder(lengths, 4, 0, world_size=2, rank=0)
    r1 = BucketedBatchOrder(lengths, 4, 0, world_size=2, rank=1)
    g = BucketedBatchOrder(lengths, 8, 0, world_size=1)
    for (k0, a), (k1, b), (k, whole) in itertools.islice(zip(r0.iterate(), r1.iterate(), g.iterate()), 7):
        assert k0 == k1 == k and a + b == whole


def test_bad_arguments():
    with pytest.raises(ConfigError):
        BucketedBatchOrder([1, 2], batch_size=0, seed=0)
    with pytest.raises(ConfigError):
        BucketedBatchOrder([], batch_size=2, seed=0)
    with pytest.raises(ConfigError):
        BucketedBatchOrder([1], batch_size=1, seed=0, world_size=2, rank=2)


def test_steps_hold_the_same_rows_however_they_are_split():
    """Grouping is by optimizer step: 1 x 16, 4 micro-batches x 4, and 2 processes x 8 (and x 2
    micro-batches of 4) see the same rows in every step, so accumulation and data parallelism leave
    the gradient unchanged."""
    lengths = _lengths(101)

    def steps(bs: int, accum: int, world: int) -> list[list[int]]:
        ranks = [BucketedBatchOrder(lengths, bs, 3, pool_batches=2, world_size=world, rank=r, grad_accum=accum)
                 for r in range(world)]
        assert ranks[0].per_epoch % accum == 0
        iters = [r.iterate(0) for r in ranks]
        out = []
        for _ in range(2 * ranks[0].per_epoch // accum):  # two epochs of steps
            rows = [i for it in iters for _ in range(accum) for i in next(it)[1]]
            out.append(sorted(rows))
        return out

    reference = steps(16, 1, 1)
    assert steps(4, 4, 1) == reference
    assert steps(8, 1, 2) == reference
    assert steps(4, 2, 2) == reference
    assert len(reference) == 2 * 7 and sorted(i for s in reference[:7] for i in s) == list(range(101))
