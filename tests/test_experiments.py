"""The study runner behind experiments/: one tiny row end to end, and a divergence recorded
as a result (its iteration and lr), not as a failure."""

import sys
from pathlib import Path

import pytest

from tests.conftest import instant_overrides

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import study  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_study_runs_rows_records_divergence_and_writes_the_table(tiny_shapes, tmp_path):
    rows = [
        study.Row("tiny", ["train.max_iter=2"]),
        study.Row("too-fast", ["solver.base_lr=2", "solver.warmup_iters=10", "train.max_iter=40"]),
    ]
    common = [*instant_overrides(tiny_shapes), "model.norm=cgbn"]
    results = {row.name: [study.run(row, 0, tmp_path, common, "instant_test")] for row in rows}
    tiny, diverged = results["tiny"][0], results["too-fast"][0]
    assert tiny["plan"]["max_iter"] == 2 and 0 <= tiny["mmAP"] <= 100
    assert "diverged" not in tiny
    assert diverged["diverged"]["iteration"] >= 1 and diverged["diverged"]["lr"] > 0
    assert "mmAP" not in diverged
    # A finished run is not run again: its stored result comes back.
    assert study.run(rows[0], 0, tmp_path, common, "instant_test") == tiny
    table = tmp_path / "table.md"
    study.write_table(table, "Tiny", "Two rows.", rows, results)
    text = table.read_text()
    assert "| tiny | 8 |" in text and "seed 0: iteration" in text and "Command:" in text


@pytest.mark.parametrize("training", [False, True])
def test_a_rescaled_backbone_computes_what_the_pretrained_one_did(tmp_path, training):
    """Each conv weight back at a fresh initialization's size, its BN's statistics with it:
    the same outputs in float64, with the running statistics and with batch statistics. BN's
    eps is 1e-30 here: with its usual 1e-5 the network is the same up to eps against variances."""
    import torch
    from rescaled_backbone import rescaled_body
    from torch import nn

    from megdet.nn.tiny_resnet import TinyResNet

    def exact_bn(channels):
        return nn.BatchNorm2d(channels, eps=1e-30)

    torch.manual_seed(1)
    grown = TinyResNet(exact_bn).double()
    with torch.no_grad():  # weights grown as pretraining grows them; statistics of a run
        for module in grown.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.mul_(torch.empty(()).uniform_(1.5, 5.0))
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 3)
                module.weight.uniform_(0.5, 1.5)
    state = {f"net.{k}": v for k, v in grown.state_dict().items()}
    torch.save({"config": {"task": "classification"}, "model": state}, tmp_path / "last.pt")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "last.pt").rename(tmp_path / "checkpoints" / "last.pt")
    body, factors = rescaled_body(tmp_path)
    fresh = TinyResNet(exact_bn).double()
    fresh.load_state_dict(body)
    assert len(factors) == sum(isinstance(m, nn.Conv2d) for m in grown.modules())
    assert all(f < 1 for f in factors.values())
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    grown.train(training), fresh.train(training)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), grown(images), rtol=1e-9, atol=1e-9)
