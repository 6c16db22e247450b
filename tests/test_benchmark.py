"""`mriseg benchmark`: the pipeline computes what one device computes, every mode runs, bad input is refused.

The two-process runs use a tiny staged U-Net (tests/stage_models.py) on 16x16
images so that each spawn stays within a few seconds on a busy 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mriseg.benchmark import (BenchmarkConfig, balanced_cut, bubble_fraction, contiguous_grads,
                              encoder_decoder_cut, parse_devices, pipelined_gradients, predicted_step_time,
                              run_benchmark, validate)
from mriseg.errors import MrisegError
from mriseg.viz import draw_benchmark_timeline
from stage_models import TinyStagedUNet, no_stages, tiny_unet


def tiny_config(**changes) -> BenchmarkConfig:
    options = dict(model="tiny", devices=["cpu", "cpu"], batch_size=4, input_size=(16, 16),
                   micro_batches=(2,), steps=1, warmup=0)
    options.update(changes)
    return BenchmarkConfig(**options)


def accumulated_gradients(config: BenchmarkConfig, micro_batches: int):
    """One device, the same micro-batches, gradients accumulated: what the pipeline must reproduce."""
    torch.manual_seed(config.seed)
    model = tiny_unet()
    generator = torch.Generator().manual_seed(config.seed)
    images = torch.randn(config.batch_size, config.channels, *config.input_size, generator=generator)
    targets = (torch.rand(config.batch_size, config.out_channels, *config.input_size, generator=generator) > 0.5)
    losses = []
    for image_chunk, target_chunk in zip(images.tensor_split(micro_batches), targets.float().tensor_split(micro_batches)):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(image_chunk), target_chunk)
        (loss / micro_batches).backward()
        losses.append(loss.detach())
    gradients = {f"{stage_name}.{name}": parameter.grad
                 for stage_name, stage in model.pipeline_stages() for name, parameter in stage.named_parameters()}
    return losses, gradients


@pytest.mark.parametrize(("cut", "micro_batches", "schedule"), [(1, 2, "gpipe"), (2, 4, "1f1b")])
def test_pipeline_matches_one_device_with_gradient_accumulation(cut, micro_batches, schedule):
    # cut=1 sends the features and the full-resolution skip; its gradient comes back from torch.cat.
    config = tiny_config()
    losses, gradients = pipelined_gradients(config, tiny_unet, cut, micro_batches, schedule)
    expected_losses, expected_gradients = accumulated_gradients(config, micro_batches)
    assert len(losses) == micro_batches
    for loss, expected in zip(losses, expected_losses):
        assert abs(loss.item() - expected.item()) < 1e-5
    assert gradients.keys() == expected_gradients.keys()
    for name, expected in expected_gradients.items():
        torch.testing.assert_close(gradients[name], expected, atol=1e-5, rtol=0, msg=name)


def test_skip_gradient_from_cat_is_made_contiguous():
    skip = torch.randn(2, 3, 4, 4, requires_grad=True)
    other = torch.randn(2, 5, 4, 4, requires_grad=True)
    (passed,) = contiguous_grads((skip,))
    seen = {}
    skip_view = passed
    skip_view.register_hook(lambda grad: seen.setdefault("raw", grad))
    torch.cat([skip_view, other], dim=1).sum().backward()
    assert not seen["raw"].is_contiguous()  # the trap: gloo refuses to send this
    assert skip.grad.is_contiguous()


def test_every_mode_runs_on_two_cpu_processes(tmp_path):
    report = run_benchmark(tiny_config(schedules=("gpipe", "1f1b")), tiny_unet)
    modes = [(e["mode"], e.get("schedule")) for e in report["results"]]
    assert modes[0] == ("single", None)
    assert ("naive split", None) in modes and ("pipelined", "gpipe") in modes and ("pipelined", "1f1b") in modes
    assert modes[-1] == ("data parallel", None)
    assert ("single, accumulated", None) in modes and ("one process, 2 threads", None) in modes
    naive = next(e for e in report["results"] if e["mode"] == "naive split")
    pipelined = next(e for e in report["results"] if e["mode"] == "pipelined")
    # like for like: a pipeline is divided by the faster of one device's two ways to do the same samples
    accumulated = next(e for e in report["results"] if e["mode"] == "single, accumulated")
    assert pipelined["baseline"] == ("single, 2 micro-batches accumulated" if accumulated["speedup"] > 1
                                     else "single (whole batch, one device)")
    assert naive["baseline"].startswith("single (whole batch")
    assert all(e["bound"] == 2.0 for e in report["results"] if e["mode"] in ("naive split", "pipelined"))
    assert any(line.startswith("fastest way to use both devices") for line in report["conclusion"])
    # Forward: the features and the skip; backward: their gradients. 4 samples of float32.
    crossing = 4 * 4 * (8 * 8 * 8 + 4 * 16 * 16)
    assert naive["bytes_sent_forward"] == crossing and naive["bytes_sent_backward"] == crossing
    assert {event["kind"] for event in naive["timeline"]} == {"F", "B"}
    assert len(naive["peak_memory_bytes"]) == 2
    assert any("Data parallelism is the better choice" in line for line in report["conclusion"])
    json.dumps(report)
    picture = draw_benchmark_timeline(report, tmp_path / "timeline.png")
    assert picture.stat().st_size > 0


def test_both_stages_in_one_process_measure_the_machinery():
    report = run_benchmark(tiny_config(colocated=True, schedules=("gpipe", "1f1b")), tiny_unet)
    assert [e["mode"] for e in report["results"]] == ["single", "single, accumulated", "naive split", "pipelined",
                                                      "pipelined"]
    # one device: a split cannot gain
    assert all(e["bound"] == 1.0 for e in report["results"] if e["mode"] in ("naive split", "pipelined"))
    assert "PROJECTION" in report["projection"]["note"]


def test_cuts_and_pipeline_arithmetic():
    assert encoder_decoder_cut(["enc1", "enc2", "bottleneck", "dec2", "dec1"]) == 3
    assert balanced_cut([1.0, 1.0, 1.0, 3.0]) == 3
    assert balanced_cut([4.0, 1.0, 1.0, 1.0]) == 1
    assert bubble_fraction(2, 4) == pytest.approx(1 / 5)
    # Two equal stages of 1 s forward and 2 s backward per micro-batch, 4 micro-batches: (m+p-1) * 3 s.
    assert predicted_step_time([(1.0, 2.0), (1.0, 2.0)], 4, "gpipe") == pytest.approx(15.0)
    assert predicted_step_time([(1.0, 2.0), (1.0, 2.0)], 4, "1f1b") == pytest.approx(15.0)
    assert predicted_step_time([(1.0, 2.0), (1.0, 2.0)], 1, "gpipe") == pytest.approx(6.0)


def test_bad_arguments_are_clear_errors():
    if torch.cuda.device_count() == 0:
        with pytest.raises(MrisegError, match="--devices cpu,cpu"):
            parse_devices("0,1", None)
    with pytest.raises(MrisegError, match="unknown device"):
        parse_devices(None, "tpu,cpu")
    with pytest.raises(MrisegError, match="more than the batch"):
        validate(tiny_config(micro_batches=(8,)), TinyStagedUNet())
    with pytest.raises(MrisegError, match="--micro-batches 3 does not divide the batch of 4"):
        validate(tiny_config(micro_batches=(2, 3)), TinyStagedUNet())
    with pytest.raises(MrisegError, match="no pipeline_stages"):
        run_benchmark(tiny_config(), no_stages)
    with pytest.raises(MrisegError, match="unknown split"):
        validate(tiny_config(splits=("middle",)))


@pytest.mark.parametrize("arguments", [["--gpus", "7"], ["--devices", "cpu,gpu"],
                                       ["--devices", "cpu,cpu", "--batch-size", "2", "--micro-batches", "4"]])
def test_cli_bad_arguments_exit_2_with_one_line(arguments):
    result = subprocess.run([sys.executable, "-m", "mriseg", "benchmark", *arguments],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_runs_a_registry_model_and_prints_json():
    result = subprocess.run([sys.executable, "-m", "mriseg", "benchmark", "--model", "unet", "--features", "4",
                             "--devices", "cpu,cpu", "--input-size", "32,32", "--batch-size", "2",
                             "--micro-batches", "2", "--schedule", "1f1b", "--split", "encoder-decoder",
                             "--steps", "1", "--warmup", "0", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [e["mode"] for e in report["results"]] == ["single", "single, accumulated", "one process, 2 threads",
                                                      "naive split", "pipelined", "data parallel"]
    assert report["cuts"]["encoder-decoder"]["groups"][1][0].startswith("dec")
