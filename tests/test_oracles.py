"""The core path checked against independent implementations and properties that cannot be faked.

* the sliding-window engine against ``monai.inferers.sliding_window_inference``;
* the soft Dice and Dice+CE losses against MONAI's ``DiceLoss`` / ``DiceCELoss``;
* per-case Dice / IoU against medpy's ``dc`` / ``jc`` (nnU-Net's TP/FP/FN formulas);
* HD95 / ASSD (one distance-transform pair, on a cropped box) against medpy and MONAI;
* the way back to the source grid against a brute-force nearest-sample search;
* a perfect prediction mapped back through the whole engine on the real BraTS cases.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mriseg.data.preprocess import PreprocessParams, inverse_taps, nearest_indices, preprocess_case, \
    resize_back, resize_nearest, restore_to_source
from mriseg.inference import InferenceSettings, predict_case, sliding_window
from mriseg.labels import REGION_SCHEMES, Task
from mriseg.losses import build_loss
from mriseg.evaluate.scoring import score_masks
from mriseg.metrics import confusion, dice_from_counts, iou_from_counts

monai = pytest.importorskip("monai")
REAL_BRATS = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats"
BRATS_2013 = "flair=Flair_subtrMeanDivStd,t1ce=T1c_subtrMeanDivStd,seg=OTMultiClass"


# --- sliding window -------------------------------------------------------------------------

@pytest.mark.parametrize("shape,patch,overlap,mode", [
    ((20, 18, 13), (8, 8, 8), 0.5, "gaussian"),
    ((20, 18, 13), (8, 6, 8), 0.25, "constant"),
    ((9, 30, 7), (16, 8, 8), 0.5, "gaussian"),      # smaller than the window on two axes: padded
    ((33, 17, 21), (12, 12, 12), 0.75, "gaussian"),
])
def test_sliding_window_equals_monai(shape, patch, overlap, mode):
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3, padding=1), torch.nn.Tanh()).eval()
    image = torch.randn(2, *shape)
    with torch.no_grad():
        ours = sliding_window(network, image, patch, overlap=overlap, batch_size=3, importance=mode)
        theirs = sliding_window_inference(image[None], patch, 3, network, overlap=overlap, mode=mode,
                                          sigma_scale=0.125, padding_mode="constant", cval=0.0)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# --- losses ---------------------------------------------------------------------------------

def test_soft_dice_and_dice_ce_equal_monai_for_sigmoid():
    from monai.losses import DiceCELoss, DiceLoss

    torch.manual_seed(1)
    logits = torch.randn(3, 1, 12, 10)
    target = (torch.rand(3, 1, 12, 10) > 0.6).float()
    monai_dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)
    monai_dice_ce = DiceCELoss(sigmoid=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)
    torch.testing.assert_close(build_loss("dice", "sigmoid")(logits, target), monai_dice(logits, target))
    torch.testing.assert_close(build_loss("dice-ce", "sigmoid")(logits, target), monai_dice_ce(logits, target))


def test_dice_ce_on_overlapping_regions_is_binary_ce_per_region_plus_monai_dice():
    """WT/TC/ET overlap, so each region is its own sigmoid: binary CE per region, as nnU-Net's
    region training. (MONAI's DiceCELoss switches to softmax CE across channels for more than one
    channel, whatever sigmoid=True says, so it is not the reference here.)"""
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 9, 7)
    target = (torch.rand(2, 3, 8, 9, 7) > 0.7).float()
    monai_dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)(logits, target)
    expected = monai_dice + torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(build_loss("dice-ce", "sigmoid")(logits, target), expected)


def test_soft_dice_and_dice_ce_equal_monai_for_softmax():
    from monai.losses import DiceCELoss, DiceLoss

    torch.manual_seed(2)
    logits = torch.randn(2, 4, 9, 7, 5)
    target = torch.randint(0, 4, (2, 9, 7, 5))
    common = {"softmax": True, "to_onehot_y": True, "include_background": False, "batch": True,
              "smooth_nr": 1.0, "smooth_dr": 1.0}
    torch.testing.assert_close(build_loss("dice", "softmax")(logits, target),
                               DiceLoss(**common)(logits, target[:, None]))
    torch.testing.assert_close(build_loss("dice-ce", "softmax")(logits, target),
                               DiceCELoss(**common)(logits, target[:, None]))


def test_ignored_voxels_change_no_sigmoid_loss():
    task = Task("binary", ignore_label=255)
    labels = torch.tensor([[[0, 1, 255, 1], [0, 0, 255, 1]]])
    logits = torch.randn(1, 1, 2, 4)
    other = logits.clone()
    other[..., 2] = 50.0  # anything at the ignored voxels
    targets = task.targets(labels)
    for name in ("dice", "bce", "bce-dice", "focal", "soft-iou"):
        loss = build_loss(name, "sigmoid")
        torch.testing.assert_close(loss(logits, targets), loss(other, targets))


# --- overlap metrics --------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_dice_and_iou_equal_medpy(seed, p_pred, p_truth):
    from medpy.metric.binary import dc, jc

    rng = np.random.default_rng(seed)
    pred, truth = rng.random((6, 7, 5)) < p_pred, rng.random((6, 7, 5)) < p_truth
    counts = confusion(pred, truth)
    if not pred.any() and not truth.any():
        assert dice_from_counts(*counts) == iou_from_counts(*counts) == 1.0
        return
    assert dice_from_counts(*counts) == pytest.approx(dc(pred, truth))
    assert iou_from_counts(*counts) == pytest.approx(jc(pred, truth))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.02, 0.6), st.floats(0.02, 0.6),
       st.sampled_from([(1.0, 1.0, 1.0), (0.9, 1.1, 3.0), (2.0, 0.5, 1.0)]))
def test_hd95_and_assd_equal_medpy_on_the_whole_volume(seed, p_pred, p_truth, spacing):
    from medpy.metric.binary import assd, hd95

    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(3, 14, size=3))
    # Blobs that may touch the volume's border, where the crop must not change the surface.
    pred = rng.random(shape) < p_pred
    truth = rng.random(shape) < p_truth
    pred[0, 0, 0] = truth[-1, -1, -1] = True
    scores = score_masks(pred, truth, spacing)
    assert scores.hd95 == pytest.approx(hd95(pred, truth, voxelspacing=spacing), rel=1e-9)
    assert scores.assd == pytest.approx(assd(pred, truth, voxelspacing=spacing), rel=1e-9)


def test_hd95_is_at_most_monais_on_a_real_case():
    """MONAI takes the larger of the two directed 95th percentiles; medpy (ours) pools both sets,
    so ours can only be smaller or equal, and equal when the shift is the same both ways."""
    from monai.metrics import compute_hausdorff_distance

    case = REAL_BRATS / "brats_2013_pat0002_1" / "OTMultiClass.nii.gz"
    if not case.exists():
        pytest.skip("real BraTS cases not present")
    truth = np.asarray(nib.load(case).dataobj) > 0
    for pred in (np.roll(truth, 3, axis=0), np.pad(truth, 1)[2:, 1:-1, 1:-1]):
        ours = score_masks(pred, truth, (1.0, 1.0, 1.0)).hd95
        theirs = float(compute_hausdorff_distance(torch.from_numpy(pred)[None, None],
                                                  torch.from_numpy(truth)[None, None], percentile=95))
        assert ours <= theirs + 1e-6
    assert score_masks(np.roll(truth, 3, axis=0), truth, (1.0, 1.0, 1.0)).hd95 == pytest.approx(3.0)


# --- the way back to the source grid ------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300))
def test_nearest_inverse_takes_the_nearest_sample(source_size, out_size):
    samples = nearest_indices(source_size, out_size)
    lo, hi, weight = inverse_taps(source_size, out_size)
    chosen = np.where(weight >= 0.5, hi, lo)
    for j in range(source_size):
        best = np.min(np.abs(samples - j))
        assert abs(samples[chosen[j]] - j) == best, (j, samples[chosen[j]])


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(4, 40), st.integers(4, 40))
def test_every_sampled_voxel_comes_back_exactly(seed, size_in, size_out):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 5, (size_in, 7)).astype(np.uint8)
    back = resize_back(resize_nearest(label, (size_out, 7)), (size_in, 7))
    sampled = np.unique(nearest_indices(size_in, size_out))
    np.testing.assert_array_equal(back[sampled], label[sampled])
    if size_out >= size_in:  # nothing was dropped: the round trip is the identity
        np.testing.assert_array_equal(back, label)


def test_linear_back_resampling_reproduces_a_linear_ramp_between_samples():
    ramp = np.arange(50, dtype=np.float32)
    down = resize_nearest(ramp, (20,))                 # holds the source positions it sampled
    back = resize_back(down, (50,), interpolation="linear")
    last_sample = nearest_indices(50, 20)[-1]
    np.testing.assert_allclose(back[:last_sample + 1], ramp[:last_sample + 1], atol=1e-5)


# --- a perfect prediction through the whole engine on the real cases -------------------------------

class Oracle(torch.nn.Module):
    """A 'network' that answers with fixed logits (the cached label): a perfect model."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert tuple(x.shape[2:]) == tuple(self.logits.shape[1:]), "expected one whole-volume window"
        return self.logits[None].expand(x.shape[0], -1, *self.logits.shape[1:])


