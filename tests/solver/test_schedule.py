import pytest
import torch

from megdet.config import load_config
from megdet.errors import ConfigError
from megdet.plan import make_plan
from megdet.solver import build_optimizer, lr_at


def _plan(overrides, world=1, images=1000):
    """The COCO preset with its warmup in iterations (500, Detectron's), not its epochs."""
    cfg = load_config("coco_r50_fpn", ["solver.warmup_epochs=null", *overrides])
    return make_plan(cfg, world, images)


def test_linear_scaling_and_epochs_to_iterations():
    small = _plan([], images=1600)
    large = _plan(["train.batch_size=256"], world=8, images=1600)
    assert small.lr == pytest.approx(0.02) and large.lr == pytest.approx(0.32)
    assert (small.iters_per_epoch, large.iters_per_epoch) == (100, 7)
    assert small.max_iter == 1100 and large.max_iter == 77
    assert small.milestones == [[800, 0.1], [1000, 0.1]]
    assert large.milestones == [[56, 0.1], [70, 0.1]]
    assert large.images_per_device == 32


def test_lr_is_the_closed_form():
    plan = _plan(["train.batch_size=64", "solver.warmup_iters=10", "solver.warmup_factor=null"])
    assert plan.warmup_start_lr == pytest.approx(0.02)  # MegDet: from the small-batch rate
    for it in range(plan.max_iter + 1):
        if it < 10:
            expected = 0.02 + (0.08 - 0.02) * it / 10
        else:
            expected = 0.08 * (0.1 if it >= 8 * 16 else 1) * (0.1 if it >= 10 * 16 else 1)
        assert lr_at(plan, it) == pytest.approx(expected, rel=1e-12)


def test_warmup_variants_and_policies():
    constant = _plan(["solver.warmup=constant", "solver.warmup_factor=0.1"])
    assert lr_at(constant, 0) == lr_at(constant, 499) == pytest.approx(0.002)
    assert lr_at(constant, 500) == pytest.approx(0.02)
    none = _plan(["solver.warmup=none"])
    assert lr_at(none, 0) == pytest.approx(0.02)
    long = _plan(["solver.policy=long", "solver.warmup=none"], images=160)
    assert long.max_iter == 180
    assert [m for m, _ in long.milestones] == [110, 140, 170]
    assert lr_at(long, 179) == pytest.approx(0.02 * 0.1 * 0.1 * 0.5)
    # The long policy written out as an explicit step policy gives the same schedule.
    explicit = _plan(
        ["solver.policy=step", "train.epochs=18", "solver.steps=[11,14,17]",
         "solver.factors=[0.1,0.1,0.5]", "solver.warmup=none"], images=160,
    )  # fmt: skip
    assert explicit.milestones == long.milestones and explicit.max_iter == long.max_iter
    with pytest.raises(ConfigError, match="conflicts with solver.policy=normal"):
        _plan(["train.epochs=12"])
    with pytest.raises(ConfigError, match="cannot be split evenly over 3"):
        _plan([], world=3)


def test_warmup_in_epochs_follows_the_batch_size():
    small = _plan(["solver.warmup_epochs=0.5"], images=1600)
    large = _plan(["solver.warmup_epochs=0.5", "train.batch_size=256"], world=8, images=1600)
    assert (small.warmup_iters, large.warmup_iters) == (50, 4)  # 0.5 x 100 and 0.5 x 7 iterations


def test_norm_parameters_get_their_own_weight_decay():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    cfg = load_config("default", ["solver.weight_decay_norm=0.0"]).solver
    optimizer = build_optimizer(model, cfg, lr=0.1)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model[1].parameters()}
    assert optimizer.defaults["momentum"] == 0.9


def test_torch_sgd_equals_goyal_momentum_correction_across_warmup_and_decay():
    """Goyal et al. 2.1: with v <- m*v + lr*g the buffer must be scaled by lr_new/lr_old when lr
    changes; torch's u <- m*u + g, w <- w - lr*u needs no correction. Both give the same weights."""
    plan = _plan(["solver.warmup_iters=4", "solver.warmup_factor=0.1"], images=16)
    plan = type(plan)(**{**plan.to_dict(), "milestones": [[6, 0.5]]})
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(10)]
    w0 = torch.randn(5, generator=g, dtype=torch.float64)

    param = torch.nn.Parameter(w0.clone())
    optimizer = torch.optim.SGD([param], lr=1.0, momentum=0.9)
    for it, grad in enumerate(grads):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(plan, it)
        param.grad = grad.clone()
        optimizer.step()

    w, v, lr_prev = w0.clone(), torch.zeros(5, dtype=torch.float64), None
    for it, grad in enumerate(grads):
        lr = lr_at(plan, it)
        correction = 1.0 if lr_prev is None else lr / lr_prev
        v = 0.9 * correction * v + lr * grad
        w = w - v
        lr_prev = lr
    lrs = [lr_at(plan, it) for it in range(10)]
    assert len(set(lrs)) == 6  # 4 warmup steps, the full lr, and the decayed lr
    torch.testing.assert_close(param.detach(), w, rtol=1e-12, atol=1e-12)
