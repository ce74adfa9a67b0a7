"""Two torchrun agents as two "nodes" on loopback train like one node with 4 processes."""

import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import instant_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(out, data):
    # CGBN groups of 4 images = 2 processes x 2 images: each group inside one "node".
    return ["-m", "megdet", "train", "--config", "instant_test", "--out", str(out),
            *instant_overrides(data), "train.max_iter=6", "model.norm=cgbn", "model.bn_size=4",
            "data.hflip=true"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_of_two_equal_one_node_of_four(tiny_shapes, tmp_path):
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "2",
                "--rdzv-backend",
                "c10d",
                "--rdzv-id",
                "megdet-test",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                *_train_args(tmp_path / "two_nodes", tiny_shapes),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=400) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-3000:]
    one = subprocess.run(
        [sys.executable, *_train_args(tmp_path / "one_node", tiny_shapes), "--nproc", "4"],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = torch.load(tmp_path / "two_nodes" / "checkpoints" / "last.pt", weights_only=True)
    ref = torch.load(tmp_path / "one_node" / "checkpoints" / "last.pt", weights_only=True)
    assert two["plan"]["world_size"] == ref["plan"]["world_size"] == 4
    assert two["plan"]["bn_groups"]["ranks_per_group"] == 2
    for key, value in ref["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-5, atol=1e-7, msg=key)
