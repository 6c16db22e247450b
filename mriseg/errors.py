"""User-facing errors.

Anything the user can fix (a bad path, a broken file, a wrong option) raises a
:class:`MrisegError`. The CLI prints its message as one line and exits with
code 2; ``--debug`` shows the traceback instead. Messages name the file and
say what is wrong with it.
"""

from __future__ import annotations

from pathlib import Path


class MrisegError(Exception):
    """A problem the user can fix; the message is shown as one line.

    Line breaks and runs of spaces are folded into single spaces: messages quote library
    errors, and some (nibabel's "... from \\n - could the file be damaged?") span lines.
    """

    exit_code = 2

    def __init__(self, message: str = ""):
        super().__init__(" ".join(str(message).split()))


class BadInputError(MrisegError):
    """A specific input file or folder is unusable."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # rebuild from (path, problem) when sent back from a worker process
        return (type(self), (self.path, self.problem))
