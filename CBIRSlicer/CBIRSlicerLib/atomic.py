"""Files written whole or not at all: written to a temporary file beside the target, flushed to disk, then renamed.

A crash or an error mid-write leaves the old file (or none), never half of one; the temporary file is removed when the
write fails. Every file the library writes in place goes through here: manifests, vector stores, transforms, saved
searches, CSV exports, scenes, the patient-key file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def replaced(path: str, exclusive: bool = False) -> Iterator[str]:
    """A temporary path beside ``path`` to write to; when the block ends, the file is synced and renamed over ``path``.

    ``exclusive``: the file is put in place only if ``path`` does not exist yet (a hard link; another process's file,
    made first, wins and is kept). If the block raises, nothing is put in place.
    """
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        if exclusive:
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass
        else:
            os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json_atomically(path: str, data: object) -> None:
    """JSON (indented by one, no NaN) written whole or not at all."""
    with replaced(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, allow_nan=False)
