"""A throwaway copy of this repository (git + DVC), for tests that run real pipeline stages."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_repo(dest: Path, params: dict[str, dict] | None = None) -> Path:
    """The repository's tracked and untracked-not-ignored files as a fresh git repo at ``dest``.

    ``params`` updates sections of the copy's params.yaml (small sizes for tests) before the commit.
    """
    import shutil
    import subprocess

    import yaml

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for rel in files:
        # A local run's lock and metrics would describe outputs the copy does not have.
        if rel == "dvc.lock" or rel.startswith("metrics/"):
            continue
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    values = yaml.safe_load((dest / "params.yaml").read_text())
    for section, updates in (params or {}).items():
        values.setdefault(section, {}).update(updates)
    (dest / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    for args in (["init", "-q"], ["add", "-A"],
                 ["-c", "user.email=ci@example.org", "-c", "user.name=ci", "commit", "-qm", "copy"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest
