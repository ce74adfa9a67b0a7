"""The training state's one owner: the checkpoint is the union of its pieces' state dicts, the
log line the union of their statistics (issue 25, part 0). That checkpoints and training stay
what they were is proven by the exact-resume tests (tests/engine/test_resume.py)."""

from pathlib import Path

import torch

from megdet.engine.state import TrainingState


class Counter:
    """A piece of step state: counts its steps, logs the count."""

    def __init__(self, name: str) -> None:
        self.name, self.count = name, 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state.get("count", 0)

    def statistics(self) -> dict[str, float]:
        return {f"{self.name}_count": float(self.count)}


def _state(quiet=()):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    parts = {"a": Counter("a"), "absent": None, "b": Counter("b")}
    return TrainingState(model, optimizer, parts, quiet=quiet)


def test_the_checkpoint_is_the_union_of_the_pieces_and_loads_back(tmp_path):
    state = _state()
    state.model(torch.ones(4, 3)).sum().backward()
    state.optimizer.step()
    state.parts["a"].count, state.parts["b"].count = 3, 5
    saved = state.state_dict()
    assert list(saved) == ["model", "optimizer", "a", "absent", "b", "rng"]
    assert saved["absent"] == {} and saved["b"] == {"count": 5}
    torch.save(saved, tmp_path / "c.pt")
    rng_then = torch.get_rng_state()
    torch.rand(10)  # the generator moves on; loading puts it back

    other = _state()
    other.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True), Path("c.pt"))
    assert (other.parts["a"].count, other.parts["b"].count) == (3, 5)
    for key, value in state.model.state_dict().items():
        assert torch.equal(other.model.state_dict()[key], value)
    momentum = other.optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, state.optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert torch.equal(torch.get_rng_state(), rng_then)


def test_a_checkpoint_without_a_piece_leaves_it_fresh_and_quiet_pieces_are_not_logged():
    state = _state(quiet=("b",))
    saved = state.state_dict()
    del saved["a"]  # written before that piece existed
    state.parts["a"].count = 7
    state.load_state_dict(saved, Path("old.pt"))
    assert state.parts["a"].count == 0
    assert state.statistics() == {"a_count": 0.0}
