"""The flow's closing line says what `dvc status` says, checked, not as fixed text."""

from __future__ import annotations

from pathlib import Path

from fixtures_dvc import STAGE, dvc, make_dvc_repo

from tasks.dvc_stage import status_verdict


def test_status_verdict_reports_clean_then_the_changed_stage(tmp_path: Path) -> None:
    repo = make_dvc_repo(tmp_path / "repo")
    assert status_verdict(repo) == f"1 changed ({STAGE}): `dvc repro` would run them"  # never run
    dvc(repo, "repro")
    assert status_verdict(repo) == "clean"
    (repo / "input.txt").write_text("changed\n")
    assert status_verdict(repo) == f"1 changed ({STAGE}): `dvc repro` would run them"


def test_status_verdict_outside_a_dvc_repo_says_unknown(tmp_path: Path) -> None:
    assert status_verdict(tmp_path).startswith("unknown (")
