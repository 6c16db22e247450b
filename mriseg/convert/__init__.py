"""``mriseg convert``: any dataset mriseg reads -> an nnU-Net v2 raw dataset, so both tools can
train and be scored on the same data and the same folds.

``nnunet.py`` writes ``DatasetNNN_NAME/`` (``imagesTr/CASE_0000.nii.gz`` ..., ``labelsTr/``,
``imagesTs/`` for unlabelled cases, ``dataset.json``) into a temporary folder and moves it into
place when complete; ``checks.py`` holds nnU-Net's dataset rules, applied to what was written.
"""

from mriseg.convert.checks import check_nnunet_dataset
from mriseg.convert.nnunet import convert_to_nnunet

__all__ = ["check_nnunet_dataset", "convert_to_nnunet"]
