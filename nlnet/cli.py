"""The ``nlnet`` command line: argument parsing only; every command calls the Python API.

Each command is one ``_cmd_<name>(subparsers)`` function that declares its arguments and sets ``func``,
the API call it makes. Heavy imports happen inside ``func`` so that ``nlnet --help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlnet", description="Non-local Neural Networks (Wang et al., CVPR 2018)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, value in sorted(globals().items()):
        if name.startswith("_cmd_") and callable(value):
            value(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
