"""Every command that writes a folder refuses one that is, holds or lies inside its input, before writing."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from qprobe import cli


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with the sha256 of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def user_folder(tmp_path: Path, tiny_photos: Path) -> Path:
    """A user's folder: photos, a notes file, and their own images/ and records/ subfolders."""
    folder = tmp_path / "userdir"
    shutil.copytree(tiny_photos, folder)
    (folder / "notes.txt").write_text("my notes\n")
    for sub in ("images", "records"):
        (folder / sub).mkdir()
    shutil.copy(tiny_photos / "coffee.png", folder / "images" / "holiday.png")
    (folder / "records" / "2024.json").write_text('{"mine": true}\n')
    return folder


def _command(name: str, folder: Path, out: Path, params: Path) -> list[str]:
    flags = ["--params", str(params), "--out", str(out)]
    return {
        "bench": ["bench", "--source", str(folder), "--metrics", str(folder.parent / "m.json"), *flags],
        "trajectories": ["trajectories", "--bench", str(folder), *flags],
        "evaluate": ["evaluate", "--data", str(folder), "--model", str(folder.parent / "model"), *flags],
        "score": ["score", str(folder), *flags],
        "data import": ["data", "import", "koniq10k", "--root", str(folder), "--no-track", *flags],
    }[name]


@pytest.mark.parametrize("command", ["bench", "trajectories", "evaluate", "score", "data import"])
@pytest.mark.parametrize(("where", "relation"), [("same", "is"), ("inside", "is inside"), ("parent", "contains")])
def test_overlapping_out_is_refused_and_the_input_is_untouched(command, where, relation, user_folder, tmp_path,
                                                               monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # any stray write (mlruns, metrics) would land here, not in the repository
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    out = {"same": user_folder, "inside": user_folder / "images", "parent": tmp_path}[where]
    before = tree_digest(user_folder)
    assert cli.main(_command(command, user_folder, out, params)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"qprobe {command}: error: --out {out}: {relation} the input folder {user_folder}; "
                       "choose an output folder apart from the inputs (nothing was written)")
    assert tree_digest(user_folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "photos", "userdir"]


def test_evaluate_refuses_an_out_inside_the_model_folder(tmp_path, tiny_photos, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    model = tmp_path / "model"
    model.mkdir()
    argv = ["evaluate", "--data", str(tiny_photos), "--model", str(model), "--out", str(model / "eval")]
    assert cli.main(argv) == 2
    assert f"--out {model / 'eval'}: is inside the input folder {model};" in capsys.readouterr().err


def test_score_checks_viz_too(user_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    assert cli.main(["score", str(user_folder), "--out", str(tmp_path / "out"), "--viz", str(user_folder)]) == 2
    assert f"--viz {user_folder}: is the input folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["trajectories", "evaluate"])
def test_an_out_folder_holding_someone_elses_files_is_refused_untouched(command, tmp_path, monkeypatch, capsys):
    """Trajectories replaces its folder whole and evaluate prunes its plots: neither touches a folder it did
    not write, even one whose entries share the names it writes."""
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    out = tmp_path / "mine"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "holiday.png").write_bytes(b"not yours")
    (out / "notes.txt").write_text("my notes\n")
    before = tree_digest(out)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    assert cli.main(_command(command, inputs, out, params)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"qprobe {command}: error: {out}: holds files `qprobe {command}` did not write (e.g. notes.txt); "
                   "choose a new or empty output folder (nothing was written or deleted)")
    assert tree_digest(out) == before


def test_a_folder_the_command_wrote_is_its_own_to_replace(tmp_path):
    from qprobe.io import OWNER_FILE, ForeignFolderError, check_owned, mark_owned

    out = tmp_path / "sets"
    check_owned(out, "trajectories")  # absent
    out.mkdir()
    check_owned(out, "trajectories")  # empty
    (out / "sft").mkdir()
    check_owned(out, "trajectories", known=("sft",))  # only names the command writes
    (out / "notes.txt").write_text("x")
    with pytest.raises(ForeignFolderError):
        check_owned(out, "trajectories", known=("sft",))
    mark_owned(out, "trajectories")
    assert (out / OWNER_FILE).read_text() == "trajectories\n"
    check_owned(out, "trajectories")  # marked: the whole folder is the command's
    with pytest.raises(ForeignFolderError):
        check_owned(out, "evaluate")  # another command's folder is not evaluate's
