"""Cross-GPU Batch Normalization (MegDet section 3.3), exact on CPU/gloo and GPU/NCCL.

BatchNorm whose statistics cover every image of a *BN group*: all processes of
``process_group``, or consecutive chunks of ``local_group_size`` images inside one process.

Why not ``nn.SyncBatchNorm``: it refuses CPU tensors, pools over its whole process group only
(no BN size below or between device counts), and re-runs its collectives when activation
checkpointing recomputes a forward. Here each process computes its count, mean and centred sum
of squares (M2) in float32 or float64, and the group combines them in float64 with Chan et al.'s
parallel formula, so a large mean next to a small spread keeps its variance (a naive float32
``E[x^2] - E[x]^2`` does not). Forward makes one collective (all-gather of
``[count, mean, M2]``) and backward one (all-gather of ``[sum dy, sum dy*x_hat]``, summed in
rank order).
"""

from __future__ import annotations

import torch
from torch import nn

from megdet import dist


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Half precision is normalized in float32 (requirement: statistics never in bf16/fp16).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _CrossGPUBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, weight, bias, running_mean, running_var, eps, factor, group, chunk, two_pass
    ):
        """``factor``: running-statistics update weight, or None for no update."""
        dtype = _compute_dtype(x)
        n, c, hw = x.shape[0], x.shape[1], x.shape[2:].numel()
        xc = x.to(dtype).reshape(n, c, hw)
        if chunk:  # BN groups inside this process: (n/chunk) groups of chunk images
            xg = _group_view(xc, n // chunk, chunk)
            var, mean = torch.var_mean(xg, dim=-1, unbiased=False)
            group_mean, group_var = mean.to(torch.float64), var.to(torch.float64)
            total = torch.full((n // chunk,), float(xg.shape[-1]), dtype=torch.float64)
        elif two_pass:  # the paper's variant: all-reduce the mean, then the variance
            sums = torch.cat([xc.new_tensor([float(n * hw)]), xc.sum(dim=(0, 2))])
            sums = dist.all_reduce_sum(sums.to(torch.float64), group)
            total = sums[:1]
            group_mean = sums[1:] / total.clamp(min=1)
            m2 = (xc - group_mean.to(dtype)[None, :, None]).square().sum(dim=(0, 2))
            m2 = dist.all_reduce_sum(m2.to(torch.float64), group)
            group_mean, group_var = group_mean[None], (m2 / total.clamp(min=1))[None]
        else:
            local = xc.shape[0] * xc.shape[2]
            if local:
                mean_l = xc.mean(dim=(0, 2))
                m2_l = (xc - mean_l[None, :, None]).square().sum(dim=(0, 2))
            else:
                mean_l = m2_l = xc.new_zeros(c)
            stats = torch.cat([xc.new_tensor([float(local)]), mean_l, m2_l]).to(torch.float64)
            gathered = dist.all_gather_tensor(stats, group)  # (group size, 2c + 1)
            counts, means, m2s = gathered[:, :1], gathered[:, 1 : c + 1], gathered[:, c + 1 :]
            total = counts.sum()
            safe_total = total.clamp(min=1)
            group_mean = (counts * means).sum(0) / safe_total
            m2 = m2s.sum(0) + (counts * (means - group_mean).square()).sum(0)
            group_var = m2 / safe_total
            group_mean, group_var, total = group_mean[None], group_var[None], total.reshape(1)

        if factor is not None:  # running statistics: mean over BN groups with elements
            valid = total > 0
            if valid.any():
                unbiased = group_var * (total / (total - 1).clamp(min=1))[:, None]
                new_mean = group_mean[valid].mean(0)
                new_var = unbiased[valid].mean(0)
                running_mean.mul_(1 - factor).add_(new_mean.to(running_mean.dtype), alpha=factor)
                running_var.mul_(1 - factor).add_(new_var.to(running_var.dtype), alpha=factor)

        invstd = torch.rsqrt(group_var + eps).to(dtype)  # (groups, c)
        mean_d = group_mean.to(dtype)
        # Normalize the 4D input itself: the output must be a new tensor, not a view, so that
        # an in-place ReLU after it is allowed.
        per_image = (n, c) + (1,) * (x.dim() - 2)
        y = (x.to(dtype) - _per_image(mean_d, n, chunk).reshape(per_image)) * _per_image(
            invstd, n, chunk
        ).reshape(per_image)
        if weight is not None:
            affine = (1, c) + (1,) * (x.dim() - 2)
            y = y * weight.to(dtype).view(affine) + bias.to(dtype).view(affine)
        ctx.save_for_backward(x, weight, mean_d, invstd, total.to(dtype))
        ctx.group, ctx.chunk = group, chunk
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, total = ctx.saved_tensors
        dtype = _compute_dtype(x)
        n, c, hw = x.shape[0], x.shape[1], x.shape[2:].numel()
        chunk = ctx.chunk
        xhat = _normalize(x.to(dtype).reshape(n, c, hw), mean, invstd, chunk)
        dyc = dy.to(dtype).reshape(n, c, hw)
        if chunk:
            groups = n // chunk
            dy_g = _group_view(dyc, groups, chunk)
            xhat_g = _group_view(xhat, groups, chunk)
            sum_dy = dy_g.sum(-1)  # (groups, c)
            sum_dy_xhat = (dy_g * xhat_g).sum(-1)
            local_dy, local_dy_xhat = sum_dy.sum(0), sum_dy_xhat.sum(0)
        else:
            local_dy = dyc.sum(dim=(0, 2))
            local_dy_xhat = (dyc * xhat).sum(dim=(0, 2))
            # An all-gather and a local sum in rank order: the same on every rank, and on gloo
            # one all-gather is 2x faster than one all-reduce (BENCHMARKS.md).
            local = torch.cat([local_dy, local_dy_xhat]).to(torch.float64)
            reduced = dist.all_gather_tensor(local, ctx.group).sum(0).to(dtype)
            sum_dy, sum_dy_xhat = reduced[None, :c], reduced[None, c:]
        scale = invstd if weight is None else invstd * weight.to(dtype)[None]
        mean_dy = sum_dy / total.clamp(min=1)[:, None]
        mean_dy_xhat = sum_dy_xhat / total.clamp(min=1)[:, None]
        dx = _expand_groups(dyc, scale, mean_dy, mean_dy_xhat, xhat, chunk)
        dweight = dbias = None
        if weight is not None:
            dweight = local_dy_xhat.to(weight.dtype)
            dbias = local_dy.to(weight.dtype)
        return (dx.reshape(x.shape).to(x.dtype), dweight, dbias) + (None,) * 7


def _group_view(t: torch.Tensor, groups: int, chunk: int) -> torch.Tensor:
    """(n, c, hw) -> (groups, c, chunk * hw), each row one BN group."""
    n, c, hw = t.shape
    return t.reshape(groups, chunk, c, hw).transpose(1, 2).reshape(groups, c, chunk * hw)


def _per_image(stat: torch.Tensor, n: int, chunk: int | None) -> torch.Tensor:
    """Per-group (groups, c) statistics repeated to (n, c, 1), one row per image."""
    stat = stat.repeat_interleave(chunk, dim=0) if chunk else stat.expand(n, -1)
    return stat[:, :, None]


def _normalize(xc, mean, invstd, chunk):
    n = xc.shape[0]
    return (xc - _per_image(mean, n, chunk)) * _per_image(invstd, n, chunk)


def _expand_groups(dyc, scale, mean_dy, mean_dy_xhat, xhat, chunk):
    n = dyc.shape[0]
    return _per_image(scale, n, chunk) * (
        dyc - _per_image(mean_dy, n, chunk) - xhat * _per_image(mean_dy_xhat, n, chunk)
    )


class CrossGPUBatchNorm2d(nn.modules.batchnorm._BatchNorm):
    """BatchNorm2d with statistics over a group of processes or chunks of images.

    Args mirror ``nn.SyncBatchNorm``; ``local_group_size=g`` normalizes each process's batch in
    consecutive chunks of ``g`` images (BN sizes below the images per device) and cannot be
    combined with a multi-process ``process_group``. ``two_pass=True`` is the paper's variant
    (all-reduce the mean, then the variance: two collectives in forward), kept to compare.
    Eval mode uses the running statistics and makes no collective call.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        local_group_size: int | None = None,
        two_pass: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if local_group_size is not None:
            if local_group_size < 1:
                raise ValueError(f"local_group_size must be >= 1, got {local_group_size}")
            if dist.group_size(process_group) > 1:
                raise ValueError("local_group_size cannot be combined with a multi-process group")
        self.process_group = process_group
        self.local_group_size = local_group_size
        self.two_pass = two_pass

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected a 4D input (N, C, H, W), got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        factor = None
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = self.momentum
            if factor is None:  # cumulative moving average, as nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
        chunk = self.local_group_size
        if chunk is not None and x.shape[0] % chunk:
            raise ValueError(
                f"batch of {x.shape[0]} images does not split into BN groups of {chunk}"
            )
        return _CrossGPUBatchNormFunction.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.eps,
            factor,
            self.process_group,
            chunk,
            self.two_pass,
        )

    def extra_repr(self) -> str:
        extra = f", local_group_size={self.local_group_size}" if self.local_group_size else ""
        return super().extra_repr() + extra


def convert_to_cgbn(
    module: nn.Module, process_group=None, local_group_size: int | None = None
) -> nn.Module:
    """Replace every ``BatchNorm2d``/``SyncBatchNorm`` with CGBN, keeping weights and stats."""
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        new = CrossGPUBatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            local_group_size,
        )
        with torch.no_grad():
            if module.affine:
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
            if module.track_running_stats:
                new.running_mean.copy_(module.running_mean)
                new.running_var.copy_(module.running_var)
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_to_cgbn(child, process_group, local_group_size))
    return module
