"""The records of a study whose runs finished before records existed, read back from its
committed table, so that the study continues on a machine without those runs' folders instead
of starting over or dropping them from its table.

    python experiments/records_from_table.py adascale [megdet_regime ...]

A record read from a table holds what the table shows (batch, lr, warmup, steps, gain, the
final metric per seed, divergences, the noise scale per epoch) and names the table as its
source (``from_table``), with the commit and machine of the table's command line (the run itself
may be older: the table's notes say where); the per-epoch
metric and the wall time were not in the table and are not in the record. Seeds are those of
the command line, ascending, as the study ran them; a record already there is kept.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from megdet.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
METRICS = {"mmAP": "mmAP", "top-1 error": "top1_err"}
DIVERGED = re.compile(r"seed (\d+): iteration (\d+), lr ([0-9.e+-]+)")
COMMAND = re.compile(r"^Command: `python (.*?)` at commit (\w+) on (.*) \(")


def _per_run(cell: str, count: int) -> list[str] | None:
    """A cell's values, one per run: "a / b", or one value that all runs share."""
    parts = [p.strip() for p in cell.split(" / ")]
    if len(parts) == count:
        return parts
    return parts * count if len(parts) == 1 else None


def _noise(values: str) -> list[float | None]:
    return [None if v == "—" else float(v) for v in values.split()]


def records(table: Path) -> dict[str, dict]:
    """Records by file name (``ROW-sSEED``) from one study table."""
    lines = table.read_text().splitlines()
    command = next((m for line in lines if (m := COMMAND.match(line))), None)
    if command is None:
        raise SystemExit(f"{table}: no `Command:` line; a table written with records has them")
    argv = command[1].split()
    seeds = (
        [int(s) for s in argv[argv.index("--seeds") + 1].split(",")] if "--seeds" in argv else [0]
    )
    rows = [line for line in lines if line.startswith("| ")]
    header = [h.strip() for h in rows[0].strip("|").split("|")]
    label = next(h for h in header if h.startswith("final "))
    metric = METRICS[label.removeprefix("final ").removesuffix(" (mean ± sd)")]
    found = {}
    for line in rows[1:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        diverged = {
            int(m[1]): (int(m[2]), float(m[3])) for m in DIVERGED.finditer(cells["diverged"])
        }
        finals = (
            [] if cells["per seed"] == "—" else [float(v) for v in cells["per seed"].split(" / ")]
        )
        count = len(finals) + len(diverged)
        run_seeds = seeds[:count]
        if len(run_seeds) < count or not set(diverged) <= set(run_seeds):
            raise SystemExit(f"{table}: row {cells['row']}: {count} runs, seeds {seeds}")
        steps = _per_run(cells["iterations"], count)
        gains = _per_run(cells.get("mean gain", "—"), count)
        noise = cells.get("noise scale per epoch", "—")
        noises = _per_run(noise, count) if noise != "—" else None
        metric_values = iter(finals)
        for index, seed in enumerate(run_seeds):
            record = {
                "row": cells["row"],
                "seed": seed,
                "from_table": str(table.relative_to(ROOT)),
                "table_command": command[1],
                "table_commit": command[2],
                "cpu": command[3],
                "plan": {
                    "global_batch": int(cells["batch"]),
                    "lr": float(cells["lr"]),
                    "warmup_iters": int(cells["warmup it"]),
                },
                "steps": int(steps[index]) if steps else None,
                # The committed tables were written from /work/main: relative, as a record's.
                "overrides": re.sub(r"/work/main/", "", cells["overrides"]),
            }
            if gains and gains[index] != "—":
                record["mean_gain"] = float(gains[index])
            if noises:
                record["gns_per_epoch"] = _noise(noises[index])
            if seed in diverged:
                iteration, lr = diverged[seed]
                record["diverged"] = {"iteration": iteration, "lr": lr}
            else:
                record[metric] = next(metric_values)
            found[f"{cells['row']}-s{seed}"] = record
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("studies", nargs="+", help="study names: experiments/results/NAME.md")
    for name in parser.parse_args().studies:
        folder = RESULTS / name / "runs"
        written = 0
        for stem, record in records(RESULTS / f"{name}.md").items():
            path = folder / f"{stem}.json"
            if not path.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(record, indent=1) + "\n")
                written += 1
        print(f"{name}: {written} records written to {folder.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
