"""``mriseg train``: train a segmentation network on a preprocess cache.

Where things live (read ``loop.py`` first: ``train -> run_training -> run_epoch -> train_step``):

* ``options.py``: :class:`TrainOptions` and their ranges, checked before any data is read;
* ``sampling.py``: volumes, random slices / patches, step batches, the split by patient;
* ``schedule.py``: learning rate, optimiser, precision;
* ``validation.py``: the task of a cache and per-volume validation through the one inference engine;
* ``run_folder.py``: config.json, metrics, log, checkpoints, and reading a run back for ``--resume``;
* ``signals.py``: Ctrl-C / SIGTERM become a checkpoint at the next step;
* ``loop.py``: the loop itself.
"""

from mriseg.train.loop import run_training, train, train_step
from mriseg.train.options import (OPTIMIZERS, SCHEDULES, TASKS, TrainOptions, default_patch_size,
                                  default_spatial_dims)
from mriseg.train.plan import Plan, plan_training
from mriseg.train.run_folder import RunFolder, resumed_options
from mriseg.train.sampling import StepBatches, TrainingSamples, Volume, load_volumes, saved_split, split_cases
from mriseg.train.schedule import LearningRate, build_optimizer
from mriseg.train.signals import StopRequested
from mriseg.train.validation import resolve_task, validate

__all__ = ["OPTIMIZERS", "SCHEDULES", "TASKS", "LearningRate", "Plan", "RunFolder", "StepBatches", "StopRequested",
           "TrainOptions", "TrainingSamples", "Volume", "build_optimizer", "plan_training", "default_patch_size",
           "default_spatial_dims", "load_volumes", "resolve_task", "resumed_options", "run_training",
           "saved_split", "split_cases", "train", "train_step", "validate"]
