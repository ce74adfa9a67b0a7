"""The study runner behind experiments/: one tiny row end to end, and a divergence recorded
as a result (its iteration and lr), not as a failure."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import instant_overrides, start_and_wait_for_iterations

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
    assert "| tiny | 8 |" in text and "seed 0: iteration" in text and "Table written by" in text


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_stopped_at_a_checkpoint_is_resumed_by_the_next_invocation(
    tiny_shapes, tmp_path, monkeypatch
):
    """A study stopped by SIGTERM (a session's end) continues its run from the checkpoint, not
    from iteration 0, and counts both attempts' time; a changed row starts over."""
    row = study.Row("long", ["train.max_iter=30", "log.period=1", "train.eval_period=0"])
    common = [*instant_overrides(tiny_shapes), "model.norm=cgbn"]
    out = tmp_path / "long-s0"

    def stopped_after_five_iterations(command, **kwargs):
        proc = start_and_wait_for_iterations(command, out / "metrics.jsonl", 5)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)

    with monkeypatch.context() as patched:
        patched.setattr(subprocess, "run", stopped_after_five_iterations)
        with pytest.raises(SystemExit, match="long seed 0 stopped at a checkpoint"):
            study.run(row, 0, tmp_path, common, "instant_test")
    stopped = json.loads((out / study.STOPPED_FILE).read_text())
    first_attempt = [
        json.loads(x)["iter"] for x in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert 5 <= first_attempt[-1] < 30 and stopped["wall_s"] > 0

    result = study.run(row, 0, tmp_path, common, "instant_test")
    assert result["resumed"] and result["steps"] == 30 and result["wall_s"] > stopped["wall_s"]
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    iterations = [r["iter"] for r in logged if "eval" not in r]
    assert iterations == list(range(1, 31))  # continued, not begun again
    assert not (out / study.STOPPED_FILE).exists()

    # Another attempt's record that names a different command is not resumed from.
    changed = study.Row("long", ["train.max_iter=3", "log.period=1", "train.eval_period=0"])
    (out / "study_result.json").unlink()
    (out / study.STOPPED_FILE).write_text(json.dumps(stopped))
    again = study.run(changed, 0, tmp_path, common, "instant_test")
    assert "resumed" not in again and again["steps"] == 3


REAL_RUN = subprocess.run


def _trains(command, **kwargs):
    if "megdet" in command:
        raise AssertionError("a run with a record was trained again")
    return REAL_RUN(command, **kwargs)  # git, for the table's commit


def test_a_finished_run_is_recorded_and_another_checkout_continues_from_the_record(
    tmp_path, monkeypatch
):
    """A run's result is copied to its committed record (paths relative to the checkout); on a
    machine without the run's folder the record is the finished run, unless the row changed or
    --fresh; the table is every finished run, whoever ran it."""
    rows = [study.Row("b16", ["train.batch_size=16"]), study.Row("b16-scratch", ["x=1"])]
    runs, records = tmp_path / "runs", tmp_path / "records"
    result = {"row": "b16", "seed": 0, "mmAP": 50.0, "steps": 10,
              "plan": {"global_batch": 16, "lr": 0.04, "warmup_iters": 5, "max_iter": 10},
              "command": f"train data.train.images={study.ROOT}/experiments/data/x"}  # fmt: skip
    (runs / "b16-s0").mkdir(parents=True)
    (runs / "b16-s0" / "study_result.json").write_text(json.dumps(result))
    # The run started from a backbone file: its config.yaml names the file's sha256.
    (runs / "b16-s0" / "config.yaml").write_text("model:\n  backbone_weights_sha256: ab12\n")
    monkeypatch.setattr(study.subprocess, "run", _trains)
    assert study.run(rows[0], 0, runs, [], records=records) == {**result, "backbone_sha256": "ab12"}
    record = json.loads((records / "b16-s0.json").read_text())
    assert record["command"] == "train data.train.images=experiments/data/x"
    assert record["backbone_sha256"] == "ab12"
    assert record["overrides"] == "train.batch_size=16" and record["mmAP"] == 50.0

    # Another machine: no run folders, the records only (and one of a row whose name extends
    # this one's, which is not this row's).
    other = tmp_path / "elsewhere"
    (records / "b16-scratch-s3.json").write_text(
        json.dumps({**record, "row": "b16-scratch", "seed": 3, "overrides": "x=1"})
    )
    (records / "b16-s1.json").write_text(json.dumps({**record, "seed": 1, "mmAP": 52.0}))
    assert study.run(rows[0], 0, other, [], records=records) == record
    done = study.finished(rows, other, records)
    assert [r["seed"] for r in done["b16"]] == [0, 1] and [
        r["seed"] for r in done["b16-scratch"]
    ] == [3]
    table = tmp_path / "table.md"
    study.write_table(table, "Tiny", "Notes.", rows, done)
    assert "| b16 | 16 | 0.04 | 5 | 10 | — | 51.00 ± 1.41 | 50.00 / 52.00 |" in table.read_text()

    # The row defined anew, or --fresh: the record is not the run; it trains (here: raises).
    changed = study.Row("b16", ["train.batch_size=16", "solver.clip_grad_norm=1"])
    assert study.read_record(records / "b16-s0.json", changed) is None
    with pytest.raises(AssertionError, match="trained again"):
        study.run(changed, 0, other, [], records=records)
    with pytest.raises(AssertionError, match="trained again"):
        study.run(rows[0], 0, other, [], records=records, fresh=True)


OLD_TABLE = """# A study

Notes.

Command: `python experiments/s.py --seeds 0,1` at commit abc1234 on AMD EPYC, 2 CPUs (3.11.7).

| row | batch | lr | warmup it | iterations | mean gain | final mmAP (mean ± sd) | per seed | diverged | noise scale per epoch | overrides |
|---|---|---|---|---|---|---|---|---|---|---|
| b16 | 16 | 0.04 | 500 | 3500 | — | 44.91 ± 1.98 | 43.51 / 46.31 | none | 10 20 — / 11 21 30 | train.batch_size=16 |
| b256-a | 256 | 0.04 | 0 | 229 / 240 | 3.86 / 3.70 | 10.52 | 10.52 | seed 0: iteration 11, lr 0.246 | 12 — / 13 | train.batch_size=256 model.backbone_weights=/work/main/experiments/data/b.pt (data: study2k) |
"""  # noqa: E501


def test_records_read_back_from_a_table_write_the_same_table(tmp_path, monkeypatch):
    """The records of runs that finished before records existed, read from their committed
    table (seeds, divergences, per-run cells), give that table back."""
    import records_from_table

    monkeypatch.setattr(records_from_table, "ROOT", tmp_path)
    table = tmp_path / "s.md"
    table.write_text(OLD_TABLE)
    found = records_from_table.records(table)
    assert sorted(found) == ["b16-s0", "b16-s1", "b256-a-s0", "b256-a-s1"]
    assert found["b256-a-s0"]["diverged"] == {"iteration": 11, "lr": 0.246}
    assert "mmAP" not in found["b256-a-s0"] and found["b256-a-s1"]["mmAP"] == 10.52
    assert found["b256-a-s1"]["steps"] == 240 and found["b16-s0"]["gns_per_epoch"] == [10, 20, None]
    rows = [study.Row("b16", ["train.batch_size=16"]),
            study.Row("b256-a", ["train.batch_size=256", f"model.backbone_weights={study.ROOT}/"
                                 "experiments/data/b.pt"], data="study2k")]  # fmt: skip
    results = {row.name: [found[f"{row.name}-s{seed}"] for seed in (0, 1)] for row in rows}
    written = tmp_path / "new.md"
    study.write_table(written, "A study", "Notes.", rows, results)
    old = [line for line in OLD_TABLE.splitlines() if line.startswith("| ")]
    new = [line for line in written.read_text().splitlines() if line.startswith("| ")]
    assert new == [line.replace("/work/main/", "") for line in old]


def test_a_command_from_another_checkout_of_the_study_is_the_same_run(monkeypatch, tmp_path):
    """A study continued from a git worktree resumes the runs its main checkout stopped: the
    checkout's own path is not part of a run's identity, nor of a committed record."""
    seen = []
    for root in ("/work/main", "/tmp/wt1"):
        monkeypatch.setattr(study, "ROOT", Path(root))
        command = ["/usr/bin/python3", "-m", "megdet", f"data.train.images={root}/experiments/x"]
        seen.append((study._portable(command), study._relative(" ".join(command[1:]))))
    assert (
        seen[0]
        == seen[1]
        == (
            ["-m", "megdet", "data.train.images=<repo>/experiments/x"],
            "-m megdet data.train.images=experiments/x",
        )
    )
    # A run finished in the worktree, its record kept from the main checkout: relative too.
    monkeypatch.setattr(study, "ROOT", Path("/work/main"))
    record = tmp_path / "b16-s0.json"
    ran = "-m megdet train x=/tmp/wt1/experiments/data/y --out /tmp/wt1/experiments/runs/s/b16-s0"
    study._keep_record(record, study.Row("b16", []), {"row": "b16", "command": ran})
    assert json.loads(record.read_text())["command"] == (
        "-m megdet train x=experiments/data/y --out experiments/runs/s/b16-s0"
    )
