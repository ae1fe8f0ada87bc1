"""Typed parameters: dataclasses filled from a section of ``params.yaml`` and the command line.

Every stage declares its knobs as a dataclass whose fields carry help text in
``field(metadata={"help": ...})``. :func:`parse_config` builds the stage's argument parser from that
dataclass, takes defaults from the stage's section of ``params.yaml`` (what ``dvc repro`` runs),
lets command-line flags override them, and validates types. A field whose metadata names a
``section`` (the protocol's limits, :mod:`qprobe.agent.protocol_config`) is a dataclass shared by
several stages: it is filled from that section, never from the stage's own, and each of its fields
gets a flag of its own (``--max-crops``). Any mistake is one line naming the file
or flag, the field, what was expected and what was found: :class:`ConfigError`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from qprobe.errors import QProbeError

T = TypeVar("T")

PARAMS_FILE = "params.yaml"
# Every top-level section some stage or flow reads (``parse_config(..., SECTION)``, flows/retrain.py).
# Anything else in a parameter file is a misspelling that would silently run built-in defaults.
SECTIONS = ("bench", "protocol", "model", "trajectories", "score", "evaluate", "stage1", "stage2", "stage3", "retrain",
            "data_import")


class ConfigError(QProbeError, ValueError):
    """A parameter file or flag that does not fit its dataclass."""


def check_sections(data: Mapping[str, Any], path: str | Path, known: Collection[str] = SECTIONS) -> None:
    """A top-level key outside ``known`` is :class:`ConfigError` naming the closest known section."""
    for name in data:
        if name not in known:
            close = difflib.get_close_matches(str(name), sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(sorted(known))}"
            raise ConfigError(f"{path}: unknown section {name!r} ({hint})")


def load_params(path: str | Path = PARAMS_FILE, known: Collection[str] = SECTIONS) -> dict[str, Any]:
    """The sections of a parameter file; a section outside ``known`` is an error (see :func:`check_sections`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found (run from the repository root or pass --params)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    check_sections(data, path, known)
    return data


def _optional_inner(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only where no information is lost."""
    inner, optional = _optional_inner(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got null")
    tp = inner
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where 1e-5 (no dot) is a string, not a float.
            with contextlib.suppress(ValueError):
                return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        args = typing.get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key {unknown[0]!r} (expected one of: {', '.join(sorted(fields))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc
    return obj


def _parse_flag(text: str, tp: Any, flag: str) -> Any:
    """Parse a command-line string as YAML (so lists and numbers work), then type-check it."""
    inner, optional = _optional_inner(tp)
    if optional and text.lower() in ("null", "none", "~"):
        return None
    if inner is str:
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{flag}: cannot parse {text!r}") from exc
    return _coerce(value, tp, flag)


def _is_sequence(tp: Any) -> bool:
    """Whether ``tp`` (or the type inside its Optional) is a list or a tuple: a flag that takes several values."""
    return typing.get_origin(_optional_inner(tp)[0]) in (list, tuple)


def _parse_values(values: list[str], tp: Any, flag: str) -> Any:
    """The values after a sequence flag (``--types blur noise``), or one YAML list (``--types '[blur, noise]'``)."""
    if len(values) == 1 and values[0].lstrip().startswith("["):
        return _parse_flag(values[0], tp, flag)
    inner, optional = _optional_inner(tp)
    if optional and len(values) == 1 and values[0].lower() in ("null", "none", "~"):
        return None
    items = [a for a in typing.get_args(inner) if a is not Ellipsis]  # list[T]: (T,); tuple[A, B]: (A, B)
    parsed = []
    for i, text in enumerate(values):
        item = items[min(i, len(items) - 1)] if items else Any
        try:
            parsed.append(text if item is str else yaml.safe_load(text))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{flag}: cannot parse {text!r}") from exc
    return _coerce(parsed, tp, flag)


# The groups a stage's options are shown in by ``--help``, in this order. A field names its group in its
# metadata (``group``); a config class names those of the fields it inherits (trl's) in ``METADATA``. A
# class whose fields name groups shows only those under ``--help``, the rest under ``--help-all``.
GROUPS = {
    "data": "data: what it reads and writes",
    "model": "model: where it starts, what trains, precision and device",
    "reward": "reward: the rollouts and what they earn",
    "tool": "tool: the protocol's limits (the `protocol:` section, one value for every stage)",
    "schedule": "schedule: batches, steps, learning rate, checkpoints and logging",
}
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`([^`]*)`")  # Sphinx roles: :class:`~a.B`, :ref:`text <target>`
_HF_LINK = re.compile(r"\[`([^`]*)`\]")  # Hugging Face docstring links: [`~transformers.Trainer`]


def _role_text(target: str) -> str:
    """What Sphinx shows for a role's target: ``text <target>`` its text, ``~a.b.C`` the last name only."""
    target = re.sub(r"\s*<[^>]*>$", "", target)
    return target.rsplit(".", 1)[-1] if target.startswith("~") else target


def plain_text(text: str) -> str:
    """``text`` (a docstring or a field's help) with its reStructuredText markup turned into plain text:
    roles and Hugging Face links become their names in backticks, ````code```` becomes ```code```."""
    text = _ROLE.sub(lambda m: f"`{_role_text(m.group(1))}`", text)
    text = _HF_LINK.sub(lambda m: f"`{_role_text(m.group(1))}`", text)
    text = text.replace("``", "`")
    return re.sub(r"(\S)::$", r"\1:", text, flags=re.MULTILINE)  # "Run it::" introduces a literal block


def _flags(cls: type, inherited: Mapping[str, Any] | None = None,
           ) -> list[tuple[dataclasses.Field[Any], Any, dict[str, Any]]]:
    """Each field of ``cls`` that gets a flag, with its type and metadata (the field's, then what the
    class's ``METADATA`` says of it); a field filled from another section gives its dataclass's fields,
    in its own group."""
    hints = typing.get_type_hints(cls)
    overrides: Mapping[str, Mapping[str, Any]] = getattr(cls, "METADATA", {})
    found: list[tuple[dataclasses.Field[Any], Any, dict[str, Any]]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = {**(inherited or {}), **f.metadata, **overrides.get(f.name, {})}
        if "section" in f.metadata:
            found += _flags(hints[f.name], {"group": meta["group"]} if "group" in meta else None)
        else:
            found.append((f, hints[f.name], meta))
    # The class's own fields first, then those it inherits and gives a group (a trl field in a stage's group).
    return sorted(found, key=lambda spec: spec[0].name in overrides)


def flag_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """The fields of ``cls`` that get a flag, with their types: its own, and in place of a field filled
    from another section, that section's dataclass's fields."""
    return [(f, tp) for f, tp, _ in _flags(cls)]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _shown(value: Any, limit: int = 60) -> str:
    """A value as the command line (lists: space-separated) or params.yaml (mappings) spells it."""
    if isinstance(value, bool) or value is None:
        text = {True: "true", False: "false", None: "null"}[value]
    elif isinstance(value, list | tuple):
        text = " ".join(_shown(v) for v in value) if value else "[]"
    elif isinstance(value, dict):
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    elif value == "":
        text = '""'
    else:
        text = str(getattr(value, "value", value))  # an enum: its value
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _FullHelp(argparse.Action):
    """``--help-all``: print the parser ``full()`` builds (every option, the whole description) and exit."""

    def __init__(self, option_strings: Sequence[str], dest: str, full: Any, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)
        self.full = full

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        self.full().print_help()
        parser.exit()


def command_parser(prog: str, description: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """An argparse parser for a command whose ``--help`` shows ``description`` (a docstring) as plain text
    (:func:`plain_text`), its paragraphs and examples laid out as written; ``kwargs`` go to argparse."""
    return argparse.ArgumentParser(prog=prog, description=plain_text(inspect.cleandoc(description or "")),
                                   formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def build_parser(cls: type, prog: str, description: str | None = None, in_force: Mapping[str, Any] | None = None,
                 source: str = PARAMS_FILE, full: bool = False) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag-name`` per field of ``cls``.

    Each flag's help is its field's (plain text) and the value it takes when not given: ``in_force`` (what
    the parameter file ``source`` sets) or the field's default. When fields name groups (:data:`GROUPS`)
    the help shows those groups and the description's first paragraph; ``--help-all`` (``full``) adds the
    whole description and the other fields (trl's), which are accepted either way.
    """
    specs = _flags(cls)
    in_force = in_force or {}
    grouped = any("group" in meta for _, _, meta in specs)
    text = plain_text(inspect.cleandoc(description or ""))
    hidden = sum("group" not in meta for _, _, meta in specs) if grouped and not full else 0
    parser = command_parser(
        prog, text if full or not grouped else text.split("\n\n")[0], usage="%(prog)s [options]" if grouped else None,
        epilog=f"--help-all: the full description and {hidden} more options (trl's)" if hidden else None)
    parser.add_argument("--params", default=PARAMS_FILE, help="parameter file whose section gives the defaults")
    if grouped:
        parser.add_argument("--help-all", action=_FullHelp, help="every option, and the full description",
                            full=lambda: build_parser(cls, prog, description, in_force, source, full=True))
    sections = {name: parser.add_argument_group(title) for name, title in GROUPS.items()} if grouped else {}
    others = parser.add_argument_group("other options: trl's and transformers' trainer settings") if full else parser
    for f, tp, meta in specs:
        if grouped and meta.get("group", "") not in (*GROUPS, ""):
            raise ValueError(f"{cls.__name__}.{f.name}: unknown help group {meta['group']!r} (one of {list(GROUPS)})")
        where = f"{source}: {_shown(in_force[f.name])}" if f.name in in_force else f"default: {_shown(_default(f))}"
        # Help texts are argparse's (trl's escape their %); the value shown is not.
        help_text = plain_text(meta.get("help") or "") + " (" + where.replace("%", "%%") + ")"
        if grouped and "group" not in meta and not full:
            help_text = argparse.SUPPRESS
        group = sections[meta["group"]] if "group" in meta and grouped else others
        flag = "--" + f.name.replace("_", "-")
        if _optional_inner(tp)[0] is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif _is_sequence(tp):
            group.add_argument(flag, dest=f.name, default=None, nargs="+", metavar=f.name.upper(), help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)
    return parser


def _flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags given for the fields of ``cls`` (its own only), typed."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name, None)
        if raw is None or "section" in f.metadata:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(raw, list):
            values[f.name] = _parse_values(raw, hints[f.name], flag)
        else:
            values[f.name] = raw if isinstance(raw, bool) else _parse_flag(raw, hints[f.name], flag)
    return values


def _shared_section(params: Mapping[str, Any], base: Mapping[str, Any], f: dataclasses.Field[Any], tp: type,
                    args: argparse.Namespace, where: str, params_path: Path) -> Any:
    """The dataclass ``tp`` of field ``f``, filled from the section its metadata names, then the flags.

    The stage's own section may not set it or any of its fields: a value set there would be a second
    home of a fact that has one.
    """
    name = f.metadata["section"]
    own = sorted(set(base) & {f.name, *(g.name for g in dataclasses.fields(tp))})
    if own:
        raise ConfigError(f"{where}: {own[0]!r} is set once for every stage, in the {name!r} section")
    values = params.get(name) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{params_path}: section {name!r} must be a mapping")
    return from_dict(tp, {**values, **_flag_values(args, tp)}, f"{params_path}:{name}")


def _in_force(cls: type, params: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The flags' values that the parameter file sets: the stage's section, and the shared sections."""
    values = dict(base)
    for f in dataclasses.fields(cls):
        if "section" in f.metadata and isinstance(params.get(f.metadata["section"]), dict):
            values.update(params[f.metadata["section"]])
    return values


def parse_config(
    cls: type[T],
    section: str | None,
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> T:
    """Defaults from ``params.yaml[section]`` (when the file exists), overridden by flags in ``argv``.

    A missing ``params.yaml`` is fine when the caller passes everything on the command line; an
    explicitly named ``--params`` file must exist.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--params", default=PARAMS_FILE)
    named = pre.parse_known_args(argv)[0].params
    params_path = Path(named)
    params: dict[str, Any] = {}
    base: dict[str, Any] = {}
    if section is not None and (params_path.is_file() or named != PARAMS_FILE):
        # The section asked for is read by definition, even one outside SECTIONS.
        params = load_params(params_path, {*SECTIONS, section})
        base = params.get(section) or {}
        if not isinstance(base, dict):
            raise ConfigError(f"{params_path}: section {section!r} must be a mapping")
        base = dict(base)
    parser = build_parser(cls, prog or f"qprobe {section}", description, _in_force(cls, params, base),
                          str(params_path))
    args = parser.parse_args(argv)
    where = f"{params_path}:{section}" if section else cls.__name__
    hints = typing.get_type_hints(cls)
    shared = {f.name: _shared_section(params, base, f, hints[f.name], args, where, params_path)
              for f in dataclasses.fields(cls) if f.init and "section" in f.metadata}
    given = _flag_values(args, cls)
    if "out" in given and "metrics" not in given and "metrics" in {f.name for f in dataclasses.fields(cls)}:
        # An output sent elsewhere takes its metrics along: metrics/*.json are the pipeline's (DVC's),
        # and an ad-hoc run must leave `dvc status` as it was.
        given["metrics"] = metrics_beside(given["out"])
    return from_dict(cls, {**base, **given, **shared}, where)


def metrics_beside(out: str | Path) -> str:
    """Where a command given ``--out OUT`` (and no ``--metrics``) writes its metrics: ``OUT.metrics.json``."""
    out = Path(out)
    return str(out.with_name(out.name + ".metrics.json"))


def to_flat_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a dataclass or a mapping (dataclasses inside it too) into ``{"a.b": value}`` for MLflow params."""
    out: dict[str, Any] = {}
    items = dataclasses.asdict(obj).items() if dataclasses.is_dataclass(obj) else obj.items()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            out.update(to_flat_dict(value, prefix=name + "."))
        else:
            out[name] = value
    return out


def repo_root() -> Path:
    """The repository root: ``QPROBE_ROOT`` if set, else the nearest parent holding ``dvc.yaml``."""
    env = os.environ.get("QPROBE_ROOT")
    if env:
        return Path(env)
    here = Path.cwd()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file():
            return candidate
    return here
