"""The ``megdet`` command: data, plan, train, eval, predict, report, config.

    megdet data shapes --out data/shapes --train 2000 --val 200
    megdet plan --config default train.batch_size=64 --nproc 4
    megdet train --config default --nproc 2 --out runs/demo
    torchrun --nproc-per-node 2 -m megdet train --config default --out runs/demo
    megdet eval --run runs/demo --nproc 2
    megdet predict --run runs/demo photos/ --out predictions --score 0.5
    megdet data convert --from yolo --images IMG --labels LABELS --names data.yaml --out t.json
    megdet report runs/bs16 runs/bs64 --epochs 1,4,7
    megdet config default train.batch_size=64      megdet config --list

``--nproc N`` starts N local processes through ``torch.distributed.run``; under torchrun (or
any launcher that sets RANK/WORLD_SIZE) the command runs as one worker of that group.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from megdet import dist
from megdet.config import (
    config_from_dict,
    load_config,
    validate_initialization,
    with_absolute_data_paths,
)
from megdet.errors import MegdetError
from megdet.logs import setup_logging
from megdet.paths import file_problem, folder_problem

log = logging.getLogger("megdet.cli")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    setup_logging(int(os.environ.get("RANK", "0")))
    try:
        if getattr(args, "nproc", 1) > 1 and args.command != "plan" and not _under_launcher():
            from megdet.launch import launch_local

            if args.config:  # config errors: once, before launch
                cfg = load_config(args.config, args.overrides)
                if args.command == "train":
                    validate_initialization(cfg)
                    _check_plan(cfg, args.nproc)
            max_restarts = getattr(args, "max_restarts", 0)
            worker_argv = _without_launch_options(argv)
            ended = launch_local(args.nproc, worker_argv, max_restarts, ["megdet", *argv])
            if ended.reported:
                print(ended.reported, file=sys.stderr)
            elif ended.exit_code:
                print(_describe_failure(args, ended.cause), file=sys.stderr)
            return ended.exit_code
        return args.handler(args)
    except MegdetError as exc:
        return _report_error(str(exc))
    except OSError as exc:
        if exc.filename is None:
            raise
        # A file the command reads or writes, not a bug: a full disk, a permission, a
        # folder that went away. Atomic writers already left the previous files whole.
        from megdet.atomic import write_failure

        return _report_error(write_failure(Path(exc.filename), exc, action="use"))
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (inside, it stops cleanly)
        if int(os.environ.get("RANK", "0")) == 0 and not _under_launcher():
            print("megdet: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:
        from megdet.launch import lost_peer, report_to_launcher

        # Another worker died under this one: the launcher says which and why; this
        # worker's traceback about a closed connection would only bury that line.
        if _under_launcher() and lost_peer(exc) and report_to_launcher("lost_peer", str(exc)):
            return 1
        raise


def _report_error(message: str) -> int:
    """Print a user's error as one line (exit code 2): under the launcher it prints the line
    once; under torchrun, rank 0 does."""
    from megdet.launch import report_to_launcher

    line = f"megdet: error: {' '.join(message.split())}"
    if not report_to_launcher("error", line) and int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr)
    return 2


def _describe_failure(args, cause: str) -> str:
    """The launcher's line for workers that ended without saying why (killed, crashed): what
    happened, and for training where it can continue from."""
    line = f"megdet: error: {cause}"
    if args.command != "train":
        return line
    from megdet.engine.checkpoint import newest_checkpoint

    run_dir = args.out or Path("runs") / Path(args.config).stem
    try:
        found = newest_checkpoint(run_dir / "checkpoints")
    except MegdetError:
        found = None
    if found is None:
        return f"{line}; no checkpoint was written"
    state, path = found
    return (
        f"{line}; the last checkpoint is at iteration {state['iteration']} ({path}); continue "
        f"with: {resume_command(run_dir, ['megdet', *sys.argv[1:]])}"
    )


def _check_plan(cfg, nproc: int) -> None:
    """What only the plan can refuse (a batch that does not split over the processes, a BN
    size that does not fit them), before any worker starts or a folder is made. The number of
    images does not change these checks."""
    from megdet.plan import make_plan

    if cfg.train.images_per_device != "auto":  # needs a measurement in the workers
        make_plan(cfg, nproc, cfg.data.train.num_images or 1)


def _parse(argv: list[str]) -> argparse.Namespace:
    """The command line, with key=value overrides accepted anywhere: argparse alone takes them
    only before the first option (``--out R a=b`` would be "unrecognized arguments")."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "predict":  # its INPUT... took the key=value items too
        inputs = [item for item in args.inputs if "=" not in item or Path(item).exists()]
        overrides = [item for item in args.inputs if item not in inputs] + overrides
        args.inputs = inputs
        if not inputs:
            parser.error("predict: give at least one INPUT (image file, folder or glob)")
    if overrides:
        if not hasattr(args, "overrides"):
            parser.error(f"{args.command}: takes no key=value overrides: {' '.join(overrides)}")
        args.overrides = [*args.overrides, *overrides]
    for option in ("nproc", "max_restarts"):
        value = getattr(args, option, None)
        least = 1 if option == "nproc" else 0
        if value is not None and value < least:
            parser.error(f"--{option.replace('_', '-')}: must be >= {least}, got {value}")
    return args