def real_cases():
    if not REAL_BRATS.is_dir():
        pytest.skip(f"the real BraTS cases are not at {REAL_BRATS}")
    from mriseg.data.readers import list_cases, read_case

    return [read_case(ref) for ref in list_cases(REAL_BRATS, modalities=BRATS_2013)]


def perfect_prediction(case, size, interpolation):
    params = PreprocessParams(size=size, crop=True, label_map={3: 1})
    _, label, _ = preprocess_case(case, params)
    regions = REGION_SCHEMES["brats"]
    task = Task("regions", (0, 1, 2, 4), regions=regions, channel_names=("WT", "TC", "ET"), label_map={3: 1})
    masks = np.stack([region.mask(label) for region in regions]).astype(np.float32)
    network = Oracle(torch.from_numpy(masks * 40 - 20))   # sigmoid: 1 inside, 0 outside
    settings = InferenceSettings(interpolation=interpolation)
    return task, predict_case(case, network, task, params, 3, settings)


@pytest.mark.slow
def test_perfect_prediction_without_downsampling_comes_back_exactly_with_the_source_geometry(tmp_path):
    from mriseg.predict import write_nifti

    for case in real_cases()[:2]:
        task, prediction = perfect_prediction(case, None, "linear")
        truth = task.truth_labels(case.label)
        for region in task.regions:
            assert dice_from_counts(*confusion(region.mask(prediction.labels), region.mask(truth))) == 1.0
        written = nib.load(str(write_nifti(prediction.labels, case, tmp_path / f"{case.case_id}.nii.gz")))
        source = nib.load(str(case.source_paths[0]))  # the input image (the label file has other codes)
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine)
        for field in ("qform_code", "sform_code", "xyzt_units"):
            assert int(written.header[field]) == int(source.header[field]), field


