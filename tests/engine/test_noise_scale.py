"""The gradient noise scale from a DDP communication hook equals McCandlish et al.'s estimators
computed in float64 from per-sample gradients, per module group, over 2 and 4 processes; so do
the two halves' squared norms that AGVM's per-module learning rates are computed from."""

import pytest
import torch
from torch import nn

from megdet.engine.noise_scale import NoiseScale, split_in_halves
from megdet.solver.module_lr import dissimilarity
from tests.distributed import run_in_processes

PER_PROCESS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _data(total: int):
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(total, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(total, 2, generator=generator, dtype=torch.float64)
    return inputs, targets


def _loss(model, inputs, targets):
    return ((model(inputs) - targets) ** 2).sum(1).mean()  # the mean over the images


def _groups(model):
    return {"first": list(model[0].parameters()), "second": list(model[2].parameters())}


def _measure(rank, world_size, steps):
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    noise = NoiseScale(_groups(model), PER_PROCESS, world_size)
    noise.attach(ddp)
    inputs, targets = _data(PER_PROCESS * world_size)
    mine = slice(rank * PER_PROCESS, (rank + 1) * PER_PROCESS)
    for _ in range(steps):
        ddp.zero_grad()
        _loss(ddp, inputs[mine], targets[mine]).backward()
        noise.measure(model)
    return noise.statistics(), noise.state_dict()


def _reference(world_size):
    """The estimators from per-sample gradients: g_b per process, g_B of the whole batch."""
    model = _model()
    inputs, targets = _data(PER_PROCESS * world_size)
    per_sample = []
    for x, y in zip(inputs, targets, strict=True):
        model.zero_grad()
        _loss(model, x[None], y[None]).backward()
        per_sample.append({n: [p.grad.clone() for p in ps] for n, ps in _groups(model).items()})

    def squared_norm_of_mean(samples, name):
        grads = [sum(s[name][i] for s in samples) / len(samples) for i in range(2)]
        return sum((g**2).sum() for g in grads).item()

    b, B = PER_PROCESS, PER_PROCESS * world_size
    expected = {}
    total_small = total_big = 0.0
    for name in ("first", "second", None):
        if name is None:
            small, big = total_small, total_big
        else:
            chunks = [per_sample[r * b : (r + 1) * b] for r in range(world_size)]
            small = sum(squared_norm_of_mean(c, name) for c in chunks) / world_size
            big = squared_norm_of_mean(per_sample, name)
            total_small, total_big = total_small + small, total_big + big
        suffix = f"_{name}" if name else ""
        grad_sq = (B * big - b * small) / (B - b)
        grad_var = (small - big) / (1 / b - 1 / B)
        expected |= {f"grad_sq{suffix}": grad_sq, f"grad_var{suffix}": grad_var}
        if grad_sq > 0:
            expected[f"gns{suffix}"] = grad_var / grad_sq
    return expected


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_hook_estimates_equal_the_float64_per_sample_computation(world_size):
    # The same batch every step: the bias-corrected EMA of equal estimates is that estimate.
    results = run_in_processes(_measure, world_size, 3)
    expected = _reference(world_size)
    for statistics, state in results:
        assert statistics.keys() == expected.keys()
        for key, value in expected.items():
            assert statistics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert state["steps"] == 3
    assert all(r[0] == results[0][0] for r in results)  # every process: the same numbers


def test_one_process_is_refused():
    with pytest.raises(ValueError, match="2\\+ processes"):
        NoiseScale({}, 4, 1)


def _measure_halves(rank, world_size):
    """One split step (AGVM's measurement), then one plain step on the same batch."""
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    halves = split_in_halves(world_size, rank)
    noise = NoiseScale(_groups(model), PER_PROCESS, world_size, halves=halves)
    noise.attach(ddp)
    inputs, targets = _data(PER_PROCESS * world_size)
    mine = slice(rank * PER_PROCESS, (rank + 1) * PER_PROCESS)
    gradients, reported = [], []
    for split in (True, False):
        if split:
            noise.split_next()
        ddp.zero_grad()
        _loss(ddp, inputs[mine], targets[mine]).backward()
        noise.measure(model)
        gradients.append([p.grad.clone() for p in model.parameters()])
        reported.append(noise.half_norms())
    assert reported[1] == {}  # a plain step reports no halves
    return reported[0], gradients, noise.statistics()


def _halves_reference(world_size):
    """|g_A|^2, |g_B|^2 and |g|^2 per group from the two halves of the batch, and the
    halves' 1 - cosine, in float64 with torch.cosine_similarity."""
    model = _model()
    inputs, targets = _data(PER_PROCESS * world_size)
    half = PER_PROCESS * world_size // 2

    def gradient(rows):
        model.zero_grad()
        _loss(model, inputs[rows], targets[rows]).backward()
        return {n: torch.cat([p.grad.flatten() for p in ps]) for n, ps in _groups(model).items()}

    first, second = gradient(slice(0, half)), gradient(slice(half, None))
    both = gradient(slice(None))
    norms, cosine_distance = {}, {}
    for name in first:
        a, b, g = first[name], second[name], both[name]
        norms[name] = (a.square().sum().item(), b.square().sum().item(), g.square().sum().item())
        cosine_distance[name] = 1 - torch.cosine_similarity(a, b, dim=0).item()
    return norms, cosine_distance


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_split_step_measures_the_halves_and_keeps_ddps_mean(world_size):
    results = run_in_processes(_measure_halves, world_size)
    norms, cosine_distance = _halves_reference(world_size)
    for half_norms, (split_grads, plain_grads), _ in results:
        for name, expected in norms.items():
            assert half_norms[name] == pytest.approx(expected, rel=1e-12), name
            measured = dissimilarity(*half_norms[name])
            assert measured == pytest.approx(cosine_distance[name], rel=1e-9, abs=1e-12)
        # What the optimizer gets is DDP's mean either way (4 processes: summed in halves,
        # then over all: float64 rounding apart).
        for split, plain in zip(split_grads, plain_grads, strict=True):
            torch.testing.assert_close(split, plain, rtol=1e-14, atol=1e-16)
    # The noise scale of the split step is the plain steps' (the same batch twice).
    statistics = results[0][2]
    expected = _reference(world_size)
    for key, value in expected.items():
        assert statistics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert all(r[0] == results[0][0] for r in results)  # every process: the same numbers


def test_halves_need_an_even_number_of_processes():
    with pytest.raises(ValueError, match="even"):
        split_in_halves(3, 0)
    with pytest.raises(ValueError, match="halves"):
        NoiseScale({}, 4, 2).split_next()
