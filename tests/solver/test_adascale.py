"""AdaScale (``solver.lr_scaling: adascale``, issue 25 part 1): the gain against the paper's
formula in float64 and against fairscale's AdaScale on the same gradients; the plan's bounds;
with scale 1 the run is bitwise the linear rule's; exact resume."""

import itertools
import json
import math

import pytest
import torch
from torch import nn

from megdet import dist
from megdet.config import load_config
from megdet.engine.noise_scale import NoiseScale
from megdet.engine.trainer import train
from megdet.errors import ConfigError
from megdet.plan import make_plan
from megdet.report import write_report
from megdet.solver.adascale import AdaScale, adascale_gain
from megdet.tasks.detection.task import DetectionTask
from tests.conftest import instant_overrides
from tests.distributed import run_in_processes

PER_PROCESS = 3


def test_the_gain_is_the_papers_formula_within_its_bounds():
    grad_sq, grad_var = 0.3, 12.0  # noise scale 40
    for base, batch in ((16, 32), (16, 256), (8, 1024)):
        expected = (grad_var / base + grad_sq) / (grad_var / batch + grad_sq)
        assert adascale_gain(grad_sq, grad_var, base, batch) == pytest.approx(expected, rel=1e-15)
        assert 1 < expected < batch / base
    assert adascale_gain(0.3, 12.0, 16, 16) == 1.0  # scale 1: the base schedule itself
    assert adascale_gain(0.0, 12.0, 16, 256) == 16.0  # all noise: the linear rule
    assert adascale_gain(-0.1, 12.0, 16, 256) == 16.0  # an estimate of |G|^2 below 0
    assert adascale_gain(0.3, 0.0, 16, 256) == 1.0  # no noise: a larger batch buys nothing
    assert adascale_gain(float("nan"), 12.0, 16, 256) == 1.0
    # Noise scale far above the batch: nearly linear; far below: nearly 1.
    assert adascale_gain(1e-6, 1.0, 16, 256) > 15.9
    assert adascale_gain(1.0, 1e-3, 16, 256) < 1.001


def test_progress_advances_by_the_gain_and_resumes_from_its_state():
    scale = AdaScale(base_batch=16, batch=64, per_epoch=10, num_images=160)
    for estimates in (None, (0.3, 12.0), (0.0, 5.0)):
        scale.update(estimates)
        scale.advance()
    first = adascale_gain(0.3, 12.0, 16, 64)
    assert scale.progress == pytest.approx(1 + first + 4)
    stats = scale.statistics()
    assert stats["gain"] == 4.0 and stats["mean_gain"] == pytest.approx((5 + first) / 3)
    assert stats["images_seen"] == 192 and stats["data_epochs"] == pytest.approx(1.2)
    assert stats["progress_epochs"] == pytest.approx(scale.progress / 10)
    again = AdaScale(16, 64, 10, 160)
    again.load_state_dict(scale.state_dict())
    assert again.state_dict() == scale.state_dict()
    assert again.crossed(4.5, 5) is True and again.crossed(scale.progress, 5) is False


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _data(total: int):
    """Targets offset from zero: a gradient with a direction, so that the one-step estimate
    of |G|^2 is well above 0 and the gain inside its bounds."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(total, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(total, 2, generator=generator, dtype=torch.float64) + 1.5
    return inputs, targets


def _step(rank, world_size, per_process):
    """One DDP step of ``world_size`` x ``per_process`` images, measured by the noise scale."""
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    noise = NoiseScale({"all": list(model.parameters())}, per_process, world_size)
    noise.attach(ddp)
    inputs, targets = _data(per_process * world_size)
    mine = slice(rank * per_process, (rank + 1) * per_process)
    ((ddp(inputs[mine]) - targets[mine]) ** 2).sum(1).mean().backward()
    noise.measure(model)
    return model, noise


def _measured_gain(rank, world_size, per_process, base_batch=2):
    """megdet's gain after one step (base batch 2 unless given)."""
    _, noise = _step(rank, world_size, per_process)
    return adascale_gain(*noise.estimates(), base_batch, per_process * world_size)


