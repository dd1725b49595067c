"""The errors a user can fix, and the one reader of JSON files that names the file and field it refuses.

Every check on user input raises a `FlexError`; the CLI's one handler (`cli.main`) prints it as one line and
exits 2. Anything else that escapes a command is a bug in our code and is shown with its traceback.
`InputError` is also a ValueError and `MissingInput` a FileNotFoundError, so library callers can keep
catching the builtin types."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class FlexError(Exception):
    """Caused by input the user can fix; the message names the file or field and what was expected."""


class InputError(FlexError, ValueError):
    """A file, field or argument that is not what it must be."""


class PackageError(InputError):
    """An expert package that must not be used; the message names the file and the problem."""


class MissingInput(FlexError, FileNotFoundError):
    """A file or folder that a command needs and that is not there."""


class OutputExists(FlexError, FileExistsError):
    """An output folder holds something this command did not write; --force replaces it."""


def read_json(path: str | os.PathLike, expect: type = dict, what: str = "") -> Any:
    """Parse a JSON file whose top level must be `expect`; every failure names the file."""
    path = Path(path)
    label = f" ({what})" if what else ""
    if not path.is_file():
        raise MissingInput(f"{path}: missing{label}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON{label}: {err}") from None
    if not isinstance(value, expect):
        raise InputError(f"{path}: expected a JSON {_kind(expect)} at the top level{label}, got {_kind(type(value))}")
    return value


def require(obj: dict, key: str, expect: type | tuple[type, ...], where: str | os.PathLike) -> Any:
    """obj[key], which must exist and be of type `expect`; `where` names the file (and record) for the message."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {_kind(type(obj))}")
    if key not in obj:
        raise InputError(f"{where}: missing field '{key}'")
    value = obj[key]
    kinds = expect if isinstance(expect, tuple) else (expect,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise InputError(f"{where}: field '{key}' must be a {' or '.join(map(_kind, kinds))}, got {value!r:.60}")
    return value


def _kind(t: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean",
            type(None): "null"}.get(t, t.__name__)
