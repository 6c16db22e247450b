"""The one label model: label schemes, regions, the ignore label and what a network's outputs mean.

Everything that turns label values into training targets, network outputs into label maps, or
label maps into scored regions asks this module; no other module defines a region.

* A **label scheme** names what the integer values of a dataset mean (:data:`LABEL_NAMES`).
* A **region** is a named set of label values scored (or trained) as one binary mask
  (:class:`Region`, :data:`REGION_SCHEMES`).
* A :class:`Task` is what a checkpoint's output channels mean: ``binary`` (one sigmoid channel),
  ``regions`` (one sigmoid channel per region, BraTS-style nested regions) or ``multiclass``
  (softmax, channel i is label value ``labels[i]``), plus the ignore label, the threshold and the
  label map preprocessing applied (so truth read from the source is mapped the same way before
  it is compared with a prediction).

Targets use :data:`IGNORED` (-1) for voxels that count for nothing in the loss and the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mriseg.errors import MrisegError

TASK_KINDS = ("binary", "multiclass", "regions")
IGNORED = -1
"""Target value of an ignored voxel, for sigmoid (float) and softmax (class index) targets alike."""

LABEL_NAMES: dict[str, dict[int, str]] = {
    "binary": {0: "background", 1: "tumour"},
    "brats2013": {0: "background", 1: "necrosis", 2: "oedema", 3: "non-enhancing tumour",
                  4: "enhancing tumour"},
    "brats": {0: "background", 1: "necrotic and non-enhancing tumour core", 2: "oedema",
              4: "enhancing tumour"},
    "brats2023": {0: "background", 1: "necrotic tumour core", 2: "oedema", 3: "enhancing tumour"},
    "msd": {0: "background", 1: "oedema", 2: "non-enhancing tumour", 3: "enhancing tumour"},
}
"""What the values of each known label scheme mean."""


@dataclass(frozen=True)
class Region:
    """A named set of label values scored as one binary mask; ``labels=None`` means any non-zero."""

    name: str
    labels: tuple[int, ...] | None

    def mask(self, label_volume: np.ndarray) -> np.ndarray:
        if self.labels is None:
            return label_volume != 0
        return np.isin(label_volume, self.labels)


REGION_SCHEMES: dict[str, tuple[Region, ...]] = {
    # BraTS 2013-2021 (Menze et al. 2015): 1 necrosis / non-enhancing core, 2 oedema, 3 non-enhancing
    # tumour (2013-2016 only; merged into 1 from 2017), 4 enhancing. Listing 3 is harmless where absent.
    "brats": (Region("WT", (1, 2, 3, 4)), Region("TC", (1, 3, 4)), Region("ET", (4,))),
    # BraTS 2023: 1 necrotic core, 2 oedema, 3 enhancing tumour.
    "brats2023": (Region("WT", (1, 2, 3)), Region("TC", (1, 3)), Region("ET", (3,))),
    # Medical Segmentation Decathlon Task01: 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour.
    "msd": (Region("WT", (1, 2, 3)), Region("TC", (2, 3)), Region("ET", (3,))),
    "binary": (Region("tumour", None),),
}
# Label schemes whose regions are another scheme's.
REGION_SCHEME_OF = {"brats2013": "brats"}


def label_scheme(values: Sequence[int] | set[int], naming: str = "") -> str:
    """Name the label convention that the values found fit, without guessing beyond them.

    ``binary`` for {0, 1}; from 2023-named files ``brats2023`` for values within {0, 1, 2, 3}, else
    ``multiclass``; ``brats2013`` when 3 and 4 both occur; ``brats`` for values within {0, 1, 2, 4}
    with a 4; ``multiclass`` otherwise.
    """
    found = set(int(v) for v in values)
    if found <= {0, 1}:
        return "binary"
    if naming == "brats2023":  # 3 is enhancing tumour; a 4 (BraTS 2024's resection cavity) is not 2013's
        return "brats2023" if found <= {0, 1, 2, 3} else "multiclass"
    if {3, 4} <= found and found <= {0, 1, 2, 3, 4}:
        return "brats2013"
    if 4 in found and found <= {0, 1, 2, 4}:
        return "brats"
    if naming == "brats2023" and found <= {0, 1, 2, 3}:
        return "brats2023"
    return "multiclass"


def _is_enhancing(name: str) -> bool:
    words = name.lower().replace("-", " ").replace("_", " ")
    return "enhanc" in words and "non enhanc" not in words and "nonenhanc" not in words


def _is_oedema(name: str) -> bool:
    return any(word in name.lower() for word in ("oedema", "edema"))


def regions_from_label_names(names: Sequence[tuple[int, str]]) -> tuple[Region, ...] | None:
    """WT / TC / ET of a dataset whose labels are *named* (nnU-Net / MSD dataset.json), from the names
    rather than from one convention's numbers: WT every tumour label, TC all but oedema, ET the
    enhancing label(s) ("non-enhancing" is not enhancing). None unless exactly one label is oedema
    and at least one is enhancing tumour. MSD Task01, BraTS 2013-2021 and BraTS 2023 (and a BraTS
    dataset written by ``mriseg convert``) all come out right whatever their numbering.
    """
    tumour = tuple(sorted(int(value) for value, _ in names if value))
    oedema = [int(value) for value, name in names if value and _is_oedema(name)]
    enhancing = tuple(sorted(int(value) for value, name in names if value and _is_enhancing(name)))
    if len(oedema) != 1 or not enhancing or oedema[0] in enhancing:
        return None
    core = tuple(value for value in tumour if value != oedema[0])
    return Region("WT", tumour), Region("TC", core), Region("ET", enhancing)


def scheme_of_regions(regions: tuple[Region, ...]) -> str | tuple[Region, ...]:
    """The name of a known region scheme with exactly these regions, else the regions themselves."""
    for name, known in REGION_SCHEMES.items():
        if known == regions:
            return name
    return regions


def regions_of_scheme(scheme: str) -> tuple[Region, ...] | None:
    """The regions a label scheme is trained and scored on, or None when it has none."""
    return REGION_SCHEMES.get(REGION_SCHEME_OF.get(scheme, scheme))


def label_names_for(values: Sequence[int], scheme: str, known: Mapping[int, str] | None = None) -> dict[int, str]:
    """Names for the label values: from dataset.json when given, else the scheme's, else ``class<v>``."""
    table = known or LABEL_NAMES.get(scheme, {})
    return {int(v): table.get(int(v), f"class{v}") for v in values}