@pytest.mark.slow
@pytest.mark.parametrize("size", [(128, 128), (128, 128, 128)])
def test_perfect_prediction_at_a_coarser_grid_loses_only_what_the_resize_dropped(size):
    """The forward resize keeps ~75% of the voxels along the longest axis; a mask restored from
    it cannot be better than the voxels kept allow. The restoration must reproduce every kept
    voxel exactly and stay close to the truth (measured: WT >= 0.976, TC >= 0.952, ET >= 0.911)."""
    for case in real_cases():
        task, prediction = perfect_prediction(case, size, "nearest")
        truth = task.truth_labels(case.label)
        record = prediction.record
        box = [slice(a, b) for a, b in record["crop_box"]]
        kept = np.ix_(*[np.unique(nearest_indices(n, m)) + s.start
                        for n, m, s in zip(record["cropped_shape"], record["shape"], box)])
        np.testing.assert_array_equal(prediction.labels[kept], np.where(truth == 3, 1, truth)[kept])
        scores = [dice_from_counts(*confusion(r.mask(prediction.labels), r.mask(truth))) for r in task.regions]
        assert min(scores[:2]) >= 0.95 and scores[2] >= 0.90, (case.case_id, scores)


def test_restore_keeps_background_outside_the_crop_for_probabilities():
    record = {"shape": [2, 2], "cropped_shape": [2, 2], "crop_box": [[1, 3], [0, 2]], "original_shape": [4, 2]}
    soft = np.full((2, 2, 2), 0.5, dtype=np.float32)
    back = restore_to_source(soft, record, fill=[1.0, 0.0])
    assert back[0, 0].tolist() == [1.0, 1.0] and back[1, 0].tolist() == [0.0, 0.0]
