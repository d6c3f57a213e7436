"""Length-bucketed micro-batches: little padding, still seeded and exactly resumable.

A padded batch costs ``rows × longest row``; random batches of varied lengths waste much of that on
padding. :class:`BucketedBatchOrder` groups rows of similar length while keeping the order random
enough for SGD ("sortish" sampling, as in fairseq/torchnlp bucket iterators):

1. epoch ``e`` shuffles all ``n`` rows with ``seed + e``;
2. the shuffled rows are cut into pools of ``pool_batches`` global batches; each pool is sorted by
   length (ties keep the shuffled order);
3. the sorted epoch is cut into global batches of ``batch_size × world_size`` rows (only the last one
   may be smaller);
4. the batches of the epoch are shuffled with a second seeded stream, so long and short batches
   alternate through the epoch.

Micro-batch ``k`` depends only on ``(seed, k)``: :meth:`iterate` resumed at ``start = k`` replays the
rest of an uninterrupted run exactly, the contract of :class:`dpolab.train.common.BatchOrder`, whose
interface (``per_epoch``, ``iterate(start)`` yielding ``(k, rows)``) this class shares.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from dpolab.errors import ConfigError

_BATCH_SHUFFLE_SALT = 0x5EED_B0C  # separates the batch-order stream from the row-shuffle stream


@dataclass
class BucketedBatchOrder:
    """Seeded, resumable, length-bucketed order of micro-batches over epochs.

    lengths: per-row cost used for grouping, e.g. ``len(prompt) + max(len(chosen), len(rejected))``
        (the padded width the row forces on a plain batch).
    batch_size: rows per micro-batch per process; world_size/rank: data-parallel slicing, as in
        ``BatchOrder`` (each global batch is split into ``world_size`` contiguous slices).
    pool_batches: global batches per sorting pool; 1 sorts nothing across batches (only within), a
        pool as large as the epoch sorts it fully (least padding, least randomness).
    """

    lengths: Sequence[int]
    batch_size: int
    seed: int
    pool_batches: int = 64
    world_size: int = 1
    rank: int = 0
    _cache: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.pool_batches < 1 or self.world_size < 1:
            raise ConfigError("batch_size, pool_batches and world_size must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} outside world_size {self.world_size}")
        if len(self.lengths) == 0:
            raise ConfigError("BucketedBatchOrder needs at least one row")
        self.lengths = [int(x) for x in self.lengths]

    @property
    def n(self) -> int:
        return len(self.lengths)

    @property
    def per_epoch(self) -> int:
        """Micro-batches per epoch (global batches; the last may be smaller, never dropped)."""
        return max(1, math.ceil(self.n / (self.batch_size * self.world_size)))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch`` in the order they are served (row indices)."""
        if epoch in self._cache:
            return self._cache[epoch]
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        global_bs = self.batch_size * self.world_size
        pool = global_bs * self.pool_batches
        ordered: list[int] = []
        for s in range(0, self.n, pool):
            ordered += sorted(perm[s:s + pool], key=self.lengths.__getitem__)  # stable: ties keep shuffle
        batches = [ordered[s:s + global_bs] for s in range(0, self.n, global_bs)]
        g2 = torch.Generator().manual_seed((self.seed + epoch) ^ _BATCH_SHUFFLE_SALT)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g2).tolist()]
        self._cache = {epoch: batches}  # keep one epoch: iterate() moves forward
        return batches

    def global_size(self, k: int) -> int:
        """Rows in micro-batch ``k`` over all processes (the exact multi-process loss normaliser)."""
        epoch, j = divmod(k, self.per_epoch)
        return len(self.epoch_batches(epoch)[j])

    def iterate(self, start: int = 0) -> Iterator[tuple[int, list[int]]]:
        """Yield ``(micro_batch_number, row indices)`` forever, starting at micro-batch ``start``."""
        k = start
        while True:
            epoch, j = divmod(k, self.per_epoch)
            chunk = self.epoch_batches(epoch)[j]
            per = math.ceil(len(chunk) / self.world_size)
            yield k, chunk[self.rank * per:(self.rank + 1) * per]
            k += 1


def pair_lengths(pairs) -> list[int]:
    """Padded-width cost of each preference pair: ``|prompt| + max(|chosen|, |rejected|)``."""
    return [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of a padded layout that is padding: ``1 − Σ len / Σ (rows × max len)`` over batches."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1.0 - real / padded if padded else 0.0
