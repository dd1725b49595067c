"""`flexolmo` command line. Each command group lives in `flexolmo_core/cli/commands/<group>.py` and
exposes `register(subparsers)`; add a group by listing its module here."""
from __future__ import annotations

import contextlib
import importlib
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version

from flexolmo_core.cli.config import FlexParser, ParamsChoice, parse
from flexolmo_core.errors import FlexError
from flexolmo_core.io.atomic import replacing_allowed

COMMAND_MODULES = (
    "flexolmo_core.cli.commands.core",
    "flexolmo_core.cli.commands.package",
    "flexolmo_core.cli.commands.train",
    "flexolmo_core.cli.commands.data",
    "flexolmo_core.cli.commands.registry",
    "flexolmo_core.cli.commands.evaluate",
    "flexolmo_core.cli.commands.serve",
    "flexolmo_core.cli.commands.audit",
)


def build_parser(params: ParamsChoice = ParamsChoice()) -> FlexParser:
    """The whole command tree; stage flags default to what `params` loads (see cli/config.py)."""
    parser = FlexParser(
        prog="flexolmo", params=params,
        description="FlexOlmo: train experts apart on closed data, merge them without joint training, opt out at inference.",
    )
    parser.add_argument("--version", action="version", version=f"flexolmo {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _version() -> str:
    try:
        return version("flexolmo")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "(not installed)"


def parse_args(argv: list[str]):
    """`argv` parsed, with the running command's defaults from its --params."""
    return parse(build_parser, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def command():
        args = parse_args(argv)
        with replacing_allowed() if getattr(args, "force", False) else contextlib.nullcontext():
            return args.func(args)

    return guarded(f"flexolmo {' '.join(argv[:1])}: error:", command)


def guarded(prefix: str, command) -> int:
    """The one error handler (the CLI and every stage process): input errors (FlexError) and the operating
    system's refusals (a missing or unreadable file, a read-only folder, a full disk) are one line and exit 2;
    anything else is a bug in our code, shown with its traceback and exit 70."""
    try:
        result = command()
    except FlexError as err:
        print(f"{prefix} {err}", file=sys.stderr)
        return 2
    except OSError as err:
        where = f"{err.filename}: " if err.filename and str(err.filename) not in str(err.strerror or err) else ""
        print(f"{prefix} {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix} interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - the one place that decides how a bug is shown
        traceback.print_exc()
        print(f"{prefix} internal error: this is a bug in flexolmo, not in your input; "
              "please report it with the traceback above", file=sys.stderr)
        return 70
    return result if isinstance(result, int) else 0

if __name__ == "__main__":
    sys.exit(main())
