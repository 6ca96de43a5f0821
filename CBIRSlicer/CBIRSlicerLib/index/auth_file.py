"""A server's credentials read from an auth file (JSON ``{"token": ...}`` or ``{"user": ..., "password": ...}``).

One reader for every server the index talks to (a DICOMweb PACS, a Milvus server), so that each gets the same guards:
an unreadable file, a file that is not JSON (or JSON nested too deep to parse), or one without credentials is one line
naming the file, and a secret is never echoed.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from ..errors import InputError

KEYS = ("token", "user", "password")


def read_auth_file(path: str, check: Callable[[object, str, str], str]) -> dict[str, str]:
    """{'token': ...} or {'user': ..., 'password': ...} from the file; ``check(value, path, key)`` gives each value as the
    server's client can carry it (or refuses it without showing it)."""
    try:
        with open(path, encoding="utf-8") as handle:
            found = json.load(handle)
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror})") from None
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise InputError(path, 'is not JSON; write {"token": "..."} or {"user": "...", "password": "..."}') from None
    if not isinstance(found, dict) or not (found.get("token") or (found.get("user") and "password" in found)):
        raise InputError(path, 'holds neither "token" nor "user" and "password"')
    return {key: check(found[key], path, key) for key in KEYS if key in found}