def _gains(rank, world_size):
    """One step of a DDP model: megdet's gain from the noise scale's estimates, and the same
    in float64 from the processes' gradients themselves."""
    model, noise = _step(rank, world_size, PER_PROCESS)
    ours = adascale_gain(*noise.estimates(), PER_PROCESS, PER_PROCESS * world_size)
    averaged = torch.cat([p.grad.flatten() for p in model.parameters()])
    per_process = [_gradient(part, world_size) for part in range(world_size)]
    paper = _paper_gain(per_process, averaged, PER_PROCESS, PER_PROCESS * world_size, PER_PROCESS)
    return {"ours": ours, "paper": paper}


def _paper_gain(
    group_gradients: list[torch.Tensor], total: torch.Tensor, small: int, big: int, base: int
) -> float:
    """The paper's gain in float64, unclamped: McCandlish et al.'s estimators of |G|^2 and
    tr(Sigma) from the groups' mean gradients (``small`` images each) and the batch's."""
    mean_small = sum(float(g.square().sum()) for g in group_gradients) / len(group_gradients)
    total_sq = float(total.square().sum())
    grad_sq = (big * total_sq - small * mean_small) / (big - small)
    grad_var = (mean_small - total_sq) / (1 / small - 1 / big)
    return (grad_var / base + grad_sq) / (grad_var / big + grad_sq)


def _split_gain(gradients: torch.Tensor, groups: list[list[int]], base_batch: int) -> float:
    """The gain (float64) when the images' gradients are averaged in ``groups``, within its
    bounds as megdet's."""
    big = gradients.shape[0]
    means = [gradients[g].mean(0) for g in groups]
    gain = _paper_gain(means, gradients.mean(0), len(groups[0]), big, base_batch)
    return min(max(gain, 1.0), big / base_batch)


def _splits(images: int, size: int):
    """Every way to cut ``images`` into groups of ``size`` (as sets)."""

    def cut(rest):
        if not rest:
            yield []
            return
        first, others = rest[0], rest[1:]
        for mates in itertools.combinations(others, size - 1):
            left = [i for i in others if i not in mates]
            for tail in cut(left):
                yield [[first, *mates], *tail]

    yield from cut(list(range(images)))


@pytest.mark.slow
def test_2x4_and_4x2_give_the_same_gain_to_the_estimators_spread():
    """Not bitwise (the estimate depends on how the batch is split): the gains measured over
    2 x 4 and 4 x 2 images (float64, the same 8 images) differ by less than 3 standard
    deviations of the estimator over every possible split of those images."""
    model = _model()
    inputs, targets = _data(8)
    per_image = []
    for x, y in zip(inputs, targets, strict=True):
        model.zero_grad()
        ((model(x[None]) - y[None]) ** 2).sum(1).mean().backward()
        per_image.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    gradients = torch.stack(per_image)
    spread = {}
    for size in (4, 2):
        gains = torch.tensor([_split_gain(gradients, s, 2) for s in _splits(8, size)])
        spread[size] = (float(gains.mean()), float(gains.std()))
    two = run_in_processes(_measured_gain, 2, 4)[0]
    four = run_in_processes(_measured_gain, 4, 2)[0]
    contiguous = {size: [list(range(i, i + size)) for i in range(0, 8, size)] for size in (4, 2)}
    assert two == pytest.approx(_split_gain(gradients, contiguous[4], 2), rel=1e-10)
    assert four == pytest.approx(_split_gain(gradients, contiguous[2], 2), rel=1e-10)
    sd = math.hypot(spread[4][1], spread[2][1])
    assert min(two, four) > 1 and max(two, four) < 4  # inside the bounds: not clamped
    assert sd > 0 and abs(two - four) < 3 * sd, (two, four, spread)


