import os
import stat

import pytest
import torch

from megdet.atomic import atomic_write_text
from megdet.engine.checkpoint import load_checkpoint, save_checkpoint
from megdet.errors import MegdetError


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "iteration": 7, "config": {"a": [1, 2]}}
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["iteration"] == 7 and loaded["config"] == {"a": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "last.pt", {"model": Boom()})
    save_checkpoint(tmp_path / "last.pt", {"model": {}})
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "last.pt", {"model": Boom()})
    assert load_checkpoint(tmp_path / "last.pt") == {"model": {}}
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.json"]


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(MegdetError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(truncated, {"model": {"w": torch.zeros(1000)}})
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(MegdetError, match="not a readable megdet checkpoint"):
        load_checkpoint(truncated)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(MegdetError, match="no 'model' entry"):
        load_checkpoint(other)


def test_weights_of_another_model_name_the_keys_that_do_not_fit():
    from torch import nn

    from megdet.engine.checkpoint import load_model_state

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    other = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Linear(2, 2)).state_dict()
    with pytest.raises(MegdetError) as info:
        load_model_state(model, other, "w.pt")
    message = str(info.value)
    assert message.startswith("w.pt: weights do not fit this model") and "\n" not in message
    assert "'1.running_mean'" in message  # missing
    assert "'0.weight'" in message  # wrong shape
    load_model_state(model, model.state_dict(), "same.pt")  # its own weights fit


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_run_files_respect_the_umask(tmp_path, umask, mode):
    """Atomic writes go through mkstemp, whose files are 0600 whatever the umask."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "plan.json", "{}")
        save_checkpoint(tmp_path / "last.pt", {"model": {}})
    finally:
        os.umask(old)
    for name in ("plan.json", "last.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
