"""MLflow: one run per stage, nested under the pipeline's run, with lineage to its datasets.

The tracking URI comes from ``MLFLOW_TRACKING_URI``; by default it is ``sqlite:///mlflow.db`` in the
repository root (MLflow 3 refuses a bare ``./mlruns`` file store), which
``mlflow ui --backend-store-uri sqlite:///mlflow.db`` opens. A sqlite store keeps its artifacts in
``mlartifacts/`` beside it; MLflow records their locations as absolute paths, so when the clone moves,
the next run re-points them at the new place (:func:`relocate_artifacts`). When the Prefect pipeline runs a stage it
puts its parent run id in ``QPROBE_PARENT_RUN_ID`` and the stage's run nests under it.

Each stage run records: its params (its section of ``params.yaml`` in force; for a training stage,
trl's fields only where they differ from trl's defaults, :func:`trainer_params`), the git commit, the stage name, its datasets as MLflow inputs
whose digest is the content hash of the file or folder (the same md5 DVC tracks for a file), metrics
and small artifacts.

A run also records who owns it (host, PID, the PID's start time, repository root), so that a run left
RUNNING by a process that died without ending it (SIGKILL, a crash) can be proved orphaned and marked
FAILED (:func:`fail_orphaned_runs`). A run cut short from outside (Ctrl-C, a termination signal) ends
KILLED, with the nested runs whose processes died with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qprobe import offline
from qprobe.config import repo_root
from qprobe.io import content_hash
from qprobe.procs import is_running, proc_start

log = logging.getLogger(__name__)

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "qprobe"
PARENT_ENV = "QPROBE_PARENT_RUN_ID"
# MLflow 3's UI opens an experiment in its GenAI view unless this tag names model training (the
# values are the UI's ExperimentKind: genai_development, custom_model_development).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
MODEL_NAME = "qprobe"
# The registered model's code, by path: MLflow saves the file with the model (models-from-code), and
# importing it here would make its imports part of every stage's code.
SERVING_CODE = Path(__file__).with_name("serving.py")
CHECKPOINT_ARTIFACT = "checkpoint"  # the checkpoint folder's name among the model's artifacts
# Who owns a run: the process that started it, and the repository it ran in.
HOST_TAG = "qprobe.host"
PID_TAG = "qprobe.pid"
PID_START_TAG = "qprobe.pid_start"
ROOT_TAG = "qprobe.root"
ARTIFACTS = "mlartifacts"  # a sqlite store's artifact root, the folder beside its database file
# The columns of MLflow's sqlite store that hold artifact locations (MLflow 3's schema).
_ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                     ("model_versions", "source"))
# Never sent to MLflow as params or tags, whatever a config holds.
_SECRET_MARKERS = ("secret", "password", "token", "access_key", "credential")


def tracking_uri(root: str | Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///ROOT/mlflow.db`` (ROOT: the repository root)."""
    default = (Path(root) if root else repo_root()) / "mlflow.db"
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{default.resolve()}"


def _configure(root: str | Path | None = None) -> Any:
    offline.apply()
    if not sys.stderr.isatty():
        # MLflow's artifact bars (registering a model downloads it back) are carriage-return frames in a log.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    existing = mlflow.get_experiment_by_name(name)  # first: MLflow creates or upgrades the store's tables
    if uri.startswith("sqlite:"):
        db = Path(uri.removeprefix("sqlite:///"))
        relocate_artifacts(db)
        if existing is None:
            # A sqlite store would put artifacts in ./mlruns of whatever folder a stage runs from.
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # another process made it first
                mlflow.create_experiment(name, artifact_location=(db.parent / ARTIFACTS).resolve().as_uri(),
                                         tags=EXPERIMENT_TAGS)
    experiment = mlflow.set_experiment(name)
    if any(experiment.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):  # made elsewhere, or before
        mlflow.set_experiment_tags(EXPERIMENT_TAGS)
    return mlflow


