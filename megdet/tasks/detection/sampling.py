"""Positive/negative sampling of anchors (RPN) and proposals (RoI heads), seeded per image.

torchvision's ``BalancedPositiveNegativeSampler`` draws from the global RNG, so which anchors
an image trains on depends on what else is in its process's batch, i.e. on the world size.
This sampler draws each image's choice from a generator seeded by ``(seed, epoch, index)``:
1 process x 8 images and 4 processes x 2 images sample exactly the same anchors.
"""

from __future__ import annotations

import torch

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
