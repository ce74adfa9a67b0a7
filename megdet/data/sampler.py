"""One global data order, whatever the number of processes.

Every process draws the same permutation of the training set per epoch from ``(seed, epoch)``;
global batch ``i`` of the epoch is ``perm[i*B:(i+1)*B]`` and rank ``r`` takes the ``r``-th
contiguous share of it. So 1 process x 8 images and 4 processes x 2 images see exactly the same
global batches, and a run can resume at any iteration without replaying the loader.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def image_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one image in one epoch; the same on every rank (no rank in it)."""
    state = np.random.SeedSequence([seed, epoch, index + 1]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def epoch_permutation(num_images: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(image_seed(seed, epoch, -1))
    return torch.randperm(num_images, generator=generator)


class GlobalShuffleSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler yielding this rank's ``(epoch, index)`` pairs for iterations
    ``start_iter .. max_iter - 1``.

    An epoch is ``ceil(num_images / global_batch)`` iterations; its last batch is filled up
    from the start of the same permutation, so every iteration has exactly ``global_batch``
    images (the learning rate was scaled for that many).

    ``group_ids`` (e.g. 0 for landscape, 1 for portrait images) turns on aspect-ratio grouping:
    walking the epoch's permutation, images fill one bucket per group and a full bucket becomes
    the next global batch, so a batch pads little. The decision is made on the whole global
    batch from the shared permutation, so all ranks agree and the order stays the same for any
    number of processes. What the buckets hold at the end of the epoch is batched in
    permutation order (mixed groups), filled up from the start of the permutation.
    """

    def __init__(
        self,
        num_images: int,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        max_iter: int,
        start_iter: int = 0,
        group_ids: Sequence[int] | None = None,
    ) -> None:
        if num_images <= 0:
            raise ValueError("the training set is empty")
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size}")
        self.num_images = num_images
        self.global_batch = global_batch
        self.per_rank = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.max_iter = max_iter
        self.start_iter = start_iter
        self.iters_per_epoch = -(-num_images // global_batch)
        if group_ids is not None and len(group_ids) != num_images:
            raise ValueError(f"{len(group_ids)} group ids for {num_images} images")
        self.group_ids = None if group_ids is None else torch.as_tensor(group_ids)

    def __len__(self) -> int:
        return max(0, self.max_iter - self.start_iter)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation, repeated to fill its last global batch."""
        perm = epoch_permutation(self.num_images, self.seed, epoch)
        length = self.iters_per_epoch * self.global_batch
        if self.group_ids is not None:
            perm = self._grouped(perm)
        return perm.repeat(-(-length // self.num_images))[:length]

    def _grouped(self, perm: torch.Tensor) -> torch.Tensor:
        """``perm`` reordered into full single-group global batches, leftovers last."""
        batches: list[list[int]] = []
        buckets: dict[int, list[int]] = {}
        for index in perm.tolist():
            bucket = buckets.setdefault(int(self.group_ids[index]), [])
            bucket.append(index)
            if len(bucket) == self.global_batch:
                batches.append(bucket.copy())
                bucket.clear()
        grouped = {i for batch in batches for i in batch}
        leftovers = [i for i in perm.tolist() if i not in grouped]
        return torch.tensor([i for batch in batches for i in batch] + leftovers)

    def global_batch_at(self, iteration: int) -> tuple[int, list[int]]:
        """The epoch and the image indices of global batch ``iteration``, all ranks included."""
        epoch, position = divmod(iteration, self.iters_per_epoch)
        start = position * self.global_batch
        return epoch, self.epoch_order(epoch)[start : start + self.global_batch].tolist()

    def __iter__(self):
        cached_epoch, order = -1, None
        for iteration in range(self.start_iter, self.max_iter):
            epoch, position = divmod(iteration, self.iters_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, order = epoch, self.epoch_order(epoch)
            start = position * self.global_batch + self.rank * self.per_rank
            yield [(epoch, int(i)) for i in order[start : start + self.per_rank]]
