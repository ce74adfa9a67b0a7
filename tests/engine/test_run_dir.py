"""A run folder changes only once a run can start: a failed --resume or --overwrite leaves the
previous run as it was, a bad --out is one line, and a run that never trained blocks nothing."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megdet.engine.run_dir import check_run_dir, folder_problem
from tests.conftest import instant_overrides


def megdet(*args):
    return subprocess.run(
        [sys.executable, "-m", "megdet", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
    )


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(proc, expected: str) -> None:
    """Exit code 2, one error line saying ``expected``, no traceback (log lines may precede)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megdet: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_failed_overwrite_or_resume_leaves_the_previous_run_as_it_was(tiny_shapes, tmp_path):
    run = tmp_path / "run"
    train = ["train", "--config", "instant_test", "--out", run, *instant_overrides(tiny_shapes)]
    done = megdet(*train, "train.max_iter=2")
    assert done.returncode == 0, done.stderr[-2000:]
    before = _files(run)
    assert {p.name for p in before} >= {"config.yaml", "plan.json", "metrics.jsonl", "last.pt"}

    # --overwrite used to remove the old run before the new one found its data missing.
    missing = megdet(*train, "--overwrite", f"data.train.json={tmp_path}/none.json")
    _one_line(missing, "none.json: annotation file not found")
    assert _files(run) == before

    # A --resume that finds no readable checkpoint used to rewrite config.yaml and plan.json.
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    before = _files(run)
    resumed = megdet(*train, "train.max_iter=4", "--resume")
    _one_line(resumed, "no readable checkpoint to resume from")
    assert _files(run) == before


def test_out_that_is_a_file_or_under_one_is_a_one_line_error(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for out, says in ((a_file, "is a file"), (a_file / "run", f"is under the file {a_file}")):
        proc = megdet("train", "--config", "instant_test", "--out", out)
        _one_line(proc, f"--out {out}: {says}; choose a folder")
        proc = megdet("eval", "--config", "instant_test", "--weights", a_file, "--out", out)
        _one_line(proc, f"--out {out}: {says}; choose a folder")
    assert a_file.read_text() == "mine"


def test_a_folder_that_cannot_be_written_is_named_before_anything_starts(tmp_path):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "run"
    else:  # root writes through permissions; a read-only mount still refuses it
        out = Path("/sys/megdet-test/run")
        if folder_problem(out) is None:
            pytest.skip("no read-only folder to test with on this machine")
    assert "cannot write in" in check_run_dir(out, overwrite=False, resume=False)
    assert "cannot write in" in check_run_dir(out, overwrite=False, resume=True)
    _one_line(megdet("train", "--config", "instant_test", "--out", out), "cannot write in")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_run_that_fails_before_its_first_iteration_does_not_block_the_rerun(
    tiny_shapes, tmp_path, nproc
):
    """With 2 processes one image is broken: the rank that reads it says so, in one line;
    the other rank's error about a lost connection is not printed."""
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    images = sorted((data / "train").iterdir())
    for image in images if nproc == 1 else images[1:2]:
        image.write_bytes(b"not an image")
    run = tmp_path / "run"
    proc = megdet("train", "--config", "instant_test", "--out", run, "--nproc", nproc,
                  "data.hflip=false", *instant_overrides(data))  # fmt: skip
    _one_line(proc, "cannot read image (UnidentifiedImageError")
    assert check_run_dir(run, overwrite=False, resume=False) is None
