"""MegDet's BN-size study at small scale: a global batch of 128 over 2 processes with CGBN
statistics over groups of 2 to 128 images (``model.bn_size``), everything else fixed.

    python experiments/bn_size.py [--rows bn2,bn128] [--seeds 0]

Same recipe as ``table3_cgbn.py``. Sizes below the 64 images of a process are chunks inside
it; 128 pools both processes. Runs go to ``experiments/runs/bn_size/``; the table to
``experiments/results/bn_size.md``.
"""

from __future__ import annotations

from study import Row, main
from table3_cgbn import RECIPE

ROWS = [
    Row(f"bn{size}", ["train.batch_size=128", f"model.bn_size={size}", *RECIPE])
    for size in (32, 8, 2, 64, 16, 4, 128)  # the paper's best first; 128 = Table 3's b128
]

if __name__ == "__main__":
    main(
        "bn_size",
        __doc__,
        "MegDet's BN size at small scale: batch 128, CGBN over 2 to 128 images (issue 13)",
        "Demo detector (`--config default`), 2 gloo processes x 64 images, 8,000 shapes images "
        "at 64 px (val: 500), 7 epochs, lr 0.32, 3 epochs of warmup, gradient norm clipped "
        "at 1; only `model.bn_size` changes.",
        ROWS,
    )