def relocate_artifacts(db: Path) -> int:
    """Point the artifact locations the sqlite store ``db`` records at the folder it is in now; returns the
    rows changed.

    MLflow records absolute locations: it resolves a relative ``artifact_location`` against the working
    directory when it creates the experiment (``mlflow.utils.uri.resolve_uri_if_local``), and a run's,
    logged model's and model version's locations extend it. The store and its ``mlartifacts/`` move
    together with the clone, so when an experiment's ``file:`` location names an ``mlartifacts`` folder
    that is not beside ``db``, every location under that old folder's parent is rewritten under
    ``db``'s, in one transaction, and one log line says so. Locations elsewhere (S3, a server) are kept.
    """
    here = db.resolve().parent
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con, con:
        old_roots = {Path(urllib.parse.unquote(urllib.parse.urlsplit(location).path)).parent
                     for (location,) in con.execute("SELECT artifact_location FROM experiments")
                     if location and location.startswith("file:")
                     and location.rstrip("/").endswith("/" + ARTIFACTS)}
        total = 0
        for old in old_roots - {here}:
            # Both spellings MLflow writes: a file URI, and a bare path (its default experiment's ./mlruns).
            changed = sum(con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                      f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                                      (after, len(before) + 1, before, len(before) + 1, before + "/")).rowcount
                          for before, after in ((old.as_uri(), here.as_uri()), (str(old), str(here)))
                          for table, column in _ARTIFACT_COLUMNS)
            log.warning("MLflow store %s: the clone moved from %s; %d artifact location(s) now point under %s",
                        db, old, changed, here)
            total += changed
    return total


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or repo_root(), capture_output=True,
                             text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _public(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if not any(m in k.lower() for m in _SECRET_MARKERS)}


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None, root: str | Path | None = None) -> Iterator[Any]:
    """Start the MLflow run of ``stage`` (nested under this process's active run, else under
    ``$QPROBE_PARENT_RUN_ID`` when set); yield it.

    ``root`` picks the default store ``ROOT/mlflow.db`` when ``MLFLOW_TRACKING_URI`` is unset. An
    exception ends the run FAILED (MLflow's way); an interruption (a BaseException that is neither an
    Exception nor an exit: KeyboardInterrupt, an orchestrator's termination signal) ends it KILLED,
    and its nested runs still RUNNING whose processes are gone with it.
    """
    mlflow = _configure(root)
    all_tags = {"qprobe.stage": stage, **_owner_tags(root), **(tags or {})}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    active = mlflow.active_run()
    # The variable names the parent of a process's first run; a run started inside it nests under it.
    parent = active.info.run_id if active is not None else os.environ.get(PARENT_ENV) or None
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=active is not None, tags=all_tags) as run:
        try:
            if params:
                mlflow.log_params({k: _param_value(v) for k, v in _public(params).items()})
            yield run
        except BaseException as exc:
            if not isinstance(exc, Exception | SystemExit | GeneratorExit):
                _end_orphaned_children(run.info.run_id, "KILLED")
                mlflow.end_run("KILLED")
            raise


def _owner_tags(root: str | Path | None) -> dict[str, str]:
    pid = os.getpid()
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid),
            ROOT_TAG: str((Path(root) if root else repo_root()).resolve())}
    start = proc_start(pid)
    if start is not None:
        tags[PID_START_TAG] = str(start)
    return tags


def _owner_gone(run: Any) -> bool:
    """The run's owner tags prove its process is gone: this host, and no live process with its PID and start.

    A run of another host, of a live process or without the tags (older runs) is never called gone.
    """
    tags = run.data.tags
    pid = tags.get(PID_TAG, "")
    if tags.get(HOST_TAG) != socket.gethostname() or not pid.isdigit():
        return False
    start = tags.get(PID_START_TAG)
    # A live process with another start time holds a reused PID: the run's own process is gone.
    return not is_running(int(pid)) or (start is not None and str(proc_start(int(pid))) != start)


def _running_runs(filter_string: str) -> list[Any]:
    import mlflow

    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"attributes.status = 'RUNNING' and {filter_string}")


def _end_orphaned_children(run_id: str, status: str) -> None:
    """End with ``status`` the RUNNING descendants of ``run_id`` whose processes are gone."""
    import mlflow

    client = mlflow.MlflowClient()
    pending = [run_id]
    while pending:
        for child in _running_runs(f"tags.mlflow.parentRunId = '{pending.pop()}'"):
            pending.append(child.info.run_id)
            if _owner_gone(child):
                client.set_terminated(child.info.run_id, status)


