"""The command line's global behaviour: version, help, one-line errors."""

import os
import subprocess
import sys

import pytest

from mriseg import __version__


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mriseg", *args], capture_output=True, text=True)


def test_version_prints_package_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"mriseg {__version__}"


def test_unknown_option_is_a_usage_error_with_exit_2():
    result = run_cli("--no-such-option")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


COMMANDS = ("synth", "preprocess", "models", "train", "predict", "evaluate", "benchmark", "demo")


def test_main_help_lists_every_command_and_where_to_start():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    assert "mriseg demo" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_a_purpose_and_an_example_of_itself(command):
    result = subprocess.run([sys.executable, "-m", "mriseg", command, "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    usage, purpose = [line.strip() for line in result.stdout.splitlines() if line.strip()][:2]
    assert usage.startswith(f"Usage: mriseg {command}")
    assert purpose and not purpose.startswith("╭")  # the one-line purpose comes before the option panels
    examples = result.stdout.split("Examples:", 1)[1]
    assert f"mriseg {command}" in examples
    # Defaults written in the help text survive rich's markup (square brackets would vanish).
    assert "(default: )" not in result.stdout and "()" not in result.stdout


@pytest.mark.parametrize("command, panels", [
    ("train", ("Model", "Task and loss", "Optimisation", "Validation", "Devices and speed")),
    ("predict", ("Inference", "Post-processing", "Pictures", "Pipelines and clusters")),
    ("evaluate", ("Scoring", "With --model")),
])
def test_options_are_grouped_in_panels(command, panels):
    result = subprocess.run([sys.executable, "-m", "mriseg", command, "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    for panel in panels:
        assert f"╭─ {panel} " in result.stdout


def test_progress_bar_on_a_terminal_shows_rate_and_status(monkeypatch):
    """On a terminal each epoch's bar carries items per second and the last loss."""
    import io

    from rich.console import Console

    from mriseg import log

    buffer = io.StringIO()
    monkeypatch.setattr(log, "is_terminal", lambda: True)
    monkeypatch.setattr(log, "console", Console(file=buffer, force_terminal=True, width=150))
    losses: list[float] = []
    for step in log.progress(range(4), description="epoch 1", status=lambda: f"loss {losses[-1]:.4f}"):
        losses.append(1.0 / (step + 1))
    screen = buffer.getvalue()
    assert "epoch 1" in screen and "4/4" in screen and "it/s" in screen and "loss 0.2500" in screen
