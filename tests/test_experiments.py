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
    assert "| tiny | 8 |" in text and "seed 0: iteration" in text and "Command:" in text


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
