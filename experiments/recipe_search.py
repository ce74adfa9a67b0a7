"""Issue 13, part 1: what makes a global batch of 128 train as batch 16 does, on a shapes set
large enough for it (8,000 images at 64 px: 62 iterations an epoch at batch 128), in the
demo's 7 epochs, with only ``train.batch_size`` and one candidate change per row.

    python experiments/recipe_search.py [--rows b16,b128] [--seeds 0]

Runs go to ``experiments/runs/recipe_search/`` (not committed); the table to
``experiments/results/recipe_search.md``.
"""

from __future__ import annotations

from study import Row, main

B128 = ["train.batch_size=128"]
ROWS = [
    Row("b16", ["train.batch_size=16"]),
    Row("b128", ["train.batch_size=128"]),
    Row("b128-warmup3", ["train.batch_size=128", "solver.warmup_epochs=3"]),
    Row("b128-clip10", ["train.batch_size=128", "solver.clip_grad_norm=10"]),
    Row("b128-lr0.02", ["train.batch_size=128", "solver.base_lr=0.02"]),
    Row("b128-lr0.02-warmup3", [*B128, "solver.base_lr=0.02", "solver.warmup_epochs=3"]),
    # Second round, after the first: warmup 3 epochs converged, clipping at 10 (b16's gradient
    # norm is ~1) let the loss explode to 2782 and the network die (gradient norm 0.01).
    Row("b128-warmup5", [*B128, "solver.warmup_epochs=5"]),
    Row("b128-clip1", [*B128, "solver.clip_grad_norm=1"]),
    Row("b128-warmup3-clip1", [*B128, "solver.warmup_epochs=3", "solver.clip_grad_norm=1"]),
    Row(
        "b128-warmup3-epochs14",
        [*B128, "solver.warmup_epochs=3", "train.epochs=14", "solver.steps=[12]"],
    ),
    # Third round: clipping at 1 held batch 128 at lr 0.32 after 0.8 epochs of warmup (39.0,
    # the best batch-128 row). Does one recipe hold every batch, batch 16 included?
    Row("b16-clip1", ["train.batch_size=16", "solver.clip_grad_norm=1"]),
    Row("b32-clip1", ["train.batch_size=32", "solver.clip_grad_norm=1"]),
    Row("b64-clip1", ["train.batch_size=64", "solver.clip_grad_norm=1"]),
    Row("b256-clip1", ["train.batch_size=256", "solver.clip_grad_norm=1"]),
]


if __name__ == "__main__":
    main(
        "recipe_search",
        __doc__,
        "Recipe search: batch 128 vs batch 16 (issue 13, part 1)",
        "Demo detector (`--config default`), 2 gloo processes, CGBN over both, 8,000 shapes "
        "images at 64 px (val: 500), 7 epochs, mmAP on val after every epoch. One candidate "
        "change per row.",
        ROWS,
    )
