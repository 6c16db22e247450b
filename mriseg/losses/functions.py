"""Segmentation losses, for sigmoid tasks (binary, BraTS regions) and softmax tasks (multi-class).

Every loss takes raw logits and a target and returns a scalar:

- sigmoid tasks: logits ``(N, C, *spatial)``, target float ``(N, C, *spatial)`` in {0, 1};
- softmax tasks: logits ``(N, K, *spatial)``, target long ``(N, *spatial)`` of class
  indices, where ``ignore_index`` marks voxels that count for nothing.

Sigmoid targets mark ignored voxels with -1 (:data:`mriseg.labels.IGNORED`), as
:meth:`mriseg.labels.Task.targets` makes them.

Names (``--loss``): ``dice`` (soft Dice, smooth 1, as in the reference LGG program),
``bce``, ``bce-dice`` (``w * BCE + (1 - w) * Dice``, the seeds' "calc loss"), ``soft-iou``,
``ce``, ``dice-ce``, ``focal`` (Lin et al. 2017) and ``border-ce``, the U-Net paper's
cross-entropy weighted by ``w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))``
(Ronneberger et al. 2015, eq. 2), whose maps :func:`border_weight_map` computes once per
label volume. For sigmoid tasks the cross-entropy term of ``ce``/``dice-ce``/``border-ce``
is binary cross-entropy. Deep-supervision models return several heads;
:func:`deep_supervision_loss` weighs the loss over them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from mriseg.errors import MrisegError

SMOOTH = 1.0

LossFunction = Callable[..., Tensor]


# --- building blocks ---------------------------------------------------------

def _probabilities_and_onehot(logits: Tensor, target: Tensor, activation: str,
                              ignore_index: int | None) -> tuple[Tensor, Tensor]:
    """Probabilities and a matching float target, both ``(N, C, *spatial)``, with ignored
    voxels zeroed in both. Softmax tasks drop the background channel (class 0)."""
    if activation == "sigmoid":
        valid = (target >= 0).to(logits.dtype)  # IGNORED (-1) voxels count for nothing
        return torch.sigmoid(logits) * valid, target.clamp_min(0).to(logits.dtype) * valid
    probabilities = torch.softmax(logits, dim=1)
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    onehot = F.one_hot(torch.where(valid, target, 0), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    mask = valid.unsqueeze(1).to(logits.dtype)
    return (probabilities * mask)[:, 1:], (onehot * mask)[:, 1:]


def _sums(logits: Tensor, target: Tensor, activation: str, ignore_index: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel intersection, prediction and target sums over batch and space."""
    probabilities, onehot = _probabilities_and_onehot(logits.float(), target, activation, ignore_index)
    reduce_dims = [0, *range(2, probabilities.ndim)]
    return ((probabilities * onehot).sum(reduce_dims), probabilities.sum(reduce_dims), onehot.sum(reduce_dims))


def dice_loss(logits: Tensor, target: Tensor, activation: str = "sigmoid",
              ignore_index: int | None = None) -> Tensor:
    """1 - soft Dice ``(2|P∩Y| + 1) / (|P| + |Y| + 1)``, over the whole batch, averaged over channels."""
    intersection, predicted, truth = _sums(logits, target, activation, ignore_index)
    return 1 - ((2 * intersection + SMOOTH) / (predicted + truth + SMOOTH)).mean()


def soft_iou_loss(logits: Tensor, target: Tensor, activation: str = "sigmoid",
                  ignore_index: int | None = None) -> Tensor:
    """1 - soft Jaccard ``(|P∩Y| + 1) / (|P| + |Y| - |P∩Y| + 1)``, averaged over channels."""
    intersection, predicted, truth = _sums(logits, target, activation, ignore_index)
    return 1 - ((intersection + SMOOTH) / (predicted + truth - intersection + SMOOTH)).mean()


def _pixel_cross_entropy(logits: Tensor, target: Tensor, activation: str,
                         ignore_index: int | None) -> tuple[Tensor, Tensor]:
    """Cross-entropy per voxel and a validity mask, both ``(N, *spatial)``; sigmoid channels are averaged."""
    logits = logits.float()
    if activation == "sigmoid":
        valid = target >= 0  # IGNORED (-1) voxels count for nothing
        per_element = F.binary_cross_entropy_with_logits(logits, target.clamp_min(0).to(logits.dtype),
                                                         reduction="none")
        return (per_element * valid).mean(1), valid.any(1).to(logits.dtype)
    index = -100 if ignore_index is None else ignore_index
    per_voxel = F.cross_entropy(logits, target.long(), ignore_index=index, reduction="none")
    return per_voxel, (target != index).to(per_voxel.dtype)


def cross_entropy_loss(logits: Tensor, target: Tensor, activation: str = "softmax",
                       ignore_index: int | None = None, pixel_weights: Tensor | None = None) -> Tensor:
    """Mean cross-entropy over the voxels that count, optionally weighted per voxel."""
    per_voxel, valid = _pixel_cross_entropy(logits, target, activation, ignore_index)
    weights = valid if pixel_weights is None else valid * pixel_weights.to(per_voxel.dtype)
    return (per_voxel * weights).sum() / valid.sum().clamp_min(1)


