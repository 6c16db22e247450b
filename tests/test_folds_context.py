"""2.5D context (``--context K``), cross-validation folds (``--folds``) and fold ensembles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mriseg.data.cache import build_cache
from mriseg.data.preprocess import PreprocessParams
from mriseg.data.readers import list_cases, read_case
from mriseg.data.synthetic import write_synthetic
from mriseg.errors import BadInputError, MrisegError
from mriseg.inference import InferenceSettings, load_model, predict_logits
from mriseg.inference.context import set_slice_context, slice_with_context, volume_with_context
from mriseg.train import TrainOptions, train
from mriseg.train.sampling import TrainingSamples, load_volumes

TINY = {"model_options": {"features": 4}, "batch_size": 4, "device": "cpu", "seed": 0, "amp": False,
        "epochs": 1, "steps_per_epoch": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("folds")
    write_synthetic(root / "raw", layout="lgg", cases=4, seed=3, size=(6, 32, 32))
    build_cache(root / "raw", root / "cache", PreprocessParams())
    return root / "raw", root / "cache"


@pytest.mark.parametrize("context", [0, 1, 2, 4])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_training_and_inference_see_the_same_neighbours(context, axis):
    image = np.random.default_rng(axis).normal(size=(2, 5, 6, 7)).astype(np.float32)
    whole = volume_with_context(torch.from_numpy(image), axis, context).numpy()
    assert whole.shape == (2 * (2 * context + 1), 5, 6, 7)
    for position in range(image.shape[axis + 1]):
        one = slice_with_context(image, axis, position, context)
        np.testing.assert_array_equal(np.take(whole, position, axis=axis + 1), one)
        # channel block j is slice position + j - K, zeros beyond the volume (written out by hand)
        for j, offset in enumerate(range(-context, context + 1)):
            index = position + offset
            expected = (np.take(image, index, axis=axis + 1) if 0 <= index < image.shape[axis + 1]
                        else np.zeros_like(np.take(image, 0, axis=axis + 1)))
            np.testing.assert_array_equal(one[2 * j:2 * j + 2], expected)


class PickChannel(nn.Module):
    """Logits = one input channel: shows which slice the engine put where."""

    def __init__(self, channel: int):
        super().__init__()
        self.channel = channel
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.channel:self.channel + 1] + self.weight


def test_engine_feeds_the_previous_slice_in_the_first_channel_block():
    image = np.arange(1, 1 + 5 * 8 * 8, dtype=np.float32).reshape(1, 5, 8, 8)
    network = set_slice_context(PickChannel(0), 1)
    logits = predict_logits(network, image, 2, 0, InferenceSettings(amp=False, channels_last=False))
    np.testing.assert_array_equal(logits[0, 1:].numpy(), image[0, :-1])
    np.testing.assert_array_equal(logits[0, 0].numpy(), np.zeros((8, 8)))


def test_sampler_draws_slices_with_context(dataset):
    from mriseg.data.cache import open_cache

    cache = open_cache(dataset[1])
    volumes = load_volumes(cache, cache.case_ids[:2], 2, 0.1, False, 255)
    image, label, _ = TrainingSamples(volumes, 2, None, 0.3, seed=0, context=2)[0]
    assert image.shape[0] == 5 * len(cache.modalities) and image.shape[1:] == label.shape


def test_context_run_predicts_through_the_checkpoint(dataset, tmp_path):
    raw, cache = dataset
    train(cache, out=tmp_path / "ctx", context=1, **TINY)
    loaded = load_model(tmp_path / "ctx", "cpu")
    assert loaded.context == 1 and loaded.in_channels == 3 * loaded.image_channels
    prediction = loaded.predict(read_case(list_cases(raw)[0]), InferenceSettings(amp=False))
    assert prediction.labels.shape == prediction.probabilities.shape[1:]


@pytest.mark.parametrize("bad,match", [({"context": 1, "spatial_dims": 3, "model": "unet3d"}, "--context"),
                                       ({"context": 17}, "context"), ({"context": -1}, "context")])
def test_context_options_are_checked(bad, match):
    with pytest.raises(MrisegError, match=match):
        TrainOptions(**bad).check()


def test_folds_train_every_fold_and_predict_as_their_mean(dataset, tmp_path):
    raw, cache = dataset
    summary = train(cache, out=tmp_path / "cv", folds=2, **TINY)
    assert [run["fold"] for run in summary["runs"]] == [0, 1]
    validated = [json.loads((tmp_path / "cv" / f"fold_{k}" / "config.json").read_text())["val_cases"] for k in (0, 1)]
    assert sorted(validated[0] + validated[1]) == sorted(json.loads((cache / "manifest.json").read_text())["cases"])
    assert json.loads((tmp_path / "cv" / "summary.json").read_text())["folds"] == 2
    case = read_case(list_cases(raw)[0])
    settings = InferenceSettings(amp=False)
    ensemble = load_model(tmp_path / "cv", "cpu")
    assert len(ensemble.members) == 2
    singles = [load_model(tmp_path / "cv" / f"fold_{k}", "cpu").predict(case, settings) for k in (0, 1)]
    joined = ensemble.predict(case, settings)
    np.testing.assert_allclose(joined.probabilities, (singles[0].probabilities + singles[1].probabilities) / 2,
                               atol=1e-5)
    listed = load_model([tmp_path / "cv" / "fold_1", tmp_path / "cv" / "fold_0"], "cpu").predict(case, settings)
    np.testing.assert_allclose(listed.probabilities, joined.probabilities, atol=1e-5)
    # resuming a finished cross-validation keeps every fold as it is
    before = (tmp_path / "cv" / "fold_1" / "last.pt").stat().st_mtime_ns
    again = train(cache, out=tmp_path / "cv", resume=True, device="cpu")
    assert again["folds"] == 2 and (tmp_path / "cv" / "fold_1" / "last.pt").stat().st_mtime_ns == before
    # a fold left over from another cross-validation is not silently averaged in
    stale = tmp_path / "cv" / "fold_2"
    stale.mkdir()
    (stale / "config.json").write_text(json.dumps({"options": {"folds": 3}}))
    with pytest.raises(BadInputError, match="different cross-validations"):
        load_model(tmp_path / "cv", "cpu")


def test_one_fold_goes_into_its_own_folder(dataset, tmp_path):
    train(dataset[1], out=tmp_path / "cv", folds=3, fold=2, **TINY)
    assert (tmp_path / "cv" / "fold_2" / "best.pt").is_file() and not (tmp_path / "cv" / "fold_0").exists()


def test_ensemble_members_must_agree(dataset, tmp_path):
    raw, cache = dataset
    train(cache, out=tmp_path / "plain", **TINY)
    train(cache, out=tmp_path / "minmax", **TINY, task="multiclass")
    with pytest.raises(BadInputError, match="cannot join an ensemble"):
        load_model([tmp_path / "plain", tmp_path / "minmax"], "cpu")


def test_cpu_recipe_fills_only_what_was_not_given():
    from mriseg.train.options import CPU_RECIPE, fresh_options

    cpu = fresh_options(None, {}, "cpu")
    assert (cpu.model_options["features"], cpu.batch_size, cpu.lr) == (CPU_RECIPE["features"],
                                                                        CPU_RECIPE["batch_size"], CPU_RECIPE["lr"])
    given = fresh_options(None, {"batch_size": 4, "lr": 1e-4, "model_options": {"features": 32}}, "cpu")
    assert (given.model_options["features"], given.batch_size, given.lr) == (32, 4, 1e-4)
    gpu = fresh_options(None, {}, "cuda")
    assert "features" not in gpu.model_options and gpu.batch_size == TrainOptions().batch_size
    assert fresh_options("unet3d", {}, "cpu").model_options == {}
    assert cpu.loss == "dice-ce"


def test_fold_without_cross_validation_is_refused(dataset, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a"], "val": ["b"]}))
    with pytest.raises(MrisegError, match="--fold 1 needs --folds"):
        train(dataset[1], out=tmp_path / "x", split=str(split), fold=1, **TINY)


def test_resume_refuses_other_data_or_model_and_unstarted_folds_keep_the_folds_data(dataset, tmp_path):
    """--resume used to drop a DATA or --model that differed from the run's without a word, and a
    fold that had not started when a cross-validation stopped restarted on the embedded default data."""
    raw, cache = dataset
    train(cache, out=tmp_path / "one", **TINY)
    with pytest.raises(BadInputError, match="own data"):
        train(raw, out=tmp_path / "one", resume=True, epochs=3)
    with pytest.raises(MrisegError, match="--model attention-unet.*unet run"):
        train(out=tmp_path / "one", model="attention-unet", resume=True, epochs=3)
    train(cache, out=tmp_path / "one", resume=True, epochs=3)  # the same DATA is fine
    train(cache, out=tmp_path / "cv", folds=2, fold=0, **TINY)
    summary = train(out=tmp_path / "cv", folds=2, resume=True, **TINY)
    started = json.loads((tmp_path / "cv" / "fold_1" / "config.json").read_text())
    assert summary["folds"] == 2 and Path(started["data"]).resolve() == cache.resolve()


def test_overwrite_clears_every_file_an_earlier_run_wrote(dataset, tmp_path):
    """A run started with --overwrite and stopped early must not sit beside the old run's files (an
    old summary.json made a resumed cross-validation take the fold as finished)."""
    from mriseg.train.run_folder import prepare_run_dir

    train(dataset[1], out=tmp_path / "run", **TINY)
    written = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "summary.json" in written and "best.pt" in written
    (tmp_path / "run" / ".last.pt.partial-999-abcd1234.pt").write_bytes(b"half")  # a SIGKILL in torch.save
    prepare_run_dir(tmp_path / "run", overwrite=True, resume=False)  # what a new run does first
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


def test_a_fold_folder_with_a_fold_missing_is_said(dataset, tmp_path, capsys):
    train(dataset[1], out=tmp_path / "cv", folds=3, fold=0, **TINY)
    train(dataset[1], out=tmp_path / "cv", folds=3, fold=2, **TINY)
    capsys.readouterr()
    assert len(load_model(tmp_path / "cv", "cpu").members) == 2
    assert "3-fold cross-validation with fold(s) [1] missing" in capsys.readouterr().err


def test_folds_choose_post_processing_by_cross_validation_and_predict_follows(dataset, tmp_path):
    from mriseg.inference import keep_largest_component
    from mriseg.predict import PredictOptions
    from mriseg.predict.run import predicted

    raw, cache = dataset
    summary = train(cache, out=tmp_path / "cv", folds=2, **TINY)
    decision = json.loads((tmp_path / "cv" / "postprocessing.json").read_text())
    assert decision == summary["postprocessing"]
    assert decision["cases"] == len(json.loads((cache / "manifest.json").read_text())["cases"])
    means = decision["mean_dice"]
    assert decision["largest_component"] == (means["largest_component"] > means["as_predicted"])
    case = read_case(list_cases(raw)[0])
    plain = load_model(tmp_path / "cv", "cpu").predict(case, InferenceSettings(amp=False)).labels
    for chosen in (True, False):
        (tmp_path / "cv" / "postprocessing.json").write_text(json.dumps({**decision, "largest_component": chosen}))
        assert load_model(tmp_path / "cv", "cpu").largest_component is chosen
        for flag, expected in ((None, chosen), (True, True), (False, False)):  # a flag overrides the decision
            loaded = load_model(tmp_path / "cv", "cpu")
            labels = predicted(case, loaded, PredictOptions(device="cpu", amp=False, largest_component=flag)).labels
            np.testing.assert_array_equal(labels, keep_largest_component(plain) if expected else plain)
    (tmp_path / "cv" / "postprocessing.json").write_text('{"largest_component": "yes"}')
    with pytest.raises(BadInputError, match="postprocessing.json.*true or false"):
        load_model(tmp_path / "cv", "cpu")
