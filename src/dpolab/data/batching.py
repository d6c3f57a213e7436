"""Seeded, resumable orders of micro-batches: uniformly shuffled (:class:`BatchOrder`) or length-bucketed
(:class:`BucketedBatchOrder`: little padding, still seeded and exactly resumable), and token-budget splits.

A padded batch costs ``rows × longest row``; random batches of varied lengths waste much of that on
padding. :class:`BucketedBatchOrder` groups rows of similar length while keeping the order random
enough for SGD ("sortish" sampling, as in fairseq/torchnlp bucket iterators):

1. epoch ``e`` shuffles all ``n`` rows with ``seed + e``;
2. the shuffled rows are cut into pools of ``pool_batches`` optimizer steps; each pool is sorted by
   length (ties keep the shuffled order);
3. the sorted epoch is cut into steps of ``batch_size × world_size × grad_accum`` rows (only the last
   one may be smaller);
4. the steps of the epoch are shuffled with a second seeded stream, so long and short batches
   alternate through the epoch;
5. each step is cut into ``grad_accum`` global micro-batches of ``batch_size × world_size`` rows, each
   split into ``world_size`` contiguous slices, one per process.

Grouping by *step* rather than by micro-batch makes the rows of an optimizer step independent of how
they are split: 1 process × 1 micro-batch of 16, 4 micro-batches of 4, or 2 processes × 8 see the
same 16 rows, so gradient accumulation and data parallelism leave the gradient unchanged.

Micro-batch ``k`` depends only on ``(seed, k)``: :meth:`iterate` resumed at ``start = k`` replays the
rest of an uninterrupted run exactly, the contract of :class:`BatchOrder`, whose
interface (``per_epoch``, ``iterate(start)`` yielding ``(k, rows)``) this class shares.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from dpolab.errors import ConfigError

_BATCH_SHUFFLE_SALT = 0x5EED_B0C  # separates the batch-order stream from the row-shuffle stream


class _ProcessSlices:
    """This process's slice of each global micro-batch: rank ``r`` takes the ``r``-th of
    ``world_size`` near-equal contiguous slices (a subclass defines ``global_rows(k)``)."""

    def global_rows(self, k: int) -> list[int]:
        raise NotImplementedError

    def iterate(self, start: int = 0) -> Iterator[tuple[int, list[int]]]:
        """Yield ``(micro_batch_number, row indices)`` forever, starting at micro-batch ``start``."""
        k = start
        while True:
            chunk = self.global_rows(k)
            per = math.ceil(len(chunk) / self.world_size)
            yield k, chunk[self.rank * per:(self.rank + 1) * per]
            k += 1


@dataclass
class BucketedBatchOrder(_ProcessSlices):
    """Seeded, resumable, length-bucketed order of micro-batches over epochs.

    lengths: per-row cost used for grouping, e.g. ``len(prompt) + max(len(chosen), len(rejected))``
        (the padded width the row forces on a plain batch).
    batch_size: rows per micro-batch per process; world_size/rank: data-parallel slicing, as in
        ``BatchOrder`` (each global batch is split into ``world_size`` contiguous slices).
    pool_batches: optimizer steps per sorting pool; 1 sorts nothing across steps (only within), a
        pool as large as the epoch sorts it fully (least padding, least randomness).
    grad_accum: micro-batches per optimizer step (the last step of an epoch may leave some of its
        micro-batches empty; the trainers run those as weight-0 stand-ins).
    """

    lengths: Sequence[int]
    batch_size: int
    seed: int
    pool_batches: int = 64
    world_size: int = 1
    rank: int = 0
    grad_accum: int = 1
    _cache: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if min(self.batch_size, self.pool_batches, self.world_size, self.grad_accum) < 1:
            raise ConfigError("batch_size, pool_batches, world_size and grad_accum must be >= 1")
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
        """Micro-batches per epoch: ``grad_accum`` per step (the last step may be smaller, never dropped)."""
        step_rows = self.batch_size * self.world_size * self.grad_accum
        return max(1, math.ceil(self.n / step_rows)) * self.grad_accum

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global micro-batches of ``epoch`` in the order they are served (row indices; with
        ``grad_accum`` > 1 the tail of the last step may hold empty ones)."""
        if epoch in self._cache:
            return self._cache[epoch]
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        global_bs = self.batch_size * self.world_size
        step_rows = global_bs * self.grad_accum
        pool = step_rows * self.pool_batches
        ordered: list[int] = []
        for s in range(0, self.n, pool):
            ordered += sorted(perm[s:s + pool], key=self.lengths.__getitem__)  # stable: ties keep shuffle
        steps = [ordered[s:s + step_rows] for s in range(0, self.n, step_rows)]
        g2 = torch.Generator().manual_seed((self.seed + epoch) ^ _BATCH_SHUFFLE_SALT)
        steps = [steps[i] for i in torch.randperm(len(steps), generator=g2).tolist()]
        batches = [rows[m * global_bs:(m + 1) * global_bs] for rows in steps for m in range(self.grad_accum)]
        self._cache = {epoch: batches}  # keep one epoch: iterate() moves forward
        return batches

    def global_rows(self, k: int) -> list[int]:
        """The rows of micro-batch ``k`` over all processes (rank ``r`` takes its ``r``-th slice)."""
        epoch, j = divmod(k, self.per_epoch)
        return self.epoch_batches(epoch)[j]

    def global_size(self, k: int) -> int:
        """Rows in micro-batch ``k`` over all processes (the exact multi-process loss normaliser)."""
        return len(self.global_rows(k))


