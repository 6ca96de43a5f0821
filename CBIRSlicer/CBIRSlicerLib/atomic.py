"""Files written whole or not at all: written to a temporary file beside the target, flushed to disk, then renamed.

A crash or an error mid-write leaves the old file (or none), never half of one; the temporary file is removed when the
write fails. Every file the library writes in place goes through here: manifests, vector stores, transforms, saved
searches, CSV exports, scenes, the patient-key file.
"""

from __future__ import annotations

import errno
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
    except OSError as error:  # a full disk, a folder that went away: said of the file asked for, not the temporary one
        raise unwritable(path, error) from None
    except RuntimeError as error:
        if "write error" not in str(error) and "No space left" not in str(error):
            raise
        raise unwritable(path, error) from None  # FAISS says a failed write as a RuntimeError of several lines
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def unwritable(path: str, error: Exception) -> OSError:
    """The error of a file that could not be written: an OSError naming it, the reason in a few words, and that the
    previous version (if any) is kept."""
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error)
    if full:
        reason = os.strerror(errno.ENOSPC)
    elif isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1][-200:]
    number = errno.ENOSPC if full else getattr(error, "errno", None) or errno.EIO
    return OSError(number, f"cannot be written ({reason}); the previous version is kept", path)


def write_json_atomically(path: str, data: object) -> None:
    """JSON (indented by one, no NaN) written whole or not at all."""
    with replaced(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, allow_nan=False)
