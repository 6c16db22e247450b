"""Running the ``mriseg`` CLI on a bad input and checking what it did.

The checks every row of the corpus shares: the exit code, exactly one ``error:`` line that
names the file and the problem, no traceback, and no file outside the output folder created,
changed or removed (:func:`snapshot` before and after).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

# Linux capabilities that let root read and search files whatever their permission bits.
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2


PR_CAPBSET_DROP = 24


def drop_file_permission_override() -> None:
    """Make this (root) process and what it executes obey file permission bits, as a user would.

    Tests here run as root, for whom ``chmod 000`` changes nothing: root reads any file
    through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH. Removing both from the bounding set
    (``prctl(PR_CAPBSET_DROP)``) keeps them out of the program executed next, so permission
    errors become real. Meant as a subprocess ``preexec_fn``.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def permissions_can_be_enforced(probe_folder: Path) -> tuple[bool, str]:
    """Whether a chmod-000 file is unreadable for the CLI subprocesses, and why not if not."""
    probe = probe_folder / "probe.bin"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        result = subprocess.run([sys.executable, "-c", f"open({str(probe)!r}, 'rb')"], capture_output=True,
                                text=True, preexec_fn=drop_file_permission_override if os.geteuid() == 0 else None)
    except (OSError, subprocess.SubprocessError) as error:
        return False, f"cannot drop CAP_DAC_OVERRIDE for the subprocess as root ({error})"
    finally:
        probe.chmod(0o600)
        probe.unlink()
    if result.returncode == 0:
        return False, "a chmod-000 file stays readable here (root with CAP_DAC_OVERRIDE that could not be dropped)"
    return True, ""


def run_cli(args: list[str], cwd: Path, home: Path, obey_permissions: bool = False,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m mriseg ARGS`` in ``cwd`` with ``$MRISEG_HOME`` under ``home``."""
    env = {**os.environ, "MRISEG_HOME": str(home / "mriseg"), "COLUMNS": "200",
           "PYTHONWARNINGS": "default"}
    env.pop("MRISEG_MODEL", None)
    preexec = drop_file_permission_override if obey_permissions and os.geteuid() == 0 else None
    return subprocess.run([sys.executable, "-m", "mriseg", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, errors="backslashreplace", timeout=timeout, preexec_fn=preexec)


@dataclass
class CliResult:
    returncode: int
    stderr: str
    stdout: str = ""


def run_main(args: list[str], cwd: Path, home: Path, monkeypatch, capsys) -> CliResult:
    """``mriseg.cli.main`` in this process: the console script's code path without the start-up cost.

    What escapes ``main`` other than ``SystemExit`` (a bug) comes back as exit code 1 with
    its traceback, as a fresh interpreter would print it.
    """
    from mriseg.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MRISEG_HOME", str(home / "mriseg"))
    monkeypatch.delenv("MRISEG_MODEL", raising=False)
    monkeypatch.setattr(sys, "argv", ["mriseg", *args])
    capsys.readouterr()
    code, escaped = 0, ""
    try:
        main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - anything else is the bug the corpus looks for
        code, escaped = 1, traceback.format_exc()
    captured = capsys.readouterr()
    return CliResult(code, captured.err + escaped, captured.out)


# What may follow an error line: progress and the closing summary of predict, nothing else.
FOLLOWING_LINE = re.compile(r"^(warning: .*|predict \d+/\d+|all \d+ case\(s\) failed; nothing was written)$")


def error_lines(result: subprocess.CompletedProcess | CliResult) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(result: subprocess.CompletedProcess | CliResult, fragments: tuple[str, ...],
                          exit_code: int = 2) -> str:
    """Exit code, no traceback, exactly one ``error:`` line holding every fragment; returns the line."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == exit_code, f"exit {result.returncode}, expected {exit_code}\n{result.stderr}"
    lines = error_lines(result)
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{result.stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    after = result.stderr.splitlines()[result.stderr.splitlines().index(lines[0]) + 1:]
    continued = [line for line in after if not FOLLOWING_LINE.match(line)]
    assert not continued, f"the error message goes on over several lines:\n{result.stderr}"
    return lines[0]


def snapshot(root: Path, exclude: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every entry under ``root`` (not following symlinks, not descending into ``exclude``) with
    its type, mode, size and content hash: compare two snapshots to see what a command touched."""
    excluded = {os.path.abspath(p) for p in exclude}
    entries: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if os.path.abspath(os.path.join(folder, d)) not in excluded]
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.abspath(path) in excluded:
                continue
            info = os.lstat(path)
            key = os.path.relpath(path, root)
            if os.path.islink(path):
                entries[key] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                entries[key] = ("dir", info.st_mode)
            else:
                with open(path, "rb") as stream:
                    digest = hashlib.sha256(stream.read()).hexdigest()
                entries[key] = ("file", info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return entries


def describe_changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """Human-readable differences between two snapshots (empty when nothing changed)."""
    changes = [f"created {k}" for k in sorted(after.keys() - before.keys())]
    changes += [f"removed {k}" for k in sorted(before.keys() - after.keys())]
    changes += [f"changed {k}" for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]
    return changes
