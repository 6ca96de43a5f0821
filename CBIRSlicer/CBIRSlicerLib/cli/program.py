"""The ``cbir`` program: one parser made of the command modules' own, and the entry point.

Each command module (:mod:`volumes`, :mod:`index`, :mod:`search`, :mod:`evaluate`, :mod:`models`, :mod:`keep`) registers
its parsers with ``register(commands)`` and sets ``run`` on them. Errors of our own hierarchy become one line on stderr
and exit code 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from ..errors import CBIRError
from . import evaluate, index, keep, models, search, volumes
from .common import Parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every ``cbir`` command."""
    parser = Parser(prog="cbir", description="Content-based image retrieval for radiology volumes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (volumes, index, search, evaluate, models, keep):  # the order of 'cbir --help'
        command.register(commands)
    return parser


# Options whose value is a list of numbers that may start with a minus sign ('--roi-ras -9,-7,34,30,30,30').
NUMBER_LIST_OPTIONS = ("--roi-ras", "--slice-ras")
_NEGATIVE_LIST = re.compile(r"^-\s*(\d|\.\d|nan|inf)", re.IGNORECASE)


def join_negative_values(argv: list[str]) -> list[str]:
    """'--roi-ras -9,...' as '--roi-ras=-9,...': argparse would take a value starting with '-' for an option."""
    joined, n = [], 0
    while n < len(argv):
        if argv[n] in NUMBER_LIST_OPTIONS and n + 1 < len(argv) and _NEGATIVE_LIST.match(argv[n + 1]):
            joined.append(f"{argv[n]}={argv[n + 1]}")
            n += 2
        else:
            joined.append(argv[n])
            n += 1
    return joined


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A library's warning as one line on the terminal (Python's own form adds the source line below it)."""
    text = " ".join(str(message).split()) or category.__name__
    return f"cbir: warning: {text} ({category.__name__}, {os.path.basename(filename)}:{lineno})\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cbir`` console script."""
    import sqlite3
    import warnings

    warnings.formatwarning = one_line_warning
    parser = build_parser()
    args = parser.parse_args(join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    try:
        return args.run(args)
    except CBIRError as error:
        print(f"cbir: error: {error}", file=sys.stderr)
        return 1
    except sqlite3.DatabaseError as error:  # a catalog damaged past what opening it checks, or one that cannot be written
        where = f"{os.path.join(os.path.abspath(args.index), 'catalog.sqlite')}: " if getattr(args, "index", None) else ""
        code = getattr(error, "sqlite_errorcode", None)
        advice = {sqlite3.SQLITE_FULL: "free space on its disk", sqlite3.SQLITE_BUSY: "let the other process finish",
                  sqlite3.SQLITE_READONLY: "write to a copy you may write", sqlite3.SQLITE_CANTOPEN: "check the folder's permissions",
                  sqlite3.SQLITE_IOERR: "check the disk or the share"}.get(code) if code is not None else None
        if advice or "disk is full" in str(error):
            # Not damage: SQLite rolled the change back; what was committed before is whole.
            print(f"cbir: error: {where}cannot be used now ({error}); the index is not damaged and nothing committed was lost: "
                  f"{advice or 'free space on its disk'}, then run the command again", file=sys.stderr)
            return 1
        print(f"cbir: error: {where}cannot be read ({error}); the index is damaged: see 'cbir index verify', "
              "then 'cbir index repair'", file=sys.stderr)
        return 1
    except OSError as error:  # disk full, permission denied: the user can act on these
        named = error.filename or getattr(args, "index", None) or getattr(args, "out", None)
        print(f"cbir: error: {f'{named}: ' if named else ''}{error.strerror or error}", file=sys.stderr)
        return 1