def names_after_label_map(names: Mapping[int, str], label_map: Mapping[int, int]) -> dict[int, str]:
    """Label names carried through a label map: a value mapped elsewhere takes its name along (BraTS
    2021's 4 "enhancing tumour" under ``4:3`` names 3); values merged into one join their names."""
    mapped: dict[int, str] = {}
    for value, name in sorted(names.items()):
        target = int(label_map.get(int(value), int(value)))
        if target == 0 and int(value) != 0:
            continue  # mapped to background
        mapped[target] = name if target not in mapped or target == 0 else f"{mapped[target]} and {name}"
    return mapped


def remap_labels(label: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Replace label values by a lookup table; values not in ``mapping`` are kept."""
    if not mapping:
        return label
    table = np.arange(max(256, int(label.max(initial=0)) + 1), dtype=label.dtype if label.dtype.kind in "iu"
                      else np.int64)
    for source, target in mapping.items():
        if source < len(table):
            table[source] = target
    return table[label]


@dataclass(frozen=True)
class Task:
    """What a network's output channels mean and how outputs become labels (stored in checkpoints).

    Attributes:
        kind: ``binary`` | ``regions`` | ``multiclass``.
        labels: label values of the task (multiclass: channel i is ``labels[i]``; 0 first).
        regions: ``regions`` kind: the regions, one sigmoid channel each, in channel order.
        channel_names: a name per output channel (legends, logs).
        threshold: probability threshold of sigmoid channels.
        ignore_label: label value that counts for nothing (loss and metrics), or None.
        label_map: the preprocessing label map (source value -> trained value); truth read
            from source files is mapped with it before it is compared with a prediction.
    """

    kind: str
    labels: tuple[int, ...] = (0, 1)
    regions: tuple[Region, ...] = ()
    channel_names: tuple[str, ...] = ("tumour",)
    threshold: float = 0.5
    ignore_label: int | None = None
    label_map: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise MrisegError(f"task kind {self.kind!r} is not one of {', '.join(TASK_KINDS)}")
        if self.kind == "regions" and not self.regions:
            raise MrisegError("a regions task needs at least one region")
        if self.kind == "multiclass" and (len(self.labels) < 2 or self.labels[0] != 0):
            raise MrisegError(f"a multiclass task needs background 0 first and another class, got {self.labels}")
        if not 0.0 < self.threshold < 1.0:
            raise MrisegError(f"--threshold must lie in (0, 1), got {self.threshold}")
        if self.kind == "multiclass" and len(self.channel_names) != len(self.labels):
            raise MrisegError(f"a multiclass task needs a name per label, got {self.channel_names} for {self.labels}")

    # --- what the channels are ---------------------------------------------------------

    @property
    def activation(self) -> str:
        return "softmax" if self.kind == "multiclass" else "sigmoid"

    @property
    def out_channels(self) -> int:
        return {"binary": 1, "regions": len(self.regions)}.get(self.kind, len(self.labels))

    def scored_regions(self) -> tuple[Region, ...]:
        """The regions a prediction of this task is scored on (labels on both sides)."""
        if self.kind == "regions":
            return self.regions
        if self.kind == "binary":
            return (Region(self.channel_names[0] if self.channel_names else "tumour", None),)
        return tuple(Region(name, (value,)) for value, name in zip(self.labels[1:], self.channel_names[1:]))

    def truth_labels(self, source_labels: np.ndarray) -> np.ndarray:
        """Source-file labels as the task sees them (the preprocessing label map applied)."""
        return remap_labels(source_labels, self.label_map)

    # --- training targets ------------------------------------------------------------------

    def targets(self, labels: Tensor) -> Tensor:
        """Label values ``(N, *S)`` -> loss targets: float ``(N, C, *S)`` in {0, 1} for sigmoid tasks,
        long class indices ``(N, *S)`` for softmax; :data:`IGNORED` where the ignore label is."""
        labels = labels.long()
        ignored = labels == self.ignore_label if self.ignore_label is not None else None
        if self.kind == "multiclass":
            lookup = torch.full((max(256, int(labels.max()) + 1),), IGNORED, dtype=torch.long, device=labels.device)
            lookup[torch.tensor(self.labels, device=labels.device)] = torch.arange(len(self.labels),
                                                                                  device=labels.device)
            return lookup[labels]
        if self.kind == "binary":
            target = (labels != 0).unsqueeze(1).float()
        else:
            target = torch.stack([torch.isin(labels, torch.tensor(region.labels, device=labels.device))
                                  for region in self.regions], dim=1).float()
        if ignored is not None:
            target = torch.where(ignored.unsqueeze(1), torch.full_like(target, IGNORED), target)
        return target

    # --- outputs to labels ---------------------------------------------------------------

    def probabilities(self, logits: Tensor) -> Tensor:
        """Logits ``(N, K, *S)`` -> probabilities of the task's activation."""
        logits = logits.float()
        return torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=1)

    def decode(self, probabilities: np.ndarray) -> np.ndarray:
        """Per-channel probabilities ``(K, *S)`` -> a label map ``(*S)`` uint8.

        binary thresholds the channel (label 1); multiclass takes the argmax and writes
        ``labels[i]``; regions thresholds each channel and paints the regions back to labels.
        """
        if self.kind == "binary":
            return (probabilities[0] >= self.threshold).astype(np.uint8)
        if self.kind == "multiclass":
            return np.asarray(self.labels, dtype=np.uint8)[np.argmax(probabilities, axis=0)]
        return regions_to_labels(probabilities >= self.threshold, [r.labels or (1,) for r in self.regions])

    def scored_masks(self, labels: np.ndarray) -> list[np.ndarray]:
        """One boolean mask per scored region of a label map."""
        return [region.mask(labels) for region in self.scored_regions()]

    # --- storage -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``task`` record (plain types, loads with ``weights_only=True``)."""
        data: dict[str, Any] = {"kind": self.kind, "activation": self.activation, "out_channels": self.out_channels,
                                "labels": list(self.labels), "channel_names": list(self.channel_names),
                                "threshold": self.threshold, "ignore_index": self.ignore_label,
                                "label_map": {str(k): int(v) for k, v in sorted(self.label_map.items())}}
        if self.kind == "binary":
            data["foreground_label"] = 1
        if self.kind == "regions":
            data["regions"] = {region.name: list(region.labels or ()) for region in self.regions}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], label_map: Mapping[int, int] | None = None) -> "Task":
        """Read a checkpoint's ``task`` record; raises :class:`MrisegError` naming a missing or bad field."""
        if not isinstance(data, Mapping):
            raise MrisegError(f"task record is a {type(data).__name__}, not a mapping")
        try:
            kind = str(data["kind"])
            stored = data.get("regions") or {}
            names = tuple(str(n) for n in data.get("channel_names") or ())
            if isinstance(stored, (list, tuple)):  # a list of label lists, named by channel_names
                stored = {(names[i] if i < len(names) else f"region{i}"): values for i, values in enumerate(stored)}
            regions = tuple(Region(str(name), tuple(int(v) for v in values)) for name, values in stored.items())
            labels = tuple(int(v) for v in data.get("labels") or ((0, 1) if kind == "binary" else ()))
            if kind == "multiclass" and len(names) != len(labels):
                names = tuple(f"class{v}" for v in labels)
            ignore = data.get("ignore_index")
            stored_map = {int(k): int(v) for k, v in (data.get("label_map") or {}).items()}
            task = cls(kind=kind, labels=labels, regions=regions, channel_names=names or ("tumour",),
                       threshold=float(data.get("threshold", 0.5)),
                       ignore_label=None if ignore is None else int(ignore),
                       label_map=dict(label_map if label_map is not None else stored_map))
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise MrisegError(f"task record is malformed ({type(error).__name__}: {error})") from None
        if "out_channels" in data and int(data["out_channels"]) != task.out_channels:
            raise MrisegError(f"task record says {data['out_channels']} output channels, its {kind} "
                              f"definition has {task.out_channels}")
        return task


