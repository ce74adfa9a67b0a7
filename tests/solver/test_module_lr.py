"""AGVM's per-module learning rates: the dissimilarity from squared norms against float64
cosines, the multipliers against the paper's formula, when they are measured and used, and
the parameter groups that carry them."""

import math

import pytest
import torch

from megdet.config import load_config
from megdet.errors import ConfigError
from megdet.plan import make_plan
from megdet.solver import build_optimizer, set_lr
from megdet.solver.module_lr import AGVM, dissimilarity, multiplier


def _norms(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    mean = (a + b) / 2
    return a.square().sum().item(), b.square().sum().item(), mean.square().sum().item()


@pytest.mark.parametrize("angle", [0.0, 1e-3, 0.3, math.pi / 2, 2.0, math.pi])
def test_dissimilarity_is_one_minus_the_float64_cosine(angle):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=generator, dtype=torch.float64)
    other = torch.randn(1000, generator=generator, dtype=torch.float64)
    other -= (other @ a) / (a @ a) * a  # orthogonal to a
    b = 3.0 * (math.cos(angle) * a / a.norm() + math.sin(angle) * other / other.norm())
    expected = 1 - torch.cosine_similarity(a, b, dim=0).item()
    assert dissimilarity(*_norms(a, b)) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_no_gradient_has_no_dissimilarity():
    assert math.isnan(dissimilarity(0.0, 1.0, 0.25))


def test_multiplier_is_agvms_clamped_square_root():
    assert multiplier(0.2, 0.2) == 1.0
    assert multiplier(0.4, 0.1) == pytest.approx(math.sqrt((0.4 + 1e-6) / (0.1 + 1e-6)))
    assert multiplier(0.3, 0.4) == pytest.approx(math.sqrt((0.3 + 1e-6) / (0.4 + 1e-6)))
    assert multiplier(1.0, 1e-3) == pytest.approx(math.sqrt(10))  # clamped above
    assert multiplier(1e-3, 1.0) == pytest.approx(math.sqrt(0.5))  # and below


def _half_norms(distances: dict[str, float]) -> dict[str, tuple[float, float, float]]:
    """Squared norms of two unit vectors with the given 1 - cosine (|g|^2 = (1 + cos) / 2)."""
    return {g: (1.0, 1.0, (2 - d) / 2) for g, d in distances.items()}


def test_multipliers_follow_an_ema_from_one_and_apply_from_start():
    agvm = AGVM(["backbone", "head"], start=4, interval=2, momentum=0.5)
    assert [agvm.measures(i) for i in range(9)] == [0, 0, 0, 0, 1, 0, 1, 0, 1]
    assert agvm.factors(3) == {}  # not before start (AGVM begins after the warmup)
    agvm.update(_half_norms({"backbone": 0.4, "head": 0.1}))
    first = multiplier(0.4, 0.1)
    assert agvm.factors(4) == pytest.approx({"backbone": 1.0, "head": 0.5 + 0.5 * first})
    agvm.update(_half_norms({"backbone": 0.4, "head": 0.1}))
    assert agvm.factors(6)["head"] == pytest.approx(0.5 * (0.5 + 0.5 * first) + 0.5 * first)
    assert agvm.statistics()["agvm_d_head"] == pytest.approx(0.1)


def test_an_overflowed_step_or_a_group_without_gradient_changes_nothing():
    agvm = AGVM(["backbone", "head"], start=0, interval=1, momentum=0.5)
    agvm.update({})  # an fp16 step the scaler skipped
    agvm.update({"backbone": (1.0, 1.0, 0.8), "head": (0.0, 0.0, 0.0)})
    assert agvm.factors(0) == {"backbone": 1.0, "head": 1.0}


def test_state_round_trip():
    agvm = AGVM(["backbone", "head"], start=0, interval=1, momentum=0.9)
    agvm.update(_half_norms({"backbone": 0.3, "head": 0.6}))
    again = AGVM(["backbone", "head"], start=0, interval=1, momentum=0.9)
    again.load_state_dict(agvm.state_dict())
    assert again.factors(0) == agvm.factors(0) and again.statistics() == agvm.statistics()


def test_module_parameter_groups_get_their_own_lr_and_the_same_update():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1)
    )
    cfg = load_config("default").solver
    modules = {"backbone": [*model[0].parameters(), *model[1].parameters()]}
    split = build_optimizer(model, cfg, 0.1, modules)
    assert [(g["module"], g["weight_decay"], len(g["params"])) for g in split.param_groups] == [
        ("backbone", 1e-4, 2), ("backbone", 0.0, 2), ("other", 1e-4, 2)
    ]  # fmt: skip
    set_lr(split, 0.1, {"other": 2.0})
    assert [g["lr"] for g in split.param_groups] == [0.1, 0.1, 0.2]
    # Factors of 1: the same update as one lr for all, bit for bit.
    copy = [p.detach().clone().requires_grad_() for p in model.parameters()]
    plain = torch.optim.SGD([{"params": copy, "weight_decay": 1e-4}], lr=0.1, momentum=cfg.momentum)
    set_lr(split, 0.1, {"other": 1.0})
    for p, q in zip(model.parameters(), copy, strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    model[1].weight.grad.zero_()  # norm parameters: weight decay 0 in split, 1e-4 in plain
    split.step()
    plain.step()
    for i, (p, q) in enumerate(zip(model.parameters(), copy, strict=True)):
        if i in (2, 3):  # the BN parameters decay differently by design
            continue
        assert torch.equal(p, q), i


def test_agvm_needs_an_even_number_of_processes():
    cfg = load_config("default", ["solver.module_lr=agvm"])
    with pytest.raises(ConfigError, match="solver.module_lr: .*even number"):
        make_plan(cfg, 1, 1000)
    with pytest.raises(ConfigError, match="even number"):
        make_plan(load_config("default", ["solver.module_lr=agvm", "train.batch_size=15"]), 3, 1000)
    plan = make_plan(cfg, 2, 1000)
    assert plan.agvm_start == plan.warmup_iters and "AGVM" in plan.summary()
    later = ["solver.module_lr=agvm", "solver.agvm.start_epochs=2"]
    plan = make_plan(load_config("default", later), 2, 1600)
    assert plan.agvm_start == 2 * plan.iters_per_epoch
