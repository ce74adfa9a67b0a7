"""A run folder changes only once a run can start: a failed --resume or --overwrite leaves the
previous run as it was, a bad --out is one line, and a run that never trained blocks nothing."""

import os
import shutil
from pathlib import Path

import pytest

from megdet.engine.run_dir import check_run_dir, folder_problem
from tests.conftest import instant_overrides, megdet, one_line_error, run_files


@pytest.mark.slow
def test_a_failed_overwrite_or_resume_leaves_the_previous_run_as_it_was(cli, tiny_shapes, tmp_path):
    run = tmp_path / "run"
    train = ["train", "--config", "instant_test", "--out", run, *instant_overrides(tiny_shapes)]
    done = cli(*train, "train.max_iter=2")
    assert done.returncode == 0, done.stderr[-2000:]
    before = run_files(run)
    assert {p.name for p in before} >= {"config.yaml", "plan.json", "metrics.jsonl", "last.pt"}

    # --overwrite used to remove the old run before the new one found its data missing.
    missing = cli(*train, "--overwrite", f"data.train.json={tmp_path}/none.json")
    one_line_error(missing, "none.json not found; pass data.train.json=FILE")
    assert run_files(run) == before

    # A --resume that finds no readable checkpoint used to rewrite config.yaml and plan.json.
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    before = run_files(run)
    resumed = cli(*train, "train.max_iter=4", "--resume")
    one_line_error(resumed, "no readable checkpoint to resume from")
    assert run_files(run) == before


def test_out_that_is_a_file_or_under_one_is_a_one_line_error(cli, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for out, says in ((a_file, "is a file"), (a_file / "run", f"is under the file {a_file}")):
        proc = cli("train", "--config", "instant_test", "--out", out)
        one_line_error(proc, f"--out {out}: {says}; choose a folder")
        proc = cli("eval", "--config", "instant_test", "--weights", a_file, "--out", out)
        one_line_error(proc, f"--out {out}: {says}; choose a folder")
    assert a_file.read_text() == "mine"


def test_a_folder_that_cannot_be_written_is_named_before_anything_starts(cli, tmp_path):
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
    one_line_error(cli("train", "--config", "instant_test", "--out", out), "cannot write in")


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
    one_line_error(proc, "cannot read image (UnidentifiedImageError")
    assert check_run_dir(run, overwrite=False, resume=False) is None