def painted_values(regions: Sequence[Sequence[int]]) -> list[int]:
    """The label value :func:`regions_to_labels` paints for each region, largest region first
    (nnU-Net's ``regions_class_order`` for the same regions)."""
    order = sorted(range(len(regions)), key=lambda r: -len(regions[r]))
    values = []
    for position, region in enumerate(order):
        smaller = set().union(*(set(regions[r]) for r in order[position + 1:]))
        values.append((sorted(set(regions[region]) - smaller) or sorted(regions[region]))[0])
    return values


def regions_to_labels(region_masks: np.ndarray, regions: Sequence[Sequence[int]]) -> np.ndarray:
    """Turn overlapping region masks back into one label map.

    BraTS models predict nested regions (whole tumour {1, 2, 4} ⊃ tumour core {1, 4} ⊃ enhancing
    {4}). Regions are painted from the largest to the smallest, each with the smallest label it
    holds that no smaller region holds, so the innermost region wins (2 where only WT, 1 where TC
    but not ET, 4 where ET).

    Args:
        region_masks: (R, *spatial) bool, one mask per region, in ``regions`` order.
        regions: the label values each region is made of.
    """
    labels = np.zeros(region_masks.shape[1:], dtype=np.uint8)
    order = sorted(range(len(regions)), key=lambda r: -len(regions[r]))
    for region, value in zip(order, painted_values(regions)):
        labels[region_masks[region]] = value
    return labels


