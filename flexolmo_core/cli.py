"""`flexolmo` command line. Each command group lives in `flexolmo_core/commands/<group>.py` and
exposes `register(subparsers)`; add a group by listing its module here."""
from __future__ import annotations

import importlib
import sys

from .cli_config import FlexParser, build_parser_for

COMMAND_MODULES = (
    "flexolmo_core.commands.core",
    "flexolmo_core.commands.package",
    "flexolmo_core.commands.train",
    "flexolmo_core.commands.data",
    "flexolmo_core.commands.registry",
    "flexolmo_core.commands.evaluate",
)


class UserError(Exception):
    """An error caused by input the user can fix; printed without a traceback."""


def _build():
    parser = FlexParser(
        prog="flexolmo",
        description="FlexOlmo: train experts apart on closed data, merge them without joint training, opt out at inference.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def build_parser(argv: list[str] | None = None):
    """The whole command tree; stage flags default to what `argv`'s --params gives (see cli_config)."""
    return build_parser_for(list(sys.argv[1:] if argv is None else argv), _build)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        result = args.func(args)
    except (UserError, FileNotFoundError, ValueError) as err:
        print(f"flexolmo {' '.join(argv[:1])}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
