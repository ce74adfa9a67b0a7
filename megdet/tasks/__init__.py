"""Tasks supply model, data and evaluation (``megdet.engine.task.Task``); the engine knows
nothing about detection or classification. ``build_task`` picks one by the config's ``task``."""

from __future__ import annotations

from megdet.config import Config


def build_task(cfg: Config):
    """The task named by ``cfg.task``; imported here only, so that commands that need no
    task (``megdet data``, ``megdet report``) do not import torchvision's models."""
    if cfg.task == "detection":
        from megdet.tasks.detection.task import DetectionTask

        return DetectionTask(cfg)
    if cfg.task == "classification":
        from megdet.tasks.classification.task import ClassificationTask

        return ClassificationTask(cfg)
    raise ValueError(f"unknown task {cfg.task!r}")  # config validation lists the choices
