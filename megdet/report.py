"""``megdet report``: plots and MegDet's Table 1 from the ``metrics.jsonl`` of finished runs.

Reads only what training wrote (``metrics.jsonl``, ``plan.json``), so a report can be made on
any machine from copied run folders, and several runs (e.g. batch 16, 64, 256) share one axis.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from megdet.atomic import atomic_write_bytes, atomic_write_text
from megdet.errors import MegdetError

log = logging.getLogger(__name__)

# MegDet Table 1's quantities: sampled positives and negatives per image, RPN and RoI heads.
SAMPLERS = ("rpn", "roi")
TITLES = {"rpn": "RPN samples", "roi": "RoI head samples"}


@dataclass
class RunLog:
    name: str
    global_batch: int
    train: list[dict]  # one record per logged iteration
    evals: list[dict]  # {"iter", "epoch", "eval": {"mmAP": ...}}


def read_run(run_dir: Path) -> RunLog:
    """One run folder's logged metrics; a one-line error when it is not a megdet run."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise MegdetError(f"{metrics}: not found; pass a folder written by `megdet train`")
    train, evals = [], []
    lines = metrics.read_text(errors="replace").splitlines()  # bytes that are not text: bad JSON
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a partial last line; anything else is corruption.
            if number == len(lines):
                continue
            raise MegdetError(f"{metrics}:{number}: not a JSON line") from None
        if problem := _record_problem(record):
            raise MegdetError(f"{metrics}:{number}: {problem}; is this a megdet metrics file?")
        (evals if "eval" in record else train).append(record)
    global_batch = _global_batch(run_dir)
    name = run_dir.resolve().name + (f" (batch {global_batch})" if global_batch else "")
    return RunLog(name, global_batch, train, evals)


# What each record must hold for the plots and tables: training lines and evaluation lines.
TRAIN_FIELDS = ("iter", "epoch", "lr", "loss")
EVAL_FIELDS = ("iter", "epoch")


def _record_problem(record) -> str | None:
    """Why a metrics.jsonl line cannot be read as megdet's, or None."""
    if not isinstance(record, dict):
        return f"a line must be a JSON object, got {type(record).__name__}"
    evaluation = "eval" in record
    if evaluation and not isinstance(record["eval"], dict):
        return "'eval' must be an object of metrics"
    for key in EVAL_FIELDS if evaluation else TRAIN_FIELDS:
        if key not in record:
            return f"no '{key}'"
    numbers = {**record["eval"], **{k: record[k] for k in EVAL_FIELDS}} if evaluation else record
    for key, value in numbers.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"'{key}' must be a number, got {value!r:.40}"
    return None


def _global_batch(run_dir: Path) -> int:
    """The run's global batch from its plan.json; 0 where there is none."""
    plan_file = run_dir / "plan.json"
    if not plan_file.is_file():
        return 0
    try:
        plan = json.loads(plan_file.read_text())
    except (OSError, ValueError) as exc:
        raise MegdetError(f"{plan_file}: not readable as JSON ({exc})") from None
    batch = plan.get("global_batch", 0) if isinstance(plan, dict) else None
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
        raise MegdetError(f"{plan_file}: not a megdet plan (needs an object with global_batch)")
    return batch


def per_epoch(records: list[dict], key: str) -> dict[int, float]:
    """Mean of ``key`` over the records of each epoch; epoch e holds (e - 1, e]."""
    sums: dict[int, list[float]] = {}
    for record in records:
        if key in record:
            epoch = max(1, math.ceil(record["epoch"] - 1e-9))
            sums.setdefault(epoch, []).append(record[key])
    return {epoch: sum(values) / len(values) for epoch, values in sorted(sums.items())}


def ratio_spread(records: list[dict], sampler: str) -> dict[int, float]:
    """Per epoch, the standard deviation over the logged iterations of one global batch's
    positive/negative ratio: how imbalanced a single batch can be (MegDet's point about small
    batches), which the epoch's mean does not show. Epochs with one logged iteration: none."""
    ratios: dict[int, list[float]] = {}
    for record in records:
        if record.get(f"{sampler}_neg"):
            epoch = max(1, math.ceil(record["epoch"] - 1e-9))
            ratios.setdefault(epoch, []).append(record[f"{sampler}_pos"] / record[f"{sampler}_neg"])
    return {e: statistics.stdev(values) for e, values in ratios.items() if len(values) > 1}


