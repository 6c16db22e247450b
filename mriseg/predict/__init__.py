"""``mriseg predict``: run a trained model and write masks in each input's own geometry.

A case goes through the one inference engine (:mod:`mriseg.inference`: the checkpoint's
preprocessing, slice-wise or sliding-window inference, probabilities resampled back to the source
grid and decoded there), optional clean-up (:func:`~mriseg.inference.keep_largest_component`), and
writers that keep the source geometry: :func:`write_nifti` (affine, qform/sform and their codes,
units) and :func:`write_slice_masks` (one mask per source slice, named after it).

Every file is written through :mod:`mriseg.files`, so an interrupted run never leaves a file that
looks finished.

Modules: ``options.py`` (:class:`PredictOptions`, :class:`CaseResult`), ``run.py`` (inputs, shards,
one case through the engine), ``writers.py`` (masks and soft maps in the source geometry),
``pictures.py`` (overlays and GIFs).
"""

from mriseg.inference import load_model
from mriseg.predict.options import DEFAULT_OUT, CaseResult, PredictOptions
from mriseg.predict.pictures import labels_for_overlay
from mriseg.predict.run import expand_inputs, parse_shard, predict, predict_case, predict_path, take_shard
from mriseg.predict.writers import write_nifti, write_slice_masks

__all__ = ["DEFAULT_OUT", "CaseResult", "PredictOptions", "expand_inputs", "labels_for_overlay", "load_model",
           "parse_shard", "predict", "predict_case", "predict_path", "take_shard", "write_nifti",
           "write_slice_masks"]
