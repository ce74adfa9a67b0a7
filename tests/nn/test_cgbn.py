"""CGBN against one float64 nn.BatchNorm2d over the concatenation of every process's images."""

import pytest
import torch
from torch import nn

from megdet import dist
from megdet.nn.cgbn import CrossGPUBatchNorm2d, convert_to_cgbn
from tests.distributed import run_in_processes

C = 3
# Uneven on purpose: images and H x W differ per rank, and rank 1 has no image at all.
SHAPES = [(3, 5, 4), (0, 5, 4), (2, 3, 6), (1, 4, 4)]
# Every rank with images: a rank's own sums are then never the group's (with an empty rank 1,
# two processes would pass without any reduction in backward).
FULL_SHAPES = [(3, 5, 4), (2, 5, 4), (2, 3, 6), (1, 4, 4)]


def _inputs(world, dtype, mean=0.0, std=1.0, shapes=SHAPES):
    """Every rank's input and upstream gradient; the same on all ranks (shared seed)."""
    g = torch.Generator().manual_seed(world)
    xs = [torch.randn(n, C, h, w, generator=g, dtype=torch.float64) * std + mean
          for n, h, w in shapes[:world]]  # fmt: skip
    dys = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in xs]
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in xs], [d.to(dtype) for d in dys], weight, bias


