"""Profiles: ``configs/NAME.yaml`` merged over ``params.yaml`` (comments and order kept).

``params.yaml`` is the embedded default that runs on a laptop CPU. A profile file holds only the
values that differ (``configs/paper.yaml``: Qwen2.5-VL-7B, DeepSpeed ZeRO-3, 8 GPUs, paper-size
data). Switching is one command, after which ``dvc params diff`` shows exactly what changed::

    qprobe profile paper        # merge configs/paper.yaml into params.yaml
    git checkout params.yaml    # back to the embedded default
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from qprobe.config import ConfigError, check_sections, command_parser, repo_root
from qprobe.io import atomic_path


def _merge(base: CommentedMap, overlay: dict[str, Any], where: str) -> int:
    changed = 0
    for key, value in overlay.items():
        if isinstance(value, dict):
            if key not in base or not isinstance(base[key], dict):
                base[key] = CommentedMap()
            changed += _merge(base[key], value, f"{where}.{key}")
        elif base.get(key) != value:
            base[key] = value
            changed += 1
    return changed


def available_profiles(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "configs").glob("*.yaml"))


def _set(params: CommentedMap, key: str, value: Any) -> int:
    *sections, last = key.split(".")
    node = params
    for section in sections:
        if not isinstance(node.get(section), dict):
            node[section] = CommentedMap()
        node = node[section]
    if node.get(last) == value:
        return 0
    node[last] = value
    return 1


def _edit_params(root: str | Path | None, edit: Callable[[CommentedMap], int]) -> int:
    """Apply ``edit`` to ``params.yaml`` in place, comments and order kept; returns what ``edit`` returns."""
    root = Path(root) if root else repo_root()
    yaml = YAML()
    yaml.preserve_quotes = True
    params_path = root / "params.yaml"
    params = yaml.load(params_path.read_text()) or CommentedMap()
    changed = edit(params)
    with atomic_path(params_path) as tmp, tmp.open("w") as fh:
        yaml.dump(params, fh)
    return changed


def update_params(overlay: dict[str, Any], root: str | Path | None = None, where: str = "update") -> int:
    """Merge ``overlay`` (sections of values) into ``params.yaml`` in place; returns how many values changed."""
    return _edit_params(root, lambda params: _merge(params, overlay, where))


def set_params(values: Mapping[str, Any], root: str | Path | None = None) -> int:
    """Set dotted keys (``stage3.rewards``) in ``params.yaml``, each value replacing the old one whole (a
    mapping is not merged), as ``dvc exp run -S`` does; returns how many values changed."""
    return _edit_params(root, lambda params: sum(_set(params, key, value) for key, value in values.items()))


def apply_profile(name: str, root: str | Path | None = None) -> int:
    """Merge ``configs/NAME.yaml`` into ``params.yaml``; returns how many values changed."""
    root = Path(root) if root else repo_root()
    profile = root / "configs" / f"{name}.yaml"
    if not profile.is_file():
        raise ConfigError(f"{profile}: no such profile (available: {', '.join(available_profiles(root)) or 'none'})")
    overlay = YAML().load(profile.read_text()) or {}
    if not isinstance(overlay, dict):
        raise ConfigError(f"{profile}: expected a mapping of sections")
    check_sections(overlay, profile)
    return update_params(overlay, root, name)


def main(argv: Sequence[str] | None = None) -> int:
    """``qprobe profile NAME``: merge ``configs/NAME.yaml`` into ``params.yaml``."""
    parser = command_parser("qprobe profile", __doc__)
    parser.add_argument("name", help="profile name: a file configs/NAME.yaml")
    args = parser.parse_args(argv)
    changed = apply_profile(args.name)
    print(f"params.yaml: {changed} values set from configs/{args.name}.yaml; `dvc params diff` shows them, "
          "`git checkout params.yaml` restores the embedded default")
    return 0
