"""The study runner behind experiments/: one tiny row end to end, and a divergence recorded
as a result (its iteration and lr), not as a failure."""

import sys
from pathlib import Path

import pytest

from tests.conftest import instant_overrides

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
