"""The scripts in examples/: they parse, the Python API example runs end to end, the prediction
scripts run for real on a tiny model, and the training scripts pass real options to torchrun.

No GPU and no Slurm are needed: the Slurm array script is run as Slurm would run it (one process
per task, with SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT set), and the training scripts run
against stand-ins for torchrun, srun and scontrol that record what they were asked to do, because
training itself needs GPUs (the 2-process CPU torchrun run lives in test_train.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import typer
from typer.main import get_command

from mriseg.checkpoint import load_checkpoint
from mriseg.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHELL_SCRIPTS = sorted([*EXAMPLES.glob("*.sh"), *EXAMPLES.glob("*.sbatch")])
# The venv's bin first, so the scripts find this mriseg (and a python3 that has torch).
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "PYTHONPATH": str(EXAMPLES.parent), "OMP_NUM_THREADS": "1"}


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.name)
def test_shell_scripts_parse(script):
    result = run(["bash", "-n", str(script)])
    assert result.returncode == 0, result.stderr


# --- the Python API example, whose trained model the prediction tests reuse ----------------

@pytest.fixture(scope="module")
def api_example(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("api") / "out"
    return out, run([sys.executable, str(EXAMPLES / "python_api.py"), str(out)], env=ENV)


@pytest.fixture(scope="module")
def trained_run(api_example) -> Path:
    out, result = api_example
    if result.returncode != 0:
        pytest.fail(f"examples/python_api.py failed, so there is no model to predict with:\n{result.stderr[-3000:]}")
    return out / "run"


@pytest.fixture(scope="module")
def scans(trained_run, tmp_path_factory) -> list[Path]:
    """Five single-file scans (4D NIfTI, channels in the model's order) from the held-out cases."""
    order = load_checkpoint(trained_run / "best.pt")["modalities"]
    folder = tmp_path_factory.mktemp("scans")
    cases = sorted(p for p in (trained_run.parent / "test").iterdir() if p.is_dir())
    written = []
    for index in range(5):
        case = cases[index % len(cases)]
        channels = [nib.load(case / f"{case.name}_{modality}.nii.gz") for modality in order]
        stacked = np.stack([np.asanyarray(channel.dataobj) for channel in channels], axis=-1)
        path = folder / f"scan{index}.nii.gz"
        nib.save(nib.Nifti1Image(stacked, channels[0].affine), path)
        written.append(path)
    return written


def test_python_api_example_runs_end_to_end(api_example):
    out, result = api_example
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("run/best.pt", "run/curves.png", "evaluation/metrics.csv", "evaluation/summary.json",
                 "evaluation/dsc.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "predictions").glob("*_seg.nii.gz"))) == 2
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert set(summary["regions"]) == {"WT", "TC", "ET"}
    assert "held-out WT Dice: mean" in result.stdout


# --- prediction scripts, run for real -------------------------------------------------------

def test_predict_pipeline_prints_a_line_per_case_and_counts_failures(trained_run, scans, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for scan in scans:
        (folder / scan.name).symlink_to(scan)
    (folder / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    result = run(["bash", str(EXAMPLES / "predict_pipeline.sh"), str(folder), str(trained_run),
                  str(tmp_path / "out")], env=ENV)
    assert result.returncode == 1, result.stderr[-3000:]  # mriseg's code: some inputs failed
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [row[0] for row in rows] == ["broken", *(scan.name.split(".")[0] for scan in scans)]
    assert rows[0][1] == "FAILED" and "broken.nii.gz" in rows[0][2]
    assert all(float(row[1]) > 0 for row in rows[1:])  # every held-out case has a tumour
    assert "5 case(s) segmented, 1 failed" in result.stderr
    assert len(list((tmp_path / "out").glob("*_seg.nii.gz"))) == 5


def test_slurm_array_tasks_together_predict_every_scan_once(trained_run, scans, tmp_path):
    scan_list = tmp_path / "scans.txt"
    scan_list.write_text("".join(f"{scan}\n" for scan in scans))
    out, tasks = tmp_path / "predictions", 3
    # All tasks at once, as Slurm starts them, writing into the same folder.
    processes = [subprocess.Popen(["bash", str(EXAMPLES / "predict_slurm_array.sbatch"), str(scan_list),
                                   str(trained_run), str(out)],
                                  env={**ENV, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(tasks)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for task in range(tasks)]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    per_task = [[json.loads(line) for line in (tmp_path / "predictions-results" / f"task-{task}.jsonl")
                 .read_text().splitlines()] for task in range(tasks)]
    assert [[result["input"] for result in results] for results in per_task] == \
        [[str(scan) for scan in scans[task::tasks]] for task in range(tasks)]
    assert all(result["status"] == "ok" for results in per_task for result in results)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{scan.name.split('.')[0]}_seg.nii.gz" for scan in scans)


# --- training scripts, against recording stand-ins for torchrun, srun and scontrol ---------

STAND_INS = {
    # Records its arguments, touches $TOUCH_CHECKPOINT if set (a checkpoint written) and exits
    # with $TORCHRUN_EXIT (1: what torchrun returns when it was signalled).
    "torchrun": 'printf "%s\\n" "$@" > "$RECORD/torchrun"\n'
                '[[ -z ${TOUCH_CHECKPOINT:-} ]] || touch "$TOUCH_CHECKPOINT"\n'
                'exit "${TORCHRUN_EXIT:-0}"\n',
    "srun": 'printf "%s\\n" "$@" > "$RECORD/srun"\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n',
    "scontrol": 'if [[ $1 == show ]]; then printf "gpu-node-07\\ngpu-node-08\\n"; '
                'else printf "%s\\n" "$@" > "$RECORD/scontrol"; fi\n',
}
SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_NNODES": "2",
             "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32"}


@pytest.fixture
def stand_ins(tmp_path) -> dict[str, str]:
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, body in STAND_INS.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECORD": str(record)}


def mriseg_arguments(record: Path) -> list[str]:
    """What torchrun was told to run after `-m mriseg`, checked against the real CLI's options."""
    arguments = (record / "torchrun").read_text().splitlines()
    start = arguments.index("-m")
    assert arguments[start + 1] == "mriseg"
    command, *rest = arguments[start + 2:]
    try:
        get_command(app).commands[command].make_context(command, list(rest))
    except typer.TyperException as error:
        pytest.fail(f"the script passes options `mriseg {command}` does not take: {error}")
    return arguments[start + 2:]


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_single_node_script_starts_or_resumes_the_run(stand_ins, tmp_path, resume):
    run_dir = tmp_path / "run"
    if resume:
        run_dir.mkdir()
        (run_dir / "last.pt").touch()
    result = run(["bash", str(EXAMPLES / "train_torchrun_single_node.sh"), "cache", str(run_dir), "--epochs", "3"],
                 env={**stand_ins, "NGPUS": "2"})
    assert result.returncode == 0, result.stderr
    torchrun = (tmp_path / "record" / "torchrun").read_text().splitlines()
    assert torchrun[:3] == ["--standalone", "--nproc_per_node", "2"]
    where = ["--resume", "--out", str(run_dir)] if resume else ["cache", "--out", str(run_dir)]
    assert mriseg_arguments(tmp_path / "record") == ["train", *where, "--device", "cuda", "--amp", "--epochs", "3"]


def test_multinode_script_takes_the_rendezvous_from_slurm(stand_ins, tmp_path):
    run_dir = tmp_path / "run"
    result = run(["bash", str(EXAMPLES / "train_slurm_multinode.sbatch"), "cache", str(run_dir)],
                 env={**stand_ins, **SLURM_JOB})
    assert result.returncode == 0, result.stderr
    torchrun = (tmp_path / "record" / "torchrun").read_text().splitlines()
    options = dict(zip(torchrun[:10:2], torchrun[1:10:2]))
    assert options == {"--nnodes": "2", "--nproc_per_node": "4", "--rdzv_backend": "c10d",
                       "--rdzv_endpoint": f"gpu-node-07:{20000 + 4242}", "--rdzv_id": "4242"}
    assert mriseg_arguments(tmp_path / "record") == ["train", "cache", "--out", str(run_dir), "--device", "cuda",
                                                     "--amp"]
    assert "torchrun" in (tmp_path / "record" / "srun").read_text().splitlines()  # one torchrun per srun task
    assert not (tmp_path / "record" / "scontrol").exists()


def test_multinode_script_passes_a_time_budget(stand_ins, tmp_path):
    result = run(["bash", str(EXAMPLES / "train_slurm_multinode.sbatch"), "cache", str(tmp_path / "run")],
                 env={**stand_ins, **SLURM_JOB, "MRISEG_TIME": "23h"})
    assert result.returncode == 0, result.stderr
    assert mriseg_arguments(tmp_path / "record")[-2:] == ["--time", "23h"]


@pytest.mark.parametrize("new_checkpoint", [True, False], ids=["new-checkpoint", "no-new-checkpoint"])
def test_multinode_script_requeues_only_after_progress(stand_ins, tmp_path, new_checkpoint):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoint = run_dir / "last.pt"
    checkpoint.touch()
    os.utime(checkpoint, (1_000_000_000, 1_000_000_000))  # an older attempt wrote it
    stopped = {"TORCHRUN_EXIT": "1", **({"TOUCH_CHECKPOINT": str(checkpoint)} if new_checkpoint else {})}
    result = run(["bash", str(EXAMPLES / "train_slurm_multinode.sbatch"), "cache", str(run_dir)],
                 env={**stand_ins, **SLURM_JOB, **stopped})
    assert mriseg_arguments(tmp_path / "record")[:4] == ["train", "--resume", "--out", str(run_dir)]
    requeued = tmp_path / "record" / "scontrol"
    if new_checkpoint:
        assert result.returncode == 0, result.stderr
        assert requeued.read_text().split() == ["requeue", "4242"]
    else:
        assert result.returncode == 1, result.stderr
        assert not requeued.exists()

