"""Three outputs per run, as detectron2 does: a console line with ETA (or a progress bar on a
terminal), one JSON object per line in ``metrics.jsonl``, and TensorBoard scalars.
Only rank 0 writes; other ranks get a writer that does nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


class EventWriter:
    def __init__(
        self,
        run_dir: Path,
        max_iter: int,
        start_iter: int = 0,
        tensorboard: bool = True,
        enabled: bool = True,
        progress_bar: bool | None = None,
        resumed: bool = False,
    ) -> None:
        """``resumed``: TensorBoard hides what the stopped run logged after ``start_iter``
        (its metrics.jsonl lines are dropped by ``start_run_dir``), so no step shows twice."""
        self.enabled = enabled
        self.max_iter = max_iter
        self._last = (time.perf_counter(), start_iter)
        self._tb = self._bar = None
        if not enabled:
            return
        self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a")  # noqa: SIM115 (kept open)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = start_iter + 1 if resumed else None  # steps are iterations done
            self._tb = SummaryWriter(log_dir=str(run_dir), purge_step=purge)
        if progress_bar if progress_bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=max_iter, initial=start_iter, unit="it", dynamic_ncols=True)

    def step(self) -> None:
        """One iteration done (moves the progress bar)."""
        if self._bar is not None:
            self._bar.update(1)

    def training(
        self,
        iteration: int,
        epoch: float,
        lr: float,
        losses: dict[str, float],
        remaining: int | None = None,
    ) -> None:
        """Scalars after ``iteration`` (0-based) finished; also the console line with ETA.

        ``losses`` holds ``loss``, the ``loss_*`` terms, and any other per-iteration scalar
        (the sampling statistics); only the losses go to the console line."""
        if not self.enabled:
            return
        now = time.perf_counter()
        then, then_iter = self._last
        seconds_per_iter = (now - then) / max(1, iteration + 1 - then_iter)
        self._last = (now, iteration + 1)
        record = {"iter": iteration + 1, "epoch": round(epoch, 4), "lr": lr, **losses}
        record["time_per_iter"] = round(seconds_per_iter, 4)
        self._write(record)
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("iter", "epoch"):
                    self._tb.add_scalar(f"train/{key}", value, iteration + 1)
        # ``remaining``: the steps left where they are measured, not planned (AdaScale).
        left = self.max_iter - iteration - 1 if remaining is None else remaining
        eta = seconds_per_iter * left
        terms = " ".join(f"{k} {v:.3f}" for k, v in losses.items() if k.startswith("loss_"))
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{lr:.4g}")
        else:
            log.info(
                "iter %d/%d epoch %.2f lr %.4g loss %.3f (%s) %.3f s/it eta %s",
                iteration + 1, self.max_iter, epoch, lr, losses["loss"], terms,
                seconds_per_iter, _duration(eta),
            )  # fmt: skip

    def evaluation(self, iteration: int, epoch: float, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"iter": iteration, "epoch": round(epoch, 4), "eval": metrics})
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(f"eval/{key}", value, iteration)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()

    def _write(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
