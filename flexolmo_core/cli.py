"""`flexolmo` command line. Each command group lives in `flexolmo_core/commands/<group>.py` and
exposes `register(subparsers)`; add a group by listing its module here."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "flexolmo_core.commands.core",
    "flexolmo_core.commands.train",
    "flexolmo_core.commands.data",
    "flexolmo_core.commands.registry",
    "flexolmo_core.commands.evaluate",
)


class UserError(Exception):
    """An error caused by input the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexolmo",
        description="FlexOlmo: train experts apart on closed data, merge them without joint training, opt out at inference.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (UserError, FileNotFoundError, ValueError) as err:
        print(f"flexolmo {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
