"""AdaScale on Goyal et al.'s small-scale setting (issue 25): does following the measured noise
move the batch at which classification breaks? ``classify_demo`` with only the batch and
``solver.lr_scaling: adascale`` changed (10 epochs of progress at its base batch 128, its
decays at 5 and 8, no warmup: the base batch has none), batch 128 to 2,048.

    python experiments/goyal_adascale.py [--rows b128,b512-adascale] [--seeds 0,1]

The linear rule's rows at the same batches (with Goyal's 2-epoch warmup) are
``goyal_batch.py``'s; row ``b256-linear`` here is its b256, rerun on this study's machine.
"""

from __future__ import annotations

from study import CLASSIFICATION, Row, main

ROWS = [
    Row("b128", ["train.batch_size=128"]),
    Row("b256-linear", ["train.batch_size=256", "solver.warmup=linear", "solver.warmup_epochs=2"]),
] + [
    Row(f"b{b}-adascale", [f"train.batch_size={b}", "solver.lr_scaling=adascale"])
    for b in (256, 512, 1024, 2048)
]

if __name__ == "__main__":
    main(
        "goyal_adascale",
        __doc__,
        "AdaScale on Goyal et al.'s setting: top-1 error vs batch size (issue 25)",
        "classify_demo: CIFAR ResNet-20, 2 gloo processes, BN over 32 images, 10 classes of 32 "
        "px textured shapes (10,000 training, 2,000 val images), 10 epochs (of progress at "
        "batch 128 under AdaScale; lr x0.1 at 5, 8), lr 0.1 at batch 128: x batch / 128 "
        "(linear, with a 2-epoch warmup) or x the measured gain (AdaScale). Rows b128 to "
        "b1024-adascale ran by 59137cc (records read back from this table), b2048-adascale at "
        "650323a (43 min, stopped once and resumed).",
        ROWS,
        report=True,
        setting=CLASSIFICATION,
    )
