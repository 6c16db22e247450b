"""Shared fixtures.

``shared_data`` finds the real cases that live in a ``shared/data`` folder beside the
checkout (``$MRISEG_SHARED_DATA`` overrides); tests that need them skip with a reason
when the folder is absent. Every test must also pass on synthetic data alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _find_shared_data() -> Path | None:
    override = os.environ.get("MRISEG_SHARED_DATA")
    if override:
        return Path(override) if Path(override).is_dir() else None
    for folder in Path(__file__).resolve().parents:
        candidate = folder / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real LGG and BraTS cases, or skip."""
    found = _find_shared_data()
    if found is None:
        pytest.skip("real data folder shared/data not found beside the checkout (set MRISEG_SHARED_DATA)")
    return found