def _flat(t):  # (N, C, H, W) -> (C, N*H*W): the elements BN pools per channel
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _reference(xs, dys, weight, bias, steps=2):
    """nn.BatchNorm2d in float64 on all ranks' elements, pooled per channel."""
    bn = nn.BatchNorm2d(C, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    x = torch.cat([_flat(t.double()) for t in xs], 1)[None, :, :, None].requires_grad_()
    for _ in range(steps):
        y = bn(x)
    dy = torch.cat([_flat(t.double()) for t in dys], 1)[None, :, :, None]
    y.backward(dy)
    sizes = [t[:, 0].numel() for t in xs]
    unflat = [
        part[0, :, :, 0].reshape(C, *t.shape[:1], *t.shape[2:]).transpose(0, 1)
        for part, t in zip(y.split(sizes, 2), xs, strict=True)
    ]
    grads = [
        part[0, :, :, 0].reshape(C, *t.shape[:1], *t.shape[2:]).transpose(0, 1)
        for part, t in zip(x.grad.split(sizes, 2), xs, strict=True)
    ]
    return {
        "y": unflat, "dx": grads, "dweight": bn.weight.grad, "dbias": bn.bias.grad,
        "running_mean": bn.running_mean, "running_var": bn.running_var,
    }  # fmt: skip


def _run_cgbn(rank, x, dy, weight, bias, group=None, steps=2, two_pass=False):
    bn = CrossGPUBatchNorm2d(C, process_group=group, two_pass=two_pass).to(x.device)
    if x.dtype == torch.float64:
        bn.double()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    x = x.clone().requires_grad_()
    for _ in range(steps):
        y = bn(x)
    y.backward(dy)
    dweight = dist.all_reduce_sum(bn.weight.grad.double().clone(), group)
    dbias = dist.all_reduce_sum(bn.bias.grad.double().clone(), group)
    return {"y": y.detach(), "dx": x.grad, "dweight": dweight, "dbias": dbias,
            "running_mean": bn.running_mean, "running_var": bn.running_var}  # fmt: skip


def _assert_close(ours, ref, dtype):
    for key in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
        a, b = ours[key].double().cpu(), ref[key].double()
        if dtype == torch.float64:
            assert (a - b).abs().max().item() < 1e-10 if a.numel() else True, key
        else:
            scale = b.abs().max().clamp(min=1.0) if b.numel() else 1.0
            assert ((a - b).abs().max() / scale).item() < 1e-5 if a.numel() else True, key


def _numerics_worker(rank, world, device="cpu"):
    results = {}
    for dtype in (torch.float64, torch.float32):
        for shapes in (SHAPES, FULL_SHAPES):
            xs, dys, weight, bias = _inputs(world, dtype, shapes=shapes)
            ref = _reference(xs, dys, weight, bias)
            ref_local = {**ref, "y": ref["y"][rank], "dx": ref["dx"][rank]}
            x, dy = xs[rank].to(device), dys[rank].to(device)
            for two_pass in (False, True):
                ours = _run_cgbn(rank, x, dy, weight, bias, two_pass=two_pass)
                _assert_close(ours, ref_local, dtype)
            # NHWC activations (model.channels_last) take the same arithmetic.
            nhwc = [t.contiguous(memory_format=torch.channels_last) for t in (x, dy)]
            _assert_close(_run_cgbn(rank, *nhwc, weight, bias), ref_local, dtype)
        results[str(dtype)] = True

    # Large mean, small spread, float32: the variance must still be right (requirement 4).
    xs, _, _, _ = _inputs(world, torch.float32, mean=1e4, std=1.0)
    pooled = torch.cat([_flat(t.double()) for t in xs], 1)
    bn = CrossGPUBatchNorm2d(C, momentum=1.0, affine=False).to(device)
    y = bn(xs[rank].to(device)).cpu()
    assert torch.allclose(bn.running_var.double().cpu(), pooled.var(1), rtol=1e-3)
    # A float32 mean of ~100 values near 1e4: a few float32 ulps (2^-24 each), in any order.
    assert torch.allclose(bn.running_mean.double().cpu(), pooled.mean(1), rtol=16 * 2.0**-24)
    if y.numel():
        exact = (_flat(xs[rank].double()) - pooled.mean(1)[:, None]) / pooled.std(1, False)[:, None]
        assert (_flat(y.double()) - exact).abs().max() < 1e-2

    # A whole group without images: no hang, no update of the running statistics.
    bn = CrossGPUBatchNorm2d(C)
    empty = torch.zeros(0, C, 4, 4, requires_grad=True)
    bn(empty).sum().backward()
    assert torch.equal(bn.running_mean, torch.zeros(C))
    assert torch.equal(bn.running_var, torch.ones(C))

    # Exactly one collective in forward and one in backward; none in eval.
    calls = []
    gather, reduce = dist.all_gather_tensor, dist.all_reduce_sum
    dist.all_gather_tensor = lambda *a, **k: calls.append("gather") or gather(*a, **k)
    dist.all_reduce_sum = lambda *a, **k: calls.append("reduce") or reduce(*a, **k)
    try:
        bn = CrossGPUBatchNorm2d(C)
        x = xs[rank].clone().requires_grad_()
        y = bn(x)
        forward_calls = list(calls)
        y.sum().backward()
        backward_calls = calls[len(forward_calls) :]
        bn.eval()
        bn(x)
        eval_calls = calls[len(forward_calls) + len(backward_calls) :]
    finally:
        dist.all_gather_tensor, dist.all_reduce_sum = gather, reduce
    assert (forward_calls, backward_calls, eval_calls) == (["gather"], ["gather"], [])
    return results


@pytest.mark.slow
@pytest.mark.device
@pytest.mark.parametrize("world", [2, 3, 4])
def test_cgbn_equals_one_batchnorm_over_all_processes(world, device):
    """On CUDA (bench/device_suite.sh) the processes share one GPU through gloo."""
    results = run_in_processes(_numerics_worker, world, device)
    assert all(r == {"torch.float64": True, "torch.float32": True} for r in results)


@pytest.mark.device
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_cgbn_single_process_equals_batchnorm(layout, device):
    xs, dys, weight, bias = _inputs(1, torch.float64)
    x, dy = (t.to(device).contiguous(memory_format=layout) for t in (xs[0], dys[0]))
    _assert_close(_run_cgbn(0, x, dy, weight, bias),
                  {**(ref := _reference(xs, dys, weight, bias)), "y": ref["y"][0],
                   "dx": ref["dx"][0]}, torch.float64)  # fmt: skip


def _subgroup_worker(rank, world):
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    xs, dys, weight, bias = _inputs(4, torch.float64)
    pair = slice(2 * (rank // 2), 2 * (rank // 2) + 2)
    ref = _reference(xs[pair], dys[pair], weight, bias)
    ours = _run_cgbn(rank, xs[rank], dys[rank], weight, bias, group=mine)
    _assert_close(ours, {**ref, "y": ref["y"][rank % 2], "dx": ref["dx"][rank % 2]},
                  torch.float64)  # fmt: skip
    return True


@pytest.mark.slow
def test_two_subgroups_of_two_equal_two_independent_references():
    assert run_in_processes(_subgroup_worker, 4) == [True] * 4


@pytest.mark.device
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_local_group_size_equals_batchnorm_chunk_by_chunk(layout, device):
    """BN groups inside one process (model.bn_size below its images) against one float64
    nn.BatchNorm2d per chunk: outputs, every gradient, running mean and variance."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, C, 5, 5, generator=g, dtype=torch.float64) * 2 + 3
    x = x.contiguous(memory_format=layout)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    bn = CrossGPUBatchNorm2d(C, local_group_size=2).double().to(device)
    refs = [nn.BatchNorm2d(C, dtype=torch.float64) for _ in range(3)]
    for module in (bn, *refs):
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
    xin = x.to(device).clone().requires_grad_()
    for _ in range(2):  # two steps: the running statistics' momentum is applied twice
        y = bn(xin)
    y.backward(dy.to(device))
    outs, grads = [], []
    for i, ref in enumerate(refs):
        part = x[2 * i : 2 * i + 2].clone().requires_grad_()
        for _ in range(2):
            out = ref(part)
        out.backward(dy[2 * i : 2 * i + 2])
        outs.append(out)
        grads.append(part.grad)

    def close(a, b):
        return (a.cpu() - b.cpu()).abs().max().item() < 1e-10

    assert close(y, torch.cat(outs)) and close(xin.grad, torch.cat(grads))
    assert close(bn.weight.grad, sum(r.weight.grad for r in refs))
    assert close(bn.bias.grad, sum(r.bias.grad for r in refs))
    # The running statistics are the mean of every chunk's own (unbiased variance, as BN).
    assert close(bn.running_mean, torch.stack([r.running_mean for r in refs]).mean(0))
    assert close(bn.running_var, torch.stack([r.running_var for r in refs]).mean(0))
    assert int(bn.num_batches_tracked) == 2
    bn.eval()
    for ref in refs:
        ref.eval()
    # Evaluation normalizes with the averaged running statistics.
    averaged = nn.BatchNorm2d(C, dtype=torch.float64).eval()
    averaged.load_state_dict(bn.state_dict())
    assert close(bn(x.to(device)), averaged(x))
    with pytest.raises(ValueError, match="does not split into BN groups of 4"):
        CrossGPUBatchNorm2d(C, local_group_size=4).train()(x)


def test_output_is_not_a_view_so_inplace_relu_works():
    x = torch.randn(4, C, 6, 6, requires_grad=True)
    y = torch.relu_(CrossGPUBatchNorm2d(C)(x))
    y.sum().backward()
    reference = nn.BatchNorm2d(C)
    xr = x.detach().clone().requires_grad_()
    torch.relu_(reference(xr)).sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)


def test_bf16_inputs_accumulate_statistics_in_float32():
    x = (torch.randn(4, C, 8, 8) * 3 + 5).bfloat16()
    bn = CrossGPUBatchNorm2d(C, momentum=1.0)
    y = bn(x)
    assert y.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    exact = x.double().transpose(0, 1).reshape(C, -1)
    assert torch.allclose(bn.running_mean.double(), exact.mean(1), rtol=1e-6)
    assert torch.allclose(bn.running_var.double(), exact.var(1), rtol=1e-5)


def test_eval_uses_running_statistics_and_convert_copies_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    with torch.no_grad():
        for bn in (model[1], model[2][0]):
            bn.running_mean.uniform_()
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_()
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    converted = convert_to_cgbn(model)
    assert isinstance(converted[1], CrossGPUBatchNorm2d)
    assert isinstance(converted[2][0], CrossGPUBatchNorm2d)
    assert not converted.training
    assert torch.allclose(converted(x), expected, atol=1e-6)


def _autocast_worker(rank, world, device):
    """bfloat16 activations under autocast, as a convolution would hand them to CGBN."""
    bf16 = torch.bfloat16
    for mean in (0.0, 100.0):  # at 100, a variance summed in bfloat16 would be noise
        xs, dys, weight, bias = _inputs(world, bf16, mean=mean, shapes=FULL_SHAPES)
        ref = _reference(xs, dys, weight, bias)  # float64 on the same bfloat16 numbers
        with torch.autocast(device, dtype=bf16):
            ours = _run_cgbn(rank, xs[rank].to(device), dys[rank].to(device), weight, bias)
        assert ours["y"].dtype == ours["dx"].dtype == bf16  # the input's dtype
        assert ours["running_mean"].dtype == torch.float32
        for key in ("y", "dx"):  # float32 arithmetic, one rounding to bfloat16 at the end
            a, b = ours[key].double().cpu(), ref[key][rank].double()
            assert ((a - b).abs() / b.abs().clamp(min=1.0)).max().item() <= 2.0**-8, key
        for key in ("dweight", "dbias", "running_mean", "running_var"):  # float32 sums
            a, b = ours[key].double().cpu(), ref[key].double()
            assert ((a - b).abs() / b.abs().clamp(min=1.0)).max().item() < 1e-5, key
    return True


@pytest.mark.slow
@pytest.mark.device
def test_cgbn_under_bf16_autocast_normalizes_in_float32_and_returns_bf16(device):
    """train.amp=bf16: statistics and their reduction in float32 over 2 processes, outputs
    and input gradients in bfloat16 within one bfloat16 rounding of the float64 reference."""
    assert run_in_processes(_autocast_worker, 2, device) == [True, True]


@pytest.mark.device
def test_per_process_cgbn_under_bf16_autocast_keeps_float32_statistics(device):
    """A group of one process takes ATen's kernels, bfloat16 input included: the same bounds."""
    assert _autocast_worker(0, 1, device)