SEED_HELP = "random seed: one seed writes byte-identical files"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default in its help, where it has one the help does not already say."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        shown = "default" in text or any(default is v for v in (None, False, argparse.SUPPRESS))
        flag = action.nargs == 0  # --overwrite, --no-calibrate: their help says what they do
        if action.option_strings and not action.required and not shown and not flag:
            text += " (default: %(default)s)"
        return text


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, as every other megdet error (exit code 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="megdet",
        description="Train object detectors with large mini-batches (MegDet) on torch.distributed.",
        epilog="examples:\n" + __doc__.split("\n\n")[1],
    )
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="make or check datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    shapes = data_commands.add_parser("shapes", help="write the synthetic shapes dataset (COCO)")
    shapes.add_argument("--out", type=Path, required=True, help="output folder")
    shapes.add_argument("--train", type=int, required=True, help="number of training images")
    shapes.add_argument("--val", type=int, required=True, help="number of validation images")
    shapes.add_argument("--size", type=int, default=128, help="image side (height) in pixels")
    shapes.add_argument("--width", type=int, help="image width in pixels (default: --size)")
    shapes.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    shapes.add_argument("--overwrite", action="store_true", help="replace a set already there")
    shapes.set_defaults(handler=_cmd_shapes)
    patterns = data_commands.add_parser(
        "patterns", help="write the synthetic classification set (ImageFolder)"
    )
    patterns.add_argument("--out", type=Path, required=True, help="output folder")
    patterns.add_argument(
        "--style",
        choices=("textured", "plain"),
        default="textured",
        help="textured: 36 textured shapes under strong noise, one per image (Goyal's "
        "studies); plain: the detector's domain, 1-3 plain shapes of one of 6 classes on the "
        "shapes set's backgrounds (pretraining a detector's backbone)",
    )
    patterns.add_argument(
        "--classes",
        type=int,
        default=None,
        help="number of classes (2-36 textured, 2-6 plain; default: 10 textured, 6 plain)",
    )
    patterns.add_argument("--train", type=int, required=True, help="number of training images")
    patterns.add_argument("--val", type=int, required=True, help="number of validation images")
    patterns.add_argument("--size", type=int, default=32, help="image side in pixels")
    patterns.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    patterns.add_argument("--overwrite", action="store_true", help="replace a set already there")
    patterns.set_defaults(handler=_cmd_patterns)
    check = data_commands.add_parser("check", help="validate a COCO dataset, every problem at once")
    check.add_argument("--json", type=Path, required=True, help="COCO instances file")
    check.add_argument("--images", type=Path, help="folder the file_names are relative to")
    check.add_argument("--strict", action="store_true", help="boxes without area are errors")
    check.set_defaults(handler=_cmd_data_check)
    convert = data_commands.add_parser(
        "convert",
        help="YOLO or Pascal VOC labels to a COCO instances file",
        description="yolo: --images DIR --labels DIR --names DATASET.yaml; "
        "voc: --root VOCdevkit/VOC2007 [--split trainval]",
    )
    convert.add_argument("--from", dest="source", choices=("yolo", "voc"), required=True)
    convert.add_argument("--out", type=Path, required=True, help="the COCO JSON file to write")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    convert.add_argument("--images", type=Path, help="yolo: image folder (searched recursively)")
    convert.add_argument("--labels", type=Path, help="yolo: label folder (same relative paths)")
    convert.add_argument(
        "--names", type=Path, help="dataset YAML with 'names' (yolo: required; voc: default "
        "VOC's 20 classes)"
    )  # fmt: skip
    convert.add_argument("--root", type=Path, help="voc: the year folder (VOCdevkit/VOC2007)")
    convert.add_argument("--split", default="trainval", help="voc: ImageSets/Main/SPLIT.txt")
    convert.add_argument(
        "--category-ids",
        metavar="coco|I,J,...",
        help="COCO id of each class in order (default 1..K; coco: COCO's 80 ids)",
    )
    convert.set_defaults(handler=_cmd_data_convert)

    def config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--config", required=required, help="preset name or YAML file")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.seed=1")
        p.add_argument("--nproc", type=int, default=1, help="local processes (torchrun)")

    plan = commands.add_parser(
        "plan",
        help="print what a run will do, before training; or, with --from RUN, project the "
        "time to RUN's accuracy on k devices",
    )
    config_args(plan, required=False)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--lr-at", metavar="I,J,...", help="also print the lr at these iterations")
    plan.add_argument(
        "--memory",
        action="store_true",
        help="also measure memory per image with and without train.checkpointing (seconds)",
    )
    project = plan.add_argument_group(
        "projection (--from)",
        "steps from RUN's logged gradient noise scale, step time measured here (megdet/"
        "projection.py); writes RUN/projection.json, which megdet report draws",
    )
    project.add_argument("--from", dest="from_run", type=Path, metavar="RUN",
                         help="a finished run of 2+ processes (train.gns: true)")  # fmt: skip
    project.add_argument("--devices", default="8,16,32,64,128", metavar="K,...",
                         help="device counts (default: %(default)s)")  # fmt: skip
    project.add_argument("--images-per-device", metavar="N,...",
                         help="images per device to try (default: powers of 2 that fit "
                         "train.memory_budget_gb, up to 64)")  # fmt: skip
    project.add_argument("--batches", metavar="B,...",
                         help="global batches to try instead (each device count that divides "
                         "them)")  # fmt: skip
    project.add_argument(
        "--bandwidth",
        type=float,
        metavar="GB/s",
        help="all-reduce bus bandwidth (default: gloo's, measured here)",
    )
    project.add_argument(
        "--target",
        type=float,
        metavar="PERCENT",
        help="the accuracy to reach, in the run's metric (default: its final)",
    )
    project.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where to time the steps (default: cuda if there is one)",
    )
    project.add_argument("--pace", choices=("model", "module"), default="model",
                         help="whose noise scale sets the steps: the whole model's (default), "
                         "or the module group's that needs the most")  # fmt: skip
    project.add_argument(
        "--no-calibrate", dest="calibrate", action="store_false",
        help="leave out the per-step overhead read from the run's logged step time (input "
        "pipeline, CGBN's collectives, hooks): the measured parts alone",
    )  # fmt: skip
    project.add_argument("--out", type=Path, help="projection JSON (default RUN/projection.json)")
    plan.set_defaults(handler=_cmd_plan)

    train = commands.add_parser("train", help="train (a detector, or what the config's task says)")
    config_args(train)
    train.add_argument("--out", type=Path, help="run folder (default runs/<config name>)")
    train.add_argument("--overwrite", action="store_true", help="replace a previous run there")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest complete checkpoint",
    )
    train.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="with --nproc: restart all processes this many times after a failure (torchrun); "
        "they resume from the newest checkpoint",
    )
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a run or a weights file on the val split")
    config_args(evaluate, required=False)
    evaluate.add_argument("--run", type=Path, help="run folder: its config and last checkpoint")
    evaluate.add_argument("--weights", type=Path, help="checkpoint file (its config by default)")
    evaluate.add_argument("--out", type=Path, help="where to write results (default RUN/eval)")
    evaluate.set_defaults(handler=_cmd_eval)

    predict = commands.add_parser(
        "predict", help="detect objects in images: detections.json and the images drawn"
    )
    predict.add_argument("--config", help="preset or YAML (default: the checkpoint's config)")
    predict.add_argument("--nproc", type=int, default=1, help="local processes (torchrun)")
    predict.set_defaults(overrides=[])  # key=value items among the inputs: see _parse
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs")
    predict.add_argument("--run", type=Path, help="run folder: its config and last checkpoint")
    predict.add_argument("--weights", type=Path, help="checkpoint file (its config by default)")
    predict.add_argument("--out", type=Path, required=True, help="output folder")
    predict.add_argument("--score", type=float, default=0.5, help="lowest score kept (0.5)")
    predict.add_argument("--batch", type=int, default=4, help="images per forward pass (4)")
    predict.add_argument(
        "--device", choices=("cpu", "cuda"), help="default: cuda where there is one"
    )  # fmt: skip
    predict.add_argument("--no-draw", action="store_true", help="write detections.json only")
    predict.set_defaults(handler=_cmd_predict)

    show = commands.add_parser(
        "config",
        help="print the config a run would get (a preset or YAML file and overrides), or "
        "with --list every key: type, default, allowed values, meaning",
    )
    show.add_argument("preset", nargs="?", help="preset name or YAML file")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.seed=1")
    show.add_argument(
        "--list", action="store_true", help="the config reference, as markdown (docs/config.md)"
    )
    show.set_defaults(handler=_cmd_config)

    report = commands.add_parser("report", help="plots and MegDet Table 1 from finished runs")
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders")
    report.add_argument("--out", type=Path, help="output folder (default FIRST_RUN/report)")
    report.add_argument(
        "--epochs",
        metavar="E,F,...",
        help="Table 1 columns (default: each run's first, middle and last epoch)",
    )
    report.add_argument(
        "--x", choices=("iteration", "epoch"), default="iteration",
        help="x axis of the loss and lr plot (epoch lines up runs of different batch sizes)"
    )  # fmt: skip
    report.set_defaults(handler=_cmd_report)
    return parser