def focal_loss(logits: Tensor, target: Tensor, activation: str = "sigmoid",
               ignore_index: int | None = None, gamma: float = 2.0) -> Tensor:
    """Mean of ``-(1 - p_t)^gamma * log(p_t)`` over the voxels that count."""
    logits = logits.float()
    if activation == "sigmoid":
        valid = (target >= 0).to(logits.dtype)
        log_pt = -F.binary_cross_entropy_with_logits(logits, target.clamp_min(0).to(logits.dtype), reduction="none")
        return ((-(1 - log_pt.exp()) ** gamma * log_pt) * valid).sum() / valid.sum().clamp_min(1)
    per_voxel, valid = _pixel_cross_entropy(logits, target, activation, ignore_index)
    log_pt = -per_voxel
    return ((-(1 - log_pt.exp()) ** gamma * log_pt) * valid).sum() / valid.sum().clamp_min(1)


# --- U-Net border weights ----------------------------------------------------

def border_weight_map(label: np.ndarray, w0: float = 10.0, sigma: float = 5.0,
                      ignore_index: int | None = None) -> np.ndarray:
    """The U-Net paper's weight map for one label image or volume (float32, same shape).

    ``w_c`` balances class frequencies (each present class gets ``voxels / (classes * count)``);
    the border term ``w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` is added on background voxels,
    where ``d1``/``d2`` are the distances to the nearest and second-nearest foreground
    component. With fewer than two components there is no gap to emphasise, so no border term.
    """
    valid = np.ones(label.shape, dtype=bool) if ignore_index is None else label != ignore_index
    classes, counts = np.unique(label[valid], return_counts=True)
    weights = np.zeros(label.shape, dtype=np.float32)
    for value, count in zip(classes, counts):
        weights[label == value] = valid.sum() / (len(classes) * count)
    components, count = ndimage.label((label > 0) & valid)
    if count >= 2:
        distances = np.stack([ndimage.distance_transform_edt(components != index)
                              for index in range(1, count + 1)])
        distances.sort(axis=0)
        border = w0 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * sigma ** 2))
        background = (label == 0) & valid
        weights[background] += border[background].astype(np.float32)
    return weights


# --- the registry ------------------------------------------------------------

def build_loss(name: str, activation: str, ignore_index: int | None = None,
               bce_weight: float = 0.5, focal_gamma: float = 2.0) -> LossFunction:
    """The loss called ``name`` (a key of :data:`mriseg.losses.LOSSES`) as
    ``loss(logits, target, pixel_weights=None) -> scalar``.

    ``activation`` is ``sigmoid`` (binary and region tasks) or ``softmax`` (multi-class).
    ``pixel_weights`` is used by ``border-ce`` only (maps from :func:`border_weight_map`).
    """
    from mriseg.losses import LOSSES

    if name not in LOSSES:
        raise MrisegError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    spec = LOSSES[name]
    if spec.sigmoid_only and activation != "sigmoid":
        raise MrisegError(f"loss {name!r} needs a sigmoid task (binary or regions); use 'ce' for multi-class")
    if not 0.0 <= bce_weight <= 1.0:
        raise MrisegError(f"--bce-weight must be in [0, 1], got {bce_weight}")
    # "bce" / "dice" weights are --bce-weight and its complement, fixed when the loss is built
    shares = {"bce": bce_weight, "dice": 1 - bce_weight}
    terms = [(shares.get(weight, weight), globals()[function]) for weight, function in spec.terms]
    common = {"activation": activation, "ignore_index": ignore_index}
    if "gamma" in spec.keywords:
        common["gamma"] = focal_gamma

    def loss(logits: Tensor, target: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
        extra = {}
        if "pixel_weights" in spec.keywords:
            if pixel_weights is None:
                raise ValueError(f"{name} needs pixel_weights (see border_weight_map)")
            extra["pixel_weights"] = pixel_weights
        return sum(weight * function(logits, target, **common, **extra) for weight, function in terms)

    loss.__name__ = f"{name}_loss"
    return loss


def deep_supervision_loss(loss: LossFunction, outputs: Tensor | Sequence[Tensor], target: Tensor,
                          pixel_weights: Tensor | None = None) -> Tensor:
    """``loss`` on one output, or the weighted sum over deep-supervision heads.

    Heads that all have the target's resolution (U-Net++'s X0,1..X0,4) are averaged, as in
    Zhou et al. 2018. Heads of falling resolution (0 = full) get weights ``2^-i``, normalised
    to sum to 1 (as in nnU-Net), and are upsampled to the target's size.
    """
    if isinstance(outputs, Tensor):
        return loss(outputs, target, pixel_weights)
    same_size = all(head.shape[2:] == outputs[0].shape[2:] for head in outputs)
    raw = torch.tensor([1.0 if same_size else 0.5 ** index for index in range(len(outputs))])
    weights = raw / raw.sum()
    total = outputs[0].new_zeros((), dtype=torch.float32)
    size = outputs[0].shape[2:]
    for weight, head in zip(weights.tolist(), outputs):
        if head.shape[2:] != size:
            head = F.interpolate(head, size=size, mode="bilinear" if head.ndim == 4 else "trilinear",
                                 align_corners=False)
        total = total + weight * loss(head, target, pixel_weights)
    return total
