"""The demo preset at any batch (issue 25, part 2): ``megdet train --config default --nproc 2
train.batch_size=B`` on ``make demo``'s own data (2,000 shapes images at 128 px), nothing else
changed, batch 16 to 1,024.

    python experiments/demo_preset.py [--rows b16,b256] [--seeds 0,1]

Rows ``bN``: the preset as it is (its ``solver.lr_scaling`` decides). Rows ``bN-linear``: the
linear rule forced, the divergence the preset must avoid. Rows ``bN-global``: AdaScale with one
gain for the whole model, as the paper states it, instead of one per module group. Rows
``bN-model``: the progress advanced by the whole model's gain instead of the smallest module
gain's. Row
``b1024-100``: batch 1,024's first hundred steps (a whole run there is ~10x batch 16's images:
the point is whether it diverges). Runs go to ``experiments/runs/demo_preset/``; the table to
``experiments/results/demo_preset.md``.
"""

from __future__ import annotations

from study import DEMO, Row, main

ROWS = [Row(f"b{b}", [f"train.batch_size={b}"]) for b in (16, 32, 64, 128, 256)]
ROWS += [Row("b1024-100", ["train.batch_size=1024", "train.max_iter=100"])]
ROWS += [
    Row(f"b{b}-linear", [f"train.batch_size={b}", "solver.lr_scaling=linear"]) for b in (128, 256)
]
# Progress by the whole model's gain (fairscale's) instead of the smallest module gain.
ROWS += [
    Row(f"b{b}-model", [f"train.batch_size={b}", "solver.adascale.pace=model"])
    for b in (32, 64, 128, 256)
]
# One gain for the whole model (AdaScale as the paper states it) instead of one per module.
ROWS += [
    Row(
        f"b{b}-global",
        [f"train.batch_size={b}", "solver.adascale.per_module=false", "solver.adascale.pace=model"],
    )  # fmt: skip
    for b in (64, 256)
]

if __name__ == "__main__":
    main(
        "demo_preset",
        __doc__,
        "The demo preset with only the batch changed, on the demo's own data (issue 25)",
        "`megdet train --config default --nproc 2 train.batch_size=B`: the demo detector, 2 gloo "
        "processes, CGBN over both, `make demo`'s 2,000 shapes images at 128 px (val: 200), 7 "
        "epochs (of progress at batch 16 under AdaScale).",
        ROWS,
        report=True,
        setting=DEMO,
    )
