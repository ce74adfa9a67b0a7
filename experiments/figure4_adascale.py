"""MegDet Figure 4 under AdaScale (issue 25): mmAP per epoch of progress on the ``long`` policy
(18 epochs, lr x0.1 at 11 and 14, x0.5 at 17), batch 16 and batch 256 with the demo preset and
only the batch changed: no hand-found recipe, the lr following the measured gain and the
policy's epochs counted in progress at batch 16 (``figure4.py`` is the same figure under the
linear rule with Table 3's recipe).

    python experiments/figure4_adascale.py [--rows b16-long,b256-long-adascale] [--seeds 0]

Runs go to ``experiments/runs/figure4_adascale/``; the table to
``experiments/results/figure4_adascale.md``; ``megdet report`` of the runs (mmAP per epoch of
progress, the gain, ``table1.md``) to ``experiments/results/figure4_adascale/``.
"""

from __future__ import annotations

from figure4 import LONG
from study import Row, main

ROWS = [
    Row("b16-long", ["train.batch_size=16", *LONG]),
    Row("b256-long-adascale", ["train.batch_size=256", *LONG, "solver.lr_scaling=adascale"]),
    Row("b128-long-adascale", ["train.batch_size=128", *LONG, "solver.lr_scaling=adascale"]),
]

if __name__ == "__main__":
    main(
        "figure4_adascale",
        __doc__,
        "MegDet Figure 4 under AdaScale: the demo preset on the long policy, only the batch "
        "changed (issue 25)",
        "Demo detector (`--config default`), 2 gloo processes, CGBN over both, 8,000 shapes "
        "images at 64 px (val: 500), the `long` policy (18 epochs of progress at batch 16), the "
        "demo's warmup (0.8 epochs) and no clipping; lr 0.04 (batch 16, where AdaScale is the "
        "linear rule) or 0.04 x the measured gain. mmAP per epoch of progress: "
        "`figure4_adascale/mmap_per_epoch.png`; the linear rule's figure with Table 3's recipe "
        "is `figure4.md`.",
        ROWS,
        report=True,
    )
