"""`megdet report` from hand-written run folders: the numbers in Table 1 and the plots."""

import json
import math

import pytest
from PIL import Image

from megdet.errors import MegdetError
from megdet.report import (
    noise_scale_series,
    per_epoch,
    ratio_spread,
    read_run,
    sampling_ratios,
    table1,
    write_report,
)


def _fake_run(path, global_batch, iters_per_epoch=4, epochs=3, pos=2.0, agvm=False):
    """Logged every iteration; positives per image grow by one each epoch, negatives stay 8."""
    path.mkdir()
    (path / "plan.json").write_text(json.dumps({"global_batch": global_batch}))
    lines = []
    for it in range(1, epochs * iters_per_epoch + 1):
        epoch = it / iters_per_epoch
        e = -(-it // iters_per_epoch)  # the epoch this iteration belongs to, 1-based
        lines.append(json.dumps({
            "iter": it, "epoch": epoch, "lr": 0.01 * it, "loss": 2.0 / it,
            "rpn_pos": pos + e - 1, "rpn_neg": 8.0, "roi_pos": pos + e - 1, "roi_neg": 8.0,
            "gns": 100.0 + it,
            **({"lr_factor_backbone": 1.0, "lr_factor_rpn": 1 - 0.01 * it} if agvm else {}),
        }))  # fmt: skip
        if it % iters_per_epoch == 0:
            lines.append(json.dumps({"iter": it, "epoch": epoch, "eval": {"mmAP": 0.1 * e}}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_per_epoch_means_and_ratios(tmp_path):
    run = read_run(_fake_run(tmp_path / "a", 16))
    assert run.global_batch == 16 and len(run.train) == 12 and len(run.evals) == 3
    assert per_epoch(run.train, "rpn_pos") == {1: 2.0, 2: 3.0, 3: 4.0}
    assert sampling_ratios(run.train)["roi"] == {1: 0.25, 2: 0.375, 3: 0.5}


def test_table1_rows_per_run_and_sampler(tmp_path):
    runs = [read_run(_fake_run(tmp_path / "b16", 16)), read_run(_fake_run(tmp_path / "b64", 64))]
    table = table1(runs, epochs=[1, 3])
    rows = [line for line in table.splitlines() if line.startswith("| b")]
    assert len(rows) == 4  # 2 runs x (rpn, roi)
    # epoch 1: 2 positives and 8 negatives per image -> 0.25; per batch of 64: 128 and 512
    assert (
        "| b64 (batch 64) | 64 | rpn | 0.250 ± 0.000 (128, 512) | 0.500 ± 0.000 (256, 512) |"
        in rows
    )


def test_ratio_spread_is_the_standard_deviation_over_an_epochs_batches():
    records = [
        {"epoch": 0.5, "roi_pos": 1.0, "roi_neg": 4.0},
        {"epoch": 1.0, "roi_pos": 3.0, "roi_neg": 4.0},
        {"epoch": 2.0, "roi_pos": 1.0, "roi_neg": 4.0},  # one batch: no spread
    ]
    assert ratio_spread(records, "roi") == {1: pytest.approx(0.5**0.5 * 0.5)}


def test_table1_takes_each_runs_own_first_middle_and_last_epoch(tmp_path):
    """A run that stopped at epoch 2 beside one of 5 epochs: each gets its own epochs, not
    the union's (which left the short run with dashes)."""
    runs = [read_run(_fake_run(tmp_path / "short", 16, epochs=2)),
            read_run(_fake_run(tmp_path / "long", 64, epochs=5))]  # fmt: skip
    rows = [line for line in table1(runs).splitlines() if line.startswith("| ")][1:]
    assert "| first epoch: pos/neg (pos, neg per batch) | middle" in table1(runs)
    short, long = rows[1], rows[3]
    assert "epoch 1: 0.250 ± 0.000 (32, 128) | epoch 2: 0.375 ± 0.000 (48, 128) | - |" in short
    assert "epoch 1: 0.250 ± 0.000 (128, 512) | epoch 3: 0.500 ± 0.000 (256, 512) | epoch 5" in long


def test_write_report_makes_readable_pngs_and_the_table(tmp_path):
    runs = [_fake_run(tmp_path / "b16", 16), _fake_run(tmp_path / "b64", 64, pos=3.0)]
    assert len(write_report(runs, tmp_path / "by_epoch", x="epoch")) == 5
    written = write_report(runs, tmp_path / "out")
    assert {p.name for p in written} == {
        "loss_lr.png", "mmap_per_epoch.png", "pos_neg_ratio.png", "noise_scale.png", "table1.md"
    }  # fmt: skip
    for path in written:
        if path.suffix == ".png":
            with Image.open(path) as image:
                assert image.width > 400 and image.height > 300
    assert not list((tmp_path / "out").glob("*.tmp*"))
    # AGVM's multipliers, where a run logged them
    runs.append(_fake_run(tmp_path / "b64-agvm", 64, agvm=True))
    written = write_report(runs, tmp_path / "agvm")
    assert "module_lr.png" in {p.name for p in written} and len(written) == 6


def test_a_truncated_last_line_is_skipped_but_corruption_is_an_error(tmp_path):
    run = _fake_run(tmp_path / "r", 16)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"iter": 13, "epo')
    assert len(read_run(run).train) == 12
    metrics.write_text('{"iter": 1, "epo\n' + metrics.read_text())
    with pytest.raises(MegdetError, match="metrics.jsonl:1: not a JSON line"):
        read_run(run)
    with pytest.raises(MegdetError, match="not found; pass a folder written by `megdet train`"):
        read_run(tmp_path / "nothing")


def test_what_was_not_measured_is_said_not_drawn(tmp_path, caplog):
    """One process logs no noise scale: no placeholder plot, a line instead. A run of one
    logged epoch fills Table 1's first column, not three identical ones."""
    run = _fake_run(tmp_path / "one", 16, iters_per_epoch=1, epochs=1)
    metrics = run / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "gns"}) + "\n"
                               for r in lines))  # fmt: skip
    with caplog.at_level("INFO", logger="megdet.report"):
        written = write_report([run], tmp_path / "out")
    assert "noise_scale.png" not in {p.name for p in written}
    assert "noise_scale.png: not drawn, no run logged a gradient noise scale" in caplog.text
    rows = [line for line in table1([read_run(run)]).splitlines() if line.startswith("| one")]
    assert all(line.endswith(" | - | - |") and "epoch 1: " in line for line in rows)


def test_the_noise_scale_line_breaks_where_it_was_not_measured(tmp_path):
    """An estimate <= 0 (noise only) is a gap in the line, not a segment joining its
    neighbours: NaN in the plotted series, the other points as logged."""
    run_dir = _fake_run(tmp_path / "gappy", 16)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:  # as the trainer logs it: grad_sq <= 0 and no gns
        if "gns" in record:
            record["grad_sq"] = 1.0
        if record.get("iter") in (5, 6) and "gns" in record:
            record["grad_sq"] = -0.2
            del record["gns"]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    xs, ys = noise_scale_series(read_run(run_dir), "iteration")
    assert xs == list(range(1, 13))
    assert [math.isnan(y) for y in ys] == [it in (5, 6) for it in xs]
    assert [y for y in ys if not math.isnan(y)] == [100.0 + it for it in xs if it not in (5, 6)]
    written = write_report([run_dir], tmp_path / "report")
    assert tmp_path / "report" / "noise_scale.png" in written
