"""``mriseg benchmark``: one device against a split across two: naive split, pipeline, data parallel.

Seed 000 put the encoder of a U-Net on one GPU and the decoder on another and
got a slower step than on one GPU. This module measures why, and what helps:

* **single**: the whole model on the first device;
* **naive split**: the model's stages cut into two groups, one per device,
  the whole batch going through them one after the other (the seed's setup);
* **pipelined split**: the batch cut into micro-batches so that both devices
  work at once (``torch.distributed.pipelining``, GPipe or 1F1B schedule);
* **data parallel**: ``DistributedDataParallel`` over the same devices.

Every "device" is one process (``torch.multiprocessing`` spawn, one rank
each). ``cpu`` devices use the gloo backend and one thread per process, so a
two-core machine stands in for two GPUs; CUDA devices use NCCL. Two stages on
the same CUDA device (``--gpus 0,0``) run in one process with a multi-stage
schedule, which measures what the pipeline machinery costs without any
parallelism. Stage groups come from ``model.pipeline_stages()`` (see
docs/architecture.md); skip tensors that cross the cut are sent with the
activations, never recomputed.

Modules: ``config.py`` (what to measure, checks), ``stages.py`` (stage groups, pipeline arithmetic),
``measure.py`` (timing, memory, the stage profile), ``workers.py`` (the measuring processes),
``report.py`` (speed-ups, projection, conclusion, :func:`run_benchmark`).
"""

from mriseg.benchmark.config import BenchmarkConfig, parse_devices, validate
from mriseg.benchmark.report import report_tables, run_benchmark
from mriseg.benchmark.stages import (balanced_cut, bubble_fraction, contiguous_grads, encoder_decoder_cut,
                                     predicted_step_time)
from mriseg.benchmark.workers import pipelined_gradients

__all__ = ["BenchmarkConfig", "balanced_cut", "bubble_fraction", "contiguous_grads", "encoder_decoder_cut",
           "parse_devices", "pipelined_gradients", "predicted_step_time", "report_tables", "run_benchmark",
           "validate"]
