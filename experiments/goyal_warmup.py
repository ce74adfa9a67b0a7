"""Goyal et al. at small scale (issue 16), warmup at a large batch: batch 1,024 at the linear
scaling rule's lr (16x the base batch's), with no warmup, a constant warmup (the base rate for
2 epochs, then the full rate) and a gradual one (linear from the base rate over 2 epochs).
Goyal, 8k: no warmup 24.84, constant 25.88, gradual 23.74 top-1 error (256: 23.60).

    python experiments/goyal_warmup.py [--rows none,constant,gradual] [--seeds 0,1]

Otherwise ``goyal_lr.py``'s setting.
"""

from __future__ import annotations

from goyal_lr import BASE_LR, LARGE, K
from study import CLASSIFICATION, Row, main

LR = [f"train.batch_size={LARGE}", f"solver.base_lr={BASE_LR * K:g}", f"solver.base_batch={LARGE}"]
START = f"solver.warmup_factor={1 / K:g}"  # from the base batch's rate
ROWS = [
    Row("none", [*LR, "solver.warmup=none"]),
    Row("constant", [*LR, "solver.warmup=constant", "solver.warmup_epochs=2", START]),
    Row("gradual", [*LR, "solver.warmup=linear", "solver.warmup_epochs=2", START]),
]

if __name__ == "__main__":
    main(
        "goyal_warmup",
        __doc__,
        "Goyal et al. at small scale: no, constant and gradual warmup at batch 1,024 (issue 16)",
        "classify_demo: CIFAR ResNet-20, 2 gloo processes, BN over 32 images, 10 classes of 32 "
        "px textured shapes (10,000 training, 2,000 val images), 10 epochs (lr x0.1 at 5, 8); "
        f"batch {LARGE} at lr {BASE_LR * K:g} ({K}x the base batch's {BASE_LR:g}); warmup over "
        "2 epochs from the base rate.",
        ROWS,
        report=True,
        setting=CLASSIFICATION,
    )
