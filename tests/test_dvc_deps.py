"""Every stage of dvc.yaml lists the project code its command runs, so a change there re-runs it.

The closure starts at the command's module (``qprobe.cli.COMMANDS``) and follows every import of a
project module, lazy ones inside functions included: a lazy import runs as surely as a top-level
one. ``qprobe/cli.py`` is left out: it only dispatches, and listing it would re-run every stage when
a command is added. ``__init__.py`` files that hold only a docstring are left out too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from qprobe.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
DISPATCH_ONLY = {"qprobe/cli.py"}


def module_file(name: str) -> Path | None:
    """The project file of module ``name``, or None for a module outside the project."""
    if name.split(".")[0] not in ("qprobe", "flows", "tasks"):
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """The absolute names of every module ``path`` imports, at any depth of its code."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            # `from pkg import mod` imports a module when `mod` is one
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def closure(module: str) -> set[str]:
    """Project files (relative to the repo) that running ``module`` can execute."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        for i in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_modules(path))
    files = {str(p.relative_to(REPO)) for p in seen if p.name != "__init__.py" or has_code(p)}
    return files - DISPATCH_ONLY


def has_code(path: Path) -> bool:
    """Whether ``path`` holds more than a docstring."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def covered(file: str, deps: list[str]) -> bool:
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(stages()))
def test_stage_deps_cover_the_code_its_command_runs(stage: str) -> None:
    spec = stages()[stage]
    words = spec["cmd"].split()
    assert words[0] == "qprobe", f"{stage}: expected a `qprobe` command, got {spec['cmd']!r}"
    command = " ".join(words[1:3]) if " ".join(words[1:3]) in COMMANDS else words[1]
    module = COMMANDS[command][0]
    deps = [str(d) for d in spec.get("deps", [])]
    missing = sorted(f for f in closure(module) if not covered(f, deps))
    assert not missing, f"dvc.yaml: stage {stage!r} runs {missing} but does not list them in its deps"


def test_closure_follows_lazy_and_relative_imports() -> None:
    """The closure of the bench command reaches code it imports only inside functions."""
    files = closure("qprobe.bench.synthesize")
    assert "qprobe/validation/bench.py" in files  # imported lazily, inside a function
    assert "qprobe/bench/texture.py" in files
    assert "qprobe/train/common.py" not in files


def test_the_library_never_imports_operations_code() -> None:
    """qprobe/ops (services, launchers) is operations code: only the CLI's dispatch table names it."""
    offenders = []
    for path in sorted((REPO / "qprobe").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        if rel.startswith("qprobe/ops/") or rel in DISPATCH_ONLY:
            continue
        if any(name == "qprobe.ops" or name.startswith("qprobe.ops.") for name in imported_modules(path)):
            offenders.append(rel)
    assert not offenders, f"these library modules import qprobe.ops: {offenders}"


def test_evaluate_declares_every_file_it_reads() -> None:
    """The bokeh photos and the training curves are inputs of evaluate: in the repository, and in its deps."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())["evaluate"]
    deps = [str(d) for d in stages()["evaluate"]["deps"]]
    for path in [params["bokeh_dir"], *params["curves"]]:
        assert (REPO / path).resolve().is_relative_to(REPO), f"evaluate reads {path}, outside the repository"
        assert covered(path, deps), f"dvc.yaml: evaluate reads {path} but does not list it in its deps"
    assert len(list((REPO / params["bokeh_dir"]).glob("*.png"))) >= params["bokeh_limit"]


def test_every_stage_but_the_persisted_bench_can_come_back_from_dvcs_run_cache() -> None:
    # DVC's run cache skips a stage with a persisted output or an uncached output that is neither a metric
    # nor a plot (dvc.stage.Stage.run); without it an experiment variant that goes back to an earlier
    # configuration re-trains the stage instead of restoring it.
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        blocked = {stage.name: [o.def_path for o in stage.outs
                                if o.persist or not (o.use_cache or o.is_metric or o.is_plot)]
                   for stage in repo.index.stages}
    assert {name: paths for name, paths in blocked.items() if paths} == {"bench": ["data/bench"]}