def _gradient(part: int, world_size: int) -> torch.Tensor:
    """Process ``part``'s gradient, computed alone (float64)."""
    model = _model()
    inputs, targets = _data(PER_PROCESS * world_size)
    rows = slice(part * PER_PROCESS, (part + 1) * PER_PROCESS)
    ((model(inputs[rows]) - targets[rows]) ** 2).sum(1).mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_gain_from_the_noise_scale_equals_the_papers_formula_in_float64(world_size):
    results = run_in_processes(_gains, world_size)
    for result in results:
        assert result["ours"] == results[0]["ours"]  # every rank the same
        assert result["ours"] == pytest.approx(result["paper"], rel=1e-10)
    assert 1 < results[0]["ours"] < world_size  # the formula was exercised, not a bound


def _fairscale(world_size: int, param_groups):
    """``fairscale.optim.AdaScale`` over ``param_groups(model)``, fed the processes' gradients
    as k gradient accumulations (skips where fairscale is not installed)."""
    pytest.importorskip("fairscale", reason="fairscale==0.4.13 is not installed here")
    from fairscale.optim import AdaScale as FairscaleAdaScale

    model = _model()
    optimizer = torch.optim.SGD(param_groups(model), lr=0.1)
    reference = FairscaleAdaScale(optimizer, world_size=1, smoothing=0.0,
                                  num_gradients_to_accumulate=world_size,
                                  is_scaled_loss=False)  # fmt: skip
    inputs, targets = _data(PER_PROCESS * world_size)
    for part in range(world_size):
        rows = slice(part * PER_PROCESS, (part + 1) * PER_PROCESS)
        ((model(inputs[rows]) - targets[rows]) ** 2).sum(1).mean().backward()
    return reference


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_gain_equals_fairscales_adascale_on_the_same_gradients(world_size):
    """fairscale's estimator over k gradient accumulations of b images is its estimator over
    k processes (it says so); fed the processes' gradients, it gives megdet's gain."""
    reference = _fairscale(world_size, lambda model: model.parameters())
    ours = run_in_processes(_gains, world_size)[0]["ours"]
    assert reference.gain() == pytest.approx(ours, rel=1e-6)


def _module_gains(rank, world_size):
    """One DDP step of a model in two module groups (its two layers): megdet's gain per
    group, and the paper's in float64 from each group's part of the processes' gradients."""
    model = _model()
    groups = {"first": list(model[0].parameters()), "second": list(model[2].parameters())}
    ddp = nn.parallel.DistributedDataParallel(model)
    noise = NoiseScale(groups, PER_PROCESS, world_size)
    noise.attach(ddp)
    inputs, targets = _data(PER_PROCESS * world_size)
    mine = slice(rank * PER_PROCESS, (rank + 1) * PER_PROCESS)
    ((ddp(inputs[mine]) - targets[mine]) ** 2).sum(1).mean().backward()
    noise.measure(model)
    scale = AdaScale(PER_PROCESS, PER_PROCESS * world_size, 10, 100, per_module=True)
    gain = scale.update(noise.estimates(), noise.group_estimates())
    scale.advance()
    paper = {}
    totals = {
        name: torch.cat([p.grad.flatten() for p in params]) for name, params in groups.items()
    }
    for name, total in totals.items():
        per_process = []
        for part in range(world_size):
            alone = _model()
            rows = slice(part * PER_PROCESS, (part + 1) * PER_PROCESS)
            ((alone(inputs[rows]) - targets[rows]) ** 2).sum(1).mean().backward()
            layer = alone[0] if name == "first" else alone[2]
            per_process.append(torch.cat([p.grad.flatten() for p in layer.parameters()]))
        paper[name] = _paper_gain(per_process, total, PER_PROCESS, PER_PROCESS * world_size,
                                  PER_PROCESS)  # fmt: skip
    return {"gain": gain, "modules": scale.module_gains, "factors": scale.factors(),
            "paper": paper, "stats": scale.statistics()}  # fmt: skip


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_module_group_gets_the_gain_of_its_own_gradients(world_size):
    """fairscale's AdaScale scales each parameter group's lr by that group's gain; megdet's
    per_module does it per module group, from the noise scale's per-group estimates."""
    results = run_in_processes(_module_gains, world_size)
    for result in results:
        assert result["modules"] == results[0]["modules"]  # every rank the same
    result = results[0]
    modules, paper = result["modules"], result["paper"]
    assert set(modules) == {"first", "second"}  # not "other": it has no parameters here
    for name in ("first", "second"):
        expected = min(max(paper[name], 1.0), world_size)
        assert modules[name] == pytest.approx(expected, rel=1e-10), name
        assert result["factors"][name] == pytest.approx(modules[name] / result["gain"])
        assert result["stats"][f"gain_{name}"] == modules[name]
    assert modules["first"] != pytest.approx(modules["second"])  # the groups differ


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_module_gains_equal_fairscales_param_group_gains(world_size):
    def layers(model):
        return [{"params": model[0].parameters()}, {"params": model[2].parameters()}]

    reference = _fairscale(world_size, layers)
    ours = run_in_processes(_module_gains, world_size)[0]
    for index, name in enumerate(("first", "second")):
        assert reference.gain(index) == pytest.approx(ours["modules"][name], rel=1e-6)
    assert reference.gain() == pytest.approx(ours["gain"], rel=1e-6)


