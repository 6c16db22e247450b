"""Segmentation losses by name: the table of ``--loss`` choices (no torch needed to read it) and, in
``functions.py``, the losses themselves for sigmoid (binary, regions) and softmax (multi-class) tasks.

Adding a loss: write its function in ``functions.py`` (``fn(logits, target, activation, ignore_index)``)
and add one row to :data:`LOSSES`; the ``--loss`` help and the docs list come from the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LOSS_FUNCTIONS = ("build_loss", "border_weight_map", "deep_supervision_loss", "dice_loss", "soft_iou_loss",
                  "cross_entropy_loss", "focal_loss")


@dataclass(frozen=True)
class LossSpec:
    """One ``--loss``: a weighted sum of functions of ``functions.py``, and its help.

    A weight is a number, or ``"bce"`` / ``"dice"`` for ``--bce-weight`` and one minus it.
    """

    terms: tuple[tuple[float | str, str], ...]
    help: str
    sigmoid_only: bool = False
    keywords: tuple[str, ...] = ()   # loss options its functions take: "gamma", "pixel_weights"


LOSSES: dict[str, LossSpec] = {
    "dice": LossSpec(((1.0, "dice_loss"),), "soft Dice (smooth 1)"),
    "bce": LossSpec(((1.0, "cross_entropy_loss"),), "binary cross-entropy", sigmoid_only=True),
    "bce-dice": LossSpec((("bce", "cross_entropy_loss"), ("dice", "dice_loss")),
                         "w * BCE + (1 - w) * Dice, w = --bce-weight"),
    "soft-iou": LossSpec(((1.0, "soft_iou_loss"),), "soft Jaccard"),
    "ce": LossSpec(((1.0, "cross_entropy_loss"),), "cross-entropy"),
    "dice-ce": LossSpec(((1.0, "cross_entropy_loss"), (1.0, "dice_loss")), "CE + Dice (binary CE per region for region tasks)"),
    "focal": LossSpec(((1.0, "focal_loss"),), "focal loss (Lin et al. 2017)", keywords=("gamma",)),
    "border-ce": LossSpec(((1.0, "cross_entropy_loss"),), "U-Net border-weighted CE (Ronneberger et al. 2015)",
                          keywords=("pixel_weights",)),
}
"""Every ``--loss`` by name."""
LOSS_NAMES = tuple(LOSSES)
LOSS_HELP = "; ".join(f"{name}: {spec.help}" for name, spec in LOSSES.items())


def __getattr__(name: str) -> Any:
    """The loss functions, imported (with torch) only when first asked for."""
    if name in LOSS_FUNCTIONS:
        from mriseg.losses import functions

        return getattr(functions, name)
    raise AttributeError(f"module 'mriseg.losses' has no attribute {name!r}")
