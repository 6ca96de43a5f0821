"""JSON files a user hands in (saved searches, answers, markups): read whole or refused in one line naming the file.

Python's ``json`` raises RecursionError on JSON nested a thousand deep, accepts ``NaN`` and ``Infinity`` (which JSON does
not have), and reads a file of any size into memory; each of those is a file problem here, said as such.
"""

from __future__ import annotations

import json
import os

from .errors import InputError

MAX_BYTES = 64 << 20  # the largest of these files: a saved search of 1,000 results is about 1.5 MB


def _no_constant(name: str):
    raise ValueError(f"holds {name}, which is not a JSON number")


def read_json(path: str, what: str):
    """The JSON value in a file; a missing, unreadable, oversized, non-UTF-8, malformed or too deeply nested file is one
    InputError naming it, ``what`` it should be, and the problem."""
    try:
        size = os.path.getsize(path)
        if size > MAX_BYTES:
            raise InputError(path, f"{what} of {size / 2**20:.0f} MiB is larger than any this could be ({MAX_BYTES >> 20} MiB)")
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise InputError(path, f"{what} does not exist") from None
    except UnicodeDecodeError as error:
        raise InputError(path, f"{what} is not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise InputError(path, f"{what} cannot be read ({error.strerror or error})") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise InputError(path, f"{what} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except RecursionError:
        raise InputError(path, f"{what} is not valid: its JSON is nested too deeply") from None
    except ValueError as error:  # NaN or Infinity
        raise InputError(path, f"{what} is not valid JSON: it {error}") from None
