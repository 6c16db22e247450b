"""The one inference engine (see ``engine.py``) and its tiling (``windows.py``)."""

from mriseg.inference.engine import (CasePrediction, InferenceSettings, background_fill, network_predictor,
                                     output_margin, predict_case, predict_logits)
from mriseg.inference.model import (LoadedModel, canonical_modality, keep_largest_component, load_model,
                                    resolve_model_path, select_modalities, tumour_volume_ml)
from mriseg.inference.windows import (PAD_VALUE, Predictor, gaussian_importance_map, sliding_window, slicewise,
                                      window_starts, with_flips)

__all__ = ["CasePrediction", "InferenceSettings", "LoadedModel", "canonical_modality", "keep_largest_component",
           "load_model", "resolve_model_path", "select_modalities", "tumour_volume_ml", "PAD_VALUE", "Predictor", "background_fill",
           "gaussian_importance_map", "network_predictor", "output_margin", "predict_case", "predict_logits",
           "sliding_window", "slicewise", "window_starts", "with_flips"]