def _cmd_config(args) -> int:
    if args.list:
        if args.preset or args.overrides:
            raise MegdetError("config --list: the reference takes no preset or overrides")
        from megdet.config_reference import markdown

        print(markdown(), end="")
        return 0
    if args.preset is None:
        raise MegdetError("config: give a preset or YAML file (or --list for every key)")
    from megdet.config import dump_config

    print(dump_config(load_config(args.preset, args.overrides)), end="")
    return 0


def _cmd_report(args) -> int:
    from megdet.report import write_report

    epochs = None
    if args.epochs:
        try:
            epochs = [int(e) for e in args.epochs.split(",")]
        except ValueError:
            raise MegdetError(f"--epochs: expected epochs like 1,4,7, got {args.epochs}") from None
    out = args.out or args.runs[0] / "report"
    if problem := folder_problem(out, "--out" if args.out else "report folder"):
        raise MegdetError(problem)
    for path in write_report(args.runs, out, epochs, args.x):
        print(path)
    return 0


def _cmd_data_check(args) -> int:
    from megdet.data.check import check_dataset

    report = check_dataset(args.json, args.images, decode=True)
    for problem in report.errors:
        print(f"error: {problem}")
    for dropped in report.dropped_boxes:
        print(f"{'error' if args.strict else 'dropped'}: {dropped}")
    print(report.summary())
    return 2 if report.problems(args.strict) else 0