def task_for_labels(label_info: Mapping[str, Any], requested: str = "auto", ignore_label: int | None = None,
                    label_map: Mapping[int, int] | None = None) -> Task:
    """The task to train for a cache's labels (``label_info``: ``values``, ``scheme``, ``names``).

    ``auto``: binary for {0, 1}, the scheme's regions for BraTS/MSD schemes, else multiclass.
    Raises :class:`MrisegError` when the labels do not fit the requested kind.
    """
    values = [int(v) for v in label_info.get("values", []) if ignore_label is None or int(v) != ignore_label]
    scheme = str(label_info.get("scheme", ""))
    names = {str(k): str(v) for k, v in (label_info.get("names") or {}).items()}
    kind = requested
    common = {"ignore_label": ignore_label, "label_map": dict(label_map or {})}
    declared = label_info.get("regions") or {}
    if declared and kind in ("auto", "regions"):  # nnU-Net region lists: sigmoid regions, scored as regions
        regions = tuple(Region(str(name), tuple(int(v) for v in labels)) for name, labels in declared.items())
        return Task("regions", tuple(values), regions=regions, channel_names=tuple(r.name for r in regions),
                    **common)
    if kind == "auto":
        kind = "binary" if set(values) <= {0, 1} else "regions" if regions_of_scheme(scheme) else "multiclass"
    if kind == "binary":
        if not set(values) <= {0, 1}:
            raise MrisegError(f"labels {values} do not fit --task binary (needs values 0 and 1); "
                              "use --task multiclass or regions, or remap with preprocess --label-map")
        return Task("binary", (0, 1), channel_names=(names.get("1", "tumour"),), **common)
    if kind == "regions":
        regions = regions_of_scheme(scheme)
        if not regions or scheme == "binary":
            raise MrisegError(f"labels {values} (scheme {scheme!r}) do not fit --task regions, which needs "
                              "BraTS or MSD labels; use --task multiclass")
        # Only the scheme's own values: BraTS 2018-21 regions are WT {1, 2, 4}, BraTS 2013's WT {1, 2, 3, 4}.
        known = set(LABEL_NAMES.get(scheme, {})) or set(values)
        regions = tuple(Region(r.name, tuple(v for v in r.labels or () if v in known)) for r in regions)
        return Task("regions", tuple(values), regions=regions, channel_names=tuple(r.name for r in regions),
                    **common)
    if len(values) < 2 or 0 not in values:
        raise MrisegError(f"labels {values} do not fit --task multiclass (needs background 0 and "
                          "at least one other class)")
    ordered = tuple(sorted(values))
    return Task("multiclass", ordered, channel_names=tuple(names.get(str(v), f"class{v}") for v in ordered),
                **common)
