"""Run an experiment: each variant is the pipeline flow on its params, saved as a DVC experiment.

For each variant, in the workspace: ``params.yaml`` goes back to what it was, the profile (if any)
and then the variant's overrides are set in it, the Prefect flow (``python -m flows.pipeline``, with
its targets) runs the variant's stages with ``dvc repro``, and ``dvc exp save --name
<experiment>-<variant>`` records params, ``dvc.lock`` and metrics as a DVC experiment (``dvc exp
show`` lists it, ``dvc exp apply`` brings it back: its outputs are in the DVC cache). Stages a variant
does not change are not re-run: DVC finds them up to date, or restores them from its run cache.

Variants run in the workspace rather than in ``dvc exp run --temp`` copies because the flow runs
there: its cluster targets pull their outputs into it, and its MLflow runs name it. Afterwards the
workspace is put back as it was: ``params.yaml``, ``dvc.lock`` and the uncached outputs (metrics,
curves) from a copy taken first, the cached outputs by ``dvc checkout``, and outputs that did not
exist before removed. An interruption restores it too.

MLflow: one ``experiment`` run tagged ``qprobe.experiment``; under it each variant's pipeline run,
tagged ``qprobe.experiment`` and ``qprobe.variant``, with the stage runs under that; the report (markdown
and HTML) is logged on the experiment run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qprobe import offline
from qprobe.errors import QProbeError
from qprobe.experiments.registry import Experiment, Variant, exp_name, resolve
from qprobe.experiments.report import write_report
from qprobe.profiles import apply_profile, set_params
from qprobe.tracking import PARENT_ENV, log_artifact, stage_run, tracking_uri

EXPERIMENT_TAG = "qprobe.experiment"
VARIANT_TAG = "qprobe.variant"
TARGETS = ("local", "kubernetes", "skypilot")
REPORTS = "outputs/experiments"  # <name>/report.md and report.html; not a DVC output


@dataclass
class Snapshot:
    """What the workspace held before: file contents (None: absent) and the cached outputs that were absent."""

    files: dict[str, bytes | None]
    absent_outs: list[str]


def _stage_outputs(root: Path) -> dict[str, list[tuple[str, bool]]]:
    """Each stage of ``dvc.yaml``: its outputs, metrics and plots as (path, cached)."""
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    found: dict[str, list[tuple[str, bool]]] = {}
    for name, stage in stages.items():
        for entry in (*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])):
            path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            found.setdefault(name, []).append((path, (options or {}).get("cache", True)))
    return found


def _outputs(root: Path) -> tuple[list[str], list[str]]:
    """The outputs of ``dvc.yaml``'s stages: (cached, uncached) paths."""
    every = [out for outs in _stage_outputs(root).values() for out in outs]
    return [path for path, cached in every if cached], [path for path, cached in every if not cached]


def snapshot(root: Path) -> Snapshot:
    cached, uncached = _outputs(root)
    files = {rel: (root / rel).read_bytes() if (root / rel).is_file() else None
             for rel in ("params.yaml", "dvc.lock", *uncached)}
    return Snapshot(files, [rel for rel in cached if not (root / rel).exists()])


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=offline.environ(),
                          capture_output=True, text=True)


def _put_back(root: Path, rel: str, data: bytes | None) -> None:
    if data is None:
        (root / rel).unlink(missing_ok=True)
    else:
        (root / rel).write_bytes(data)