def _cmd_data_convert(args) -> int:
    from megdet.data.convert import ConversionFailed, read_names, write_conversion

    if problem := file_problem(args.out):
        raise MegdetError(problem)
    if args.source == "yolo":
        from megdet.data.yolo import convert_yolo

        missing = [f"--{k}" for k in ("images", "labels", "names") if getattr(args, k) is None]
        if missing:
            raise MegdetError(f"data convert --from yolo: needs {', '.join(missing)}")
        names = read_names(args.names)
        conversion = convert_yolo(args.images, args.labels, names, args.category_ids)
    else:
        from megdet.data.voc import convert_voc

        if args.root is None:
            raise MegdetError("data convert --from voc: needs --root (VOCdevkit/VOC2007)")
        names = read_names(args.names) if args.names else None
        conversion = convert_voc(args.root, args.split, names, args.category_ids)
    for note in [*conversion.notes, conversion.dropped_note()]:
        if note:
            print(f"note: {note}")
    try:
        write_conversion(conversion, args.out, args.overwrite)
    except ConversionFailed as failed:
        for problem in failed.errors:
            print(f"error: {problem}")
        print(f"{args.out}: not written ({len(failed.errors)} error(s))")
        return 2
    print(conversion.summary(args.out))
    return 0


def _cmd_patterns(args) -> int:
    from megdet.data.patterns import generate_patterns

    if min(args.train, args.val) < 0:
        raise MegdetError("data patterns: --train/--val must be >= 0")
    classes = args.classes
    if classes is None:
        classes = 10 if args.style == "textured" else 6
    if problem := folder_problem(args.out):
        raise MegdetError(problem)
    try:
        written = generate_patterns(
            args.out, classes, args.train, args.val, args.size, args.seed, args.overwrite,
            style=args.style,
        )  # fmt: skip
    except ValueError as exc:
        raise MegdetError(f"data patterns: {exc}") from None
    for split, path in written.items():
        print(f"{split}: {path} ({classes} class folders, {args.style})")
    return 0


