"""Past batch 256 with per-module learning rates (issue 15): batch 512, plain SGD against AGVM
(``solver.module_lr=agvm``), both with Table 3's recipe (CGBN, 3 epochs of warmup, gradient
norm clipped at 1) and the same 7 epochs.

    python experiments/agvm.py [--rows b512-sgd,b512-agvm] [--seeds 0,1]

AGVM's own setting (every 10 iterations, EMA 0.97) is made for COCO runs of 3,700 iterations
at batch 512; here batch 512 makes 16 iterations an epoch, 110 in all, 63 after the warmup.
So it measures at every iteration with an EMA of 0.9: the multipliers settle within about the
same share of the run (a tenth) as the paper's do. Runs go to ``experiments/runs/agvm/``; the
table to ``experiments/results/agvm.md``; ``megdet report`` of the runs (mmAP per epoch of
all four on one plot, the lr multipliers) to ``experiments/results/agvm/``.
"""

from __future__ import annotations

from study import Row, main
from table3_cgbn import RECIPE

BATCH = ["train.batch_size=512", *RECIPE]
AGVM = ["solver.module_lr=agvm", "solver.agvm.interval=1", "solver.agvm.momentum=0.9"]
ROWS = [Row("b512-sgd", BATCH), Row("b512-agvm", [*BATCH, *AGVM])]

if __name__ == "__main__":
    main(
        "agvm",
        __doc__,
        "Batch 512: plain SGD vs AGVM's per-module learning rates (issue 15)",
        "Demo detector (`--config default`), 2 gloo processes (AGVM's halves: one each), CGBN "
        "over both, 8,000 shapes images at 64 px (val: 500), 7 epochs (lr x0.1 at epoch 6), "
        "lr 0.04 per 16 images (1.28 at 512), 3 epochs of warmup, gradient norm clipped at 1; "
        "AGVM from the end of the warmup, measured every iteration, EMA 0.9. mmAP per epoch: "
        "`agvm/mmap_per_epoch.png`; the multipliers: `agvm/module_lr.png`.",
        ROWS,
        report=True,
    )