def sampling_ratios(records: list[dict]) -> dict[str, dict[int, float]]:
    """Positives over negatives per epoch, for the RPN and the RoI heads (Table 1)."""
    ratios = {}
    for sampler in SAMPLERS:
        pos = per_epoch(records, f"{sampler}_pos")
        neg = per_epoch(records, f"{sampler}_neg")
        ratios[sampler] = {e: pos[e] / neg[e] for e in pos if neg.get(e)}
    return ratios


def table1(runs: list[RunLog], epochs: list[int] | None = None) -> str:
    """Markdown like MegDet Table 1: positive/negative ratio per batch size at chosen epochs,
    or, by default, at each run's own first, middle and last epoch (a batch-256 run and a
    batch-16 run of the same schedule log different epochs when one stopped early)."""
    if not any(per_epoch(run.train, "rpn_pos") for run in runs):
        return "No sampling statistics (`rpn_pos`, `roi_pos`) in these runs.\n"
    columns = [f"epoch {e}" for e in epochs] if epochs else ["first epoch", "middle", "last"]
    lines = [
        "| run | global batch | sampler | "
        + " | ".join(f"{c}: pos/neg (pos, neg per batch)" for c in columns)
        + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for run in runs:
        logged = sorted(per_epoch(run.train, "rpn_pos"))
        chosen = epochs or ([logged[0], logged[len(logged) // 2], logged[-1]] if logged else [])
        if not epochs:  # a run of one or two epochs: each once, the rest of the columns "-"
            chosen = sorted(set(chosen))
            chosen += [None] * (len(columns) - len(chosen))
        ratios = sampling_ratios(run.train)
        for sampler in SAMPLERS:
            pos = per_epoch(run.train, f"{sampler}_pos")
            neg = per_epoch(run.train, f"{sampler}_neg")
            spread = ratio_spread(run.train, sampler)
            cells = []
            for e in chosen or [None] * len(columns):
                if e in ratios[sampler]:
                    batch = run.global_batch or 1
                    sd = f" ± {spread[e]:.3f}" if e in spread else ""
                    counts = f"({pos[e] * batch:.0f}, {neg[e] * batch:.0f})"
                    cell = f"{ratios[sampler][e]:.3f}{sd} {counts}"
                    cells.append(cell if epochs else f"epoch {e}: {cell}")
                else:
                    cells.append("-")
            lines.append(f"| {run.name} | {run.global_batch} | {sampler} | {' | '.join(cells)} |")
    note = (
        "\npos/neg: sampled positives over negatives, mean over the logged iterations of the "
        "epoch, ± its standard deviation from one logged global batch to the next; in brackets "
        "the counts per global batch (per image x global batch).\n"
    )
    return "\n".join(lines) + "\n" + note


# The validation curve per task: the metric, its axis label and the plot's title.
CURVES = {
    "mmAP": ("mmAP (%)", "Validation mmAP per epoch (MegDet Fig. 4)"),
    "top1_err": ("top-1 error (%)", "Validation top-1 error per epoch (Goyal et al. Fig. 2)"),
}


def write_report(
    run_dirs: list[Path], out_dir: Path, epochs: list[int] | None = None, x: str = "iteration"
):
    """Write the PNGs and ``table1.md`` to ``out_dir``; return the paths written. ``x``:
    ``iteration`` or ``epoch`` on the loss/lr axis (epochs line up runs of different batch
    sizes, as MegDet's Figure 4 does)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI or servers
    import matplotlib.pyplot as plt

    runs = [read_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    _colors([ax_loss, ax_lr], len(runs), plt)
    for run in runs:
        steps = [r["iter" if x == "iteration" else "epoch"] for r in run.train]
        marker = _marker(len(steps))
        ax_loss.plot(steps, [r["loss"] for r in run.train], label=run.name, marker=marker)
        # The lr holds from one logged iteration to the next: a step function, not a ramp.
        ax_lr.plot(steps, [r["lr"] for r in run.train], drawstyle="steps-post", label=run.name,
                   marker=marker)  # fmt: skip
    ax_loss.set(ylabel="training loss", title=f"Loss and learning rate per {x}")
    ax_lr.set(xlabel=x, ylabel="learning rate")
    ax_loss.legend()
    written.append(_save(fig, out_dir / "loss_lr.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _colors([ax], len(runs), plt)
    metric = next((m for m in CURVES for run in runs for r in run.evals if m in r["eval"]), "mmAP")
    for run in runs:
        points = [(r["epoch"], 100 * r["eval"][metric]) for r in run.evals if metric in r["eval"]]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=run.name)
    ylabel, title = CURVES[metric]
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    if any(run.evals for run in runs):
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no evaluations logged", ha="center", transform=ax.transAxes)
    written.append(_save(fig, out_dir / f"{metric.lower()}_per_epoch.png"))

    if any(r.get("gns", 0) > 0 for run in runs for r in run.train):
        written.append(_plot_noise_scale(runs, out_dir / "noise_scale.png", plt, x))
    else:
        log.info("noise_scale.png: not drawn, no run logged a gradient noise scale (it needs "
                 "train.gns: true and 2+ processes)")  # fmt: skip
    if any(key.startswith(FACTOR) for run in runs for r in run.train for key in r):
        written.append(_plot_module_lr(runs, out_dir / "module_lr.png", plt, x))
    if any("gain" in r for run in runs for r in run.train):
        written.append(_plot_adascale(runs, out_dir / "adascale.png", plt))
    projections = {
        run.name: _read_projection(Path(d)) for run, d in zip(runs, run_dirs, strict=True)
    }
    if projections := {name: p for name, p in projections.items() if p}:
        written.append(_plot_projection(projections, out_dir / "projection.png", plt))

    if any(f"{sampler}_pos" in r for run in runs for r in run.train for sampler in SAMPLERS):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, sampler in zip(axes, SAMPLERS, strict=True):
            for run in runs:
                ratios = sampling_ratios(run.train)[sampler]
                if ratios:
                    ax.plot(list(ratios), list(ratios.values()), marker="o", label=run.name)
            ax.set(xlabel="epoch", ylabel="positives / negatives", title=TITLES[sampler])
            ax.legend()
        written.append(_save(fig, out_dir / "pos_neg_ratio.png"))
        table = out_dir / "table1.md"  # detection runs: sampled positives and negatives
        atomic_write_text(
            table, "# Positive and negative samples (MegDet Table 1)\n\n" + table1(runs, epochs)
        )
        written.append(table)
    return written


def _plot_noise_scale(runs: list[RunLog], path: Path, plt, x: str) -> Path:
    """The gradient noise scale B_simple of each run over training, its global batch as a
    dashed line of the same color: a batch far above the noise scale buys little per image."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _colors([ax], len(runs), plt)
    gaps = False
    for run in runs:
        xs, ys = noise_scale_series(run, x)
        measured = sum(not math.isnan(y) for y in ys)
        if not measured:
            continue
        gaps |= measured < len(ys)
        (line,) = ax.plot(xs, ys, label=f"{run.name}: noise scale", marker=_marker(measured))
        if run.global_batch:
            ax.axhline(run.global_batch, color=line.get_color(), linestyle="--", linewidth=1)
    title = "Gradient noise scale B_simple (dashed: the batch)"
    if gaps:  # say what a break in a line is, rather than let it read as missing data
        title += "\ngaps: |G|^2 estimated <= 0 there (noise only)"
    ax.set(xlabel=x, ylabel="images", title=title)
    if ax.lines:
        ax.set_yscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no noise scale logged (train.gns with 2+ processes)", ha="center",
                transform=ax.transAxes)  # fmt: skip
    return _save(fig, path)


def noise_scale_series(run: RunLog, x: str) -> tuple[list[float], list[float]]:
    """Each logged noise scale against ``x``; NaN where the squared gradient came out <= 0
    (the log then has ``grad_sq`` without ``gns``: noise only, no scale to draw), so that the
    line breaks there instead of joining its neighbours across it."""
    records = [r for r in run.train if "gns" in r or "grad_sq" in r]
    xs = [r["iter" if x == "iteration" else "epoch"] for r in records]
    return xs, [r["gns"] if (r.get("gns") or 0) > 0 else math.nan for r in records]


def _plot_adascale(runs: list[RunLog], path: Path, plt) -> Path:
    """Under AdaScale: each step's gain (1 to batch / base batch), and the progress in epochs
    at the base batch against the steps taken (the linear rule would be a line of slope
    batch / base batch, the base batch itself one of slope 1)."""
    fig, (gain_ax, progress_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for run in runs:
        records = [r for r in run.train if "gain" in r]
        if not records:
            continue
        steps = [r["iter"] for r in records]
        gain_ax.plot(steps, [r["gain"] for r in records], label=run.name)
        progress_ax.plot(steps, [r["progress_epochs"] for r in records], label=run.name)
    gain_ax.set(xlabel="step", ylabel="gain r", title="AdaScale gain per step")
    progress_ax.set(xlabel="step", ylabel="epochs of progress at the base batch",
                    title="Progress through the base batch's schedule")  # fmt: skip
    gain_ax.legend()
    return _save(fig, path)


def _read_projection(run_dir: Path) -> dict | None:
    """``megdet plan --from``'s projection.json of a run, if it made one."""
    path = run_dir / "projection.json"
    if not path.is_file():
        return None
    try:
        projection = json.loads(path.read_text())
        rows = projection["rows"]
        if rows and all({"devices", "batch", "hours", "best"} <= set(r) for r in rows):
            return projection
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise MegdetError(f"{path}: not a megdet projection; remake it with megdet plan --from")


TIME_UNITS = (("hours", 1.0), ("minutes", 60.0), ("seconds", 3600.0))  # the first >= 1


def _plot_projection(projections: dict[str, dict], path: Path, plt) -> Path:
    """``plan --from``'s projected hours to each run's accuracy against the device count, one
    line per global batch (a batch on more devices: fewer images each), the perfect scaling
    of the fewest devices' best as a dotted line."""
    fig, axes = plt.subplots(1, len(projections), figsize=(6.5 * len(projections), 4.5),
                             squeeze=False)  # fmt: skip
    for ax, (name, projection) in zip(axes[0], projections.items(), strict=True):
        longest = max(row["hours"] for row in projection["rows"])
        unit, per_hour = next(u for u in TIME_UNITS if longest * u[1] >= 1 or u[0] == "seconds")
        by_batch: dict[int, list[tuple[int, float]]] = {}
        for row in projection["rows"]:
            by_batch.setdefault(row["batch"], []).append((row["devices"], row["hours"] * per_hour))
        for batch, points in sorted(by_batch.items()):
            ax.plot(*zip(*sorted(points), strict=True), marker="o", label=f"batch {batch}")
        best = {r["devices"]: r["hours"] * per_hour for r in projection["rows"] if r.get("best")}
        first = min(best)
        ax.plot(sorted(best), [best[first] * first / k for k in sorted(best)], "k:",
                label="perfect scaling")  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="devices", ylabel=unit,
               title=f"{name}: projected time to {projection['metric']} "
               f"{projection['target']:.1f}")  # fmt: skip
        ax.set_xticks(sorted(best), [str(k) for k in sorted(best)])
        ax.minorticks_off()
        ax.legend(fontsize="small")
    return _save(fig, path)


FACTOR = "lr_factor_"  # AGVM's multiplier of a module group's lr, logged per iteration


def _plot_module_lr(runs: list[RunLog], path: Path, plt, x: str) -> Path:
    """AGVM's lr multiplier of each module group: one color per group, one line style per
    run (the backbone is the reference, at 1)."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors, styles = {}, ["-", "--", ":", "-."]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(r for r in runs if any(FACTOR in k for t in r.train for k in t)):
        groups = sorted({k[len(FACTOR) :] for t in run.train for k in t if k.startswith(FACTOR)})
        for group in groups:
            points = [(t["iter" if x == "iteration" else "epoch"], t[FACTOR + group])
                      for t in run.train if FACTOR + group in t]  # fmt: skip
            color = colors.setdefault(group, palette[len(colors) % len(palette)])
            ax.plot(*zip(*points, strict=True), color=color, linestyle=styles[i % len(styles)],
                    label=f"{run.name}: {group}")  # fmt: skip
    ax.set(xlabel=x, ylabel="lr multiplier", title="AGVM: each module's lr / the scaled lr")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the plot
    return _save(fig, path)


def _marker(points: int) -> str | None:
    """Markers where a line has few points: one logged point draws nothing without one."""
    return "o" if points < 30 else None


def _colors(axes, lines: int, plt) -> None:
    """Past matplotlib's 10 default colors, 20 (tab20): a study's runs each keep their own."""
    if lines > 10:
        for ax in axes:
            ax.set_prop_cycle(color=[plt.cm.tab20(i % 20) for i in range(lines)])


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path
