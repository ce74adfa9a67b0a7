"""MegDet's own regime at small scale (issue 26): the detector's backbone pretrained by megdet
(``pretrain.py``'s ``b128``, trained first if it is not there), then Table 3's recipe
(``table3_cgbn.py``: 3 epochs of warmup, gradient norm clipped at 1, linear rule) at batch 16
to 256, only ``train.batch_size`` changing; the from-scratch column is ``table3_cgbn.md``.
Rows ``bnN``: MegDet's BN size at batch 128; ``b256-agvm``, ``b512``, ``b512-agvm``: AGVM in
this regime; ``frozen-bB``: Goyal et al.'s detection table (batch 2 ... 16, BN frozen;
``-noclip``: without clipping). Rows ``b16-from-bB``: Goyal et al.'s pre-training table, batch
16 from the backbone ``pretrain.py`` trained at batch B (run ``pretrain.py --rows bB-linear``
first, with ``--fresh`` where only its record is here). Rows ``bB-rescaled``: the backbone with
its weights scaled back to a fresh initialization's size (why it transferred negatively);
rows ``*-plain``: ``pretrain.py``'s ``b128-plain`` backbone (``-rescaled``: rows
``b16-from-bB`` and ``*-plain`` with the weights' size taken out as megdet loads them); rows
``b16-preset-rescaled`` and ``bB-adascale-rescaled``: issue 25's AdaScale in this regime (the
demo preset, no recipe).

    python experiments/megdet_regime.py [--rows b16,b256] [--seeds 0,1]

Runs go to ``experiments/runs/megdet_regime/`` (their records to
``experiments/results/megdet_regime/runs/``); the table to ``experiments/results/megdet_regime.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys

from agvm import AGVM, B256, BATCH
from pretrain import BACKBONE_ROW, GOYAL_BATCHES, PLAIN_ROW
from rescaled_backbone import write_rescaled
from study import ROOT, Row, main
from table3_cgbn import RECIPE


def pretrained_backbone(quick: bool) -> list[str]:
    """The pretrain study's backbone run (trained once, then reused): the override that starts
    every detector from it. Its weights are needed, not its record: on a machine without its
    run folder it is trained again (``--fresh``), and its record then describes this run."""
    runs = ROOT / "experiments" / "runs" / ("quick/pretrain" if quick else "pretrain")
    folder = runs / f"{BACKBONE_ROW}-s0"
    if not (folder / "study_result.json").is_file():
        subprocess.run(
            [sys.executable, str(ROOT / "experiments" / "pretrain.py"), "--rows", BACKBONE_ROW,
             "--seeds", "0", "--fresh", *(["--quick"] if quick else [])],
            check=True,
        )  # fmt: skip
    error = json.loads((folder / "study_result.json").read_text())["top1_err"]
    print(f"backbone: {folder} (top-1 error {error:.2f}%)", flush=True)
    if not quick:  # the rows below name the full study's file; --quick has no such rows' data
        write_rescaled(folder, RESCALED)
    return [f"model.backbone_weights={folder}"]


# The pretrained backbone with its weights at a fresh initialization's size
# (``rescaled_backbone.py``), for rows ``bB-rescaled``: written from the full study's backbone
# only, so those rows do not run with --quick (model.backbone_weights_rescale=true does the
# same from any backbone).
RESCALED = ROOT / "experiments" / "data" / "backbones" / "b128-s0-rescaled.pt"


ROWS = [Row(f"b{b}", [f"train.batch_size={b}", *RECIPE]) for b in (16, 32, 64, 128, 256)]
# Controls for batch 16, on the same machine and seed: from random weights (table3_cgbn.md's
# b16, rerun here), and from a detector's backbone trained elsewhere (the demo-preset study's
# batch-16 run: `make demo`'s 2,000 images at 128 px), the issue's own probe.
DEMO_DETECTOR = ROOT / "experiments" / "runs" / "demo_preset" / "b16-s0"
ROWS += [
    Row("b16-scratch", ["train.batch_size=16", *RECIPE, "model.backbone_weights=none"]),
    Row("b16-from-detector", ["train.batch_size=16", *RECIPE,
                              f"model.backbone_weights={DEMO_DETECTOR}"]),
    # The pretrained body frozen whole (stem and res2-res5): how far its features carry the
    # detector as they are, against what fine-tuning them makes of them.
    Row("b16-frozen-body", ["train.batch_size=16", *RECIPE, "model.frozen_stages=5"]),
]  # fmt: skip
# MegDet's BN-size row (bn_size.py's, batch 128) and AGVM at 256 and 512 (agvm.py's rows):
# AGVM assumes a backbone whose half-batch gradients agree, which a pretrained one may give.
ROWS += [
    Row(f"bn{size}", ["train.batch_size=128", f"model.bn_size={size}", *RECIPE])
    for size in (2, 8, 32)  # 128: row b128
]
ROWS += [Row("b256-agvm", [*B256, *AGVM]), Row("b512", BATCH), Row("b512-agvm", [*BATCH, *AGVM])]
# Goyal et al.'s detection table (their Mask R-CNN, kn = 2 ... 16, the linear rule, the
# iterations scaled inversely): batch 2, 4, 8, 16 on 2 processes from the rescaled backbone, BN
# frozen at its pretrained statistics (1 image a process at batch 2: batch statistics would be
# of one image, and CGBN's of 2 would change with the batch, the one thing the table varies).
# On the study set's quarter (2,000 images, the same recipe): batch 2 makes 7,000 steps, where
# the whole set's 28,000 would take about 1.5 hours here. frozen-b16-cgbn: what freezing costs.
GOYAL_DETECTION = ["model.norm=frozen", *RECIPE, f"model.backbone_weights={RESCALED}"]
ROWS += [
    Row(f"frozen-b{b}", [f"train.batch_size={b}", *GOYAL_DETECTION], data="study2k")
    for b in (2, 4, 8, 16)
]
# The same table without clipping: at clip 1 the small batches' noisier gradients were clipped on
# most steps (batch 2: median norm 2.9, 99% of steps), which cuts their lr below the linear
# rule's; without it each batch takes the rule's own step.
ROWS += [
    Row(f"frozen-b{b}-noclip", [f"train.batch_size={b}", "model.norm=frozen",
                                "solver.warmup_epochs=3", f"model.backbone_weights={RESCALED}"],
        data="study2k")
    for b in (2, 4, 8, 16)
]  # fmt: skip
ROWS += [
    Row("frozen-b16-cgbn", ["train.batch_size=16", *RECIPE, f"model.backbone_weights={RESCALED}"],
        data="study2k")
]  # fmt: skip
# Goyal et al.'s pre-training table: batch 16 (row b16's run) from each backbone pretrain.py
# trained at a larger batch under the linear rule; its runs must be here (`pretrain.py --fresh`).
PRETRAIN_RUNS = ROOT / "experiments" / "runs" / "pretrain"
ROWS += [
    Row(f"b16-from-b{b}", ["train.batch_size=16", *RECIPE,
                           f"model.backbone_weights={PRETRAIN_RUNS}/b{b}-linear-s0"])
    for b in GOYAL_BATCHES
]  # fmt: skip

# Why the pretrained backbone transfers negatively: its weights grew (stem 5x a fresh
# initialization's RMS), which behind BN slows their learning as 1/|w|^2. The same backbone with
# every weight scaled back, the network computing what it did (rescaled_backbone.py).
ROWS += [
    Row(f"b{b}-rescaled", [f"train.batch_size={b}", *RECIPE,
                           f"model.backbone_weights={RESCALED}"])
    for b in (16, 32, 64, 128, 256)
]  # fmt: skip
# Issue 25 in this regime: the demo preset itself (no Table 3 recipe: its own warmup, no
# clipping), only the batch changed, the lr following the measured noise (AdaScale), from the
# rescaled backbone; batch 16 (where AdaScale is the linear rule) is its base. The
# from-scratch column is adascale.py's.
ROWS += [Row("b16-preset-rescaled", ["train.batch_size=16", f"model.backbone_weights={RESCALED}"])]
ROWS += [
    Row(f"b{b}-adascale-rescaled", [f"train.batch_size={b}", "solver.lr_scaling=adascale",
                                    f"model.backbone_weights={RESCALED}"])
    for b in (32, 64, 128, 256)
]  # fmt: skip
# The plain-style backbone (pretrain.py's b128-plain, the detector's own domain): batch 16 and
# 256 fine-tuned from it, and batch 16 with it frozen; its run must be here (`pretrain.py --fresh`).
PLAIN = [f"model.backbone_weights={PRETRAIN_RUNS}/{PLAIN_ROW}-s0"]
ROWS += [
    Row("b16-from-plain", ["train.batch_size=16", *RECIPE, *PLAIN]),
    Row("b256-from-plain", ["train.batch_size=256", *RECIPE, *PLAIN]),
    Row("b16-frozen-plain", ["train.batch_size=16", *RECIPE, *PLAIN, "model.frozen_stages=5"]),
]
# The pre-training table and the plain backbone with the weights' size taken out, as rows
# bB-rescaled take it out of the b128 backbone: megdet rescales each backbone as it loads it
# (model.backbone_weights_rescale), so what is left between the rows is the features.
RESCALE = "model.backbone_weights_rescale=true"
ROWS += [
    Row(f"b16-from-b{b}-rescaled", ["train.batch_size=16", *RECIPE,
                                    f"model.backbone_weights={PRETRAIN_RUNS}/b{b}-linear-s0",
                                    RESCALE])
    for b in GOYAL_BATCHES
]  # fmt: skip
ROWS += [
    Row("b16-from-plain-rescaled", ["train.batch_size=16", *RECIPE, *PLAIN, RESCALE]),
    Row("b256-from-plain-rescaled", ["train.batch_size=256", *RECIPE, *PLAIN, RESCALE]),
]

if __name__ == "__main__":
    main(
        "megdet_regime",
        __doc__,
        "MegDet Table 3 in its own regime: a backbone megdet pretrained, batch 16 to 256 "
        "(issue 26)",
        "Demo detector (`--config default`) from `pretrain.py`'s b128 backbone (tiny ResNet, "
        "36 textured shapes at 64 px), 2 gloo processes, CGBN over both (BN size = the global "
        "batch), 8,000 shapes images at 64 px (val: 500), 7 epochs, linearly scaled lr (0.04 "
        "per 16 images), 3 epochs of warmup, gradient norm clipped at 1: table3_cgbn.md's "
        "recipe, whose runs start from random weights. Rows bB-rescaled: the same backbone "
        "with each convolution scaled back to a fresh initialization's RMS "
        "(rescaled_backbone.py; model.backbone_weights_rescale does the same); rows *-plain: "
        "pretrain.py's b128-plain backbone (the plain style); rows b16-from-bB: the backbone "
        "pretrain.py trained at batch B; rows b16-preset-rescaled and bB-adascale-rescaled: "
        "the demo preset itself from the rescaled backbone (its 0.8-epoch warmup, no clipping, "
        "x0.1 at epoch 6), AdaScale above batch 16 (issue 25; the from-scratch column is "
        "adascale.md); rows frozen-bB-noclip: frozen-bB without clipping. The runs ran at the "
        "commits docs/studies.md names; the -noclip rows (both seeds) and the AdaScale rows at "
        "c6d2ebb, on Intel Xeon; the second seeds of b32-b256-rescaled, b16-preset-rescaled and "
        "b32-b128-adascale-rescaled, and the rows "
        "b16-from-bB-rescaled and *-plain-rescaled at 4b502c5 on AMD EPYC, and the second seeds "
        "of b256-adascale-rescaled, b16-from-bB(-rescaled), *-plain-rescaled, b16-from-plain, "
        "b128 and bn2-bn32 at 89d3b12 on AMD EPYC, from the backbones "
        "pretrain.py retrained there (b128: the same 6.67% top-1 error and noise scale per "
        "epoch; the others 1-4 points apart, pretrain.md; each record names its backbone "
        "file's sha256).",
        ROWS,
        prepare=pretrained_backbone,
    )