def _cmd_shapes(args) -> int:
    from megdet.data.shapes import generate_shapes

    if min(args.train, args.val) < 0 or min(args.size, args.width or args.size) < 32:
        raise MegdetError("data shapes: --train/--val must be >= 0, --size and --width >= 32")
    if problem := folder_problem(args.out):
        raise MegdetError(problem)
    written = generate_shapes(
        args.out, args.train, args.val, args.size, args.seed, args.width, args.overwrite
    )
    for split, path in written.items():
        print(f"{split}: {path} (images in {args.out / split})")
    return 0


def _cmd_plan(args) -> int:
    import json

    from megdet.plan import make_plan
    from megdet.solver import lr_at
    from megdet.tasks import build_task

    if args.from_run is not None:
        return _cmd_plan_from(args)
    if args.config is None:
        raise MegdetError("plan: give --config (what a run will do) or --from RUN (a projection)")
    cfg = load_config(args.config, args.overrides)
    validate_initialization(cfg)
    task = build_task(cfg)  # the counts and the memory estimate training uses
    if cfg.data.train.num_images is None:  # the data is here: check it as training does
        task.train_dataset()
        task.check_evaluation()
    memory = None
    if args.memory or cfg.train.images_per_device == "auto":
        memory = task.estimate_memory()
    plan = make_plan(cfg, args.nproc, task.num_train_images, memory)
    lr_at_iters = {}
    if args.lr_at:
        try:
            iterations = [int(i) for i in args.lr_at.split(",")]
        except ValueError:
            raise MegdetError(
                f"--lr-at: expected iterations like 0,100,500, got {args.lr_at}"
            ) from None
        lr_at_iters = {str(i): lr_at(plan, i) for i in iterations}
    if args.json:
        report = plan.to_dict()
        if args.lr_at:
            report["lr_at"] = lr_at_iters
        print(json.dumps(report, indent=2))
    else:
        print(plan.summary())
        for it, lr in lr_at_iters.items():
            print(f"lr at iteration {it}: {lr:.6g}")
    return 0


