"""`qprobe data import NAME`: each public IQA release, built tiny in its official layout, becomes a manifest."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from fixtures_public import (
    BUILDERS,
    CSIQ_REFS,
    SPAQ_COLUMNS,
    build_csiq,
    build_deqa,
    build_hriq,
    build_kadid10k,
    build_koniq10k,
    build_pipal,
    build_spaq,
    build_uhdiqa,
    csiq_rows,
    spaq_rows,
    write_csv,
)
from PIL import Image

from qprobe import cli
from qprobe.data.manifest import image_path, read_manifest
from qprobe.data.public import LOADERS


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No params.yaml from the repository and no MLflow database in it.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def run_import(name: str, root: Path | str, out: Path, *extra: str) -> int:
    return cli.main(["data", "import", name, "--root", str(root), "--out", str(out), "--no-track", *extra])


def import_ok(name: str, root: Path, out: Path, *extra: str) -> pd.DataFrame:
    assert run_import(name, root, out, *extra) == 0
    return read_manifest(out)


def error_of(capsys: pytest.CaptureFixture[str], name: str, root: Path, out: Path, *extra: str) -> str:
    assert run_import(name, root, out, *extra) == 2
    return capsys.readouterr().err


def key(row_id: str) -> str:
    return row_id.split(":", 1)[1]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_each_release_imports_as_a_manifest(name: str, tmp_path: Path) -> None:
    spec = BUILDERS[name](tmp_path / "release")
    out = tmp_path / "out" / name
    df = import_ok(name, tmp_path / "release", out)

    assert len(df) == spec.count
    assert df["id"].is_unique and df["id"].str.startswith(f"{name}:").all()
    assert df["mos"].between(1.0, 5.0).all() and df["mos_raw"].notna().all()
    assert df["has_defect"].isna().all() and (df["defects"].map(len) == 0).all()
    assert set(df["split"]) <= {"train", "val", "test"} and "train" in set(df["split"])
    by_key = df.set_index(df["id"].map(key))
    for release_key, (raw, mos, std) in spec.scores.items():
        row = by_key.loc[release_key]
        assert row["mos_raw"] == pytest.approx(raw)
        assert row["mos"] == pytest.approx(mos)
        assert (pd.isna(row["mos_std"]) if std is None else row["mos_std"] == pytest.approx(std))
    for release_key, split in spec.official_splits.items():
        assert by_key.loc[release_key, "split"] == split
    # No scene in two splits.
    assert (df.groupby("source")["split"].nunique() == 1).all()
    # Paths are relative to the manifest and open the original files; sizes come from the headers.
    for row in df.itertuples():
        path = image_path(out / "manifest.parquet", row.image)
        assert not Path(row.image).is_absolute() and path.is_file()
        with Image.open(path) as img:
            assert img.size == (row.width, row.height)


def test_koniq_keeps_the_official_sets_and_loads_with_datasets(tmp_path: Path) -> None:
    build_koniq10k(tmp_path / "koniq")
    out = tmp_path / "out"
    import_ok("koniq10k", tmp_path / "koniq", out)

    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(out / "manifest.parquet"), split="train",
                      cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 10
    assert sorted(ds.unique("split")) == ["test", "train", "val"]
    assert {"id", "image", "source", "width", "height", "mos", "mos_std", "mos_raw"} <= set(ds.column_names)


def test_splits_are_drawn_by_source_and_seeded(tmp_path: Path) -> None:
    build_kadid10k(tmp_path / "kadid")
    first = import_ok("kadid10k", tmp_path / "kadid", tmp_path / "a", "--seed", "3")
    again = import_ok("kadid10k", tmp_path / "kadid", tmp_path / "b", "--seed", "3")
    assert first["split"].tolist() == again["split"].tolist()
    # 5 references, val 0.1 and test 0.2 (the defaults), by the bench's rule: 3 train, 1 val, 1 test,
    # each with both its distortions.
    counts = first["split"].value_counts().to_dict()
    assert counts == {"train": 6, "val": 2, "test": 2}
    assert first["source"].str.endswith(".png").all()
    assert (first["source"].map(lambda s: Path(s).name) == first["id"].map(lambda i: key(i)[:3] + ".png")).all()
    others = [import_ok("kadid10k", tmp_path / "kadid", tmp_path / f"s{s}", "--seed", str(s))["split"].tolist()
              for s in range(4)]
    assert any(o != first["split"].tolist() for o in others)


def test_deqa_takes_splits_from_file_names_and_carves_val_from_train(tmp_path: Path) -> None:
    build_deqa(tmp_path / "Data-DeQA-Score")
    df = import_ok("deqa", tmp_path / "Data-DeQA-Score", tmp_path / "out", "--val-fraction", "0.3")
    split = df.set_index(df["id"].map(key))["split"]
    assert (split[[f"KONIQ/images/{826380 + i}.jpg" for i in range(3)]] == "test").all()
    assert set(split[split.index.str.startswith("KADID10K")]) <= {"train", "val"}
    assert "val" in set(split)
    # A full-reference folder is split by reference: both distortions of a scene stay together.
    kadid = df[df["id"].str.startswith("deqa:KADID10K")]
    assert (kadid.groupby("source")["split"].nunique() == 1).all()
    assert sorted(kadid["source"].unique()) == [f"../Data-DeQA-Score/KADID10K/references/I0{r}.png" for r in range(1, 5)]


def test_pipal_val_labels_are_the_official_val_split(tmp_path: Path) -> None:
    build_pipal(tmp_path / "pipal", val=True)
    df = import_ok("pipal", tmp_path / "pipal", tmp_path / "out")
    assert df.loc[df["id"] == "pipal:A0100_10_00.bmp", "split"].item() == "val"
    assert (df.loc[df["id"] != "pipal:A0100_10_00.bmp", "split"] != "val").all()
    assert df["source"].str.contains("Train_Ref/A000").sum() == 12


def test_livec_leaves_out_the_practice_images(tmp_path: Path) -> None:
    BUILDERS["livec"](tmp_path / "clive")
    df = import_ok("livec", tmp_path / "clive", tmp_path / "out")
    assert not df["id"].str.contains(":t").any() and len(df) == 8


def test_an_s3_root_is_downloaded_then_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boto3 = pytest.importorskip("boto3")
    from moto import mock_aws

    from qprobe import storage

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    release = tmp_path / "release"
    build_spaq(release)
    storage.client.cache_clear()
    try:
        with mock_aws():
            s3 = boto3.client("s3")
            s3.create_bucket(Bucket="iqa")
            for path in release.rglob("*"):
                if path.is_file():
                    s3.upload_file(str(path), "iqa", f"spaq/{path.relative_to(release).as_posix()}")
            s3.put_object(Bucket="iqa", Key="spaq-old/stray.txt", Body=b"not part of the release")
            out = tmp_path / "out"
            df = import_ok("spaq", "s3://iqa/spaq", out)
            assert len(df) == 10 and not (out / "release" / "stray.txt").exists()
            assert df["image"].str.startswith("release/TestImage/").all()
            assert all(image_path(out, p).is_file() for p in df["image"])
            # Re-running keeps what is already downloaded.
            before = (out / "release" / "TestImage" / "00001.jpg").stat().st_mtime_ns
            import_ok("spaq", "s3://iqa/spaq/", out)
            assert (out / "release" / "TestImage" / "00001.jpg").stat().st_mtime_ns == before
    finally:
        storage.client.cache_clear()


def test_the_import_is_recorded_in_mlflow(tmp_path: Path) -> None:
    build_kadid10k(tmp_path / "kadid")
    assert cli.main(["data", "import", "kadid10k", "--root", str(tmp_path / "kadid"), "--out",
                     str(tmp_path / "out")]) == 0
    import mlflow

    runs = mlflow.search_runs(experiment_names=["qprobe"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["dataset"] == "kadid10k" and run.data.tags["qprobe.stage"] == "data-import"
    assert run.data.metrics["images"] == 10
    contexts = {i.dataset.name: i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"kadid10k-release": "source", "kadid10k": "output"}


# --- errors: one line naming the file, the row and the column -----------------------------------


def test_unknown_dataset_lists_the_known_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = error_of(capsys, "koniq", tmp_path, tmp_path / "out")
    assert "unknown dataset 'koniq'" in err and all(n in err for n in LOADERS)


def test_a_missing_score_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    err = error_of(capsys, "kadid10k", tmp_path / "empty", tmp_path / "out")
    assert "dmos.csv" in err and str(tmp_path / "empty") in err


def test_a_missing_column_names_file_and_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_kadid10k(tmp_path / "kadid")
    dmos = tmp_path / "kadid" / "kadid10k" / "dmos.csv"
    dmos.write_text(dmos.read_text().replace(",var", ",variance"))
    err = error_of(capsys, "kadid10k", tmp_path / "kadid", tmp_path / "out")
    assert str(dmos) in err and "missing column 'var'" in err


def test_an_out_of_range_score_names_the_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_koniq10k(tmp_path / "koniq")
    scores = tmp_path / "koniq" / "koniq10k_scores_and_distributions.csv"
    lines = scores.read_text().splitlines()
    fields = lines[2].split(",")
    fields[7] = "5.5"
    lines[2] = ",".join(fields)
    scores.write_text("\n".join(lines) + "\n")
    err = error_of(capsys, "koniq10k", tmp_path / "koniq", tmp_path / "out")
    assert f"{scores}: row 3, column 'MOS'" in err and "5.5" in err and "[1, 5]" in err
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_an_image_missing_on_disk_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_csiq(tmp_path / "csiq")
    missing = tmp_path / "csiq" / "dst_imgs" / "blur" / "boston.BLUR.2.png"
    missing.unlink()
    err = error_of(capsys, "csiq", tmp_path / "csiq", tmp_path / "out")
    assert str(missing) in err and "column 'image'" in err and "row 13" in err


def test_an_unknown_csiq_distortion_names_row_and_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_csiq(tmp_path / "csiq")
    sheet = tmp_path / "csiq" / "csiq.DMOS.csv"
    sheet.write_text(sheet.read_text().replace("jpeg 2000", "jpeg xl", 1))
    err = error_of(capsys, "csiq", tmp_path / "csiq", tmp_path / "out")
    assert "row 6, column 'dst_type'" in err and "'jpeg xl'" in err


def test_fractions_must_leave_a_train_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_kadid10k(tmp_path / "kadid")
    err = error_of(capsys, "kadid10k", tmp_path / "kadid", tmp_path / "out", "--val-fraction", "0.5",
                   "--test-fraction", "0.5")
    assert "--test-fraction" in err


# --- spreadsheets: the official xlsx needs openpyxl; its CSV export always works -----------------


def test_unreadable_xlsx_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_spaq(tmp_path / "spaq")
    (tmp_path / "spaq" / "Annotations" / "MOS and Image attribute scores.csv").unlink()
    xlsx = tmp_path / "spaq" / "Annotations" / "MOS and Image attribute scores.xlsx"
    xlsx.write_bytes(b"PK\x03\x04")
    err = error_of(capsys, "spaq", tmp_path / "spaq", tmp_path / "out")
    assert str(xlsx) in err and "not a readable xlsx workbook" in err


def test_official_xlsx_sheets_are_read(tmp_path: Path) -> None:
    import openpyxl

    build_spaq(tmp_path / "spaq")
    (tmp_path / "spaq" / "Annotations" / "MOS and Image attribute scores.csv").unlink()
    book = openpyxl.Workbook()
    book.active.append(SPAQ_COLUMNS)
    for row in spaq_rows():
        book.active.append([float(v) if not isinstance(v, str) else v for v in row])
    book.save(tmp_path / "spaq" / "Annotations" / "MOS and Image attribute scores.xlsx")
    assert len(import_ok("spaq", tmp_path / "spaq", tmp_path / "out-spaq")) == 10

    build_csiq(tmp_path / "csiq")
    (tmp_path / "csiq" / "csiq.DMOS.csv").unlink()
    book = openpyxl.Workbook()
    book.active.title = "note"
    sheet = book.create_sheet("all_by_image")
    for row in csiq_rows():
        sheet.append([None if v == "" else v for v in row])
    book.save(tmp_path / "csiq" / "csiq.DMOS.xlsx")
    df = import_ok("csiq", tmp_path / "csiq", tmp_path / "out-csiq")
    assert len(df) == 3 * len(CSIQ_REFS) and df["mos"].max() == pytest.approx(5.0)


def test_a_semicolon_csv_export_reads_too(tmp_path: Path) -> None:
    build_spaq(tmp_path / "spaq")
    path = tmp_path / "spaq" / "Annotations" / "MOS and Image attribute scores.csv"
    with open(path, "w", newline="") as fh:
        fh.write(";".join(SPAQ_COLUMNS) + "\n")
        fh.writelines(";".join(str(v) for v in row) + "\n" for row in spaq_rows())
    assert len(import_ok("spaq", tmp_path / "spaq", tmp_path / "out")) == 10


def test_relative_paths_survive_a_relative_root(tmp_path: Path) -> None:
    build_koniq10k(tmp_path / "data" / "raw", sets=False)
    os.chdir(tmp_path / "data")
    df = import_ok("koniq10k", Path("raw"), Path("public") / "koniq")
    assert df["image"].str.startswith("../../raw/1024x768/").all()
    assert image_path(Path("public/koniq/manifest.parquet"), df["image"].iloc[0]).is_file()


def test_uhdiqa_challenge_layout_keeps_the_official_sets(tmp_path: Path) -> None:
    spec = build_uhdiqa(tmp_path / "uhd", per_set=True)
    df = import_ok("uhdiqa", tmp_path / "uhd", tmp_path / "out")
    assert dict(zip(df["id"].map(key), df["split"], strict=True)) == spec.official_splits


def test_hriq_reads_a_named_mos_column_and_bare_image_names(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "hriq"
    build_hriq(root)
    write_csv(root / "hriq_mos_file.csv", ["image", "MOS", "SD"], [["0001.jpg", 4.5, 0.3], ["0002.jpg", 2.0, 0.3]])
    df = import_ok("hriq", root, tmp_path / "out")
    assert sorted(df["mos"]) == [2.0, 4.5] and set(zip(df["width"], df["height"], strict=True)) == {(32, 24)}  # the rated size
    write_csv(root / "hriq_mos_file.csv", ["image", "MOS"], [["0001.jpg", 4.5], ["0002.jpg", 5.5]])
    err = error_of(capsys, "hriq", root, tmp_path / "out2")
    assert "hriq_mos_file.csv: row 3, column 'MOS': score 5.5 is outside the published range [1, 5]" in err
