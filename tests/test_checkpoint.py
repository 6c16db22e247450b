"""Checkpoints: atomic writes, safe loading, and a clear error for every bad file."""

from __future__ import annotations

import os
import pickle
import types

import pytest
import torch
from torch import nn

from mriseg import __version__
from mriseg.checkpoint import (CHECKPOINT_FORMAT, load_checkpoint, model_from_checkpoint,
                               save_checkpoint)
from mriseg.errors import BadInputError


def tiny_payload(model: nn.Module) -> dict:
    return {
        "model": {"name": "tiny", "in_channels": 2, "out_channels": 1, "spatial_dims": 2, "options": {}},
        "state_dict": model.state_dict(),
        "preprocess": {"size": 64},
        "modalities": ["flair", "t1ce"],
        "task": {"kind": "binary", "label_values": [0, 1]},
        "epoch": 3,
        "best_score": 0.5,
    }


@pytest.fixture
def fake_registry(monkeypatch):
    """Stand in for mriseg.models so these tests exercise the checkpoint code only."""
    module = types.ModuleType("mriseg.models")

    def build_model(name, in_channels, out_channels, spatial_dims=2, **options):
        if name != "tiny":
            raise ValueError(f"unknown model {name}")
        return nn.Conv2d(in_channels, out_channels, 3, padding=1)

    module.build_model = build_model
    monkeypatch.setitem(__import__("sys").modules, "mriseg.models", module)
    return module


def test_round_trip_restores_header_and_weights(tmp_path, fake_registry):
    model = nn.Conv2d(2, 1, 3, padding=1)
    path = save_checkpoint(tmp_path / "best.pt", tiny_payload(model))
    checkpoint = load_checkpoint(path)
    assert checkpoint["format"] == CHECKPOINT_FORMAT
    assert checkpoint["mriseg_version"] == __version__
    assert checkpoint["task"]["kind"] == "binary"
    rebuilt = model_from_checkpoint(checkpoint)
    assert not rebuilt.training
    x = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(rebuilt(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temporary file left behind


def test_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", tiny_payload(nn.Conv2d(2, 1, 3)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(os.urandom(300))
    with pytest.raises(BadInputError, match="last.pt|garbage.pt"):
        load_checkpoint(path)


def test_file_from_another_tool(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(nn.Conv2d(2, 1, 3).state_dict(), path)
    with pytest.raises(BadInputError, match="not an mriseg checkpoint"):
        load_checkpoint(path)


def test_incompatible_format_version(tmp_path):
    path = save_checkpoint(tmp_path / "future.pt", tiny_payload(nn.Conv2d(2, 1, 3)))
    document = torch.load(path, weights_only=True)
    document["format_version"] = 99
    torch.save(document, path)
    with pytest.raises(BadInputError, match="format_version 99"):
        load_checkpoint(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_that_would_execute_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": 1, "payload": _Exploit()}, path)
    with pytest.raises(BadInputError, match="execute code"):
        load_checkpoint(path)


def test_raw_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(BadInputError):
        load_checkpoint(path)


def test_missing_required_keys(tmp_path):
    path = save_checkpoint(tmp_path / "thin.pt", {"epoch": 1})
    with pytest.raises(BadInputError, match="missing model"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_model(tmp_path, fake_registry):
    payload = tiny_payload(nn.Conv2d(2, 1, 3, padding=1))
    payload["model"]["in_channels"] = 4
    checkpoint = load_checkpoint(save_checkpoint(tmp_path / "best.pt", payload))
    with pytest.raises(BadInputError, match="do not fit"):
        model_from_checkpoint(checkpoint)


def test_unwritable_folder(tmp_path):
    with pytest.raises(BadInputError, match="cannot write"):
        save_checkpoint(tmp_path / "no" / "such" / "dir" / "best.pt", {"epoch": 0})


def test_a_file_that_is_no_checkpoint_at_all_is_named_as_such(tmp_path):
    """A text file passed as --model is not "a pickle that would execute code"."""
    path = tmp_path / "README.md"
    path.write_text("# notes\n")
    with pytest.raises(BadInputError, match="README.md: not a checkpoint: neither a torch.save archive nor a pickle"):
        load_checkpoint(path)
