"""Every bad input of the corpus, through the CLI: the documented exit code, one error line naming the
file and the problem, no traceback, no output that looks valid, nothing outside the output folder touched.

Rows run ``mriseg.cli.main`` in this process (the console script's code path, without paying the
interpreter and import start-up 65 times); rows that need dropped privileges or the real stderr, and every row when
``MRISEG_CORPUS_SUBPROCESS=1``, run ``python -m mriseg`` in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from corrupt.corpus import CORPUS as ROUND_ONE
from corrupt.corpus import BadInput, Scenario, Workspace, make_templates
from corrupt.round_two import ROUND_TWO
from corrupt.harness import (assert_one_line_error, describe_changes, permissions_can_be_enforced, run_cli, run_main,
                             snapshot)
from mriseg.errors import BadInputError


CORPUS = ROUND_ONE + ROUND_TWO


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    return make_templates(tmp_path_factory.mktemp("templates"))


@pytest.fixture(scope="module")
def permission_support(tmp_path_factory) -> tuple[bool, str]:
    return permissions_can_be_enforced(tmp_path_factory.mktemp("permissions"))


def assert_nothing_looks_valid(command: str, out: Path) -> None:
    """After a refusal the output folder holds nothing a later step would take for a result."""
    if not out.is_dir():
        return
    if command == "preprocess" and (out / "manifest.json").exists():
        from mriseg.data.cache import open_cache

        with pytest.raises(BadInputError):
            open_cache(out)
    if command == "predict":
        assert not [p for p in out.rglob("*") if p.is_file()], "predict wrote files for a refused input"
    if command == "evaluate":
        assert not [p.name for p in out.iterdir() if p.name in ("metrics.csv", "summary.json", "dsc.png")]
    hidden = [p for p in out.rglob(".*") if p.name.endswith((".tmp", ".partial"))]
    assert not hidden, f"temporary files left behind: {hidden}"


def record_outcome(entry: BadInput, result, tmp_path: Path) -> None:
    """With ``MRISEG_CORPUS_REPORT=FILE``, append what each row did (the source of docs/reliability.md)."""
    report = os.environ.get("MRISEG_CORPUS_REPORT")
    if not report:
        return
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    message = lines[0].replace(str(tmp_path) + "/", "").replace(str(tmp_path), ".") if lines else ""
    with open(report, "a", encoding="utf-8") as stream:
        stream.write(json.dumps({"name": entry.name, "command": entry.command, "problem": entry.problem,
                                 "expected": entry.expected, "exit_code": result.returncode,
                                 "message": message}) + "\n")


def test_corpus_is_large_and_uniquely_named():
    names = [entry.name for entry in CORPUS]
    assert len(names) == len(set(names))
    assert sum(entry.expected == "refused" for entry in CORPUS) >= 40


def test_every_row_is_in_the_reliability_table():
    table = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    missing = [entry.name for entry in CORPUS if f"| `{entry.name}` |" not in table]
    assert not missing, f"rows missing from docs/reliability.md: {missing}"


@pytest.mark.parametrize("entry", CORPUS, ids=[entry.name for entry in CORPUS])
def test_bad_input(entry: BadInput, templates, permission_support, tmp_path, monkeypatch, capsys):
    workspace = Workspace(tmp_path, templates)
    scenario: Scenario = entry.build(workspace)
    if scenario.obey_permissions and not permission_support[0]:
        pytest.skip(permission_support[1])
    (tmp_path / "cwd").mkdir()
    (tmp_path / "home").mkdir()
    before = snapshot(tmp_path, exclude=(scenario.out,))
    if scenario.obey_permissions or scenario.fresh_interpreter or os.environ.get("MRISEG_CORPUS_SUBPROCESS") == "1":
        result = run_cli(scenario.args, cwd=tmp_path / "cwd", home=tmp_path / "home",
                         obey_permissions=scenario.obey_permissions)
    else:
        result = run_main(scenario.args, cwd=tmp_path / "cwd", home=tmp_path / "home",
                          monkeypatch=monkeypatch, capsys=capsys)
    after = snapshot(tmp_path, exclude=(scenario.out,))
    record_outcome(entry, result, tmp_path)
    assert not describe_changes(before, after), describe_changes(before, after)
    if scenario.exit_code == 0:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr and "error:" not in result.stderr, result.stderr
        scenario.check(scenario.out)
    else:
        assert_one_line_error(result, scenario.fragments, scenario.exit_code)
        assert_nothing_looks_valid(entry.command, scenario.out)
        if scenario.after is not None:
            scenario.after(scenario.out)
