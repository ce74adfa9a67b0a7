"""solver.clip_grad_norm: gradients scaled down to the limit, never up."""

import torch

from megdet.engine.trainer import _clip_gradients


def _model_with_gradients(scale: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    return model


def _norm(model) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))


def test_gradients_above_the_limit_are_scaled_to_it_in_every_direction_alike():
    model = _model_with_gradients(10.0)
    before = [p.grad.clone() for p in model.parameters()]
    norm = _norm(model)
    _clip_gradients(model, norm, max_norm=1.0)
    assert abs(_norm(model) - 1.0) < 1e-5
    for old, p in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, old / (norm + 1e-6), rtol=1e-12, atol=0)


def test_gradients_below_the_limit_or_without_one_are_untouched():
    for max_norm in (1e6, None):
        model = _model_with_gradients(0.01)
        before = [p.grad.clone() for p in model.parameters()]
        _clip_gradients(model, _norm(model), max_norm)
        assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters(), strict=True))
