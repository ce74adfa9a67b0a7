"""MegDet Figure 4 and Table 1 at small scale: mmAP per epoch of batch 16 and of the largest
batch on the ``long`` policy (18 epochs, lr x0.1 at 11 and 14, x0.5 at 17), and the sampled
positive/negative ratios of the same runs at their first, middle and last epoch.

    python experiments/figure4.py [--rows b16,b256] [--seeds 0]

Same recipe as ``table3_cgbn.py`` (3 epochs of warmup, gradient norm clipped at 1); only
``train.batch_size`` changes. Runs go to ``experiments/runs/figure4/``; the final-mmAP table to
``experiments/results/figure4.md``; ``megdet report`` of the runs (the mmAP-per-epoch plot, the
loss and ratio plots, ``table1.md``) to ``experiments/results/figure4/``.
"""

from __future__ import annotations

from study import Row, main
from table3_cgbn import RECIPE

LONG = ["solver.policy=long", "train.epochs=null"]
ROWS = [Row(f"b{b}-long", [f"train.batch_size={b}", *LONG, *RECIPE]) for b in (16, 256, 128)]

if __name__ == "__main__":
    main(
        "figure4",
        __doc__,
        "MegDet Figure 4 at small scale: batch 16 and 256 on the long policy (issue 13)",
        "Demo detector (`--config default`), 2 gloo processes, CGBN over both, 8,000 shapes "
        "images at 64 px (val: 500), the `long` policy (18 epochs), linearly scaled lr (0.04 per "
        "16 images), 3 epochs of warmup, gradient norm clipped at 1. mmAP per epoch: "
        "`figure4/mmap_per_epoch.png`; MegDet Table 1 from the same runs: `figure4/table1.md`.",
        ROWS,
        report=True,
    )
