"""The command line's global behaviour: version, help, one-line errors."""

import subprocess
import sys

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
