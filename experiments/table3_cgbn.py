"""MegDet Table 3 at small scale: CGBN + warmup at global batch 16 to 256, the same recipe
and the same 7 epochs; only ``train.batch_size`` changes between rows.

    python experiments/table3_cgbn.py [--rows b16,b256] [--seeds 0,1]

The recipe is the demo preset's with the two changes the recipe search found necessary for
batch 128 (``experiments/results/recipe_search.md``): 3 epochs of warmup and the gradient norm
clipped at 1. Runs go to ``experiments/runs/table3_cgbn/``; the table to
``experiments/results/table3_cgbn.md``.
"""

from __future__ import annotations

from study import Row, main

RECIPE = ["solver.warmup_epochs=3", "solver.clip_grad_norm=1"]
ROWS = [Row(f"b{b}", [f"train.batch_size={b}", *RECIPE]) for b in (16, 32, 64, 128, 256)]

if __name__ == "__main__":
    main(
        "table3_cgbn",
        __doc__,
        "MegDet Table 3 at small scale: CGBN + warmup, batch 16 to 256 (issue 13)",
        "Demo detector (`--config default`), 2 gloo processes, CGBN over both (BN size = the "
        "global batch), 8,000 shapes images at 64 px (val: 500), 7 epochs, linearly scaled "
        "lr (0.04 per 16 images), 3 epochs of warmup, gradient norm clipped at 1.",
        ROWS,
    )
