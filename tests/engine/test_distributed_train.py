"""A real 2-process gloo run of the trainer: both processes must end with identical weights."""

import pytest
import torch

from megdet import dist
from megdet.config import load_config
from megdet.engine.trainer import train
from megdet.tasks.detection.task import DetectionTask
from tests.conftest import instant_overrides
from tests.distributed import run_in_processes


def _train_a_few_iterations(rank, world_size, root, run_dir, norm):
    cfg = load_config(
        "instant_test", [*instant_overrides(root), "train.max_iter=4", f"model.norm={norm}"]
    )
    ctx = dist.init_distributed()
    assert (ctx.rank, ctx.world_size) == (rank, world_size)
    result = train(cfg, DetectionTask(cfg), run_dir, ctx)
    return {"metrics": result.metrics, "weights": result.model.state_dict()}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("norm", ["bn", "cgbn"])
def test_two_gloo_processes_train_to_identical_weights(tiny_shapes, tmp_path, norm):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first, second = run_in_processes(_train_a_few_iterations, 2, tiny_shapes, run_dir, norm)
    assert first["metrics"] == second["metrics"]
    assert set(first["weights"]) == set(second["weights"])
    for key, value in first["weights"].items():
        # BN running statistics included: they are averaged before evaluation and saving.
        assert torch.equal(value, second["weights"][key]), key
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["iteration"] == 4 and saved["plan"]["world_size"] == 2
    assert all(torch.equal(saved["model"][k], v) for k, v in first["weights"].items())
    if norm == "cgbn":
        assert saved["plan"]["bn_groups"] == {
            "images_per_group": 8, "ranks_per_group": 2, "local_group_size": None
        }  # fmt: skip
    init = DetectionTask(load_config("instant_test", instant_overrides(tiny_shapes))).build_model()
    changed = [k for k, v in init.state_dict().items() if not torch.equal(first["weights"][k], v)]
    assert any("roi_heads" in k for k in changed) and any("backbone.body" in k for k in changed)
    assert (run_dir / "metrics.jsonl").read_text().count('"loss"') == 1  # log.period 10 > 4


def _train_from_file(rank, world_size, root, run_dir, weights):
    cfg = load_config(
        "instant_test",
        [*instant_overrides(root), "train.max_iter=2", "model.norm=cgbn",
         f"model.backbone_weights={weights}", "model.frozen_stages=2"],
    )  # fmt: skip
    result = train(cfg, DetectionTask(cfg), run_dir, dist.init_distributed())
    return result.model.backbone.body.state_dict()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pretrained_backbone_read_by_rank_0_reaches_every_rank(tiny_shapes, tmp_path):
    """Only rank 0 reads model.backbone_weights; the frozen stem and res2 of every rank end
    with the file's weights and statistics, untouched by training."""
    from megdet.nn import norm_layer
    from megdet.nn.tiny_resnet import TinyResNet

    torch.manual_seed(123)
    pretrained = TinyResNet(norm_layer("bn"))
    with torch.no_grad():
        for name, buffer in pretrained.named_buffers():
            if "running" in name:
                buffer.uniform_(0.5, 1.5)
    path = tmp_path / "tiny.pth"
    torch.save(pretrained.state_dict(), path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ranks = run_in_processes(_train_from_file, 2, tiny_shapes, run_dir, path)
    file = pretrained.state_dict()
    frozen = [k for k in file if k.startswith(("stem.", "layer1.")) and "num_batches" not in k]
    assert frozen
    for body in ranks:
        assert all(torch.equal(body[k], file[k]) for k in frozen)
        assert not torch.equal(body["layer2.0.conv1.weight"], file["layer2.0.conv1.weight"])
