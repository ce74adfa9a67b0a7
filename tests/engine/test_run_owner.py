"""Nothing lost (issue 24): a run folder has one writer, ``--overwrite`` keeps the old run
until the new one has a checkpoint, a resumed run logs each iteration once, and everything the
end of training reads is checked before its first iteration."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megdet.engine.run_dir import (
    ASIDE,
    LOCK,
    RunLock,
    previous_outputs,
    settle_replacement,
    start_run_dir,
)
from tests.conftest import instant_overrides, one_line_error, run_files


@pytest.fixture(scope="module")
def trained(tiny_shapes, tmp_path_factory) -> Path:
    """A finished 2-iteration instant run (config, plan, metrics, checkpoint, eval)."""
    from megdet.cli import main

    run = tmp_path_factory.mktemp("trained") / "run"
    code = main(["train", "--config", "instant_test", "--out", str(run), "train.max_iter=2",
                 *instant_overrides(tiny_shapes)])  # fmt: skip
    assert code == 0
    return run


def _train(cli, run, data, *extra):
    return cli("train", "--config", "instant_test", "--out", run, *instant_overrides(data), *extra)


def test_a_second_writer_is_refused_with_the_owner_named(cli, trained, tiny_shapes, tmp_path):
    """A train into a folder another run holds, with or without --overwrite, and an eval that
    would write RUN/eval, are one line naming the process; nothing of the run changes."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = run_files(run)
    owner = RunLock(run)
    assert owner.acquire() is None  # as a training run holds it
    try:
        for extra in ([], ["--overwrite"], ["--resume"]):
            busy = _train(cli, run, tiny_shapes, "train.max_iter=2", *extra)
            one_line_error(busy, f"--out {run}: in use by another megdet run (pid ")
            assert f"pid {os.getpid()} on " in busy.stderr
        evaluated = cli("eval", "--run", run)
        one_line_error(evaluated, f"--run {run}: in use by another megdet run")
        # Evaluating elsewhere writes nothing into the run: allowed while it trains.
        elsewhere = cli("eval", "--run", run, "--out", tmp_path / "eval")
        assert elsewhere.returncode == 0, elsewhere.stderr[-2000:]
    finally:
        owner.release()
    assert run_files(run) == before
    assert cli("eval", "--run", run).returncode == 0  # free again


def test_the_lock_of_a_killed_run_is_released_by_the_system(tmp_path):
    """SIGKILL leaves no chance to clean up: the kernel drops the lock with the process, so
    the run's --resume is never blocked."""
    run = tmp_path / "run"
    holder = (
        "import os, signal, sys; from megdet.engine.run_dir import RunLock; "
        "assert RunLock(sys.argv[1]).acquire() is None; os.kill(os.getpid(), signal.SIGKILL)"
    )
    killed = subprocess.run([sys.executable, "-c", holder, str(run)], timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert (run / LOCK).read_text().startswith("pid ")  # it held it
    lock = RunLock(run)
    assert lock.acquire() is None
    lock.release()


def test_a_lock_taken_for_a_run_that_never_starts_leaves_no_folder(tmp_path):
    run = tmp_path / "new" / "run"
    lock = RunLock(run)
    assert lock.acquire() is None and (run / LOCK).is_file()
    lock.release()
    assert not run.exists()


@pytest.mark.slow
def test_an_overwrite_that_diverges_puts_the_previous_run_back(cli, trained, tiny_shapes, tmp_path):
    """It used to delete the old checkpoints first, then diverge at iteration 2."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = run_files(run)
    diverged = _train(cli, run, tiny_shapes, "--overwrite", "train.max_iter=4",
                      "solver.base_lr=10000", "solver.warmup=none")  # fmt: skip
    one_line_error(diverged, "training diverged at iteration")
    assert run_files(run) == before
    assert not (run / ASIDE).exists()


def test_a_replacement_killed_before_its_checkpoint_is_undone_and_one_with_it_is_kept(
    trained, tmp_path
):
    """What ``--overwrite`` does on disk: the old run is moved aside (not deleted) when the
    new one starts, deleted at its first checkpoint, and put back if there is none."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = run_files(run)
    start_run_dir(run, "new: config\n", "{}\n", replace=True, resumed_at=None)
    assert (run / ASIDE / "checkpoints" / "last.pt").is_file()
    assert (run / "config.yaml").read_text() == "new: config\n"
    assert not (run / "checkpoints").exists()
    (run / "metrics.jsonl").write_text('{"iter": 1}\n')  # what the new run logged, then died
    settle_replacement(run)  # at the next start (or when the new run fails)
    assert run_files(run) == before and not (run / ASIDE).exists()

    start_run_dir(run, "new: config\n", "{}\n", replace=True, resumed_at=None)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"the new run's first checkpoint")
    settle_replacement(run)
    assert not (run / ASIDE).exists()
    assert (run / "config.yaml").read_text() == "new: config\n"
    assert sorted(previous_outputs(run)) == ["checkpoints", "config.yaml", "plan.json"]


def test_resume_after_a_run_killed_before_its_first_checkpoint_logs_each_iteration_once(
    cli, tiny_shapes, tmp_path
):
    run = tmp_path / "run"
    run.mkdir()
    dead = [{"iter": 2, "epoch": 1.0, "lr": 0.1, "loss": 9.0}, {"iter": 4, "epoch": 2.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dead) + '{"it')
    resumed = _train(cli, run, tiny_shapes, "--resume", "train.max_iter=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [2, 2]  # the new run's iteration 2, its eval at 2
    assert records[0]["loss"] != 9.0 and "eval" in records[1]


@pytest.mark.parametrize(
    ("break_val", "message"),
    [
        (lambda data: f"data.val.json={data}/missing.json", "missing.json not found; pass data"),
        (lambda data: f"data.val.images={data}/nowhere", "image file not found"),
    ],
)
def test_the_val_set_is_checked_before_the_first_iteration(
    cli, tiny_shapes, tmp_path, break_val, message
):
    """It used to be read only after training ended."""
    run = tmp_path / "run"
    proc = _train(cli, run, tiny_shapes, "train.max_iter=2", break_val(tiny_shapes))
    one_line_error(proc, message)
    assert "data.val" in proc.stderr
    assert not run.exists()  # not one iteration ran, nothing was written


def test_a_lock_kept_by_a_dead_runs_child_is_waited_for(tmp_path):
    """A DataLoader worker inherits the lock's open file and outlives its killed parent by a
    few seconds: the restarted run waits for it instead of refusing its own folder."""
    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    child = (
        "import fcntl, os, socket, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"os.write(fd, f'pid {gone} on {{socket.gethostname()}}: megdet train'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(1.5)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", child, str(run / LOCK)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    lock = RunLock(run)
    assert lock.acquire() is None  # after the child let go
    assert holder.wait(timeout=30) == 0
    lock.release()
