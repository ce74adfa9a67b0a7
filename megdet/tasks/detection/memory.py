"""How much memory a training step needs per image, with and without activation checkpointing.

Measured, not guessed: one training forward of the configured detector on the CPU at the
configured image size, with ``torch.autograd.graph.saved_tensors_hooks`` recording every tensor
autograd keeps for backward (counted once per storage) and which checkpointable region (ResNet
stage, residual block, FPN) was running when it was saved. With regions checkpointed, the
forward keeps each region's input instead of what was saved inside it, and backward recomputes
one region at a time, when everything saved after that region has been freed already:

    peak(mode) = max(saved outside regions + region inputs,                   end of forward
                     max over regions r of (saved outside before r + inputs of regions up to r
                                            + saved inside r))              recomputing r

Two forwards (1 and 2 images) split that into a part per image and a fixed part. Weights,
gradients, SGD momentum and DDP's gradient buckets add 4 x the parameter bytes.
"""

from __future__ import annotations

import torch

from megdet.config import CHECKPOINTING, Config
from megdet.nn import training_norm
from megdet.plan import MemoryEstimate
from megdet.tasks.detection.backbone import checkpoint_regions
from megdet.tasks.detection.model import build_detector

MB = 2**20


def estimate_memory(cfg: Config, num_classes: int) -> MemoryEstimate:
    """Measure the configured detector; every mode of ``train.checkpointing`` at once."""
    torch.manual_seed(0)
    norm = training_norm(cfg.model.norm)  # as training builds it, one process
    model = build_detector(cfg.model, num_classes, norm).train()
    height = cfg.model.min_size
    width = min(cfg.model.max_size, round(height * 4 / 3))  # a typical 4:3 COCO image
    per_count = {n: _activation_bytes(model, n, height, width) for n in (1, 2)}
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    per_image = {m: (per_count[2][m] - per_count[1][m]) / MB for m in CHECKPOINTING}
    fixed = {m: max(0.0, per_count[1][m] / MB - per_image[m]) for m in CHECKPOINTING}
    return MemoryEstimate((height, width), 4 * params / MB, fixed, per_image)


def _activation_bytes(model, images: int, height: int, width: int):
    """Bytes autograd keeps for backward in one training forward, per checkpointing mode."""
    regions = checkpoint_regions(model.backbone)
    running: dict[str, str | None] = dict.fromkeys(regions)  # kind -> region running now
    inputs: dict[str, dict[str, dict[int, int]]] = {kind: {} for kind in regions}
    starts: dict[str, dict[str, int]] = {kind: {} for kind in regions}  # region -> first save
    # storage -> (bytes, the region of each kind running when it was saved, order of saving)
    saved: dict[int, tuple[int, dict[str, str | None], int]] = {}
    weights = {_key(p) for p in model.parameters()}  # saved too, but not activations

    def enter(kind, name):
        def hook(module, args):
            running[kind] = name
            starts[kind][name] = len(saved)
            tensors = [a for a in args if torch.is_tensor(a)]
            tensors += [v for a in args if isinstance(a, dict) for v in a.values()]
            inputs[kind][name] = {_key(t): _nbytes(t) for t in tensors}

        return hook

    def leave(kind):
        def hook(module, args, output):
            running[kind] = None

        return hook

    def pack(tensor):
        key = _key(tensor)
        if key not in saved and key not in weights:
            saved[key] = (_nbytes(tensor), dict(running), len(saved))
        return tensor

    handles = []
    for kind, modules in regions.items():
        for name, module in modules:
            handles.append(module.register_forward_pre_hook(enter(kind, name)))
            handles.append(module.register_forward_hook(leave(kind)))
    generator = torch.Generator().manual_seed(0)
    batch = [torch.rand(3, height, width, generator=generator) for _ in range(images)]
    box = torch.tensor([[0.1 * width, 0.1 * height, 0.6 * width, 0.7 * height]])
    targets = [{"boxes": box, "labels": torch.tensor([1])} for _ in range(images)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(batch, targets)
    finally:
        for handle in handles:
            handle.remove()

    result = {}
    for mode in CHECKPOINTING:
        kinds = sorted(set(mode.split("+")) - {"none"})
        outside: dict[int, tuple[int, int]] = {}  # storage -> (order, bytes)
        inside: dict[str, int] = {}
        start: dict[str, int] = {}
        region_inputs: dict[str, dict[int, int]] = {}
        for kind in kinds:
            start.update(starts[kind])
            region_inputs.update(inputs[kind])
        for key, (size, where, order) in saved.items():
            region = next((where[k] for k in kinds if where[k] is not None), None)
            if region is None:
                outside[key] = (order, size)
            else:
                inside[region] = inside.get(region, 0) + size

        peak = _live(outside, region_inputs, None, region_inputs)
        for name, size in inside.items():
            earlier = [r for r in region_inputs if start[r] <= start[name]]
            peak = max(peak, _live(outside, region_inputs, start[name], earlier) + size)
        result[mode] = peak
    return result


def _live(outside: dict, region_inputs: dict, until: int | None, regions) -> int:
    """Bytes of the outside tensors saved before ``until`` (all if None) and of the inputs of
    ``regions``, each storage counted once."""
    merged = {k: size for k, (order, size) in outside.items() if until is None or order < until}
    for name in regions:
        merged.update(region_inputs[name])
    return sum(merged.values())


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()
