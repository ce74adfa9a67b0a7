"""Positive/negative sampling of anchors (RPN) and proposals (RoI heads), seeded per image.

torchvision's ``BalancedPositiveNegativeSampler`` draws from the global RNG, so which anchors
an image trains on depends on what else is in its process's batch, i.e. on the world size.
This sampler draws each image's choice from a generator seeded by ``(seed, epoch, index)``:
1 process x 8 images and 4 processes x 2 images sample exactly the same anchors.
"""

from __future__ import annotations

import torch
from torch import nn

from megdet import dist
from megdet.data.sampler import image_seed


class SeededPositiveNegativeSampler:
    """Drop-in for the heads' ``fg_bg_sampler``; set ``image_keys`` before each forward."""

    def __init__(
        self, batch_size_per_image: int, positive_fraction: float, seed: int, stream: int
    ) -> None:
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.seed = seed
        self.stream = stream  # keeps the RPN's and the RoI heads' draws independent
        self.image_keys: list[tuple[int, int]] | None = None
        self.last_counts = (0, 0, 0)  # positives, negatives, images of the last call

    def __call__(self, matched_idxs: list[torch.Tensor]):
        keys = self.image_keys
        if keys is None or len(keys) != len(matched_idxs):
            raise RuntimeError("set fg_bg_sampler.image_keys to the batch's (epoch, index) pairs")
        positives, negatives = [], []
        total_pos = total_neg = 0
        for matched, (epoch, index) in zip(matched_idxs, keys, strict=True):
            generator = torch.Generator().manual_seed(
                image_seed(self.seed * 7919 + self.stream, epoch, index)
            )
            positive = torch.where(matched >= 1)[0]
            negative = torch.where(matched == 0)[0]
            num_pos = min(int(self.batch_size_per_image * self.positive_fraction), positive.numel())
            num_neg = min(self.batch_size_per_image - num_pos, negative.numel())
            pick_pos = torch.randperm(positive.numel(), generator=generator)[:num_pos]
            pick_neg = torch.randperm(negative.numel(), generator=generator)[:num_neg]
            pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
            neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
            pos_mask[positive[pick_pos.to(positive.device)]] = 1
            neg_mask[negative[pick_neg.to(negative.device)]] = 1
            positives.append(pos_mask)
            negatives.append(neg_mask)
            total_pos, total_neg = total_pos + num_pos, total_neg + num_neg
        self.last_counts = (total_pos, total_neg, len(matched_idxs))
        return positives, negatives


class GlobalSampleCounts:
    """The global batch's sampled anchors and RoIs, summed over processes while the box head
    runs: started by a forward pre-hook of the RoI pooler (both samplers have drawn by then),
    awaited when the losses are weighted (``DetectionTask.global_batch_losses``)."""

    def __init__(self, rpn: SeededPositiveNegativeSampler, roi: SeededPositiveNegativeSampler):
        self.samplers = (rpn, roi)
        self._pending = None

    def start(self, module: nn.Module, args) -> None:
        if not module.training or dist.get_world_size() == 1:
            return
        features = args[0]  # the pooler's feature maps: the device the counts are summed on
        device = next(iter(features.values())).device if isinstance(features, dict) else None
        local = torch.tensor(
            [float(sum(s.last_counts[:2])) for s in self.samplers],
            dtype=torch.float64,
            device=device,
        )
        total = local.clone()
        self._pending = (local, total, dist.all_reduce_sum_async(total))

    def shares(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of the RPN's and the RoI heads' samples, times the number of
        processes (DDP divides by it): 1.0 each when every process sampled as many. On the
        device (float64): the step reads nothing for them, and NCCL sums no host tensor."""
        if self._pending is None:
            raise RuntimeError("no sample counts in flight: was the box head run in training?")
        local, total, work = self._pending
        self._pending = None
        work.wait()
        rpn, roi = (local * dist.get_world_size() / total.clamp(min=1)).unbind()
        return rpn, roi
