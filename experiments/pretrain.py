"""megdet pretrains the detector's backbone (issue 26), and Goyal et al.'s pre-training table
at small scale: ``pretrain_tiny`` (the demo's tiny ResNet classifying 36 textured shapes at 64
px, 18,000 images, 10 epochs, lr 0.1 per 128 images) at batch 128 (the backbone the
MegDet-regime studies start from, ``b128``) and at larger batches under the linear rule with
a 2-epoch gradual warmup, each of which ``megdet_regime.py``'s ``b16-from-bB`` rows fine-tune.
Row ``b128-plain``: the same at batch 128 on the plain style (``data patterns --style plain``:
the detector's own domain, 6 classes), the textured backbone having transferred negatively.

    python experiments/pretrain.py [--rows b128,b1024-linear] [--seeds 0,1]
"""

from __future__ import annotations

from study import PRETRAIN, Row, main

BACKBONE_ROW = "b128"  # the studies' pretrained backbone
PLAIN_ROW = "b128-plain"
GOYAL_BATCHES = (256, 512, 1024, 2048)
ROWS = [Row(BACKBONE_ROW, ["train.batch_size=128"])] + [
    Row(f"b{b}-linear", [f"train.batch_size={b}", "solver.warmup=linear",
                         "solver.warmup_epochs=2"])
    for b in GOYAL_BATCHES
]  # fmt: skip
ROWS += [Row(PLAIN_ROW, ["train.batch_size=128"], data="plain64")]

if __name__ == "__main__":
    main(
        "pretrain",
        __doc__,
        "megdet pretrains the detector's backbone: top-1 error vs pre-training batch (issue 26)",
        "pretrain_tiny: the demo detector's tiny ResNet with a pooled linear classifier, 2 "
        "gloo processes, CGBN over 32 images, 36 classes of 64 px textured shapes (18,000 "
        "training, 1,800 val images), 10 epochs (lr x0.1 at 5, 8), lr 0.1 x batch / 128 (the "
        "linear rule), with a 2-epoch linear warmup above batch 128. Row b128-plain: the same "
        "at batch 128 on the plain style (6 classes of plain shapes, 1-3 an image, on the "
        "detection set's backgrounds: `data patterns --style plain`), 18,000 / 1,800 images. "
        "Every run here ran again at 4b502c5 on AMD EPYC, where the first runs' folders were "
        "gone (their records are in git history: at 53477dc on Intel Xeon, 6.67, 10.22, "
        "24.83, 59.61, 73.33 and 33.56% in this table's order); the detection runs from "
        "these backbones name them by sha256 in their records.",
        ROWS,
        report=True,
        setting=PRETRAIN,
    )
