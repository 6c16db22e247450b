"""Validation: every validation case predicted whole by the one inference engine and scored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mriseg.devices import Precision
from mriseg.errors import BadInputError, MrisegError
from mriseg.inference import InferenceSettings, predict_logits
from mriseg.labels import Task, task_for_labels
from mriseg.metrics import dice
from mriseg.train.options import TrainOptions
from mriseg.train.sampling import Volume


def resolve_task(label_info: dict[str, Any], requested: str, ignore_index: int, source: Path,
                 label_map: dict[int, int] | None = None) -> Task:
    """The task the checkpoint stores (see :func:`mriseg.labels.task_for_labels`); the ignore label
    counts only when the cache holds it."""
    values = [int(v) for v in label_info.get("values", [])]
    declared = label_info.get("ignore")  # nnU-Net dataset.json's "ignore" label
    ignore = int(declared) if declared is not None else ignore_index if ignore_index in values else None
    try:
        return task_for_labels(label_info, requested, ignore, label_map)
    except MrisegError as error:
        raise BadInputError(source, str(error)) from None


@torch.no_grad()
def validate(model: nn.Module, volumes: list[Volume], task: Task, loss_fn, options: TrainOptions,
             precision: Precision) -> list[dict[str, Any]]:
    """One record per volume: loss and per-volume Dice of each scored region, and their mean.

    The volume is predicted by the one inference engine (:func:`mriseg.inference.predict_logits`,
    the same call ``predict`` and ``evaluate --model`` make) and decoded by the task, so a
    checkpoint's validation Dice is what scoring it on the cached grid without flips (``--no-tta``)
    gives; validation skips flip TTA to keep each check a single pass.
    """
    settings = InferenceSettings(patch_size=options.patch_size if options.spatial_dims == 3 else None,
                                 batch_size=options.batch_size, tta=False, amp=precision.dtype is not None,
                                 channels_last=precision.channels_last)
    records = []
    for volume in volumes:
        image, label = np.asarray(volume.image, dtype=np.float32), np.asarray(volume.label)
        logits = predict_logits(model, image, options.spatial_dims, volume.slice_axis, settings)
        targets = task.targets(torch.from_numpy(label.astype(np.int64))[None])
        weights = None
        if volume.border_weights is not None:
            weights = torch.from_numpy(np.asarray(volume.border_weights, dtype=np.float32))[None]
        loss = loss_fn(logits[None], targets, weights).item()
        predicted = task.decode(task.probabilities(logits[None])[0].numpy())
        valid = label != task.ignore_label if task.ignore_label is not None else None
        scores = [dice(p, t, valid) for p, t in zip(task.scored_masks(predicted), task.scored_masks(label))]
        records.append({"case_id": volume.case_id, "loss": loss, "dice": float(np.mean(scores)), "channels": scores})
    return records
