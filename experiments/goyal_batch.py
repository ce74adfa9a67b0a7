"""Goyal et al. at small scale (issue 16), Figure 1: top-1 error against the batch size, from
64 to 2,048, each at the linear scaling rule's lr with a gradual warmup over 2 epochs (none at
the base batch), the same 10 epochs. Goyal (ResNet-50, ImageNet, 90 epochs): 23.48-23.74 from 256 to
8k, 24.79 at 16k.

    python experiments/goyal_batch.py [--rows b64,b2048] [--seeds 0]

Row ``b1024-40ep`` trains batch 1,024 for 40 epochs (lr x0.1 at 20, 32): as many steps as
batch 256 makes in 10.

Otherwise ``goyal_lr.py``'s setting.
"""

from __future__ import annotations

from goyal_lr import BASE
from study import CLASSIFICATION, Row, main

WARMUP = ["solver.warmup=linear", "solver.warmup_epochs=2"]
ROWS = [Row(f"b{BASE}", [f"train.batch_size={BASE}"])] + [
    Row(f"b{b}", [f"train.batch_size={b}", *WARMUP]) for b in (128, 256, 512, 1024, 2048)
]
# Does the large batch catch up given the steps? Batch 1,024 for 4x the epochs (400 steps, as
# batch 256 makes in 10), the lr steps at the same fractions of the run.
ROWS.append(
    Row("b1024-40ep", ["train.batch_size=1024", *WARMUP, "train.epochs=40", "solver.steps=[20,32]"])
)

if __name__ == "__main__":
    main(
        "goyal_batch",
        __doc__,
        "Goyal et al. Figure 1 at small scale: top-1 error vs batch size (issue 16)",
        "classify_demo: CIFAR ResNet-20, 2 gloo processes, BN over 32 images, 10 classes of 32 "
        "px textured shapes (10,000 training, 2,000 val images), 10 epochs (lr x0.1 at 5, 8), "
        "lr 0.1 per 128 images (linear scaling), gradual warmup over 2 epochs from the base "
        "rate (0.1 at 128) above batch 64.",
        ROWS,
        report=True,
        setting=CLASSIFICATION,
    )
