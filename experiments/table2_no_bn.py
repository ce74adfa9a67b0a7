"""MegDet Table 2 at small scale: no BatchNorm (frozen, i.e. no normalization in a network
trained from scratch), batch 16 to 128 at the linearly scaled lr, 64 and 128 also at half.

    python experiments/table2_no_bn.py [--rows b16,b128-half-lr] [--seeds 0]

Same recipe as ``table3_cgbn.py`` (3 epochs of warmup, gradient norm clipped at 1) so that the
normalization is the only difference between the two tables. Runs go to
``experiments/runs/table2_no_bn/``; the table to ``experiments/results/table2_no_bn.md``.
"""

from __future__ import annotations

from study import Row, main
from table3_cgbn import RECIPE

NO_BN = ["model.norm=frozen", "model.backbone_weights=none", *RECIPE]
ROWS = [Row(f"b{b}", [f"train.batch_size={b}", *NO_BN]) for b in (16, 32, 64, 128)]
ROWS += [Row(f"b{b}-half-lr", [f"train.batch_size={b}", "solver.base_lr=0.02", *NO_BN])
         for b in (64, 128)]  # fmt: skip

if __name__ == "__main__":
    main(
        "table2_no_bn",
        __doc__,
        "MegDet Table 2 at small scale: no BatchNorm, batch 16 to 128 (issue 13)",
        "Demo detector (`--config default`) with `model.norm=frozen` from scratch (no "
        "normalization), 2 gloo processes, 8,000 shapes images at 64 px (val: 500), 7 epochs, "
        "linearly scaled lr (0.04 per 16 images; 'half-lr': 0.02), 3 epochs of warmup, "
        "gradient norm clipped at 1.",
        ROWS,
    )