def split_by_tokens(rows: Sequence[int], widths: Sequence[int], budget: int) -> list[list[int]]:
    """Cut a micro-batch into forward passes of at most ``budget`` padded tokens each.

    ``widths[i]`` is the padded size row ``i`` forces per row it occupies (so a group costs
    ``len(group) × max width``). Rows are taken in order of width (narrowest first, ties by position
    in ``rows``) and grouped greedily; a row wider than the budget forms a group of its own, and
    ``budget <= 0`` keeps the micro-batch whole. Every row lands in exactly one group.
    """
    if budget <= 0 or not rows:
        return [list(rows)]
    groups: list[list[int]] = []
    current: list[int] = []
    for i in sorted(rows, key=widths.__getitem__):  # stable
        if current and (len(current) + 1) * widths[i] > budget:
            groups.append(current)
            current = []
        current.append(i)
    groups.append(current)
    return groups


def batch_order(lengths: Sequence[int], cfg, accelerator):
    """The trainers' micro-batch order: :class:`BucketedBatchOrder` over ``lengths`` with
    ``cfg.group_by_length`` (the default), else over equal lengths (nothing sorted: each step's rows
    a uniformly shuffled draw), so that either way an epoch's last step is its own and the rows of a
    step do not depend on ``grad_accum`` or the process count (a plain :class:`BatchOrder` of
    micro-batches let the last step of an epoch take micro-batches of the next); sliced for this
    process of ``accelerator``."""
    world, rank = accelerator.num_processes, accelerator.process_index
    return BucketedBatchOrder(lengths if cfg.group_by_length else [0] * len(lengths), cfg.batch_size, cfg.seed,
                              world_size=world, rank=rank, grad_accum=cfg.grad_accum)


def pair_lengths(pairs) -> list[int]:
    """Padded-width cost of each preference pair: ``|prompt| + max(|chosen|, |rejected|)``."""
    return [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of a padded layout that is padding: ``1 − Σ len / Σ (rows × max len)`` over batches."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1.0 - real / padded if padded else 0.0


@dataclass
class BatchOrder(_ProcessSlices):
    """A seeded, resumable order of micro-batches over epochs.

    Epoch ``e`` shuffles ``n`` rows with ``seed + e``; micro-batch ``k`` of the whole run is the
    ``k``-th chunk of ``batch_size * world_size`` rows, and process ``rank`` takes its slice, so the
    order depends only on (seed, k): resuming at micro-batch k reproduces the rest of the run exactly.
    The last chunk of an epoch may be smaller (never dropped).
    """

    n: int
    batch_size: int
    seed: int
    shuffle: bool = True
    world_size: int = 1
    rank: int = 0

    @property
    def per_epoch(self) -> int:
        return max(1, math.ceil(self.n / (self.batch_size * self.world_size)))

    def epoch_perm(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def global_size(self, k: int) -> int:
        """Rows in micro-batch ``k`` summed over all processes (the loss normaliser of an exact
        multi-process step; needs no communication)."""
        j = k % self.per_epoch
        global_bs = self.batch_size * self.world_size
        return max(0, min(global_bs, self.n - j * global_bs))

    def global_rows(self, k: int) -> list[int]:
        """The rows of micro-batch ``k`` over all processes (rank ``r`` takes its ``r``-th slice)."""
        epoch, j = divmod(k, self.per_epoch)
        global_bs = self.batch_size * self.world_size
        return self.epoch_perm(epoch)[j * global_bs:(j + 1) * global_bs]


def total_steps(max_steps: int, epochs: float, micro_batches_per_epoch: int, grad_accum: int) -> int:
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * micro_batches_per_epoch / grad_accum))
