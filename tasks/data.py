"""Prefect tasks for new data: mirror photos from S3, and record the folder as a DVC data version."""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import get_run_logger, task

from qprobe import storage
from qprobe.io import IMAGE_EXTENSIONS
from tasks.dvc_stage import StageError, dvc, stage_env


@task(name="pull-new-photos", retries=2, retry_delay_seconds=30)
def pull_new_photos(incoming: str, photos: str, root: str) -> int:
    """Download the photos under the S3 prefix ``incoming`` that ``photos`` lacks; returns how many."""
    fetched, kept = storage.sync_prefix(incoming, Path(root) / photos, IMAGE_EXTENSIONS)
    get_run_logger().info("%s: %d new photos, %d already in %s", incoming, len(fetched), kept, photos)
    return len(fetched)


@task(name="version-data")
def version_data(photos: str, root: str) -> str:
    """``dvc add`` the photo folder (a new data version when it changed); returns its DVC md5."""
    proc = dvc(["add", photos], root, stage_env())
    if proc.returncode != 0:
        raise StageError(f"dvc add {photos} failed: {(proc.stdout + proc.stderr).strip()[-500:]}")
    meta = yaml.safe_load((Path(root) / f"{photos}.dvc").read_text())
    md5 = meta["outs"][0]["md5"]
    get_run_logger().info("%s is data version %s", photos, md5)
    return md5