def fail_orphaned_runs(root: str | Path | None = None) -> list[str]:
    """Mark FAILED the RUNNING runs of this repository whose process is gone; return their ids.

    A SIGKILL or a crash leaves its run RUNNING for ever; the pipeline calls this when it starts. Only
    runs started on this host in this repository (``root``, default the current one) count, and only
    when their PID no longer runs the process that started them (see :func:`_owner_gone`). Says so in
    one warning line when it marks any.
    """
    mlflow = _configure(root)
    here = _owner_tags(root)
    orphans = [run for run in _running_runs(f"tags.`{HOST_TAG}` = '{here[HOST_TAG]}'")
               if run.data.tags.get(ROOT_TAG) == here[ROOT_TAG] and _owner_gone(run)]
    client = mlflow.MlflowClient()
    for run in orphans:
        client.set_terminated(run.info.run_id, "FAILED")
    if orphans:
        log.warning("marked %d MLflow run(s) FAILED, left RUNNING by a process that is gone (killed or crashed): %s",
                    len(orphans), ", ".join(f"{run.info.run_name} {run.info.run_id} (pid {run.data.tags[PID_TAG]})"
                                            for run in orphans))
    return [run.info.run_id for run in orphans]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def trainer_params(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """A training section's params as a run logs them: trl's fields only where they differ from trl's defaults.

    ``cls`` is the stage's config (a dataclass extending a trl config), ``values`` what the stage is
    given (its ``params.yaml`` section, or every field's value before trl's ``__post_init__`` derives
    its own); a field ``values`` leaves out takes ``cls``'s default, which may differ from trl's. The
    fields of Q-Probe's own are kept whatever their value; so MLflow's compare view shows what an
    experiment changed, not trl's ~200 defaults. A field filled from another section (the
    protocol's limits) is kept only when given: the pipeline logs that section as its own.
    """
    trl = next(c for c in cls.__mro__ if c.__module__.split(".")[0] == "trl")
    trl_defaults = {f.name: _default(f) for f in dataclasses.fields(trl) if f.init}
    in_force = {f.name: _default(f) for f in dataclasses.fields(cls) if f.init and "section" not in f.metadata}
    in_force.update(values)
    return {k: v for k, v in in_force.items() if k not in trl_defaults or v != trl_defaults[k]}


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def log_dataset(path: str | Path, name: str, context: str, digest: str | None = None) -> str:
    """Record ``path`` (file, folder or URI) as an input of the active run; returns the digest used.

    ``context`` is MLflow's dataset context: ``source`` / ``input`` for what the stage read,
    ``output`` for what it wrote (lineage: a later stage logs the same digest as its input).
    """
    mlflow = _configure_active()
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    uri = str(path)
    if digest is None:
        local = Path(uri)
        digest = content_hash(local) if local.exists() else "unknown"
        uri = str(local.resolve()) if local.exists() else uri
    with warnings.catch_warnings():
        # A local path matches two equivalent artifact sources; MLflow warns and picks the first.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    dataset = MetaDataset(source=source, name=name, digest=digest[:36])
    mlflow.log_input(dataset, context=context)
    return digest


def _configure_active() -> Any:
    import mlflow

    if mlflow.active_run() is None:
        raise RuntimeError("log_dataset needs an active MLflow run (use qprobe.tracking.stage_run)")
    return mlflow


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    if Path(path).exists():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
    else:
        log.warning("artifact %s not found; not logged", path)


def register_model(model_dir: str | Path, alias: str | None = None, tags: Mapping[str, str] | None = None,
                   root: str | Path | None = None) -> str:
    """Log ``model_dir`` as an MLflow model and register it as a new version of ``qprobe``; returns the version.

    The model is a pyfunc whose code is :mod:`qprobe.serving` (why not the transformers flavour: see
    there) and whose artifact is the checkpoint folder, processor and chat template included; it is
    logged in a ``register`` run (nested under the active run: the pipeline's, the retraining's).
    Load it back with ``mlflow.pyfunc.load_model("models:/qprobe/VERSION")`` (or ``@ALIAS``). The
    registry keeps its own copy (the artifact store, S3 in production), so a version outlives the
    workspace's ``models/`` folder, which the next pipeline run overwrites. ``alias`` (e.g.
    ``challenger``) moves to the new version when given.
    """
    from importlib.metadata import version as dist_version

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    mlflow = _configure(root)
    digest = content_hash(model_dir)
    with stage_run("register", {"model_dir": str(model_dir)}, tags={"model.md5": digest}, root=root):
        # Pinned here: MLflow's inference of them would load the model in a subprocess.
        requirements = [f"{dist}=={dist_version(dist)}" for dist in ("torch", "transformers", "pillow")]
        info = mlflow.pyfunc.log_model(name="model", python_model=str(SERVING_CODE),
                                       artifacts={CHECKPOINT_ARTIFACT: str(model_dir)},
                                       pip_requirements=requirements, signature=ModelSignature(
                                           inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                                           params=ParamSchema([ParamSpec("max_new_tokens", "long", 1024)])))
    version = mlflow.register_model(info.model_uri, MODEL_NAME, tags={"model.md5": digest, **(tags or {})}).version
    if alias:
        set_alias(alias, str(version), root=root)
    return str(version)


def model_version(alias: str, root: str | Path | None = None) -> Any | None:
    """The registered version behind ``alias`` (e.g. ``champion``), or None when nothing holds it."""
    mlflow = _configure(root)
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(MODEL_NAME, alias)
    except mlflow.exceptions.MlflowException:
        return None


def download_version(version: Any, dst: str | Path) -> Path:
    """Materialise a registered version's checkpoint under ``dst``; returns the checkpoint folder."""
    import mlflow

    model = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dst)))
    artifacts = mlflow.models.Model.load(str(model)).flavors["python_function"]["artifacts"]
    return model / artifacts[CHECKPOINT_ARTIFACT]["path"]


def tag_version(version: str, key: str, value: str, root: str | Path | None = None) -> None:
    _configure(root).MlflowClient().set_model_version_tag(MODEL_NAME, version, key, value)


def set_alias(alias: str, version: str, root: str | Path | None = None) -> None:
    mlflow = _configure(root)
    mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, alias, version)