def _numbers(flag: str, text: str | None) -> list[int] | None:
    """A flag's comma-separated positive integers, or a one-line error."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise MegdetError(f"{flag}: expected positive integers like 8,16,32, got {text}")
    return values


def _cmd_plan_from(args) -> int:
    """``plan --from RUN``: RUN's steps carried to other batches, times measured here."""
    import json

    import torch

    from megdet import projection
    from megdet.atomic import atomic_write_text
    from megdet.tasks import build_task

    if args.config or args.overrides:
        raise MegdetError("plan --from: the run's own config.yaml is used; drop --config")
    run = projection.summarize_run(args.from_run)
    devices = _numbers("--devices", args.devices)
    per_device = _numbers("--images-per-device", args.images_per_device)
    batches = _numbers("--batches", args.batches)
    if args.bandwidth is not None and not args.bandwidth > 0:
        raise MegdetError(f"--bandwidth: must be > 0 GB/s, got {args.bandwidth:g}")
    target = run.final if args.target is None else args.target
    until = run.reached(target)
    if until is None:
        best = (min if run.lower_is_better else max)(v for _, v in run.evals)
        raise MegdetError(
            f"--target: {run.path} never reached {run.metric} {target:g} (its best: {best:.2f}); "
            "give a level it reached"
        )
    cfg = load_config(str(run.path / "config.yaml"), [])
    task = build_task(cfg)
    if not batches and not per_device:
        memory = task.estimate_memory()
        fit = memory.images_that_fit(cfg.train.checkpointing, cfg.train.memory_budget_gb)
        per_device = [2**i for i in range(7) if 2**i <= max(1, min(fit, 64))]
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise MegdetError("--device cuda: no CUDA device here; use --device cpu")
    n = run.images_per_device
    counts = (max(1, n // 2), n) if n > 1 else (1, 2)
    threads = projection.measure_threads(run, device_name)
    timed = projection.measure_step_time(task, cfg, counts, torch.device(device_name),
                                         threads=threads)  # fmt: skip
    bandwidth = (
        args.bandwidth * 1e9
        if args.bandwidth
        else projection.measure_bus_bandwidth(timed["gradient_bytes"])
    )
    step_time = projection.fit_step_time(timed["seconds"], timed["gradient_bytes"], bandwidth,
                                         threads)  # fmt: skip
    calibration = "not calibrated (--no-calibrate)"
    if args.calibrate:
        step_time, calibration = projection.calibrate(step_time, run, device_name)
    rows = projection.project(run, step_time, devices, per_device, batches, until, args.pace)
    print(projection.format_projection(run, step_time, rows, target, until, args.pace,
                                       calibration))  # fmt: skip
    out = args.out or run.path / "projection.json"
    document = projection.projection_dict(run, step_time, rows, target, args.pace, calibration)
    atomic_write_text(out, json.dumps(document, indent=1) + "\n")
    print(f"written: {out}")
    return 0


def _cmd_train(args) -> int:
    from megdet.engine.run_dir import RunLock, check_run_dir, settle_replacement
    from megdet.engine.stop import STOPPED_EXIT_CODE, StopRequested
    from megdet.engine.trainer import train
    from megdet.launch import report_to_launcher
    from megdet.tasks import build_task

    cfg = with_absolute_data_paths(load_config(args.config, args.overrides))
    validate_initialization(cfg)
    run_dir = args.out or Path("runs") / Path(args.config).stem
    if args.resume and args.overwrite:
        raise MegdetError("train: --resume and --overwrite contradict each other; pick one")
    # torchrun restarting failed workers (--max-restarts) continues the run it restarts; its
    # first attempt already did any --overwrite.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume = args.resume or restarted
    overwrite = args.overwrite and not restarted
    ctx = dist.init_distributed()
    lock = RunLock(run_dir)
    try:
        problem = None
        if ctx.is_main:  # rank 0 owns the folder for the run's lifetime
            problem = lock.acquire()
            if problem is None:
                settle_replacement(run_dir)  # a replacement killed before its checkpoint
                problem = check_run_dir(run_dir, overwrite, resume)
        problem = dist.broadcast_object(problem)  # all ranks stop, or none does
        if problem:
            raise MegdetError(problem)
        task = build_task(cfg)
        began = time.perf_counter()
        try:
            result = train(cfg, task, run_dir, ctx, resume=resume, replace=overwrite)
        except StopRequested as stopped:
            if ctx.is_main:
                line = (
                    f"megdet: {stopped}; checkpoint {stopped.checkpoint}; resume with: "
                    f"{resume_command(run_dir)}"
                )
                if not report_to_launcher("stopped", line):
                    print(line, file=sys.stderr)
            return STOPPED_EXIT_CODE
        if ctx.is_main:
            _print_final(run_dir / "eval" / "metrics.json", task, result.metrics)
            _print_where(run_dir, result.steps, time.perf_counter() - began)
        dist.barrier()  # see dist.barrier: every rank done before any tears down
    finally:
        lock.release()
        dist.shutdown()
    return 0


def resume_command(run_dir: Path, typed: list[str] | None = None) -> str:
    """The command that continues this run: as it was typed (the launcher passes it on in
    MEGDET_COMMAND), without --overwrite, with --resume and this --out."""
    import shlex

    from megdet.launch import COMMAND

    argv = typed or shlex.split(os.environ.get(COMMAND, "")) or ["megdet", *sys.argv[1:]]
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--out":
            skip = True
        elif item not in ("--overwrite", "--resume") and not item.startswith("--out="):
            kept.append(item)
    return shlex.join([*kept, "--out", str(run_dir), "--resume"])


def _cmd_eval(args) -> int:
    from megdet.engine.checkpoint import load_model_state
    from megdet.engine.run_dir import RunLock
    from megdet.tasks import build_task

    if args.out and (problem := folder_problem(args.out)):
        raise MegdetError(problem)
    state, weights, cfg = _checkpoint(args, "eval")
    out = args.out or (args.run / "eval" if args.run else None)
    if out and not args.out and (problem := folder_problem(out)):  # RUN/eval
        raise MegdetError(problem)
    ctx = dist.init_distributed()
    # Writing into a run folder: not while a run trains there (it writes RUN/eval too).
    inside_run = args.run is not None and out is not None and _is_inside(out, args.run)
    lock = RunLock(args.run) if inside_run else None
    try:
        problem = lock.acquire("--run") if lock and ctx.is_main else None
        if problem := dist.broadcast_object(problem):
            raise MegdetError(problem)
        task = build_task(cfg)
        task.check_evaluation()
        model = task.build_model(split="val")
        load_model_state(model, state["model"], weights)
        metrics = task.evaluate(model.to(ctx.device), ctx.device, out if ctx.is_main else None,
                                progress=ctx.is_main)  # fmt: skip
        if ctx.is_main:
            _print_final(out / "metrics.json" if out else None, task, metrics)
        dist.barrier()  # see dist.barrier: every rank done before any tears down
    finally:
        if lock:
            lock.release()
        dist.shutdown()
    return 0


def _is_inside(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def _checkpoint(args, command: str):
    """The checkpoint (``--run``'s last, or ``--weights``), its path, and the config: the
    checkpoint's own, or ``--config`` where given; key=value overrides on top."""
    from megdet.engine.checkpoint import load_checkpoint

    if args.run and args.weights:
        raise MegdetError(
            f"{command}: give --run RUN_DIR (its checkpoints/last.pt) or --weights FILE, not both"
        )
    if args.run:
        weights = args.run / "checkpoints" / "last.pt"
    elif args.weights:
        weights = args.weights
    else:
        raise MegdetError(f"{command}: give --run RUN_DIR, or --weights FILE (and --config NAME)")
    state = load_checkpoint(weights)
    if args.config:
        return state, weights, load_config(args.config, args.overrides)
    if not isinstance(state.get("config"), dict):
        raise MegdetError(f"{weights}: keeps no config; give --config NAME")
    return state, weights, config_from_dict(state["config"], args.overrides)


def _cmd_predict(args) -> int:
    import torch

    from megdet.data.images import find_images
    from megdet.tasks.detection import predict

    if problem := folder_problem(args.out):
        raise MegdetError(problem)
    if args.batch < 1 or not 0 <= args.score <= 1:
        raise MegdetError("predict: --batch must be >= 1 and --score in [0, 1]")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise MegdetError("predict --device cuda: torch sees no CUDA device here; use --device cpu")
    files, unmatched = find_images(args.inputs, exclude=args.out)
    if unmatched and not files:
        raise MegdetError(f"predict: no images to predict ({'; '.join(unmatched)})")
    state, weights, cfg = _checkpoint(args, "predict")
    if cfg.task != "detection":
        raise MegdetError(f"predict: {weights} is a {cfg.task} model; predict draws detections")
    labels = predict.checkpoint_labels(state, cfg, weights)
    model = predict.load_detector(state, cfg, weights, labels, args.score)
    ctx = dist.init_distributed()
    try:
        device = torch.device("cpu") if args.device == "cpu" else ctx.device
        drawn = None if args.no_draw else predict.drawn_paths(files, args.out / "images")
        mine = predict.predict_files(
            model, files, drawn, labels, device, args.batch, progress=ctx.is_main
        )
        found = predict.gather(mine)
        if ctx.is_main:
            predict.write_detections(args.out / "detections.json", found)
            for line in [*unmatched, *found.skipped]:
                print(f"skipped: {line}")
            drawn_note = "" if args.no_draw else f", drawn in {args.out / 'images'}"
            print(
                f"{found.images} image(s), {len(found.results)} detection(s) scoring >= "
                f"{args.score}: {args.out / 'detections.json'}{drawn_note}"
            )
        dist.barrier()  # see dist.barrier: every rank done before any tears down
    finally:
        dist.shutdown()
    return 0 if found.images else 2


def _print_final(metrics_file: Path | None, task, metrics: dict[str, float]) -> None:
    """The final table of ``train`` and ``eval``, saying its units and where its file is."""
    where = f"; {metrics_file} holds fractions, -1 where undefined" if metrics_file else ""
    print(f"\n{task.metrics_name} on the val split, in percent{where}:")
    print(task.format_metrics(metrics))


def _print_where(run_dir: Path, steps: int, seconds: float) -> None:
    """What a finished run leaves and how long it took: the last lines a user reads."""
    minutes, rest = divmod(round(seconds), 60)
    took = f"{minutes} min {rest} s" if minutes else f"{rest} s"
    print(f"\ntrained {steps} steps in {took}")
    print(f"run folder: {run_dir} (config.yaml, plan.json, metrics.jsonl, eval/)")
    print(f"checkpoint: {run_dir / 'checkpoints' / 'last.pt'}")
    print(f"plots:      megdet report {run_dir}")


def _under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _without_launch_options(argv: list[str]) -> list[str]:
    """The worker's command line: the launcher's own options (--nproc, --max-restarts) out."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in ("--nproc", "--max-restarts"):
            skip = True
        elif not item.startswith(("--nproc=", "--max-restarts=")):
            out.append(item)
    return out
