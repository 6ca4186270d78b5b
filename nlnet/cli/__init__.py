"""The ``nlnet`` command line: argument parsing only; every command calls the Python API.

Each command has an ``_add_<name>`` function that declares its arguments and a ``_<name>`` function, the API
call it makes (``set_defaults(func=...)``); :func:`_build_parser` registers them. Heavy imports happen inside
the command functions so that ``nlnet --help`` stays instant.

Bad input (a missing file, an unknown recipe name, an invalid key or value) ends in one line on stderr and exit
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nlnet.cli.data import _add_data
from nlnet.cli.detect import _add_detect
from nlnet.cli.video import (
    _add_ablate,
    _add_convert,
    _add_demo,
    _add_info,
    _add_predict,
    _add_test,
    _add_train,
)
from nlnet.cli.visualize import _add_visualize

# What bad input raises across nlnet (missing files, recipe validation, unknown names): the message is the
# error report. Anything else is a bug and keeps its traceback.
_USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError, KeyError)

_COMMANDS = (
    _add_train,
    _add_test,
    _add_predict,
    _add_detect,
    _add_info,
    _add_convert,
    _add_visualize,
    _add_demo,
    _add_ablate,
    _add_data,
)


def _build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before and after the command name; SUPPRESS keeps a subcommand's absent flag from
    # resetting one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    parser = argparse.ArgumentParser(prog="nlnet", description="Non-local Neural Networks (Wang et al., CVPR 2018)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(subparsers, common)
    return parser


def _one_line(err: BaseException) -> str:
    # str(KeyError) is the repr of its key; its argument is the message.
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return "; ".join(line.strip() for line in message.splitlines() if line.strip()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; bad input prints ``nlnet COMMAND: error: ...`` on stderr and returns 2."""
    args = _build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _USER_ERRORS as err:
        if args.debug:
            raise
        command = " ".join(
            filter(None, (args.command, getattr(args, "detect_command", None), getattr(args, "data_command", None)))
        )
        print(f"nlnet {command}: error: {_one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 2
