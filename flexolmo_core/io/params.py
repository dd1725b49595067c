"""Load one stage's config dataclass from its `params.yaml` section, with errors that name the file and field."""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from flexolmo_core.errors import InputError

T = TypeVar("T")


class ParamsError(InputError):
    pass


def at_least(low: float, default: Any) -> Any:
    """A dataclass field whose value (when not None) must be >= `low`; `check_ranges` enforces it."""
    return dataclasses.field(default=default, metadata={"min": low})


def between(low: float, high: float, default: Any) -> Any:
    """A dataclass field whose value (when not None) must lie in [low, high]; `check_ranges` enforces it."""
    return dataclasses.field(default=default, metadata={"min": low, "max": high})


def check_ranges(config: Any, section: str) -> None:
    """Refuse out-of-range fields of a config dataclass (call it from __post_init__, so params files and
    command-line flags are checked alike, where they are parsed)."""
    for f in dataclasses.fields(config):
        low, high, value = f.metadata.get("min"), f.metadata.get("max"), getattr(config, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if low is not None and value is not None and not value >= low:
            raise ParamsError(f"{section}.{f.name} must be >= {low} ({flag}), got {value!r}")
        if high is not None and value is not None and not value <= high:
            raise ParamsError(f"{section}.{f.name} must be <= {high} ({flag}), got {value!r}")


NO_FLAG = {"cmd": False}  # dataclass field metadata: params.yaml structure, not a command-line flag


def read_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, where)
            except ParamsError:
                continue
        raise ParamsError(f"{where}: expected {annotation}, got {value!r}")
    if annotation is type(None):
        if value is None:
            return None
        raise ParamsError(f"{where}: expected null, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(annotation) or (Any,)
        items = [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):  # a nested section (expert.dp), or one already built
        return value if isinstance(value, annotation) else from_dict(annotation, value, where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ParamsError(f"{where}: expected true/false, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ParamsError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are errors naming `where.field`."""
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _check_type(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # ValueError: a dataclass's own range checks
        raise ParamsError(f"{where}: {err}") from err


def load_section(cls: type[T], section: str, path: str | os.PathLike = "params.yaml") -> T:
    """The config dataclass for one stage, e.g. `load_section(MergeConfig, "merge")`."""
    data = read_params(path)
    if section not in data:
        raise ParamsError(f"{path}: missing section '{section}'")
    return from_dict(cls, data[section] or {}, f"{path}:{section}")
