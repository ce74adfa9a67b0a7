"""Classification (issue 16): the CIFAR ResNets, zero-initialized residual gammas, seeded
augmentation, exact top-1/top-5 error over processes, the same training for 1 and 2
processes, and the user's path through the CLI."""

import json

import pytest
import torch

from megdet import dist
from megdet.config import load_config
from megdet.data.patterns import generate_patterns
from megdet.engine.task import Task
from megdet.engine.trainer import train
from megdet.errors import ConfigError, DataError
from megdet.nn import norm_layer
from megdet.tasks import build_task
from megdet.tasks.classification import data
from megdet.tasks.classification.model import build_classifier
from megdet.tasks.detection.backbone import build_backbone
from tests.conftest import megdet
from tests.distributed import run_in_processes


@pytest.fixture(scope="module")
def patterns(tmp_path_factory):
    root = tmp_path_factory.mktemp("patterns")
    generate_patterns(root, 6, num_train=36, num_val=20, size=32, seed=0)
    return root


def _cfg(root, *overrides):
    return load_config(
        "classify_demo",
        [f"data.train.images={root}/train", f"data.val.images={root}/val", *overrides],
    )


def test_cifar_resnets_have_he_et_als_sizes():
    """He et al. 2016, table 6: ResNet-20 0.27M and ResNet-56 0.85M parameters (10 classes)."""
    for backbone, millions in (("resnet20", 0.27), ("resnet56", 0.85)):
        cfg = load_config("classify_demo", [f"model.backbone={backbone}"])
        model = build_classifier(cfg, 10, None, pretrained=False)
        count = sum(p.numel() for p in model.parameters())
        assert count / 1e6 == pytest.approx(millions, abs=0.01), backbone
        logits = model(torch.randn(2, 3, 32, 32))
        assert logits.shape == (2, 10)


@pytest.mark.parametrize("backbone", ["resnet20", "resnet18", "resnet50"])
def test_each_blocks_last_gamma_starts_at_zero(backbone):
    """Goyal 5.1: every residual block starts as the identity; other gammas stay at 1."""
    cfg = load_config("classify_demo", [f"model.backbone={backbone}"])
    net = build_classifier(cfg, 10, None, pretrained=False).net
    last = {"resnet50": "bn3"}.get(backbone, "bn2")
    blocks = [m for name, m in net.named_modules() if hasattr(m, last) and "layer" in name]
    assert blocks and all(torch.all(getattr(b, last).weight == 0) for b in blocks)
    assert torch.all(net.bn1.weight == 1)
    off = load_config("classify_demo", [f"model.backbone={backbone}",
                                        "classification.zero_init_residual=false"])  # fmt: skip
    net = build_classifier(off, 10, None, pretrained=False).net
    assert all(torch.all(getattr(b, last).weight == 1) for b in net.modules() if hasattr(b, last))


def test_augmentation_is_drawn_per_image_not_per_process(patterns):
    cfg = _cfg(patterns, "classification.augment=random_resized_crop")
    index = data.read_folder(cfg.data.train.images, "data.train.images")
    dataset = data.FolderDataset(index, data.train_transform(cfg.classification), seed=5)
    first = dataset[(2, 7)][0]
    torch.manual_seed(123)  # another process's global generator state
    torch.rand(10)
    again = dataset[(2, 7)][0]
    assert torch.equal(first, again)
    assert not torch.equal(first, dataset[(3, 7)][0])  # another epoch, another crop
    state = torch.get_rng_state()
    dataset[(0, 0)]
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32


def test_eval_transform_is_the_resize_and_center_crop():
    cfg = load_config("classify_demo", ["classification.augment=random_resized_crop",
                                        "classification.image_size=224"])  # fmt: skip
    resize, crop = data.eval_transform(cfg.classification).transforms[:2]
    assert list(resize.size) == [256] and list(crop.size) == [224, 224]  # 224 / 0.875