def test_one_gain_for_all_has_no_module_factors():
    scale = AdaScale(16, 64, 10, 160, per_module=False)
    scale.update((0.3, 12.0), {"backbone": (0.0, 5.0), "rpn": (1.0, 0.1)})
    scale.advance()
    assert scale.factors() is None and not any(k.startswith("gain_") for k in scale.statistics())
    per_module = AdaScale(16, 64, 10, 160, per_module=True)
    gain = per_module.update((0.3, 12.0), {"backbone": (0.0, 5.0), "rpn": (1.0, 0.1)})
    assert per_module.factors() == {"backbone": 4.0 / gain,
                                    "rpn": adascale_gain(1.0, 0.1, 16, 64) / gain}  # fmt: skip


def test_pace_module_advances_by_the_smallest_module_gain_and_resumes():
    scale = AdaScale(16, 256, 10, 160, per_module=True, pace="module")
    groups = {"backbone": (0.0, 5.0), "rpn": (1.0, 30.0), "box_head": (1.0, 60.0)}
    gain = scale.update((0.3, 12.0), groups)
    scale.advance()
    slowest = adascale_gain(1.0, 30.0, 16, 256)
    assert scale.module_gains["backbone"] == 16.0 and slowest < gain
    assert scale.progress == pytest.approx(slowest)  # the rpn's, not the model's
    again = AdaScale(16, 256, 10, 160, per_module=True, pace="module")
    again.load_state_dict(scale.state_dict())
    assert again.progress == scale.progress
    model = AdaScale(16, 256, 10, 160, per_module=True, pace="model")
    model.update((0.3, 12.0), groups)
    model.advance()
    assert model.progress == gain


def _cfg(root, *extra):
    return load_config("instant_test", [*instant_overrides(root), *extra])


def test_the_plan_bounds_the_steps_and_refuses_what_cannot_work(tiny_shapes):
    cfg = _cfg(tiny_shapes, "solver.lr_scaling=adascale", "train.batch_size=64",
               "train.epochs=10", "solver.steps=[8]")  # fmt: skip
    plan = make_plan(cfg, 2, 160)
    assert (plan.scale, plan.progress_per_epoch, plan.progress_iters) == (8.0, 20, 200)
    assert (plan.min_steps, plan.max_iter, plan.lr) == (25, 200, 0.02)
    assert plan.milestones == [[160, 0.1]]  # in iterations of progress at batch 8
    assert "between 25 steps (gain 8) and 200 (gain 1)" in plan.summary()
    with pytest.raises(ConfigError, match="run 2\\+ processes"):
        make_plan(cfg, 1, 160)
    small = _cfg(tiny_shapes, "solver.lr_scaling=adascale", "train.batch_size=4")
    with pytest.raises(ConfigError, match="train.batch_size 4 is smaller"):
        make_plan(small, 2, 160)