def restore(root: Path, snap: Snapshot, stages: list[str]) -> None:
    """Put the workspace back as :func:`snapshot` found it (see the module docstring); ``stages``: those
    the variants ran, whose cached outputs come back from the DVC cache as ``dvc.lock`` has them."""
    for rel, data in snap.files.items():
        _put_back(root, rel, data)
    locked = (yaml.safe_load(snap.files["dvc.lock"] or b"") or {}).get("stages") or {}
    outputs = _stage_outputs(root)
    # Only those: another stage's outputs were not touched, and may be in no cache (never committed). An
    # output that was absent (a fresh clone of a committed dvc.lock) has nothing to come back from the cache.
    targets = [path for stage in stages if stage in locked for path, cached in outputs.get(stage, ())
               if cached and path not in snap.absent_outs]
    if targets:
        proc = _dvc(root, "checkout", *targets)
        if proc.returncode != 0:
            raise QProbeError(f"dvc checkout (restoring the workspace) failed: {proc.stderr.strip()[-300:]}")
    for rel in snap.absent_outs:
        path = root / rel
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _flow_command(exp: Experiment, variant: Variant, profile: str | None, target: str) -> list[str]:
    tags = {EXPERIMENT_TAG: exp.name, VARIANT_TAG: variant.name, "qprobe.profile": profile or "params.yaml"}
    return [sys.executable, "-m", "flows.pipeline", "--target", target,
            *(arg for key, value in tags.items() for arg in ("--tag", f"{key}={value}")),
            *(["--stages", *variant.stages] if variant.stages else [])]


def _set_variant(root: Path, snap: Snapshot, variant: Variant, profile: str | None) -> dict[str, Any]:
    """``params.yaml`` as it was, then the profile, then the variant's overrides; returns the overrides set."""
    _put_back(root, "params.yaml", snap.files["params.yaml"])
    if profile:
        apply_profile(profile, root)
    overrides = resolve(variant.overrides, yaml.safe_load((root / "params.yaml").read_text()) or {})
    set_params(overrides, root)
    return overrides


def run_variant(root: Path, exp: Experiment, variant: Variant, profile: str | None, target: str,
                parent_id: str, snap: Snapshot) -> None:
    """Run one variant with the flow and save it as the DVC experiment ``<experiment>-<variant>``."""
    overrides = _set_variant(root, snap, variant, profile)
    name = exp_name(exp.name, variant.name)
    print(f"experiment {exp.name}, variant {variant.name}: " +
          (", ".join(f"{k}={v}" for k, v in overrides.items()) or "no overrides"), flush=True)
    env = {**offline.environ(), "MLFLOW_TRACKING_URI": tracking_uri(root), PARENT_ENV: parent_id}
    with subprocess.Popen(_flow_command(exp, variant, profile, target), cwd=root, env=env) as flow:
        try:
            code = flow.wait()
        except KeyboardInterrupt:
            flow.wait()  # Ctrl-C reached the flow too: let it stop its stage and end its runs
            raise
    if code != 0:
        raise QProbeError(f"experiment {exp.name}, variant {variant.name}: the pipeline flow exited {code} "
                          "(its output is above)")
    # DVC adds the top-level metrics and plots itself; the stages' own (uncached) metrics files only when told.
    untracked = [arg for rel in _outputs(root)[1] if (root / rel).is_file() for arg in ("--include-untracked", rel)]
    saved = _dvc(root, "exp", "save", "--force", "--name", name, *untracked, *(variant.stages or ()))
    if saved.returncode != 0:
        raise QProbeError(f"dvc exp save --name {name} failed: {saved.stderr.strip()[-300:]}")


def _ran(root: Path, exp: Experiment) -> list[str]:
    """The stages some variant of ``exp`` runs."""
    every = list((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {})
    return [stage for stage in every if any(v.stages is None or stage in v.stages for v in exp.variants)]


def run_experiment(exp: Experiment, root: Path, profile: str | None = None, target: str = "local") -> str:
    """Run every variant of ``exp``, put the workspace back, write and log the report; returns its markdown."""
    if target not in TARGETS:
        raise QProbeError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    snap = snapshot(root)
    params = {"experiment": exp.name, "profile": profile or "params.yaml", "target": target,
              "variants": ",".join(v.name for v in exp.variants)}
    with stage_run("experiment", params, tags={EXPERIMENT_TAG: exp.name}, root=root) as run:
        try:
            for variant in exp.variants:
                run_variant(root, exp, variant, profile, target, run.info.run_id, snap)
        finally:
            restore(root, snap, _ran(root, exp))
        md, html, text = write_report(root, exp, root / REPORTS / exp.name)
        log_artifact(md)
        log_artifact(html)
    return text