def _evaluate(rank, world_size, root):
    cfg = _cfg(root, "eval.images_per_device=8")
    task = build_task(cfg)
    torch.manual_seed(0)
    model = task.build_model()
    for module in model.modules():  # a trained-looking network: no zero gammas
        if isinstance(module, torch.nn.modules.batchnorm._NormBase):
            module.weight.data.uniform_(0.5, 1.5)
    dist.init_distributed()
    metrics = task.evaluate(model, torch.device("cpu"), None)
    # the reference: every image through the same model in one batch
    dataset = data.FolderDataset(task.val_index, data.eval_transform(cfg.classification))
    images, labels = data.collate([dataset[i] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        top = model(images).topk(5, dim=1).indices
    expected = {
        "top1_err": 1 - (top[:, 0] == labels).double().mean().item(),
        "top5_err": 1 - (top == labels[:, None]).any(1).double().mean().item(),
    }
    return metrics, expected


@pytest.mark.slow
def test_errors_count_every_image_once_over_processes(patterns):
    """20 images of 6 classes over 2 processes with batches of 8: a last short batch."""
    results = run_in_processes(_evaluate, 2, patterns)
    (metrics, expected), (other, _) = results
    assert metrics == other  # the same on every rank
    assert metrics["images"] == 20
    assert metrics["top1_err"] == pytest.approx(expected["top1_err"], abs=1e-12)
    assert metrics["top5_err"] == pytest.approx(expected["top5_err"], abs=1e-12)
    assert 0 < metrics["top1_err"] < 1  # the reference is not trivially 0 or 1


def _train(rank, world_size, root, run_dir):
    cfg = _cfg(root, "train.dtype=float64", "train.batch_size=8", "model.bn_size=4",
               "train.max_iter=4", "log.period=1", "classification.augment=random_resized_crop",
               "eval.images_per_device=8")  # fmt: skip
    result = train(cfg, build_task(cfg), run_dir, dist.init_distributed())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    return result.model.state_dict(), losses, result.metrics


@pytest.mark.slow
def test_same_global_batch_same_training_for_1_and_2_processes(patterns, tmp_path):
    """float64: BN over 4 images (two chunks in one process, or one process each), the same
    crops and flips per image, the mean loss over the batch: the same weights."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run_in_processes(_train, 1, patterns, tmp_path / "one")[0]
    two = run_in_processes(_train, 2, patterns, tmp_path / "two")[0]
    assert one[1] == pytest.approx(two[1], rel=1e-9)
    assert one[1][0] != one[1][-1]  # it trained
    for key, value in one[0].items():
        torch.testing.assert_close(two[0][key], value, rtol=1e-9, atol=1e-12, msg=key)
    assert one[2] == two[2]


def test_classification_is_a_task_and_refuses_what_it_cannot_do(patterns):
    task = build_task(_cfg(patterns))
    assert isinstance(task, Task) and task.num_train_images == 36 and task.num_classes == 6
    groups = task.parameter_groups(task.build_model())
    assert list(groups) == ["backbone", "head"] and len(groups["head"]) == 2  # fc weight, bias
    with pytest.raises(ConfigError, match="train.checkpointing"):
        build_task(_cfg(patterns, "train.checkpointing=stages"))
    with pytest.raises(ConfigError, match="model.backbone: 'resnet20' is not a detection"):
        load_config("instant_test", ["model.backbone=resnet20"])
    # The detector's tiny body classifies too (issue 26): the same names, plus fc.
    tiny = build_task(_cfg(patterns, "model.backbone=tiny")).build_model().state_dict()
    body = build_backbone(load_config("instant_test", []).model, norm_layer("bn")).body
    assert {k[len("net.") :] for k in tiny if not k.startswith("net.fc.")} == set(body.state_dict())
    with pytest.raises(ConfigError, match="data.train.images: .* is not a folder"):
        _ = build_task(_cfg(patterns, "data.train.images=/nonexistent")).num_train_images


def test_val_classes_must_be_the_training_classes(patterns, tmp_path):
    generate_patterns(tmp_path / "other", 3, num_train=3, num_val=3, size=32)
    task = build_task(_cfg(patterns, f"data.val.images={tmp_path}/other/val"))
    with pytest.raises(DataError, match="class folders differ"):
        task.build_model(split="val")


def test_memory_estimate_grows_with_the_images(patterns):
    estimate = build_task(_cfg(patterns)).estimate_memory()
    assert estimate.per_image_mb["none"] > 0 and estimate.weights_mb > 0
    assert estimate.image_size == (32, 32)
    assert estimate.images_that_fit("none", 1.0) > estimate.images_that_fit("none", 0.5)


@pytest.mark.slow
def test_train_eval_plan_report_through_the_cli(cli, tmp_path):
    root = tmp_path / "data"
    made = cli("data", "patterns", "--out", root, "--classes", 4, "--train", 64, "--val", 16)
    assert made.returncode == 0, made.stderr
    paths = [f"data.train.images={root}/train", f"data.val.images={root}/val"]
    planned = cli("plan", "--config", "classify_demo", *paths, "--nproc", 2)
    assert planned.returncode == 0 and "global batch 128" in planned.stdout, planned.stderr
    run = tmp_path / "run"
    trained = megdet("train", "--config", "classify_demo", *paths, "train.batch_size=16",
                     "model.bn_size=8", "train.epochs=2", "solver.steps=[1.5]", "--nproc", 2,
                     "--out", run)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "classification error" in trained.stdout and "top1_err" in trained.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "eval" in r] == [1.0, 2.0]  # per epoch, like mmAP
    assert all("train_top1_err" in r and "gns" in r for r in records if "loss" in r)
    final = records[-1]["eval"]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["labels"] == {"names": sorted(p.name for p in (root / "train").iterdir())}
    evaluated = cli("eval", "--run", run, "--out", tmp_path / "again")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again == pytest.approx(final)
    reported = cli("report", run)
    assert reported.returncode == 0, reported.stderr[-3000:]
    assert "top1_err_per_epoch.png" in {p.name for p in (run / "report").iterdir()}
