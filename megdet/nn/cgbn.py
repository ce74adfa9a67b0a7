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
rank order). A group of one process (per-process BN) runs ATen's fused BatchNorm kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from megdet import dist
from megdet.nn.recompute import active_tape


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Half precision is normalized in float32 (requirement: statistics never in bf16/fp16).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _batch_statistics(x: torch.Tensor, group, chunk: int | None, two_pass: bool):
    """(mean, biased variance, element count) per BN group, float64: ``(groups, c)``,
    ``(groups, c)``, ``(groups,)``. The only place CGBN talks to other processes in forward."""
    xc = x.detach().to(_compute_dtype(x))
    if chunk:
        return _chunk_statistics(xc, chunk)
    if two_pass:
        return _two_pass_statistics(xc, group)
    return _group_statistics(xc, group)


class _CrossGPUBatchNormFunction(torch.autograd.Function):
    """Normalization by given batch statistics; backward pools its sums over ``group``.

    The statistics come in as arguments (computed without autograd by the module), so that a
    recomputation under activation checkpointing can pass the recorded ones again.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group_mean, group_var, total, eps, group, chunk):
        xc = x.to(_compute_dtype(x))
        invstd = torch.rsqrt(group_var + eps).to(xc.dtype)  # (groups, c)
        mean = group_mean.to(xc.dtype)
        if chunk:
            y = (
                _per_image(mean, chunk, x.dim())
                .neg()
                .add(xc)
                .mul_(_per_image(invstd, chunk, x.dim()))
            )
            if weight is not None:
                affine = (1, -1) + (1,) * (x.dim() - 2)
                y = y.mul_(weight.to(y.dtype).view(affine)).add_(bias.to(y.dtype).view(affine))
        else:  # one group: ATen's fused normalization with the group's statistics
            w = None if weight is None else weight.to(xc.dtype)
            b = None if bias is None else bias.to(xc.dtype)
            var = group_var[0].to(xc.dtype)
            y = nn.functional.batch_norm(xc, mean[0], var, w, b, False, 0.0, eps)
        # A new tensor, never a view of the input: an in-place ReLU may follow.
        ctx.save_for_backward(x, weight, mean, invstd, total.to(xc.dtype))
        ctx.group, ctx.chunk = group, chunk
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, total = ctx.saved_tensors
        xc, dyc = x.to(_compute_dtype(x)), dy.to(_compute_dtype(x))
        chunk, dims = ctx.chunk, x.dim()
        xhat = _per_image(mean, chunk, dims).neg().add(xc).mul_(_per_image(invstd, chunk, dims))
        dy_xhat = dyc * xhat
        if chunk:
            sum_dy, sum_dy_xhat = _group_sum(dyc, chunk), _group_sum(dy_xhat, chunk)  # (groups, c)
            local_dy, local_dy_xhat = sum_dy.sum(0), sum_dy_xhat.sum(0)
        else:
            reduce_dims = [0] + list(range(2, dims))
            local_dy, local_dy_xhat = dyc.sum(reduce_dims), dy_xhat.sum(reduce_dims)
            # An all-gather and a local sum in rank order: the same on every rank, and on gloo
            # one all-gather is 2x faster than one all-reduce (BENCHMARKS.md).
            local = torch.cat([local_dy, local_dy_xhat]).to(torch.float64)
            reduced = dist.all_gather_tensor(local, ctx.group).sum(0).to(xc.dtype)
            c = xc.shape[1]
            sum_dy, sum_dy_xhat = reduced[None, :c], reduced[None, c:]
        scale = invstd if weight is None else invstd * weight.to(xc.dtype)[None]
        mean_dy = sum_dy / total.clamp(min=1)[:, None]
        mean_dy_xhat = sum_dy_xhat / total.clamp(min=1)[:, None]
        # dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)), per group and channel; the
        # buffer of dy * x_hat is reused.
        dx = torch.mul(xhat, _per_image(mean_dy_xhat, chunk, dims), out=dy_xhat)
        dx = torch.sub(dyc, _per_image(mean_dy, chunk, dims)).sub_(dx)
        dx.mul_(_per_image(scale, chunk, dims))
        dweight = dbias = None
        if weight is not None:
            dweight = local_dy_xhat.to(weight.dtype)
            dbias = local_dy.to(weight.dtype)
        return (dx.to(x.dtype), dweight, dbias) + (None,) * 6


class _LocalBatchNormFunction(torch.autograd.Function):
    """BatchNorm over this process's batch by ATen's fused kernels: one pass forward, one pass
    backward, where the group path needs several (a BN group of one process)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps):
        y, mean, invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, factor, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        affine = weight is not None
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, ctx.eps, [True, affine, affine]
        )
        return dx, dweight, dbias, None, None, None, None


def _group_statistics(xc: torch.Tensor, group):
    """Mean and biased variance over every element of the processes in ``group``.

    Each process sends ``[count, mean, M2]`` (float64) in one all-gather; the means and M2s are
    combined with Chan et al.'s formula, which keeps a small variance next to a large mean.
    """
    c = xc.shape[1]
    dims = [0] + list(range(2, xc.dim()))
    local = xc.numel() // c if c else 0
    if local:
        mean_l = xc.mean(dims)
        m2_l = (xc - mean_l.view((1, c) + (1,) * (xc.dim() - 2))).square_().sum(dims)
    else:
        mean_l = m2_l = xc.new_zeros(c)
    stats = torch.cat([xc.new_tensor([float(local)]), mean_l, m2_l]).to(torch.float64)
    gathered = dist.all_gather_tensor(stats, group)  # (group size, 2c + 1)
    counts, means, m2s = gathered[:, :1], gathered[:, 1 : c + 1], gathered[:, c + 1 :]
    total = counts.sum()
    safe_total = total.clamp(min=1)
    group_mean = (counts * means).sum(0) / safe_total
    m2 = m2s.sum(0) + (counts * (means - group_mean).square()).sum(0)
    return group_mean[None], (m2 / safe_total)[None], total.reshape(1)


def _two_pass_statistics(xc: torch.Tensor, group):
    """The paper's variant: all-reduce the sums for the mean, then the centred squares."""
    c = xc.shape[1]
    dims = [0] + list(range(2, xc.dim()))
    sums = torch.cat([xc.new_tensor([float(xc.numel() // c)]), xc.sum(dims)])
    sums = dist.all_reduce_sum(sums.to(torch.float64), group)
    total = sums[:1]
    group_mean = sums[1:] / total.clamp(min=1)
    centred = xc - group_mean.to(xc.dtype).view((1, c) + (1,) * (xc.dim() - 2))
    m2 = dist.all_reduce_sum(centred.square_().sum(dims).to(torch.float64), group)
    return group_mean[None], (m2 / total.clamp(min=1))[None], total


def _chunk_statistics(xc: torch.Tensor, chunk: int):
    """BN groups inside this process: consecutive chunks of ``chunk`` images."""
    n, c = xc.shape[:2]
    groups = xc.reshape(n // chunk, chunk, c, -1).transpose(1, 2).reshape(n // chunk, c, -1)
    var, mean = torch.var_mean(groups, dim=-1, unbiased=False)
    total = torch.full(
        (n // chunk,), float(groups.shape[-1]), dtype=torch.float64, device=xc.device
    )
    return mean.to(torch.float64), var.to(torch.float64), total


def _update_running(running_mean, running_var, group_mean, group_var, total, factor) -> None:
    """Running statistics: the mean over BN groups that had elements; none, no update. On the
    device throughout (a weight per group, no test on the host): a read per layer would stall
    a GPU's queue at every BN of every step."""
    valid = (total > 0).to(group_mean.dtype)[:, None]
    groups = valid.sum().clamp(min=1)
    unbiased = group_var * (total / (total - 1).clamp(min=1))[:, None]
    new_mean = (group_mean * valid).sum(0) / groups
    new_var = (unbiased * valid).sum(0) / groups
    weight = valid.amax() * factor  # 0 when no group had elements: the statistics stay
    for running, new in ((running_mean, new_mean), (running_var, new_var)):
        running.mul_(1 - weight).add_((new * weight).to(running.dtype))


def _group_sum(t: torch.Tensor, chunk: int) -> torch.Tensor:
    """(n, c, ...) summed per BN group of ``chunk`` consecutive images: (n / chunk, c)."""
    n, c = t.shape[:2]
    return t.reshape(n // chunk, chunk, c, -1).sum(dim=(1, 3))


def _per_image(stat: torch.Tensor, chunk: int | None, dims: int) -> torch.Tensor:
    """Per-group (groups, c) statistics shaped to broadcast over (n, c, H, W)."""
    if chunk:
        stat = stat.repeat_interleave(chunk, dim=0)
    return stat.reshape(stat.shape + (1,) * (dims - 2))


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
        chunk = self.local_group_size
        if chunk is not None and x.shape[0] % chunk:
            raise ValueError(
                f"batch of {x.shape[0]} images does not split into BN groups of {chunk}"
            )
        tape = active_tape()
        if self._is_local(x, chunk):
            return self._local_forward(x, tape)
        if tape is not None and tape.replaying:
            # Recomputation under activation checkpointing: the first forward's statistics,
            # no collective, no second update of the running statistics.
            mean, var, total = tape.replay()
        else:
            mean, var, total = _batch_statistics(x, self.process_group, chunk, self.two_pass)
            if self.training and self.track_running_stats:
                factor = self._next_momentum()
                _update_running(self.running_mean, self.running_var, mean, var, total, factor)
            if tape is not None:
                tape.record((mean, var, total))
        return _CrossGPUBatchNormFunction.apply(
            x, self.weight, self.bias, mean, var, total, self.eps, self.process_group, chunk
        )

    def _is_local(self, x: torch.Tensor, chunk: int | None) -> bool:
        """A BN group of this process's whole batch: ATen's own kernels do all of it, half
        precision included (train.amp: they accumulate in float32 and keep float32 running
        statistics next to a half-precision input and output)."""
        return (
            chunk is None
            and not self.two_pass
            and dist.group_size(self.process_group) == 1
            and x.numel() > 0
        )

    def _local_forward(self, x: torch.Tensor, tape) -> torch.Tensor:
        # A recomputation normalizes the same input by the same kernel, so it recomputes the
        # same statistics bit for bit; it only must not move the running statistics again.
        running, factor = (None, None), 0.0
        replaying = tape is not None and tape.replaying
        if self.training and self.track_running_stats and not replaying:
            factor = self._next_momentum()
            running = (self.running_mean, self.running_var)
        return _LocalBatchNormFunction.apply(x, self.weight, self.bias, *running, factor, self.eps)

    def _next_momentum(self) -> float:
        """Count one more batch; the weight its statistics get in the running ones."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

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
        copy_batchnorm_state(module, new)
        with torch.no_grad():
            if module.track_running_stats:
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_to_cgbn(child, process_group, local_group_size))
    return module


def copy_batchnorm_state(source: nn.Module, target: nn.Module) -> None:
    """Affine parameters and running statistics of BatchNorm ``source`` into ``target`` (a
    BatchNorm of another kind: CGBN, FrozenBatchNorm2d)."""
    with torch.no_grad():
        if source.affine:
            target.weight.copy_(source.weight)
            target.bias.copy_(source.bias)
        if source.track_running_stats:
            target.running_mean.copy_(source.running_mean)
            target.running_var.copy_(source.running_var)
