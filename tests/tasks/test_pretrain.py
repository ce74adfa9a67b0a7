"""megdet pretrains its own backbone (issue 26): a classifier's checkpoint initializes the
detector's body bitwise, weights and BN statistics; what does not fit is one line; a run's
config.yaml records the file it started from."""

import pytest
import torch
import yaml
from torch import nn
from torchvision.models import resnet18

from megdet.config import load_config
from megdet.errors import ConfigError
from megdet.nn import norm_layer
from megdet.nn.tiny_resnet import TinyResNet, TinyResNetClassifier
from megdet.nn.weights import (
    conv_sizes,
    file_sha256,
    load_backbone_weights,
    normalized_convs,
    record_backbone_source,
)
from megdet.tasks.classification.model import Classifier
from megdet.tasks.detection.backbone import build_backbone
from tests.conftest import instant_overrides, megdet


def _randomized(net: nn.Module, seed: int) -> nn.Module:
    """Weights and BN statistics unlike any fresh network's, so that equality means loaded."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if tensor.is_floating_point():
                tensor.uniform_(0.5, 1.5) if "running_var" in name else tensor.normal_()
    return net


def _checkpoint(path, task: str, backbone: str, model: nn.Module):
    """A file as megdet train saves it: the model's state_dict and the run's config."""
    config = {"task": task, "model": {"backbone": backbone}}
    torch.save({"model": model.state_dict(), "config": config, "iteration": 2}, path)
    return path


def _detector_body(backbone: str, source, *overrides):
    cfg = load_config(
        "instant_test",
        [f"model.backbone={backbone}", f"model.backbone_weights={source}", *overrides],
    ).model
    return build_backbone(cfg, norm_layer("bn"), pretrained=True).body


@pytest.mark.parametrize("backbone", ["tiny", "resnet18"])
def test_a_classification_checkpoint_initializes_the_detector_bitwise(tmp_path, backbone):
    net = TinyResNetClassifier(norm_layer("bn"), 36) if backbone == "tiny" else resnet18()
    classifier = Classifier(_randomized(net, seed=1))
    path = _checkpoint(tmp_path / "last.pt", "classification", backbone, classifier)
    body = _detector_body(backbone, path).state_dict()
    saved = {k[len("net.") :]: v for k, v in classifier.state_dict().items()}
    kept = [k for k in saved if not k.startswith("fc.")]
    assert kept and all(k in body for k in kept)
    for key in kept:  # weights, BN statistics, the counters: all of them, bitwise
        assert torch.equal(body[key], saved[key]), key
    assert any("running_var" in k for k in kept)


def test_a_detection_checkpoint_and_a_run_folder_initialize_it_too(tmp_path):
    detector = _detector_body("tiny", "none")
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.body = _randomized(detector, seed=2)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    _checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", "detection", "tiny", model)
    body = _detector_body("tiny", tmp_path / "run").state_dict()  # the folder: its last.pt
    for key, value in model.backbone.body.state_dict().items():
        assert torch.equal(body[key], value), key


def _one_line(backbone, source) -> str:
    with pytest.raises(ConfigError) as caught:
        _detector_body(backbone, source)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("model.backbone_weights: ")
    return message


def test_what_does_not_fit_is_refused_in_one_line(tmp_path):
    tiny = Classifier(TinyResNetClassifier(norm_layer("bn"), 10))
    classified = _checkpoint(tmp_path / "tiny.pt", "classification", "tiny", tiny)
    assert _one_line("resnet18", classified) == (
        f"model.backbone_weights: {classified} is a classification checkpoint of backbone "
        "tiny, not resnet18; set model.backbone=tiny, or pretrain a resnet18"
    )
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.body = _detector_body("resnet18", "none")
    detected = _checkpoint(tmp_path / "r18.pt", "detection", "resnet18", model)
    assert "is a detection checkpoint of backbone resnet18, not tiny" in _one_line("tiny", detected)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert f"cannot load {text}" in _one_line("tiny", text)
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    assert "is neither a megdet checkpoint nor a state_dict" in _one_line("tiny", listed)
    folder = tmp_path / "empty_run"
    folder.mkdir()
    assert "is a folder without checkpoints/last.pt" in _one_line("tiny", folder)


def test_the_run_records_the_file_and_refuses_another_one(tmp_path):
    tiny = Classifier(TinyResNetClassifier(norm_layer("bn"), 10))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    path = _checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", "classification", "tiny", tiny)
    cfg = load_config("instant_test", [f"model.backbone_weights={tmp_path / 'run'}"]).model
    recorded = record_backbone_source(cfg)
    assert recorded.backbone_weights == str(path.resolve())
    assert recorded.backbone_weights_sha256 == file_sha256(path) and len(file_sha256(path)) == 64
    assert record_backbone_source(recorded) == recorded  # what it recorded, it accepts
    torch.save({"model": {}, "config": {}}, path)  # the file changed since
    with pytest.raises(ConfigError, match=r"^model.backbone_weights_sha256: .* has sha256 "):
        record_backbone_source(recorded)


@pytest.fixture(scope="module")
def tiny_patterns(tmp_path_factory):
    root = tmp_path_factory.mktemp("patterns")
    proc = megdet("data", "patterns", "--out", root / "set", "--classes", "4", "--train", "16",
                  "--val", "8", "--size", "64", "--seed", "0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "set"


@pytest.mark.slow
def test_pretrain_then_fine_tune_through_the_cli(tiny_patterns, tiny_shapes, tmp_path):
    """``pretrain_tiny`` for 2 iterations, then the detector from its run folder for 2: the
    detector's frozen stem is the classifier's bitwise, and its config.yaml says which file."""
    pretrain = tmp_path / "pretrain"
    proc = megdet(
        "train", "--config", "pretrain_tiny", "--nproc", 2, "--out", pretrain,
        f"data.train.images={tiny_patterns}/train", f"data.val.images={tiny_patterns}/val",
        "train.batch_size=8", "solver.base_batch=8", "model.bn_size=4", "train.max_iter=2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    fine_tune = tmp_path / "detect"
    proc = megdet(
        "train", "--config", "instant_test", "--out", fine_tune, *instant_overrides(tiny_shapes),
        f"model.backbone_weights={pretrain}", "model.frozen_stages=1", "train.max_iter=2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    source = pretrain / "checkpoints" / "last.pt"
    config = yaml.safe_load((fine_tune / "config.yaml").read_text())["model"]
    assert config["backbone_weights"] == str(source.resolve())
    assert config["backbone_weights_sha256"] == file_sha256(source)
    classifier = torch.load(source, weights_only=True)["model"]
    detector = torch.load(fine_tune / "checkpoints" / "last.pt", weights_only=True)["model"]
    stem = [k for k in classifier if k.startswith("net.stem.") and "num_batches" not in k]
    assert any("running_mean" in k for k in stem)
    for key in stem:  # frozen: trained 2 iterations, still the classifier's
        assert torch.equal(detector["backbone.body." + key[len("net.") :]], classifier[key]), key
    learned = "backbone.body.layer2.0.conv1.weight"
    assert not torch.equal(detector[learned], classifier["net.layer2.0.conv1.weight"])


def _grown_classifier(path, seed: int = 1):
    """A tiny classifier's checkpoint whose conv weights grew 1.5-5x, as pretraining grows
    them, with BN statistics of a run."""
    torch.manual_seed(seed)
    net = TinyResNetClassifier(norm_layer("bn"), 6)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.mul_(torch.empty(()).uniform_(1.5, 5.0))
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 3)
                module.weight.uniform_(0.5, 1.5)
    return _checkpoint(path, "classification", "tiny", Classifier(net))


def _exact_bn(channels):  # BN's eps breaks the invariance by eps against each variance
    return nn.BatchNorm2d(channels, eps=1e-30)


@pytest.mark.parametrize("training", [False, True])
def test_rescaled_weights_are_back_at_their_initial_size_and_compute_the_same(tmp_path, training):
    """model.backbone_weights_rescale: every convolution behind a BN at its fresh RMS, the BN
    statistics scaled with it, so the network's outputs (running or batch statistics) are
    those of the weights as loaded, in float64."""
    path = _grown_classifier(tmp_path / "last.pt")
    rescaled = TinyResNet(_exact_bn).double()
    initial = conv_sizes(rescaled)
    load_backbone_weights(rescaled, "tiny", str(path), rescale=True)
    as_loaded = TinyResNet(_exact_bn).double()
    load_backbone_weights(as_loaded, "tiny", str(path))
    assert len(initial) == sum(isinstance(m, nn.Conv2d) for m in rescaled.modules()) == 21
    for name, size in conv_sizes(rescaled).items():
        assert size == pytest.approx(initial[name], rel=1e-12), name
        assert conv_sizes(as_loaded)[name] > 1.4 * size  # it did change them
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    rescaled.train(training), as_loaded.train(training)
    with torch.no_grad():
        torch.testing.assert_close(rescaled(images), as_loaded(images), rtol=1e-9, atol=1e-9)


def test_the_detector_rescales_its_pretrained_body_when_asked(tmp_path):
    path = _grown_classifier(tmp_path / "last.pt")
    torch.manual_seed(0)
    body = _detector_body("tiny", path, "model.backbone_weights_rescale=true")
    torch.manual_seed(0)
    fresh = TinyResNet(norm_layer("bn"))  # what build_backbone initialized before loading
    for name, size in conv_sizes(fresh).items():
        assert conv_sizes(body)[name] == pytest.approx(size, rel=1e-5), name
    as_loaded = _detector_body("tiny", path)
    assert conv_sizes(as_loaded)["stem.0"] > 1.4 * conv_sizes(body)["stem.0"]


def test_only_convolutions_a_normalization_follows_are_rescaled():
    """A convolution straight into another layer is not scale-invariant: it is left alone."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                        nn.ReLU(), nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8))  # fmt: skip
    assert list(normalized_convs(net)) == ["0", "4"]