def _train(rank, world_size, root, run_dir, extra, resume=False):
    cfg = _cfg(root, "train.checkpoint_period=3", "log.period=1", "model.norm=cgbn",
               "data.hflip=true", *extra)  # fmt: skip
    result = train(cfg, DetectionTask(cfg), run_dir, dist.init_distributed(), resume=resume)
    return {k: v for k, v in result.model.state_dict().items() if v.is_floating_point()}


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if "loss" in json.loads(line)]


@pytest.mark.slow
def test_with_scale_1_the_run_is_bitwise_the_linear_rules(tiny_shapes, tmp_path):
    """Batch 8 = base batch 8 on 2 processes: every gain is 1, progress is the step count."""
    runs = {}
    for rule in ("linear", "adascale"):
        (tmp_path / rule).mkdir()
        extra = [f"solver.lr_scaling={rule}", "train.max_iter=6"]
        runs[rule] = run_in_processes(_train, 2, tiny_shapes, tmp_path / rule, extra)[0]
    for key, value in runs["linear"].items():
        assert torch.equal(runs["adascale"][key], value), key
    linear, adascale = _records(tmp_path / "linear"), _records(tmp_path / "adascale")
    assert [r["lr"] for r in adascale] == [r["lr"] for r in linear]
    assert [r["gain"] for r in adascale] == [1.0] * 6
    assert adascale[-1]["progress_epochs"] == 3.0  # 6 base iterations, 2 an epoch


@pytest.mark.slow
def test_adascale_ends_by_progress_and_resumes_bitwise(tiny_shapes, tmp_path):
    """Batch 16 over base 8 (scale 2) for 4 epochs of progress (8 base iterations): it ends
    when progress reaches 8, in fewer steps; stopped at step 3 and resumed, the same run."""
    extra = ["solver.lr_scaling=adascale", "train.batch_size=16", "train.epochs=4",
             "solver.steps=[3]", "solver.warmup_iters=2",
             "solver.adascale.pace=model"]  # progress by the gain logged  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir()
    split.mkdir()
    expected = run_in_processes(_train, 2, tiny_shapes, straight, extra)[0]
    records = _records(straight)
    steps = len(records)
    assert 4 <= steps < 8 and records[-1]["progress_epochs"] >= 4.0
    assert records[-2]["progress_epochs"] < 4.0  # it stopped at the first step past the end
    assert all(1 <= r["gain"] <= 2 for r in records) and records[-1]["mean_gain"] > 1
    # Each module group its own gain (the default, solver.adascale.per_module), in bounds.
    modules = [k for k in records[0] if k.startswith("gain_")]
    assert {"gain_backbone", "gain_rpn", "gain_box_head"} <= set(modules)
    assert all(1 <= r[k] <= 2 for r in records for k in modules)
    assert records[-1]["images_seen"] == 16 * steps
    # The lr is the gain times the base schedule at the progress before the step.
    plan = json.loads((straight / "plan.json").read_text())
    progress = 0.0
    for record in records:
        base = plan["lr"] * (0.1 if progress >= plan["milestones"][0][0] else 1)
        if progress < plan["warmup_iters"]:
            alpha = progress / plan["warmup_iters"]
            base = plan["warmup_start_lr"] + (plan["lr"] - plan["warmup_start_lr"]) * alpha
        assert record["lr"] == pytest.approx(record["gain"] * base, rel=1e-12)
        progress += record["gain"]

    run_in_processes(_train, 2, tiny_shapes, split, [*extra, "train.max_iter=3"])
    resumed = run_in_processes(_train, 2, tiny_shapes, split, extra, True)[0]
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key
    assert [r["gain"] for r in _records(split)] == [r["gain"] for r in records]
    state = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    assert state["adascale"]["steps"] == steps and state["iteration"] == steps
    written = write_report([straight], tmp_path / "report")
    assert tmp_path / "report" / "adascale.png" in written
